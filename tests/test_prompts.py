"""Prompt sets: referring expressions validated against region maps, plain-task label prompts and their errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_nnunet.preprocessing.prompts import (FINDING_TEXT, PLAIN, REFERRING, PromptSet, lesion_voxels,
                                               load_prompt_set, read_prompt_set, readable_label_name, save_prompt_set)
from text_conditioning.expressions import ExpressionsError


def _write_dataset(folder: Path, labels: dict, region_maps: dict, expressions: list | None = None,
                   prompt_table: dict | None = None, **dataset_keys) -> Path:
    (folder / "labelsTr").mkdir(parents=True)
    (folder / "imagesTr").mkdir()
    for case, array in region_maps.items():
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(folder / "labelsTr" / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)),
                        str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": len(region_maps), "file_ending": ".nii.gz",
                                                     **dataset_keys}))
    if expressions is not None:
        (folder / "expressions.json").write_text(json.dumps({"format": "lsms-expressions", "version": 1,
                                                             "expressions": expressions}))
    if prompt_table is not None:
        (folder / "prompts.json").write_text(json.dumps(prompt_table))
    return folder


def _two_region_map() -> np.ndarray:
    region_map = np.zeros((8, 8), dtype=np.uint8)
    region_map[1:3, 1:3] = 1
    region_map[5:7, 5:7] = 2
    return region_map


def test_referring_prompts_are_validated_against_region_maps(tmp_path):
    expressions = [{"id": "a-e0", "case": "a", "text": "the left lesion", "targets": [1]},
                   {"id": "a-e1", "case": "a", "text": "nothing here", "targets": []}]
    folder = _write_dataset(tmp_path / "ds", {"background": 0, "region_1": 1, "region_2": 2},
                            {"a": _two_region_map()}, expressions)
    prompt_set = load_prompt_set(folder)
    assert prompt_set.mode == REFERRING
    assert [(p.targets, p.all_regions) for p in prompt_set.prompts_for_case("a")] == [((1,), False), ((), False),
                                                                                      ((), True)]
    assert prompt_set.prompts_for_case("a")[-1].texts == (FINDING_TEXT,)  # the finding prompt: every lesion
    assert prompt_set.all_texts() == ["the left lesion", "nothing here"]
    assert prompt_set.texts_to_encode() == ["the left lesion", "nothing here", FINDING_TEXT]


def test_referring_target_absent_from_region_map_is_rejected(tmp_path):
    expressions = [{"id": "a-e0", "case": "a", "text": "the third lesion", "targets": [3]}]
    folder = _write_dataset(tmp_path / "ds", {"background": 0, "region_1": 1, "region_2": 2, "region_3": 3},
                            {"a": _two_region_map()}, expressions)
    with pytest.raises(ExpressionsError, match=r"a-e0") as error:
        load_prompt_set(folder)
    assert "expressions.json" in str(error.value)


def test_plain_prompts_from_label_names(tmp_path):
    folder = _write_dataset(tmp_path / "ds", {"background": 0, "liver_tumour": 1, "HepaticVessel": 2},
                            {"a": _two_region_map()})
    prompt_set = load_prompt_set(folder)
    assert prompt_set.mode == PLAIN
    assert prompt_set.canonical_label_prompts() == [("liver_tumour", 1, "liver tumour"),
                                                    ("HepaticVessel", 2, "hepatic vessel")]
    assert [p.targets for p in prompt_set.prompts_for_case("any")] == [(1,), (2,)]


def test_plain_label_without_usable_name_needs_a_prompt_table(tmp_path):
    folder = _write_dataset(tmp_path / "ds", {"background": 0, "label_1": 1}, {"a": _two_region_map()})
    with pytest.raises(ValueError, match=r"label 'label_1' \(value 1\) has no usable name.*prompt table"):
        load_prompt_set(folder)


def test_prompt_table_supplies_phrasings_and_rejects_unknown_labels(tmp_path):
    table = {"format": "lsms-prompts", "version": 1, "labels": {"label_1": ["the tumour", "the liver lesion"]}}
    folder = _write_dataset(tmp_path / "ok", {"background": 0, "label_1": 1}, {"a": _two_region_map()},
                            prompt_table=table)
    assert load_prompt_set(folder).label_prompts == (("label_1", 1, ("the tumour", "the liver lesion")),)

    table["labels"]["kidney"] = ["the kidney"]
    folder = _write_dataset(tmp_path / "bad", {"background": 0, "label_1": 1}, {"a": _two_region_map()},
                            prompt_table=table)
    with pytest.raises(ValueError, match=r"prompts.json: labels \['kidney'\] are not foreground labels"):
        load_prompt_set(folder)


def test_prompt_table_phrasing_without_words_is_rejected(tmp_path):
    table = {"format": "lsms-prompts", "version": 1, "labels": {"label_1": ["the tumour", "\u200b\U0001F600"]}}
    folder = _write_dataset(tmp_path / "bad", {"background": 0, "label_1": 1}, {"a": _two_region_map()},
                            prompt_table=table)
    with pytest.raises(ExpressionsError, match=r"prompts.json: label 'label_1' has a phrasing .* no letter or digit"):
        load_prompt_set(folder)


def test_readable_label_names():
    assert readable_label_name("liver") == "liver"
    assert readable_label_name("left_kidney") == "left kidney"
    assert readable_label_name("region_3") is None
    assert readable_label_name("1") is None


def test_prompt_set_round_trip_and_missing_step_message(tmp_path):
    prompt_set = PromptSet(PLAIN, label_prompts=(("liver", 1, ("liver", "the liver")),))
    save_prompt_set(prompt_set, {"name": "x", "sha256": "0" * 64, "dim": 8, "max_tokens": 4}, tmp_path / "lsms_text")
    loaded, encoder = read_prompt_set(tmp_path / "lsms_text")
    assert loaded == prompt_set and encoder["dim"] == 8
    with pytest.raises(FileNotFoundError, match="LSMSv2_encode_text"):
        read_prompt_set(tmp_path / "elsewhere" / "lsms_text")


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "region_1": 1, "region_3": 3}, r"label values \[0, 1, 3\] are not consecutive"),
    ({"background": 0, "liver_tumour": 2}, r"label values \[0, 2\] are not consecutive"),
    ({"background": 0, "liver_tumour": 1.5}, r"labels \{'liver_tumour': 1.5\} are not integers"),
])
def test_non_consecutive_or_non_integer_label_values_are_rejected(tmp_path, labels, expected):
    folder = _write_dataset(tmp_path / "ds", labels, {"a": _two_region_map()})
    with pytest.raises(ExpressionsError, match=r"dataset.json: " + expected + r".*Fix: "):
        load_prompt_set(folder)


def test_float_region_map_is_diagnosed_not_reported_as_target_absent(tmp_path):
    expressions = [{"id": "a-e0", "case": "a", "text": "the left lesion", "targets": [1]}]
    folder = _write_dataset(tmp_path / "ds", {"background": 0, "region_1": 1, "region_2": 2},
                            {"a": _two_region_map()}, expressions)
    smoothed = _two_region_map().astype(np.float32) * 0.5 + 0.5 * (_two_region_map() > 0)  # 1.0 and 1.5
    sitk.WriteImage(sitk.GetImageFromArray(smoothed), str(folder / "labelsTr" / "a.nii.gz"))
    with pytest.raises(ExpressionsError, match=r"labelsTr/a.nii.gz: the label map holds 1 non-integer or negative "
                                               r"value\(s\), e.g. \[1.5\].*Fix: save it as an integer image"):
        load_prompt_set(folder)


def test_plan_and_preprocess_checks_labels_before_fingerprinting(tmp_path, monkeypatch, capsys):
    from lsms_nnunet.preprocessing import encode_text
    import nnunetv2.experiment_planning.plan_and_preprocess_entrypoints as nnunet_entrypoints

    folder = _write_dataset(tmp_path / "ds", {"background": 0, "region_2": 2}, {"a": _two_region_map()})
    monkeypatch.setattr(encode_text, "dataset_folders", lambda dataset: ("ds", folder, tmp_path / "text"))
    monkeypatch.setattr(nnunet_entrypoints, "plan_and_preprocess_entry",
                        lambda: pytest.fail("fingerprinting started before the labels were checked"))
    monkeypatch.setattr("sys.argv", ["LSMSv2_plan_and_preprocess", "-d", "1"])
    with pytest.raises(SystemExit) as exit_info:  # the command prints the expected error alone (lsms_nnunet.cli)
        encode_text.plan_and_preprocess_entry()
    assert exit_info.value.code == 1
    assert "not consecutive" in capsys.readouterr().err


def test_deeply_nested_dataset_json_names_the_file(tmp_path):
    folder = _write_dataset(tmp_path / "ds", {"background": 0, "liver_tumour": 1}, {"a": _two_region_map()})
    (folder / "dataset.json").write_text("{\"a\": " * 50_000 + "1" + "}" * 50_000)
    with pytest.raises(ExpressionsError, match=r"dataset.json nests JSON arrays/objects too deeply .* Fix: "):
        load_prompt_set(folder)


CONTEXT_LABELS = {"background": 0, "region_1": 1, "region_2": 2, "liver": 3}


def _liver_map() -> np.ndarray:
    region_map = _two_region_map()
    region_map[0:8, 0:4][region_map[0:8, 0:4] == 0] = 3  # the liver around region 1
    return region_map


def test_context_regions_are_declared_in_dataset_json_and_travel_with_the_prompt_set(tmp_path):
    expressions = [{"id": "a-e0", "case": "a", "text": "the lesion in the liver", "targets": [1]}]
    folder = _write_dataset(tmp_path / "ds", CONTEXT_LABELS, {"a": _liver_map()}, expressions,
                            lsms_context=["liver"])
    prompt_set = load_prompt_set(folder)
    assert prompt_set.context == (("liver", 3),) and prompt_set.context_ids == (3,)
    save_prompt_set(prompt_set, {"name": "enc"}, tmp_path / "text")
    assert read_prompt_set(tmp_path / "text")[0] == prompt_set
    lesions = lesion_voxels(_liver_map(), prompt_set.context_ids)
    assert np.array_equal(lesions, np.isin(_liver_map(), [1, 2]))
    from lsms_nnunet.training.variants import merged_lesion_labels
    merged = merged_lesion_labels({"labels": CONTEXT_LABELS, "lsms_context": ["liver"]})
    assert merged["labels"] == {"background": 0, "lesion": [1, 2]}  # vanilla's lesion label leaves the liver out


@pytest.mark.parametrize("context, targets, maps, message", [
    (["kidney"], [1], {"a": _liver_map()}, r"lsms_context names \['kidney'\], which are not distinct foreground "
                                           r"labels"),
    ("liver", [1], {"a": _liver_map()}, r"lsms_context is 'liver'\. Fix: list label names"),
    (["liver"], [3], {"a": _liver_map()}, r"entry 0 \(id 'a-e0'\) targets the id\(s\) of context \['liver'\]"),
    (["liver"], [1], {"a": _liver_map(), "b": _two_region_map()},
     r"the label maps of 1 case\(s\) hold none of it, e\.g\. \['b'\]"),
])
def test_bad_context_is_refused_before_training(tmp_path, context, targets, maps, message):
    expressions = [{"id": f"{case}-e0", "case": case, "text": "the lesion", "targets": targets} for case in maps]
    folder = _write_dataset(tmp_path / "ds", CONTEXT_LABELS, maps, expressions, lsms_context=context)
    with pytest.raises(ExpressionsError, match=message) as error:
        load_prompt_set(folder)
    assert "Fix:" in str(error.value)


def test_phrase_table_rewrites_travel_with_the_prompt_set_and_are_encoded(tmp_path):
    from text_conditioning.phrases import PhraseTable
    from lsms_nnunet.preprocessing.encode_text import with_phrase_variants

    expressions = [{"id": "a-e0", "case": "a", "text": "the largest cyst", "targets": [1]},
                   {"id": "a-e1", "case": "a", "text": "nothing here", "targets": []}]
    folder = _write_dataset(tmp_path / "ds", {"background": 0, "region_1": 1, "region_2": 2},
                            {"a": _two_region_map()}, expressions)
    table = PhraseTable((("largest", "biggest", "dominant"), ("cyst", "simple cyst")), ("t.json",))
    prompt_set = with_phrase_variants(load_prompt_set(folder), table, per_expression=2)
    assert dict(prompt_set.variants) == {"the largest cyst": tuple(table.variants("the largest cyst", 2))}
    rewrites = dict(prompt_set.variants)["the largest cyst"]
    assert len(rewrites) == 2 and prompt_set.prompts_for_case("a")[0].variants == rewrites
    assert prompt_set.prompts_for_case("a")[1].variants == ()
    assert prompt_set.texts_to_encode() == ["the largest cyst", "nothing here", *rewrites, FINDING_TEXT]
    assert prompt_set.variants_of(["the largest cyst"], limit=1) == [rewrites[0]]
    save_prompt_set(prompt_set, {"name": "x", "sha256": "0" * 64, "dim": 8, "max_tokens": 4}, tmp_path / "text")
    loaded = read_prompt_set(tmp_path / "text")[0]
    assert loaded == prompt_set and loaded.phrase_table_sha256 == table.sha256
    assert with_phrase_variants(load_prompt_set(folder), PhraseTable(()), 2).variants == ()
