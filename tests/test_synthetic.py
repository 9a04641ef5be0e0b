"""The synthetic referring dataset: nnU-Net-valid files, correct and unambiguous expressions, text that matters."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from lsms_nnunet.datasets import synthetic
from lsms_nnunet.datasets.synthetic import (ATTRIBUTE_KINDS, HELDOUT_SYNONYMS, KINDS, LIVER_LABEL, MAX_LESIONS,
                                            MIN_SIZE_RATIO, PLAIN_LABELS, SPACINGS, generate_case,
                                            make_synthetic_dataset, make_synthetic_entry)
from text_conditioning.expressions import load_expressions, validate_against_cases

SHAPE_2D, SHAPE_3D = (64, 64), (16, 32, 32)
CATEGORIES = {"kind", "kind_lobe", "lobe", "attribute", "plural", "size", "no_target"}
KIND_WORDS = {"cyst": ("cyst",), "hemangioma": ("hemangioma",), "hcc": ("hcc", "hepatocellular carcinoma"),
              "metastasis": ("metastasis", "metastases", "metastatic")}
SEEN_WORDS = {"kinds": KIND_WORDS, "attributes": {adjective: (adjective,) for adjective in ATTRIBUTE_KINDS},
              "second": ("second largest",), "first": ("largest", "biggest"), "last": ("smallest", "tiniest")}
# An independent reading of the held-out wording, written from the radiology meaning rather than from the generator.
HELDOUT_WORDS = {"kinds": {"cyst": ("cyst",), "hemangioma": ("vascular tumour", "haemangioma"),
                           "hcc": ("primary liver cancer", "hepatoma"), "metastasis": ("deposit",)},
                 "attributes": {"hypodense": ("hypoattenuating", "low-attenuation"),
                                "hyperdense": ("hyperattenuating", "high-attenuation"),
                                "fluid-density": ("water-attenuation",),
                                "peripherally enhancing": ("globularly", "nodular"),
                                "heterogeneous": ("inhomogeneous", "mosaic"), "encapsulated": ("capsule",),
                                "ring-enhancing": ("rim-enhancing",), "target-like": ("targetoid", "bull's-eye")},
                 "second": ("second most sizeable", "second in size"),
                 "first": ("largest", "most sizeable", "greatest"),
                 "last": ("smallest", "least voluminous", "diminutive")}


def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array and spacing in array axis order."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nnUNet_raw")
    return {
        "2d": make_synthetic_dataset(501, dim=2, num_cases=4, num_test_cases=2, seed=3, shape=SHAPE_2D, raw_root=root),
        "3d": make_synthetic_dataset(502, dim=3, num_cases=3, num_test_cases=1, seed=3, shape=SHAPE_3D, raw_root=root,
                                     organ_context=True),
        "plain": make_synthetic_dataset(503, dim=2, num_cases=4, num_test_cases=2, seed=3, shape=SHAPE_2D, plain=True,
                                        raw_root=root),
    }


@pytest.fixture(scope="module")
def many_cases() -> list[synthetic.SyntheticCase]:
    """Enough in-memory cases (default shapes) for statistics over the expressions."""
    return [generate_case(index, seed=11, dim=dim) for dim in (2, 3) for index in range(30)]


def region_maps(folder: Path) -> dict[str, np.ndarray]:
    maps = {}
    for split in ("Tr", "Ts"):
        for path in sorted((folder / f"labels{split}").glob("*.nii.gz")):
            maps[path.name[:-len(".nii.gz")]] = read_array(path)[0]
    return maps


@pytest.mark.parametrize("key, shape, dim, names", [
    ("2d", SHAPE_2D, 2, "Dataset501_SynthLiverRLS2D"),
    ("3d", SHAPE_3D, 3, "Dataset502_SynthLiverRLS3D"),
])
def test_files_and_geometry(datasets, key, shape, dim, names):
    folder = datasets[key]
    assert folder.name == names
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["file_ending"] == ".nii.gz"
    regions = {"background": 0, **{f"region_{i}": i for i in range(1, MAX_LESIONS + 1)}}
    if key == "3d":  # made with organ_context: the liver is a context region
        assert dataset_json["labels"] == {**regions, "liver": LIVER_LABEL} and dataset_json["lsms_context"] == ["liver"]
    else:
        assert dataset_json["labels"] == regions and "lsms_context" not in dataset_json
    assert "synthetic" in dataset_json["description"] and "patient's right" in dataset_json["description"]
    train_cases = [f"synliver_{index:03d}" for index in range(dataset_json["numTraining"])]
    assert sorted(path.name for path in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in train_cases]
    assert sorted(path.name for path in (folder / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in train_cases]
    test_images = sorted(path.name for path in (folder / "imagesTs").glob("*.nii.gz"))
    assert test_images and all(name.endswith("_0000.nii.gz") for name in test_images)
    assert len(list((folder / "labelsTs").glob("*.nii.gz"))) == len(test_images)
    assert (folder / "expressions.json").is_file() and (folder / "imagesTs" / "expressions.json").is_file()
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")], "staging folder left behind"
    for image_path in (folder / "imagesTr").iterdir():
        image, spacing = read_array(image_path)
        labels, label_spacing = read_array(folder / "labelsTr" / image_path.name.replace("_0000", ""))
        assert image.shape == labels.shape == shape
        assert spacing == label_spacing == SPACINGS[dim]
        assert image.dtype == np.int16
        assert image.min() < -900 and np.percentile(image, 99) > 50  # air and enhanced tissue, in HU


def test_region_ids_consecutive_and_targets_exist(datasets):
    folder = datasets["2d"]
    maps = region_maps(folder)
    for expressions_path in (folder / "expressions.json", folder / "imagesTs" / "expressions.json"):
        expressions = load_expressions(expressions_path)
        validate_against_cases(expressions, {case: np.unique(m).tolist() for case, m in maps.items()}, expressions_path)
        for expression in expressions:
            assert re.fullmatch(rf"{expression.case}-e\d+", expression.id)
            assert set(expression.targets) <= set(np.unique(maps[expression.case]).tolist()) - {0}
    for case, region_map in region_maps(datasets["3d"]).items():
        lesions = np.unique(region_map[region_map != LIVER_LABEL]).tolist()
        assert lesions == list(range(0, max(lesions) + 1)) and 2 <= max(lesions) <= MAX_LESIONS
        liver = (region_map == LIVER_LABEL) | (region_map > 0)
        assert (region_map == LIVER_LABEL).any() and ndimage.label(liver)[1] == 1  # lesions lie inside the liver


def test_regions_sidecar_describes_the_maps(datasets):
    folder = datasets["3d"]
    regions = json.loads((folder / "regions.json").read_text(encoding="utf-8"))
    assert regions["format"] == "lsms-synthetic-regions" and "patient's right" in regions["lobe_convention"]
    maps = region_maps(folder)
    assert sorted(regions["cases"]) == sorted(maps)
    for case, entry in regions["cases"].items():
        image = read_array(next(folder.glob(f"images*/{case}_0000.nii.gz")))[0]
        lesions = entry["regions"]
        assert sorted(int(region) for region in lesions) == list(range(1, int(maps[case][maps[case] != LIVER_LABEL]
                                                                              .max()) + 1))
        sizes = []
        for region, lesion in lesions.items():
            mask = maps[case] == int(region)
            assert lesion["kind"] in KINDS and lesion["lobe"] in ("right", "left")
            assert lesion["size_voxels"] == mask.sum()
            assert np.allclose(lesion["centre"], np.argwhere(mask).mean(axis=0), atol=0.01)
            assert lesion["mean_intensity"] == pytest.approx(image[mask].mean(), abs=0.06)
            sizes.append((lesion["size_rank"], lesion["size_voxels"]))
        ranked = [size for _, size in sorted(sizes)]
        assert [rank for rank, _ in sorted(sizes)] == list(range(1, len(sizes) + 1))
        assert all(larger >= MIN_SIZE_RATIO * smaller for larger, smaller in zip(ranked, ranked[1:]))
    assert {entry["split"] for entry in regions["cases"].values()} == {"train", "test"}


def test_lobe_convention_right_lobe_on_image_left(many_cases):
    centre_x = {"right": [], "left": []}
    for case in many_cases:
        width = case.image.shape[-1]
        for lesion in case.lesions:
            centre_x[lesion.lobe].append(lesion.centre[-1] / width)
    assert np.mean(centre_x["right"]) < 0.4 < np.mean(centre_x["left"])


def test_lesion_looks_match_the_attribute_words(many_cases):
    for case in many_cases:
        for lesion in case.lesions:
            if lesion.kind in ATTRIBUTE_KINDS["hypodense"]:
                assert lesion.mean_intensity < 60, (case.case_id, lesion)
            if lesion.kind in ATTRIBUTE_KINDS["hyperdense"]:
                assert lesion.mean_intensity > 60, (case.case_id, lesion)
            if lesion.kind == "cyst":
                assert lesion.mean_intensity < 25, (case.case_id, lesion)


def test_no_target_expressions_make_about_an_eighth(many_cases):
    targets = [expression.targets for case in many_cases for expression in case.expressions]
    no_target = sum(1 for target in targets if not target)
    assert 0.07 < no_target / len(targets) < 0.18
    assert all(5 <= len(case.expressions) <= 8 for case in many_cases)


@pytest.mark.parametrize("wording", ["text", "heldout_text"])
def test_expressions_are_unambiguous(many_cases, wording):
    for case in many_cases:
        texts = [getattr(expression, wording) for expression in case.expressions]
        assert len(set(texts)) == len(texts), case.case_id
        for text, expression in zip(texts, case.expressions):
            singular = re.match(r"(the|find the|segment the|show me the|which lesion) ", text) and "lesions" not in text
            if singular:
                assert len(expression.targets) <= 1, (case.case_id, text, expression.targets)


def expected_targets(text: str, lesions: tuple[synthetic.SyntheticLesion, ...], words: dict) -> tuple[int, ...]:
    """An independent reading of the phrase: filter by kind, lobe and attribute words, then apply the size word."""
    lowered = text.lower()
    matching = [lesion for lesion in lesions if
                all(any(word in lowered for word in words["kinds"][kind]) <= (lesion.kind == kind) for kind in KINDS)
                and all((f"{lobe} " in lowered or f"{lobe}-" in lowered) <= (lesion.lobe == lobe)
                        for lobe in ("right", "left"))
                and all(any(word in lowered for word in synonyms) <= (lesion.kind in ATTRIBUTE_KINDS[adjective])
                        for adjective, synonyms in words["attributes"].items())]
    matching.sort(key=lambda lesion: lesion.size_rank)
    if any(word in lowered for word in words["second"]):
        matching = matching[1:2]
    elif any(word in lowered for word in words["first"]):
        matching = matching[:1]
    elif any(word in lowered for word in words["last"]):
        matching = matching[-1:]
    return tuple(sorted(lesion.region_id for lesion in matching))


@pytest.mark.parametrize("wording, words", [("text", SEEN_WORDS), ("heldout_text", HELDOUT_WORDS)])
def test_targets_are_what_the_text_says(many_cases, wording, words):
    for case in many_cases:
        for expression in case.expressions:
            text = getattr(expression, wording)
            assert expression.targets == expected_targets(text, case.lesions, words), (case.case_id, text,
                                                                                       case.lesions)


def expected_category(text: str, targets: tuple[int, ...]) -> str:
    """The category from the seen wording alone, by the order of precedence the categories are defined with."""
    lowered = text.lower()
    if not targets:
        return "no_target"
    if any(word in lowered for word in ("largest", "biggest", "smallest", "tiniest")):
        return "size"
    if any(adjective in lowered for adjective in ATTRIBUTE_KINDS):
        return "attribute"
    names_kind = any(word in lowered for words in KIND_WORDS.values() for word in words)
    names_lobe = "lobe" in lowered
    if names_kind and names_lobe:
        return "kind_lobe"
    if names_lobe:
        return "lobe"
    if names_kind and not re.match(r"(all|every) ", lowered):
        return "kind"
    return "plural"


def test_categories_follow_the_wording(many_cases):
    found = set()
    for case in many_cases:
        for expression in case.expressions:
            assert expression.category == expected_category(expression.text, expression.targets), expression
            found.add(expression.category)
    assert found == CATEGORIES


def test_heldout_wording_is_never_a_training_wording(many_cases):
    """Held-out texts must differ from every seen text and use synonyms that no seen text contains."""
    seen = {expression.text.lower() for case in many_cases for expression in case.expressions}
    heldout = {expression.heldout_text.lower() for case in many_cases for expression in case.expressions}
    assert not seen & heldout
    synonyms = {word.lower() for table in HELDOUT_SYNONYMS.values() for words in table.values() for word in words}
    synonyms |= {"most sizeable", "least voluminous", "diminutive", "greatest", "sole", "located within",
                 "within the", "of the liver", "find", "segment", "show me", "which lesion", "each and every",
                 "lesions of the"}
    for word in sorted(synonyms):
        assert not [text for text in seen if word in text], word
    assert all(any(word in text for word in synonyms) for text in heldout)


def test_text_is_necessary(datasets):
    """A model that ignores the text can at best predict every lesion; that must score a low Dice."""
    folder = datasets["2d"]
    maps = region_maps(folder)
    dice = []
    for expression in load_expressions(folder / "expressions.json"):
        all_lesions = maps[expression.case] > 0
        target = np.isin(maps[expression.case], expression.targets)
        dice.append(2 * (all_lesions & target).sum() / (all_lesions.sum() + target.sum()))
    assert np.mean(dice) < 0.7
    assert any(not expression.targets for expression in load_expressions(folder / "expressions.json"))


def test_determinism(datasets, tmp_path):
    again = make_synthetic_dataset(501, dim=2, num_cases=4, num_test_cases=2, seed=3, shape=SHAPE_2D,
                                   raw_root=tmp_path)
    original = datasets["2d"]
    for path in sorted(original.glob("*s*/*.nii.gz")):
        assert np.array_equal(read_array(path)[0], read_array(again / path.relative_to(original))[0])
    for name in ("expressions.json", "imagesTs/expressions.json", "regions.json", "dataset.json"):
        assert (original / name).read_text(encoding="utf-8") == (again / name).read_text(encoding="utf-8")
    assert not np.array_equal(generate_case(0, seed=3, shape=SHAPE_2D).image,
                              generate_case(0, seed=4, shape=SHAPE_2D).image)


def test_refuses_to_overwrite_and_replaces_atomically(tmp_path, monkeypatch):
    first = make_synthetic_dataset(7, num_cases=1, num_test_cases=0, shape=SHAPE_2D, name="First", raw_root=tmp_path)
    with pytest.raises(FileExistsError, match=r"Dataset007_First.*--overwrite"):
        make_synthetic_dataset(7, num_cases=1, num_test_cases=0, shape=SHAPE_2D, name="Second", raw_root=tmp_path)

    real_generate_case = synthetic.generate_case

    def fail_on_second_case(case_index, *args, **kwargs):
        if case_index == 1:
            raise RuntimeError("interrupted")
        return real_generate_case(case_index, *args, **kwargs)

    monkeypatch.setattr(synthetic.writing, "generate_case", fail_on_second_case)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_synthetic_dataset(7, num_cases=2, num_test_cases=0, shape=SHAPE_2D, name="Second", overwrite=True,
                               raw_root=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # old dataset intact, no half dataset
    monkeypatch.setattr(synthetic.writing, "generate_case", real_generate_case)

    second = make_synthetic_dataset(7, num_cases=2, num_test_cases=0, shape=SHAPE_2D, name="Second", overwrite=True,
                                    raw_root=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [second.name] == ["Dataset007_Second"]
    assert len(list((second / "imagesTr").iterdir())) == 2
    assert not (second / "imagesTs").exists()


@pytest.mark.parametrize("key", ["2d", "3d", "plain"])
def test_nnunet_integrity_check_passes(datasets, key):
    verify_dataset_integrity(str(datasets[key]), num_processes=1)


def test_plain_mode_labels_are_lesion_kinds(datasets):
    plain, referring = datasets["plain"], datasets["2d"]
    dataset_json = json.loads((plain / "dataset.json").read_text(encoding="utf-8"))
    assert plain.name == "Dataset503_SynthLiverLesions2D"
    assert dataset_json["labels"] == PLAIN_LABELS == {"background": 0, "cyst": 1, "hemangioma": 2, "hcc": 3,
                                                      "metastasis": 4}
    assert not list(plain.rglob("expressions.json")) and not (plain / "regions.json").exists()
    regions = json.loads((referring / "regions.json").read_text(encoding="utf-8"))["cases"]
    for path in sorted(plain.glob("labels*/*.nii.gz")):
        relative = path.relative_to(plain)
        region_map = read_array(referring / relative)[0]
        kind_of_region = np.zeros(LIVER_LABEL + 1, dtype=np.uint8)  # the liver is background in the plain task
        for region, lesion in regions[path.name[:-len(".nii.gz")]]["regions"].items():
            kind_of_region[int(region)] = PLAIN_LABELS[lesion["kind"]]
        assert np.array_equal(read_array(path)[0], kind_of_region[region_map])
    image_path = next(plain.glob("imagesTs/*.nii.gz"))
    assert np.array_equal(read_array(image_path)[0], read_array(referring / image_path.relative_to(plain))[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset_id": 0}, "from 1 to 999"),
    ({"dataset_id": 1, "dim": 4}, "--dim 2 or --dim 3"),
    ({"dataset_id": 1, "shape": (32, 32, 32)}, "give 2 sizes"),
    ({"dataset_id": 1, "shape": (8, 64)}, ">= 16"),
    ({"dataset_id": 1, "num_cases": 0}, "--cases >= 1"),
    ({"dataset_id": 1, "name": "bad name"}, "folder-name safe"),
])
def test_bad_parameters_are_rejected_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_synthetic_dataset(raw_root=tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_too_small_image_fails_cleanly(tmp_path):
    with pytest.raises(ValueError, match=r"synliver_000.*too small.*larger --shape"):
        make_synthetic_dataset(1, num_cases=2, shape=(16, 16), raw_root=tmp_path)
    assert not list(tmp_path.iterdir())


def test_raw_root_defaults_to_nnunet_raw(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ValueError, match="export nnUNet_raw"):
        make_synthetic_dataset(9, num_cases=1, num_test_cases=0, shape=SHAPE_2D)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert make_synthetic_dataset(9, num_cases=1, num_test_cases=0, shape=SHAPE_2D).parent == tmp_path


def test_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    arguments = ["LSMSv2_make_synthetic", "-d", "12", "--dim", "3", "--cases", "2", "--test_cases", "1",
                 "--seed", "5", "--shape", *map(str, SHAPE_3D), "--name", "Tiny"]
    monkeypatch.setattr(sys, "argv", arguments)
    make_synthetic_entry()
    folder = tmp_path / "Dataset012_Tiny"
    assert str(folder) in capsys.readouterr().out
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["lsms_synthetic"] == {
        "seed": 5, "dim": 3, "shape": list(SHAPE_3D), "spacing": list(SPACINGS[3]), "mode": "referring"}
    assert read_array(folder / "imagesTs" / "synliver_002_0000.nii.gz")[0].shape == SHAPE_3D

    with pytest.raises(SystemExit) as exit_info:
        make_synthetic_entry()
    assert exit_info.value.code == 1
    assert "Dataset012_Tiny" in capsys.readouterr().err

    monkeypatch.setattr(sys, "argv", [*arguments, "--overwrite", "--plain"])
    make_synthetic_entry()
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["labels"] == PLAIN_LABELS


def test_default_files_carry_categories_and_no_heldout_phrasing(datasets):
    folder = datasets["2d"]
    for path in (folder / "expressions.json", folder / "imagesTs" / "expressions.json"):
        for expression in load_expressions(path):
            assert expression.category in CATEGORIES and expression.phrasing is None
            assert (expression.category == "no_target") == (not expression.targets)
    assert not (folder / "expressions_heldout.json").exists()
    assert "heldout_phrasing" not in json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["lsms_synthetic"]


def test_heldout_phrasing_flag_adds_reworded_test_expressions_and_training_heldout_file(datasets, tmp_path,
                                                                                        monkeypatch):
    """Training and seen test expressions stay exactly the default ones; the test cases are also asked in held-out
    wording (marked), and the training cases' held-out wordings go to the extra file."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    # --test-cases: the old spelling of --test_cases, still accepted
    monkeypatch.setattr(sys, "argv", ["LSMSv2_make_synthetic", "-d", "501", "--cases", "4", "--test-cases", "2",
                                      "--seed", "3", "--shape", *map(str, SHAPE_2D), "--heldout_phrasing"])
    make_synthetic_entry()
    folder, default = tmp_path / "Dataset501_SynthLiverRLS2D", datasets["2d"]
    assert (folder / "expressions.json").read_bytes() == (default / "expressions.json").read_bytes()
    seen = load_expressions(folder / "expressions.json")
    heldout = load_expressions(folder / "expressions_heldout.json")
    assert [(e.id + "-h", e.case, e.targets, e.category) for e in seen] == [
        (e.id, e.case, e.targets, e.category) for e in heldout]
    assert all(e.phrasing == "heldout" for e in heldout)
    assert not {e.text for e in seen} & {e.text for e in heldout}
    default_test = load_expressions(default / "imagesTs" / "expressions.json")
    test = load_expressions(folder / "imagesTs" / "expressions.json")
    reworded_test = [e for e in test if e.phrasing == "heldout"]
    assert [e for e in test if e.phrasing != "heldout"] == default_test
    assert [(e.id + "-h", e.case, e.targets, e.category) for e in default_test] == [
        (e.id, e.case, e.targets, e.category) for e in reworded_test]
    assert not {e.text for e in seen} & {e.text for e in reworded_test}
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["lsms_synthetic"]["heldout_phrasing"]


def test_varied_anatomy_moves_the_liver_so_the_image_position_does_not_tell_the_lobe():
    """--varied_anatomy: the body and its liver move and resize between cases while the lobe words stay relative to
    the liver, so a lesion's place in the image tells its lobe far less well than in the default generator."""
    def best_threshold_accuracy(varied: bool) -> float:
        """How well one threshold on a lesion's image x tells right lobe from left, over 40 cases."""
        lesions = [lesion for index in range(40)
                   for lesion in generate_case(index, seed=5, dim=2, varied_anatomy=varied).lesions]
        x = np.array([lesion.centre[-1] for lesion in lesions])
        right = np.array([lesion.lobe == "right" for lesion in lesions])
        return max(max(np.mean((x < t) == right), np.mean((x >= t) == right)) for t in np.unique(x))

    assert best_threshold_accuracy(False) > 0.97 and best_threshold_accuracy(True) < 0.9
    default, explicit = generate_case(3, seed=5, dim=2), generate_case(3, seed=5, dim=2, varied_anatomy=False)
    varied = generate_case(3, seed=5, dim=2, varied_anatomy=True)
    assert np.array_equal(default.image, explicit.image) and not np.array_equal(default.image, varied.image)
    liver_centre = [np.argwhere(case.region_map == LIVER_LABEL).mean(axis=0) for case in (default, varied)]
    assert np.abs(liver_centre[0] - liver_centre[1]).max() > 2
