"""Per-expression masks -> referring dataset: atoms, lossless round trip, geometry safety, incremental re-runs, and
the table's optional columns (all-lesion and anatomy maps, test split, no-target intent, held-out phrasing)."""
import csv
import json
import os
import re
import sys
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_nnunet.datasets.convert_expression_masks import (COLUMNS, MANIFEST_NAME, atomize, convert_expression_masks,
                                                           convert_expression_masks_entry, verify_roundtrip)
from lsms_nnunet.datasets.geometry import ConversionError
from text_conditioning.expressions import load_expressions

SPACING = (0.8, 0.9, 2.0)
ORIGIN = (-10.0, 20.0, 5.0)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def write_image(array, path, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def write_table(path, rows, columns=("image", "text", "mask")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def venn_masks(shape=(6, 8, 10)):
    """Three boxes with every pairwise and the triple overlap (7 distinct non-empty sets)."""
    masks = np.zeros((3,) + shape, dtype=bool)
    masks[0, 1:5, 1:5, 1:6] = True
    masks[1, 1:5, 3:7, 1:6] = True
    masks[2, 1:5, 2:6, 4:9] = True
    return masks


def make_3d_case(folder, stem, masks, seed=0):
    rng = np.random.default_rng(seed)
    image = write_image(rng.normal(0, 100, masks.shape[1:]).astype(np.float32), folder / f"{stem}.nii.gz")
    mask_paths = [write_image(mask.astype(np.uint8), folder / f"{stem}_mask{index}.nii.gz")
                  for index, mask in enumerate(masks)]
    return image, mask_paths


def test_atomize_venn_masks_give_seven_atoms_and_exact_unions():
    masks = venn_masks()
    region_map, targets = atomize(masks)
    assert sorted(np.unique(region_map)) == list(range(8))
    assert [len(target) for target in targets] == [4, 4, 4]
    for mask, target in zip(masks, targets):
        assert np.array_equal(np.isin(region_map, target), mask)
    triple = set(targets[0]) & set(targets[1]) & set(targets[2])
    assert len(triple) == 1
    first_voxels = [np.flatnonzero(region_map.ravel() == atom)[0] for atom in range(1, 8)]
    assert first_voxels == sorted(first_voxels), "ids follow order of first appearance"


def test_atomize_empty_masks_map_to_background():
    region_map, targets = atomize(np.zeros((2, 3, 4), dtype=bool))
    assert region_map.max() == 0 and targets == [(), ()]


def test_3d_nifti_round_trip_with_overlaps_and_empty_mask(tmp_path, capsys):
    source = tmp_path / "source"
    source.mkdir()
    masks = venn_masks()
    image_a, masks_a = make_3d_case(source, "patient one", masks)
    image_b, masks_b = make_3d_case(source, "patient-2", masks[:1], seed=1)
    empty = write_image(np.zeros(masks.shape[1:], np.uint8), source / "empty.nii.gz")
    table = write_table(tmp_path / "table.csv", [
        ["source/patient one.nii.gz", "the left box", "source/patient one_mask0.nii.gz"],
        ["source/patient one.nii.gz", "the right box", "source/patient one_mask1.nii.gz"],
        [str(image_a), "the back box", str(masks_a[2])],
        ["source/patient-2.nii.gz", "the only box", "source/patient-2_mask0.nii.gz"],
        ["source/patient-2.nii.gz", "the cyst", str(empty)],
    ])
    folder = convert_expression_masks(table, 7, "Boxes", raw_root=tmp_path / "raw")
    assert re.search(r"warning: 1 row\(s\) have an empty mask file .*table.csv row 5", capsys.readouterr().err)
    assert folder == tmp_path / "raw" / "Dataset007_Boxes"
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["labels"] == {"background": 0, **{f"region_{i}": i for i in range(1, 8)}}
    assert dataset["numTraining"] == 2 and dataset["file_ending"] == ".nii.gz"
    expressions = load_expressions(folder / "expressions.json")
    assert [e.id for e in expressions] == ["patient_one-e0", "patient_one-e1", "patient_one-e2", "patient-2-e0",
                                           "patient-2-e1"]
    assert expressions[4].targets == () and expressions[3].targets == (1,)
    assert all(e.category is None for e in expressions), "no category column, no category"
    region_map = sitk.ReadImage(str(folder / "labelsTr" / "patient_one.nii.gz"))
    assert region_map.GetSpacing() == pytest.approx(SPACING) and region_map.GetOrigin() == pytest.approx(ORIGIN)
    assert region_map.GetDirection() == pytest.approx(DIRECTION)
    array = sitk.GetArrayFromImage(region_map)
    for mask, expression in zip(masks, expressions[:3]):
        assert np.array_equal(np.isin(array, expression.targets), mask)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / "patient_one_0000.nii.gz")))
    assert np.allclose(image, sitk.GetArrayFromImage(sitk.ReadImage(str(image_a))))
    verify_roundtrip(folder, table)

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)


def test_roundtrip_check_detects_tampered_targets(tmp_path):
    masks = venn_masks()
    image, mask_paths = make_3d_case(tmp_path, "case", masks)
    table = write_table(tmp_path / "t.csv", [[image.name, f"box {i}", path.name] for i, path in
                                             enumerate(mask_paths)])
    folder = convert_expression_masks(table, 8, "Tamper", raw_root=tmp_path / "raw")
    document = json.loads((folder / "expressions.json").read_text(encoding="utf-8"))
    document["expressions"][0]["targets"] = document["expressions"][0]["targets"][:-1]
    (folder / "expressions.json").write_text(json.dumps(document))
    with pytest.raises(ConversionError, match=r"row 1 .*differ"):
        verify_roundtrip(folder, table)


def test_2d_png_set_stays_png_and_reads_with_natural_image_io(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    rng = np.random.default_rng(0)
    entries = []
    for stem in ("slice_a", "slice_b"):
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (20, 24)).astype(np.uint8)),
                        str(tmp_path / f"{stem}.png"))
        for index, box in enumerate(((slice(2, 10), slice(3, 12)), (slice(6, 15), slice(8, 20)))):
            mask = np.zeros((20, 24), np.uint8)
            mask[box] = 255
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / f"{stem}_m{index}.png"))
            entries.append({"image": f"{stem}.png", "text": f"lesion {index}", "mask": f"{stem}_m{index}.png",
                            "id": f"{stem}.expr{index}"})
    table = tmp_path / "table.json"
    table.write_text(json.dumps(entries))
    folder = convert_expression_masks(table, 9, "Slices", raw_root=tmp_path / "raw", channel_name="grayscale")
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["file_ending"] == ".png" and len(dataset["labels"]) == 4
    assert dataset["channel_names"] == {"0": "grayscale"}
    seg, _ = NaturalImage2DIO().read_seg(str(folder / "labelsTr" / "slice_a.png"))
    images, _ = NaturalImage2DIO().read_images([str(folder / "imagesTr" / "slice_a_0000.png")])
    assert seg.shape == images.shape == (1, 1, 20, 24)
    expressions = {e.id: e for e in load_expressions(folder / "expressions.json")}
    assert np.array_equal(np.isin(seg[0, 0], expressions["slice_a.expr1"].targets),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "slice_a_m1.png"))) > 0)


def write_dicom_series(array, folder, spacing, origin):
    """A minimal CT series: one file per slice with position, orientation and shared series/study UIDs."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index, plane in enumerate(array):
        slice_image = sitk.GetImageFromArray(plane[None])
        slice_image.SetSpacing(spacing)
        position = (origin[0], origin[1], origin[2] + index * spacing[2])
        slice_image.SetOrigin(position)
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": "\\".join(f"{value:.4f}" for value in position), "0020|0013": str(index + 1),
                "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{index + 1}", "0018|0050": f"{spacing[2]:.4f}"}
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{index:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_folder_is_read_as_one_volume(tmp_path):
    array = np.arange(4 * 10 * 12, dtype=np.int16).reshape(4, 10, 12)
    spacing, origin = (0.7, 0.7, 2.5), (-30.0, -40.0, 100.0)
    write_dicom_series(array, tmp_path / "ct_series", spacing, origin)
    mask = np.zeros(array.shape, np.uint8)
    mask[1:3, 2:6, 3:9] = 1
    write_image(mask, tmp_path / "mask.nii.gz", spacing=spacing, origin=origin, direction=np.eye(3).ravel())
    table = write_table(tmp_path / "t.csv", [["ct_series", "the box", "mask.nii.gz"]])
    folder = convert_expression_masks(table, 10, "Dicom", raw_root=tmp_path / "raw")
    image = sitk.ReadImage(str(folder / "imagesTr" / "ct_series_0000.nii.gz"))
    assert image.GetSize() == (12, 10, 4) and image.GetSpacing() == pytest.approx(spacing)
    assert np.array_equal(sitk.GetArrayFromImage(image), array)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "ct_series.nii.gz"))), mask)


@pytest.mark.parametrize("field, mask_kwargs, image_value, mask_value", [
    ("size", {"shape": (6, 8, 11)}, "(10, 8, 6)", "(11, 8, 6)"),
    ("spacing", {"spacing": (0.8, 0.9, 2.5)}, "(0.8, 0.9, 2.0)", "(0.8, 0.9, 2.5)"),
    ("origin", {"origin": (-10.0, 21.5, 5.0)}, "(-10.0, 20.0, 5.0)", "(-10.0, 21.5, 5.0)"),
    ("direction", {"direction": tuple(np.eye(3).ravel())}, "(0.0, 1.0, 0.0, 1.0", "(1.0, 0.0, 0.0, 0.0"),
])
def test_geometry_mismatch_names_both_values(tmp_path, field, mask_kwargs, image_value, mask_value):
    image, _ = make_3d_case(tmp_path, "case", venn_masks()[:1])
    shape = mask_kwargs.pop("shape", (6, 8, 10))
    mask = write_image(np.ones(shape, np.uint8), tmp_path / "bad.nii.gz", **mask_kwargs)
    table = write_table(tmp_path / "t.csv", [[image.name, "x", mask.name]])
    with pytest.raises(ConversionError) as error:
        convert_expression_masks(table, 11, "Bad", raw_root=tmp_path / "raw")
    message = str(error.value)
    assert f"{field}: image {image_value}" in message and mask_value in message
    assert "t.csv row 1" in message and "bad.nii.gz" in message and "--resample_masks" in message
    assert not (tmp_path / "raw" / "Dataset011_Bad").exists()
    assert not [p for p in (tmp_path / "raw").iterdir()], "no staging folder is left behind"


def test_non_binary_mask_is_refused(tmp_path):
    masks = venn_masks().astype(np.uint8)
    masks[0, 1, 1, 1] = 2
    image, mask_paths = make_3d_case(tmp_path, "case", masks[:1])
    table = write_table(tmp_path / "t.csv", [[image.name, "x", mask_paths[0].name]])
    with pytest.raises(ConversionError, match=r"row 1.*not binary \(values 0, 1, 2\)"):
        convert_expression_masks(table, 12, "NonBinary", raw_root=tmp_path / "raw")


def test_resample_masks_fixes_spacing_mismatch_and_rejects_mask_outside(tmp_path):
    image, _ = make_3d_case(tmp_path, "case", venn_masks()[:1])
    coarse = np.zeros((6, 8, 10), np.uint8)
    coarse[2:4, 2:6, 4:8] = 1
    fine = coarse.repeat(2, axis=0)  # same extent in z, half the z spacing
    fine_origin = (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 0.25)  # each coarse centre is nearest to one fine slice
    mask = write_image(fine, tmp_path / "fine.nii.gz", spacing=(0.8, 0.9, 1.0), origin=fine_origin)
    table = write_table(tmp_path / "t.csv", [[image.name, "x", mask.name]])
    with pytest.raises(ConversionError, match="spacing"):
        convert_expression_masks(table, 13, "Resampled", raw_root=tmp_path / "raw")
    folder = convert_expression_masks(table, 13, "Resampled", raw_root=tmp_path / "raw", resample_masks=True)
    region_map = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "case.nii.gz")))
    assert np.array_equal(region_map, coarse)

    far = write_image(fine, tmp_path / "far.nii.gz", spacing=(0.8, 0.9, 1.0), origin=(500.0, 500.0, 500.0))
    table = write_table(tmp_path / "far.csv", [[image.name, "x", far.name]])
    with pytest.raises(ConversionError, match="outside the image"):
        convert_expression_masks(table, 14, "Far", raw_root=tmp_path / "raw", resample_masks=True)


def test_too_many_atoms_is_a_clear_error(tmp_path):
    voxel_codes = np.arange(1, 32 * 32 * 32 + 1).reshape(32, 32, 32)
    image = write_image(np.zeros((32, 32, 32), np.int16), tmp_path / "big.nii.gz")
    rows = []
    for bit in range(16):
        mask = write_image(((voxel_codes >> bit) & 1).astype(np.uint8), tmp_path / f"m{bit}.nii.gz")
        rows.append([image.name, f"expression {bit}", mask.name])
    table = write_table(tmp_path / "t.csv", rows)
    with pytest.raises(ConversionError, match="32768 regions.*int16"):
        convert_expression_masks(table, 15, "Many", raw_root=tmp_path / "raw")


def test_table_problems_are_reported_before_any_work(tmp_path):
    image, mask_paths = make_3d_case(tmp_path, "case", venn_masks()[:1])
    table = write_table(tmp_path / "t.csv", [[image.name, "a", mask_paths[0].name, "same"],
                                             [image.name, "", "missing.nii.gz", "same"],
                                             [image.name, "c", "missing.nii.gz", "bad id!"]],
                        columns=("image", "text", "mask", "id"))
    with pytest.raises(ConversionError) as error:
        convert_expression_masks(table, 16, "Broken", raw_root=tmp_path / "raw")
    message = str(error.value)
    assert "row 2 (line 3) has no text" in message and "row 3 (line 4): mask" in message
    assert "unsafe id 'bad id!'" in message
    fixed = write_table(tmp_path / "dup.csv", [[image.name, "a", mask_paths[0].name, "same"],
                                               [image.name, "b", mask_paths[0].name, "same"]],
                        columns=("image", "text", "mask", "id"))
    with pytest.raises(ConversionError, match="row 2 .*repeats expression id 'same'"):
        convert_expression_masks(fixed, 16, "Broken", raw_root=tmp_path / "raw")


def test_optional_category_column_fills_the_category(tmp_path):
    image, mask_paths = make_3d_case(tmp_path, "case", venn_masks()[:2])
    table = write_table(tmp_path / "t.csv", [[image.name, "the left box", mask_paths[0].name, "size"],
                                             [image.name, "the right box", mask_paths[1].name, ""]],
                        columns=("image", "text", "mask", "category"))
    folder = convert_expression_masks(table, 17, "Categories", raw_root=tmp_path / "raw")
    assert [e.category for e in load_expressions(folder / "expressions.json")] == ["size", None]
    bad = write_table(tmp_path / "bad.csv", [[image.name, "a", mask_paths[0].name, "Size Rank"]],
                      columns=("image", "text", "mask", "category"))
    with pytest.raises(ConversionError, match="row 1 .*category 'Size Rank'.*lowercase identifier"):
        convert_expression_masks(bad, 18, "Broken", raw_root=tmp_path / "raw")


def test_rerun_redoes_only_changed_cases_and_guards_foreign_datasets(tmp_path, capsys):
    masks = venn_masks()
    image_a, masks_a = make_3d_case(tmp_path, "alpha", masks[:2])
    image_b, masks_b = make_3d_case(tmp_path, "beta", masks[1:], seed=3)
    table = write_table(tmp_path / "t.csv", [[path.name, f"text {i}", mask.name] for path, group in
                                             ((image_a, masks_a), (image_b, masks_b)) for i, mask in enumerate(group)])
    raw = tmp_path / "raw"
    folder = convert_expression_masks(table, 17, "Rerun", raw_root=raw, num_processes=2)
    assert "converted 2 case(s), kept 0" in capsys.readouterr().out
    labels = {case: folder / "labelsTr" / f"{case}.nii.gz" for case in ("alpha", "beta")}
    before = {case: path.stat().st_mtime_ns for case, path in labels.items()}

    changed = masks[2].copy()
    changed[:, :, 0] = True
    write_image(changed.astype(np.uint8), masks_b[1])
    os.utime(masks_b[1], ns=(before["beta"] + 10**9, before["beta"] + 10**9))
    assert convert_expression_masks(table, 17, "Rerun", raw_root=raw) == folder
    assert "converted 1 case(s), kept 1" in capsys.readouterr().out
    assert labels["alpha"].stat().st_mtime_ns == before["alpha"]
    assert labels["beta"].stat().st_mtime_ns != before["beta"]
    beta_map = sitk.GetArrayFromImage(sitk.ReadImage(str(labels["beta"])))
    beta_expression = load_expressions(folder / "expressions.json")[3]
    assert np.array_equal(np.isin(beta_map, beta_expression.targets), changed)
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert set(manifest["cases"]) == {"alpha", "beta"}

    convert_expression_masks(table, 17, "Rerun", raw_root=raw, overwrite=True)
    assert "converted 2 case(s), kept 0" in capsys.readouterr().out

    foreign = raw / "Dataset018_Foreign"
    foreign.mkdir()
    (foreign / "dataset.json").write_text("{}")
    with pytest.raises(ConversionError, match="Dataset018_Foreign, which was not made by this converter"):
        convert_expression_masks(table, 18, "Foreign", raw_root=raw)
    assert (foreign / "dataset.json").read_text(encoding="utf-8") == "{}"
    folder = convert_expression_masks(table, 18, "Foreign", raw_root=raw, overwrite=True)
    assert (folder / MANIFEST_NAME).is_file()


def test_cli_entry_converts_and_reports_errors(tmp_path, monkeypatch, capsys):
    image, mask_paths = make_3d_case(tmp_path, "case", venn_masks()[:2])
    table = write_table(tmp_path / "t.csv", [[image.name, f"t{i}", m.name] for i, m in enumerate(mask_paths)])
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setattr(sys, "argv", ["LSMSv2_convert_expression_masks", "-i", str(table), "-d", "19", "-n", "Cli",
                                      "-np", "1"])
    convert_expression_masks_entry()
    assert (tmp_path / "raw" / "Dataset019_Cli" / "labelsTr" / "case.nii.gz").is_file()
    assert "Wrote" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["LSMSv2_convert_expression_masks", "-i", str(table), "-d", "19", "-n", "Other"])
    with pytest.raises(SystemExit) as exit_info:
        convert_expression_masks_entry()
    assert exit_info.value.code == 1
    assert re.search("Dataset019_Cli, which was not made|taken by", capsys.readouterr().err)


def test_deeply_nested_json_table_names_the_file(tmp_path):
    from lsms_nnunet.datasets.convert_expression_masks import read_table

    table = tmp_path / "table.json"
    table.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConversionError, match=r"Table .*table.json nests JSON arrays/objects too deeply .* Fix: "):
        read_table(table)



def lesion_boxes(shape=(6, 8, 10)):
    """Three separate lesions (boxes that do not touch, even diagonally)."""
    lesions = np.zeros((3,) + shape, dtype=bool)
    lesions[0, 1:3, 1:3, 1:3] = True
    lesions[1, 1:3, 5:7, 1:3] = True
    lesions[2, 3:5, 1:3, 6:9] = True
    return lesions


def write_lesion_case(folder, stem, seed=0):
    """An image with three lesions: e0 names the first, e1 the first two, none names the third."""
    lesions = lesion_boxes()
    image, masks = make_3d_case(folder, stem, np.stack([lesions[0], lesions[0] | lesions[1]]), seed)
    all_lesions = write_image(lesions.any(axis=0).astype(np.uint8), folder / f"{stem}_lesions.nii.gz")
    return image, masks, all_lesions, lesions


def read_map(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def warning_lines(err):
    return [line for line in err.splitlines() if "warning:" in line]


def test_all_lesion_map_keeps_unnamed_lesions_and_its_absence_warns_once(tmp_path, capsys):
    image_a, masks_a, lesions_a, boxes = write_lesion_case(tmp_path, "alpha")
    image_b, masks_b, _, _ = write_lesion_case(tmp_path, "beta", seed=1)
    instances = np.zeros(boxes.shape[1:], np.uint8)  # two touching lesions: one component, two instances
    instances[1:3, 1:3, 1:3], instances[1:3, 3:5, 1:3] = 1, 2
    instance_map = write_image(instances, tmp_path / "beta_instances.nii.gz")
    rows = [[image_a.name, "the first lesion", masks_a[0].name, lesions_a.name],
            [image_a.name, "the upper lesions", masks_a[1].name, ""],  # per-image cell: taken from the row above
            [image_b.name, "the upper lesions", masks_b[1].name, instance_map.name]]
    table = write_table(tmp_path / "t.csv", rows, columns=("image", "text", "mask", "all_lesions"))
    with pytest.raises(ConversionError, match=r"reach outside its all-lesion map .*t.csv row 3 .*Fix: "):
        convert_expression_masks(table, 20, "Lesions", raw_root=tmp_path / "raw")  # beta has no lesion at 1:3, 5:7
    assert not (tmp_path / "raw" / "Dataset020_Lesions").exists()
    touching = write_image((instances > 0).astype(np.uint8), tmp_path / "beta_touching.nii.gz")
    rows[2] = [image_b.name, "the two touching lesions", touching.name, instance_map.name]
    table = write_table(tmp_path / "t.csv", rows, columns=("image", "text", "mask", "all_lesions"))
    capsys.readouterr()
    folder = convert_expression_masks(table, 20, "Lesions", raw_root=tmp_path / "raw")
    assert not warning_lines(capsys.readouterr().err)
    alpha = read_map(folder / "labelsTr" / "alpha.nii.gz")
    assert np.array_equal(alpha > 0, boxes.any(axis=0)), "every lesion is a region, named or not"
    assert [len(np.unique(alpha[box])) for box in boxes] == [1, 1, 1] and len(np.unique(alpha)) == 4
    expressions = load_expressions(folder / "expressions.json")
    unnamed = int(np.unique(alpha[boxes[2]])[0])
    assert all(unnamed not in e.targets for e in expressions[:2]) and len(expressions[1].targets) == 2
    beta = read_map(folder / "labelsTr" / "beta.nii.gz")
    assert len(np.unique(beta[instances > 0])) == 2 and len(expressions[2].targets) == 2, "instances stay apart"

    plain = write_table(tmp_path / "plain.csv", [row[:3] for row in rows])
    folder = convert_expression_masks(plain, 21, "Unnamed", raw_root=tmp_path / "raw")
    lines = warning_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "2 of 2 image(s) have no all_lesions map" in lines[0]
    assert "become background" in lines[0] and "Fix: add an all_lesions column" in lines[0]
    assert not read_map(folder / "labelsTr" / "alpha.nii.gz")[boxes[2]].any(), "without the map: background"


def write_anatomy(folder, stem, values=(1, 2)):
    anatomy = np.zeros((6, 8, 10), np.uint8)
    anatomy[:, :, :5] = values[0]
    anatomy[:, :, 7:] = values[1]
    return write_image(anatomy, folder / f"{stem}_anatomy.nii.gz"), anatomy


def test_anatomy_map_becomes_context_regions_the_prompt_reader_accepts(tmp_path, monkeypatch, capsys):
    from lsms_nnunet.preprocessing.prompts import load_prompt_set

    image, masks, lesions, boxes = write_lesion_case(tmp_path, "alpha")
    anatomy_file, anatomy = write_anatomy(tmp_path, "alpha")
    columns = ("image", "text", "mask", "all_lesions", "anatomy")
    table = write_table(tmp_path / "t.csv", [[image.name, "the first lesion", masks[0].name, lesions.name,
                                              anatomy_file.name],
                                             [image.name, "the upper lesions", masks[1].name, "", ""]], columns)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setattr(sys, "argv", ["LSMSv2_convert_expression_masks", "-i", str(table), "-d", "22", "-n",
                                      "Anatomy", "--anatomy_labels", "liver=1", "spleen=2"])
    convert_expression_masks_entry()
    folder = tmp_path / "raw" / "Dataset022_Anatomy"
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["lsms_context"] == ["liver", "spleen"]
    assert dataset["labels"] == {"background": 0, "liver": 1, "spleen": 2, "region_3": 3, "region_4": 4,
                                 "region_5": 5}
    region_map = read_map(folder / "labelsTr" / "alpha.nii.gz")
    outside = ~boxes.any(axis=0)
    assert np.array_equal(region_map[outside], anatomy[outside]), "organs outside the lesions are context ids"
    assert np.array_equal(region_map > 2, boxes.any(axis=0)), "lesions keep their own ids inside the organ"
    prompt_set = load_prompt_set(folder)
    assert dict(prompt_set.context) == {"liver": 1, "spleen": 2}
    assert [e.targets for e in prompt_set.expressions] == [(3,), (3, 4)]

    def refused(rows, match, **options):
        bad = write_table(tmp_path / "bad.csv", rows, columns)
        with pytest.raises(ConversionError, match=match):
            convert_expression_masks(bad, 23, "Bad", raw_root=tmp_path / "raw", **options)
        assert not (tmp_path / "raw" / "Dataset023_Bad").exists()

    refused([[image.name, "x", masks[0].name, lesions.name, anatomy_file.name]],
            r"bad.csv row 1 \(line 2\): anatomy .*values \[1, 2\]. Fix: name them with --anatomy_labels")
    refused([[image.name, "x", masks[0].name, lesions.name, anatomy_file.name]],
            r"bad.csv row 1 \(line 2\): anatomy .*value\(s\) \[2\], which --anatomy_labels", anatomy_labels={"liver": 1})
    refused([[image.name, "x", masks[0].name, lesions.name, anatomy_file.name]],
            r"--anatomy_labels 'Liver' is not a usable label name .*'liver'", anatomy_labels={"Liver": 1})
    other, _, _, _ = write_lesion_case(tmp_path, "beta")
    refused([[image.name, "x", masks[0].name, lesions.name, anatomy_file.name], [other.name, "y", masks[0].name,
                                                                               lesions.name, ""]],
            r"1 image\(s\) have no anatomy map although others have one, e.g. .*bad.csv row 2")
    shifted = write_image(anatomy, tmp_path / "shifted.nii.gz", origin=(0.0, 0.0, 0.0))
    refused([[image.name, "x", masks[0].name, lesions.name, shifted.name]],
            r"bad.csv row 1 \(line 2\): .*shifted.nii.gz does not lie on the grid of image .*origin: image", anatomy_labels={
                "liver": 1, "spleen": 2})


def test_split_column_and_test_table_fill_imagesTs_and_labelsTs(tmp_path, capsys):
    cases = {stem: write_lesion_case(tmp_path, stem, seed) for seed, stem in enumerate(("alpha", "beta", "gamma"))}
    columns = ("image", "text", "mask", "all_lesions", "split")

    def rows(stem, split):
        image, masks, lesions, _ = cases[stem]
        return [[image.name, "the first lesion", masks[0].name, lesions.name, split],
                [image.name, "the upper lesions", masks[1].name, lesions.name, ""]]

    table = write_table(tmp_path / "t.csv", rows("alpha", "") + rows("beta", "test"), columns)
    test_table = write_table(tmp_path / "test.csv", rows("gamma", ""), columns)
    raw = tmp_path / "raw"
    folder = convert_expression_masks(table, 24, "Split", raw_root=raw, test_table=test_table)
    assert "converted 3 case(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["alpha_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["beta_0000.nii.gz", "expressions.json",
                                                                         "gamma_0000.nii.gz"]
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 1
    assert {e.case for e in load_expressions(folder / "expressions.json")} == {"alpha"}
    test_expressions = load_expressions(folder / "imagesTs" / "expressions.json")
    assert [e.case for e in test_expressions] == ["beta", "beta", "gamma", "gamma"]
    for expression in test_expressions:
        _, masks, _, boxes = cases[expression.case]
        expected = read_map(masks[int(expression.id[-1])]) > 0
        region_map = read_map(folder / "labelsTs" / f"{expression.case}.nii.gz")
        assert np.array_equal(np.isin(region_map, expression.targets), expected), "test masks rebuild exactly"
        assert np.array_equal(region_map > 0, boxes.any(axis=0))
    verify_roundtrip(folder, table, test_table)
    assert convert_expression_masks(table, 24, "Split", raw_root=raw, test_table=test_table) == folder
    assert "converted 0 case(s), kept 3" in capsys.readouterr().out, "re-runs keep the manifest's cases"

    def refused(rows, match, test_rows=None):
        bad = write_table(tmp_path / "bad.csv", rows, columns)
        bad_test = write_table(tmp_path / "bad_test.csv", test_rows, columns) if test_rows else None
        with pytest.raises(ConversionError, match=match):
            convert_expression_masks(bad, 25, "Bad", raw_root=raw, test_table=bad_test)
        assert not (raw / "Dataset025_Bad").exists()

    refused(rows("alpha", "validation"), r"bad.csv row 1 \(line 2\) has split 'validation'. Fix: write train or test")
    refused(rows("alpha", ""), r"bad_test.csv row 1 .* is in the --test table but has split 'train'",
            test_rows=rows("beta", "train"))
    refused(rows("alpha", "train") + rows("alpha", "test")[:1], r"bad.csv row 3 .*gives split 'test', but .*bad.csv "
                                                               r"row 1 .*gives 'train' for the same image")
    refused(rows("alpha", "test"), "Every image of .*bad.csv is a test image")


def test_no_target_intent_is_silent_and_unmarked_empty_masks_get_one_summary_line(tmp_path, capsys):
    image, masks, lesions, _ = write_lesion_case(tmp_path, "alpha")
    empty = write_image(np.zeros((6, 8, 10), np.uint8), tmp_path / "empty.nii.gz")
    columns = ("image", "text", "mask", "category", "all_lesions")
    intended = [[image.name, "the first lesion", masks[0].name, "", lesions.name],
                [image.name, "the calcified lesion", "", "", lesions.name],
                [image.name, "the cyst", empty.name, "no_target", lesions.name]]
    table = write_table(tmp_path / "t.csv", intended, columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = convert_expression_masks(table, 26, "Intent", raw_root=tmp_path / "raw")
    assert not warning_lines(capsys.readouterr().err)
    expressions = load_expressions(folder / "expressions.json")
    assert [(e.targets, e.category) for e in expressions[1:]] == [((), "no_target"), ((), "no_target")]

    unmarked = [[image.name, f"the lesion {index}", empty.name, "", lesions.name] for index in range(4)]
    table = write_table(tmp_path / "t.csv", intended + unmarked, columns)
    convert_expression_masks(table, 26, "Intent", raw_root=tmp_path / "raw")
    lines = warning_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert re.search(r"4 row\(s\) have an empty mask file but no no-target marker.*t.csv row 4 .*row 5 .*row 6 "
                     r".*and 1 more\. Fix: .*leave their mask cell empty or set category no_target", lines[0])

    wrong = write_table(tmp_path / "wrong.csv", [[image.name, "the cyst", masks[0].name, "no_target",
                                                  lesions.name]], columns)
    with pytest.raises(ConversionError, match=r"wrong.csv row 1 .*has category no_target .* but mask .* has 8 voxel"):
        convert_expression_masks(wrong, 27, "Wrong", raw_root=tmp_path / "raw")


def test_heldout_phrasing_goes_to_the_file_the_benchmark_reads(tmp_path):
    from lsms_nnunet.benchmark.preparation import read_heldout_expressions

    alpha, masks_a, lesions_a, _ = write_lesion_case(tmp_path, "alpha")
    beta, masks_b, lesions_b, _ = write_lesion_case(tmp_path, "beta", seed=1)
    columns = ("image", "text", "mask", "all_lesions", "split", "phrasing")
    rows = [[alpha.name, "the first lesion", masks_a[0].name, lesions_a.name, "", ""],
            [alpha.name, "the upper lesions", masks_a[1].name, lesions_a.name, "", "seen"],
            [alpha.name, "the lesion that comes first", masks_a[0].name, lesions_a.name, "", "heldout"],
            [beta.name, "the first lesion", masks_b[0].name, lesions_b.name, "test", ""],
            [beta.name, "the lesion that comes first", masks_b[0].name, lesions_b.name, "test", "heldout"]]
    table = write_table(tmp_path / "t.csv", rows, columns)
    folder = convert_expression_masks(table, 28, "Heldout", raw_root=tmp_path / "raw")
    seen = load_expressions(folder / "expressions.json")
    assert [e.text for e in seen] == ["the first lesion", "the upper lesions"] and all(e.phrasing is None
                                                                                       for e in seen)
    heldout = read_heldout_expressions(folder, {e.case for e in seen})
    assert [(e.id, e.case, e.targets, e.phrasing) for e in heldout] == [("alpha-e2", "alpha", seen[0].targets,
                                                                         "heldout")]
    test = load_expressions(folder / "imagesTs" / "expressions.json")
    assert [e.phrasing for e in test] == [None, "heldout"] and test[0].targets == test[1].targets

    def refused(bad_rows, match):
        bad = write_table(tmp_path / "bad.csv", bad_rows, columns)
        with pytest.raises(ConversionError, match=match):
            convert_expression_masks(bad, 29, "Bad", raw_root=tmp_path / "raw")
        assert not (tmp_path / "raw" / "Dataset029_Bad").exists()

    refused(rows[:3] + [[alpha.name, "nothing here", "", lesions_a.name, "", "heldout"]],
            r"1 held-out row\(s\) of training images refer to what no seen row .*bad.csv row 4 .*Fix: ")
    refused([rows[2]], r"every row of training image .* is held-out wording, .*Fix: mark at least one")
    refused([rows[0][:5] + ["unseen"]], r"bad.csv row 1 \(line 2\) has phrasing 'unseen'. Fix: write seen or heldout")


def test_help_lists_every_column(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["LSMSv2_convert_expression_masks", "--help"])
    with pytest.raises(SystemExit):
        convert_expression_masks_entry()
    text = capsys.readouterr().out
    assert all(re.search(rf"^  {column} ", text, re.MULTILINE) for column in COLUMNS), text
    assert "--test" in text and "--anatomy_labels" in text
