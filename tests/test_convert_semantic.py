"""Semantic lesion labels -> referring dataset: components, attributes, unambiguous and no-target expressions."""
import json
import re
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_nnunet.datasets.convert_semantic import convert_semantic, convert_semantic_entry, extract_regions
from lsms_nnunet.datasets.geometry import ConversionError
from text_conditioning.expressions import load_expressions

SHAPE = (24, 32, 48)  # z, y, x
SPACING = (1.0, 1.0, 2.0)  # x, y, z in mm
# (z, y, x) start, edge length, intensity: A big hypodense (patient's right, low), B medium hyperdense (left, high),
# C small hypodense (right, middle). x grows towards the patient's left for identity direction (LPS).
BLOBS = {"A": ((4, 10, 6), 6, 40.0), "B": ((16, 12, 38), 5, 180.0), "C": ((10, 20, 18), 4, 45.0)}


def semantic_volume():
    rng = np.random.default_rng(0)
    label = np.zeros(SHAPE, np.uint8)
    label[2:22, 4:30, 2:46] = 1
    image = rng.normal(-50, 5, SHAPE)
    image[label == 1] = rng.normal(100, 10, int((label == 1).sum()))
    for (z, y, x), edge, value in BLOBS.values():
        label[z:z + edge, y:y + edge, x:x + edge] = 2
        image[z:z + edge, y:y + edge, x:x + edge] = value
    label[20, 26, 30:32] = 2  # a 2-voxel speck: below min_lesion_voxels
    return image.astype(np.float32), label


def write_volume(array, path, flip_x=False):
    if flip_x:
        array = array[:, :, ::-1]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(SPACING)
    origin_x = (SHAPE[2] - 1) * SPACING[0] if flip_x else 0.0
    image.SetOrigin((origin_x, -20.0, 30.0))
    image.SetDirection((-1.0 if flip_x else 1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(path))


def make_nnunet_source(folder, cases=("liver_001", "liver_002"), flip_x=False):
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    image, label = semantic_volume()
    for case in cases:
        write_volume(image, folder / "imagesTr" / f"{case}_0000.nii.gz", flip_x)
        write_volume(label, folder / "labelsTr" / f"{case}.nii.gz", flip_x)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return folder


def texts_to_targets(expressions, case):
    return {e.text: e.targets for e in expressions if e.case == case}


def targets_of(by_text, *alternatives):
    found = [by_text[text] for text in alternatives if text in by_text]
    assert found, f"none of {alternatives} in {sorted(by_text)}"
    return found[0]


def nouns(template):
    return [template.format(noun=noun, nouns=noun + "s") for noun in ("lesion", "tumour")]


def expected_category(text, targets):
    """The report category read off the wording, in the precedence the converter documents."""
    if not targets:
        return "no_target"
    if any(word in text for word in ("largest", "biggest", "smallest", "tiniest")):
        return "size"
    if any(word in text for word in ("superior", "uppermost", "highest", "inferior", "lowest", "right-sided",
                                     "left-sided", "furthest", "anterior", "posterior", "closest", "half of")):
        return "position"
    if "dense" in text or "intense" in text:
        return "attribute"
    return "lobe" if "lobe" in text else "plural"


@pytest.mark.parametrize("flip_x", [False, True])
def test_three_blobs_give_ranked_regions_and_correct_expressions(tmp_path, flip_x):
    source = make_nnunet_source(tmp_path / "source", flip_x=flip_x)
    folder = convert_semantic(source, "tumour", "liver", 21, "Blobs", raw_root=tmp_path / "raw")
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    # the organ is kept as context region 1 (dataset.json's lsms_context); the lesions follow it, largest first
    assert dataset["labels"] == {"background": 0, "liver": 1, "region_2": 2, "region_3": 3, "region_4": 4}
    assert dataset["lsms_context"] == ["liver"]
    region_map = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "liver_001.nii.gz")))
    if flip_x:
        region_map = region_map[:, :, ::-1]
    for region_id, blob in ((2, "A"), (3, "B"), (4, "C")):
        (z, y, x), edge, _ = BLOBS[blob]
        assert (region_map[z:z + edge, y:y + edge, x:x + edge] == region_id).all()
    _, label = semantic_volume()
    assert region_map[20, 26, 30] == 1, "specks below min_lesion_voxels are organ again"
    assert np.array_equal(region_map == 0, label == 0)

    regions = json.loads((folder / "regions.json").read_text(encoding="utf-8"))["cases"]["liver_001"]["regions"]
    assert [r["size_voxels"] for r in regions] == [216, 125, 64]
    assert [r["size_rank"] for r in regions] == [1, 2, 3]
    assert regions[0]["size_physical"] == pytest.approx(216 * 2.0 / 1000) and regions[0]["size_unit"] == "mL"
    assert [r["lobe"] for r in regions] == ["right", "left", "right"]
    assert [r["intensity_class"] for r in regions] == ["hypo", "hyper", "hypo"]
    assert regions[1]["centroid_mm_lps"][2] > regions[0]["centroid_mm_lps"][2], "B lies superior to A"

    expressions = load_expressions(folder / "expressions.json")
    by_text = texts_to_targets(expressions, "liver_001")
    assert targets_of(by_text, *nouns("all {nouns}"), *nouns("every {noun}"), *nouns("all the {nouns}")) == (2, 3, 4)
    assert targets_of(by_text, *nouns("the largest {noun}"), *nouns("the biggest {noun}")) == (2,)
    assert targets_of(by_text, *nouns("the second largest {noun}"), *nouns("the second biggest {noun}")) == (3,)
    assert targets_of(by_text, *nouns("the smallest {noun}"), *nouns("the tiniest {noun}")) == (4,)
    assert targets_of(by_text, *nouns("the {noun} in the left lobe"), *nouns("the left-lobe {noun}")) == (3,)
    assert targets_of(by_text, *nouns("all {nouns} in the right lobe"),
                      *nouns("every {noun} in the right lobe")) == (2, 4)
    assert targets_of(by_text, *nouns("all hypodense {nouns}"), *nouns("every hypodense {noun}")) == (2, 4)
    assert targets_of(by_text, *nouns("the hyperdense {noun}"), *nouns("the only hyperdense {noun}")) == (3,)
    assert targets_of(by_text, *nouns("the isodense {noun}")) == (), "no-target expression"
    assert targets_of(by_text, *nouns("the most superior {noun}"), *nouns("the uppermost {noun}"),
                      *nouns("the highest {noun}")) == (3,)
    assert targets_of(by_text, *nouns("the {noun} furthest to the patient's right"),
                      *nouns("the most right-sided {noun}")) == (2,)
    assert any(targets == () for targets in by_text.values())
    assert {e.id for e in expressions if e.case == "liver_001"} == {f"liver_001-e{k}" for k in range(len(by_text))}
    for expression in expressions:
        assert expression.category == expected_category(expression.text, expression.targets), expression

    image = sitk.ReadImage(str(folder / "imagesTr" / "liver_001_0000.nii.gz"))
    assert image.GetDirection()[0] == (-1.0 if flip_x else 1.0)
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)


def test_same_seed_same_phrasing_and_other_seed_same_targets(tmp_path):
    source = make_nnunet_source(tmp_path / "source", cases=("liver_001",))
    first = convert_semantic(source, 2, 1, 22, "SeedA", raw_root=tmp_path / "raw", seed=5)
    again = convert_semantic(source, 2, 1, 22, "SeedA", raw_root=tmp_path / "raw", seed=5, overwrite=True)
    assert (first / "expressions.json").read_text(encoding="utf-8") == (again / "expressions.json").read_text(encoding="utf-8")
    other = convert_semantic(source, 2, 1, 23, "SeedB", raw_root=tmp_path / "raw", seed=6)
    families = [json.loads((folder / "regions.json").read_text(encoding="utf-8"))["cases"]["liver_001"]["expressions"]
                for folder in (first, other)]
    assert [e["family"] for e in families[0]] == [e["family"] for e in families[1]]
    assert ([e.targets for e in load_expressions(first / "expressions.json")] ==
            [e.targets for e in load_expressions(other / "expressions.json")])


def test_plain_folder_2d_uses_8_connectivity_and_organ_halves(tmp_path):
    source = tmp_path / "plain"
    (source / "images").mkdir(parents=True)
    (source / "labels").mkdir()
    label = np.zeros((30, 40), np.uint8)
    label[2:28, 2:38] = 1
    label[5:10, 5:10] = 3  # 25 px, patient's right half
    label[10, 10] = 3  # touches the block only diagonally: same component under 8-connectivity
    label[20:24, 30:34] = 3  # 16 px, left half
    image = np.where(label == 3, 10.0, 50.0).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(source / "images" / "slice_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(source / "labels" / "slice.nii.gz"))
    with pytest.raises(ConversionError, match=r"images/ \+ labels/\) does not say what the images are\. Fix: pass "
                                              r"--channel_name"):
        convert_semantic(source, 3, 1, 24, "Plain", raw_root=tmp_path / "raw", min_lesion_voxels=5)
    folder = convert_semantic(source, 3, 1, 24, "Plain", raw_root=tmp_path / "raw", min_lesion_voxels=5,
                              channel_name="CT")
    regions = json.loads((folder / "regions.json").read_text(encoding="utf-8"))["cases"]["slice"]["regions"]
    assert [r["size_voxels"] for r in regions] == [26, 16] and regions[0]["size_unit"] == "mm2"
    assert [r["side_of_organ"] for r in regions] == ["right", "left"] and regions[0]["lobe"] is None
    by_text = texts_to_targets(load_expressions(folder / "expressions.json"), "slice")
    assert by_text["the lesion in the patient's left half of the organ"] == (3,)  # after the organ, context id 1
    assert by_text["the hyperdense lesion"] == () and by_text["all hypodense lesions"] == (2, 3)
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["channel_names"] == {"0": "CT"}


def test_labelled_test_cases_are_converted_to_a_test_split_and_the_source_split_is_kept(tmp_path):
    source = make_nnunet_source(tmp_path / "source")
    image, label = semantic_volume()
    (source / "imagesTs").mkdir()
    (source / "labelsTs").mkdir()
    write_volume(image, source / "imagesTs" / "liver_009_0000.nii.gz")
    write_volume(label, source / "labelsTs" / "liver_009.nii.gz")
    splits = [{"train": ["liver_001"], "val": ["liver_002"]}, {"train": ["liver_002"], "val": ["liver_001"]}]
    (source / "splits_final.json").write_text(json.dumps(splits))
    folder = convert_semantic(source, "tumour", "liver", 29, "WithTest", raw_root=tmp_path / "raw")

    assert json.loads((folder / "splits_final.json").read_text(encoding="utf-8")) == splits
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 2
    assert sorted(path.name for path in (folder / "imagesTs").iterdir()) == ["expressions.json", "liver_009_0000.nii.gz"]
    test_map = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTs" / "liver_009.nii.gz")))
    assert sorted(np.unique(test_map)) == [0, 1, 2, 3, 4], "the liver (context 1) and the three lesions"
    test_expressions = load_expressions(folder / "imagesTs" / "expressions.json")
    assert {e.case for e in test_expressions} == {"liver_009"} and test_expressions[0].id == "liver_009-e0"
    assert all(set(e.targets) <= {2, 3, 4} for e in test_expressions) and any(not e.targets for e in test_expressions)
    regions = json.loads((folder / "regions.json").read_text(encoding="utf-8"))
    assert set(regions["cases"]) == {"liver_001", "liver_002"} and set(regions["test_cases"]) == {"liver_009"}

    (source / "imagesTs" / "liver_009_0000.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"labelsTs/liver_009.nii.gz: the test case has no image\(s\) "
                                              r"\['liver_009_0000.nii.gz'\] .* Fix: add them"):
        convert_semantic(source, "tumour", "liver", 30, "NoImage", raw_root=tmp_path / "raw")


def test_extract_regions_orders_by_size_and_drops_small():
    label = np.zeros((10, 10, 10), np.uint8)
    label[0:2, 0:2, 0:2] = 2  # 8
    label[5:8, 5:8, 5:8] = 2  # 27
    label[9, 9, 9] = 2  # 1
    region_map, sizes = extract_regions(label, 2, min_lesion_voxels=2)
    assert list(sizes) == [27, 8] and region_map[6, 6, 6] == 1 and region_map[0, 0, 0] == 2
    assert region_map[9, 9, 9] == 0


def test_bad_inputs_are_refused_with_the_fix(tmp_path):
    source = make_nnunet_source(tmp_path / "source", cases=("liver_001",))
    with pytest.raises(ConversionError, match=r"'metastasis' is unknown.*names: background, liver, tumour"):
        convert_semantic(source, "metastasis", None, 25, "Bad", raw_root=tmp_path / "raw")
    with pytest.raises(ConversionError, match="neither an nnU-Net raw dataset"):
        convert_semantic(tmp_path, 2, None, 25, "Bad", raw_root=tmp_path / "raw")
    with pytest.raises(ConversionError, match="No case .* at least 10000 voxels"):
        convert_semantic(source, 2, 1, 25, "Bad", raw_root=tmp_path / "raw", min_lesion_voxels=10000)
    shifted = sitk.ReadImage(str(source / "labelsTr" / "liver_001.nii.gz"))
    shifted.SetOrigin((5.0, -20.0, 30.0))
    sitk.WriteImage(shifted, str(source / "labelsTr" / "liver_001.nii.gz"))
    with pytest.raises(ConversionError, match=r"origin: image \(0.0, -20.0, 30.0\) vs label \(5.0, -20.0, 30.0\)"):
        convert_semantic(source, 2, 1, 25, "Bad", raw_root=tmp_path / "raw")
    assert not list((tmp_path / "raw").iterdir()), "failed runs leave nothing behind"


def test_cli_entry_refuses_existing_dataset_without_overwrite(tmp_path, monkeypatch, capsys):
    source = make_nnunet_source(tmp_path / "source", cases=("liver_001",))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    argv = ["LSMSv2_convert_semantic", "-i", str(source), "-d", "26", "-n", "Cli", "--lesion_label", "tumour",
            "--organ_label", "1", "--min_lesion_voxels", "20"]
    monkeypatch.setattr(sys, "argv", argv)
    convert_semantic_entry()
    assert "Dataset026_Cli" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        convert_semantic_entry()
    assert exit_info.value.code == 1
    assert re.search("already used by .*--overwrite", capsys.readouterr().err)
    monkeypatch.setattr(sys, "argv", argv + ["--overwrite", "-np", "1"])
    convert_semantic_entry()


def test_non_ct_channel_says_intense_and_plain_label_names_become_nouns(tmp_path):
    source = make_nnunet_source(tmp_path / "source", cases=("liver_001",))
    dataset = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    dataset["channel_names"] = {"0": "T1"}
    dataset["labels"] = {"background": 0, "liver": 1, "metastasis": 2}
    (source / "dataset.json").write_text(json.dumps(dataset))
    folder = convert_semantic(source, "metastasis", "liver", 27, "Mr", raw_root=tmp_path / "raw")
    texts = [e.text for e in load_expressions(folder / "expressions.json")]
    assert any("hypointense" in text for text in texts) and not any("dense" in text for text in texts)
    assert any("metastases" in text or "metastasis" in text for text in texts)
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["channel_names"] == {"0": "T1"}


@pytest.mark.parametrize("channel_name, hypo, hyper", [("MR", "hypointense", "hyperintense"),
                                                       ("t2w", "hypointense", "hyperintense"),
                                                       ("PET", "darker", "brighter")])
def test_plain_folder_takes_the_modality_from_the_user_and_words_intensity_by_it(tmp_path, channel_name, hypo, hyper):
    source = tmp_path / "plain"
    (source / "images").mkdir(parents=True)
    (source / "labels").mkdir()
    image, label = semantic_volume()
    write_volume(image, source / "images" / "brain_0000.nii.gz")
    write_volume(label, source / "labels" / "brain.nii.gz")
    folder = convert_semantic(source, 2, 1, 28, "Modality", raw_root=tmp_path / "raw", channel_name=channel_name)
    texts = [e.text for e in load_expressions(folder / "expressions.json")]
    assert any(hypo in text for text in texts) and any(hyper in text for text in texts)
    assert not any("dense" in text for text in texts)
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["channel_names"] == {"0": channel_name}
