"""evaluate_referring_folder and LSMSv2_evaluate on a tiny NIfTI folder written with SimpleITK."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_nnunet.evaluation.evaluate import EvaluationInputError, evaluate_referring_folder, format_summary_table
from lsms_nnunet.evaluation.metrics import aggregate_metrics, expression_metrics
from text_conditioning.expressions import Expression, ExpressionsError, save_expressions

SPACING_ZYX = (2.5, 0.8, 0.6)
SHAPE = (4, 12, 12)


def _write(array: np.ndarray, path: Path, spacing_zyx=SPACING_ZYX) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))


def _region_maps() -> dict[str, np.ndarray]:
    case_a = np.zeros(SHAPE, dtype=np.uint8)
    case_a[1:3, 1:4, 1:4] = 1
    case_a[1:3, 7:11, 6:10] = 2
    case_b = np.zeros(SHAPE, dtype=np.uint8)
    case_b[0:2, 4:8, 4:8] = 1
    return {"case_a": case_a, "case_b": case_b}


def _predictions(maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    shifted = np.zeros(SHAPE, dtype=np.uint8)
    shifted[1:3, 2:5, 1:4] = 1
    spurious = np.zeros(SHAPE, dtype=np.uint8)
    spurious[3, 0:2, 0:2] = 1
    return {
        "case_a-e0": (maps["case_a"] == 1).astype(np.uint8),  # exact
        "case_a-e1": shifted,  # finds lesion 1 shifted one row, misses lesion 2
        "case_a-e2": np.zeros(SHAPE, dtype=np.uint8),  # both empty
        "case_b-e0": np.zeros(SHAPE, dtype=np.uint8),  # misses the lesion
        "case_b-e1": spurious,  # refers to nothing, predicts something
    }


EXPRESSIONS = [
    Expression("case_a-e0", "case_a", "the small lesion", (1,)),
    Expression("case_a-e1", "case_a", "all lesions", (1, 2)),
    Expression("case_a-e2", "case_a", "the lesion in the left lobe", ()),
    Expression("case_b-e0", "case_b", "the lesion", (1,)),
    Expression("case_b-e1", "case_b", "the second lesion", ()),
]


@pytest.fixture()
def folders(tmp_path):
    reference_dir, prediction_dir = tmp_path / "labels", tmp_path / "predictions"
    reference_dir.mkdir()
    prediction_dir.mkdir()
    maps = _region_maps()
    for case, region_map in maps.items():
        _write(region_map, reference_dir / f"{case}.nii.gz")
    for expression_id, prediction in _predictions(maps).items():
        _write(prediction, prediction_dir / f"{expression_id}.nii.gz")
    expressions_file = tmp_path / "expressions.json"
    save_expressions(expressions_file, EXPRESSIONS)
    return reference_dir, prediction_dir, expressions_file


def _strict_json(path: Path) -> dict:
    def reject(constant):
        raise AssertionError(f"{path} holds {constant}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_evaluate_folder_per_expression_and_aggregate(folders, tmp_path):
    reference_dir, prediction_dir, expressions_file = folders
    output_file = tmp_path / "out" / "summary.json"
    summary = evaluate_referring_folder(reference_dir, prediction_dir, expressions_file, output_file=output_file)

    entries = summary["metric_per_expression"]
    assert [entry["id"] for entry in entries] == [expression.id for expression in EXPRESSIONS]
    by_id = {entry["id"]: entry for entry in entries}
    assert by_id["case_a-e0"]["dice"] == 1.0 and by_id["case_a-e0"]["hd95"] == 0.0
    assert by_id["case_a-e0"]["text"] == "the small lesion"
    assert by_id["case_a-e0"]["reference_file"] == str(reference_dir.resolve() / "case_a.nii.gz")
    assert by_id["case_a-e0"]["prediction_file"] == str(prediction_dir.resolve() / "case_a-e0.nii.gz")
    assert [by_id[i]["presence"] for i in ("case_a-e2", "case_b-e0", "case_b-e1")] == [
        "both_empty", "pred_empty", "ref_empty"]
    assert (by_id["case_a-e1"]["tp"], by_id["case_a-e1"]["fp"], by_id["case_a-e1"]["fn"]) == (1, 0, 1)
    assert (by_id["case_b-e1"]["tp"], by_id["case_b-e1"]["fp"], by_id["case_b-e1"]["fn"]) == (0, 1, 0)

    # The spacing must come from the files: HD95 in mm with the anisotropic (2.5, 0.8, 0.6) grid.
    maps, predictions = _region_maps(), _predictions(_region_maps())
    expected = expression_metrics(predictions["case_a-e1"] > 0, np.isin(maps["case_a"], (1, 2)), SPACING_ZYX)
    assert by_id["case_a-e1"]["hd95"] == pytest.approx(expected["hd95"])
    assert by_id["case_a-e1"]["nsd"] == pytest.approx(expected["nsd"])
    assert summary["aggregate"] == aggregate_metrics(entries)
    assert summary["aggregate"]["no_target_accuracy"] == 0.5

    assert _strict_json(output_file) == summary
    assert summary["settings"]["nsd_tolerance_mm"] == 1.0
    assert summary["settings"]["expressions"] == str(expressions_file.resolve())
    table = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert table == format_summary_table(summary) + "\n"
    assert "| mIoU" in table and "Prec@0.9" in table and "undefined for 2" in table
    assert not [path for path in output_file.parent.iterdir() if path.name.endswith(".tmp")]


def test_per_category_and_per_phrasing_scores_on_a_hand_made_example(folders, tmp_path):
    reference_dir, prediction_dir, _ = folders
    labelled = [Expression(e.id, e.case, e.text, e.targets, category, phrasing) for e, category, phrasing in zip(
        EXPRESSIONS, ("size", None, "no_target", "size", "no_target"), (None, None, None, "heldout", None))]
    summary = evaluate_referring_folder(reference_dir, prediction_dir, labelled, output_file=tmp_path / "summary.json")
    assert [entry["category"] for entry in summary["metric_per_expression"]] == [
        "size", None, "no_target", "size", "no_target"]
    # size: exact (Dice 1) + missed (0); no_target: both empty (1) + spurious (0); uncategorized: lesion 1 found
    # shifted by one row (12 of its 18 voxels) and lesion 2 (32 voxels) missed: Dice 24/68, IoU 12/56.
    assert summary["per_category"] == {
        "size": {"n_expressions": 2, "mean_dice": 0.5, "mIoU": 0.5, "no_target_accuracy": None},
        "no_target": {"n_expressions": 2, "mean_dice": 0.5, "mIoU": 0.5, "no_target_accuracy": 0.5},
        "uncategorized": {"n_expressions": 1, "mean_dice": pytest.approx(24 / 68), "mIoU": pytest.approx(12 / 56),
                          "no_target_accuracy": None}}
    assert list(summary["per_category"]) == ["size", "no_target", "uncategorized"]
    assert summary["per_phrasing"]["heldout"] == {"n_expressions": 1, "mean_dice": 0.0, "mIoU": 0.0,
                                                  "no_target_accuracy": None}
    assert summary["per_phrasing"]["seen"]["n_expressions"] == 4
    table = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| Category      | Expressions | Mean Dice | mIoU   | No-target accuracy |" in table
    assert "| size          | 2           | 0.5000    | 0.5000 | n/a                |" in table
    assert "| no_target     | 2           | 0.5000    | 0.5000 | 0.5000             |" in table
    assert "| heldout  | 1           | 0.0000    | 0.0000 | n/a                |" in table


def test_without_heldout_expressions_there_is_no_phrasing_split(folders):
    reference_dir, prediction_dir, _ = folders
    summary = evaluate_referring_folder(reference_dir, prediction_dir, EXPRESSIONS)
    assert "per_phrasing" not in summary and list(summary["per_category"]) == ["uncategorized"]


def test_evaluate_with_worker_processes_matches_serial(folders):
    reference_dir, prediction_dir, expressions_file = folders
    serial = evaluate_referring_folder(reference_dir, prediction_dir, EXPRESSIONS)
    parallel = evaluate_referring_folder(reference_dir, prediction_dir, expressions_file, num_processes=2)
    assert parallel["metric_per_expression"] == serial["metric_per_expression"]
    assert serial["settings"]["expressions"] == "<list of 5 expressions>"


def test_evaluate_2d_images_uses_in_plane_spacing(tmp_path):
    reference = np.zeros((12, 12), dtype=np.uint8)
    reference[2:6, 2:6] = 1
    prediction = np.zeros((12, 12), dtype=np.uint8)
    prediction[4:8, 2:6] = 1
    for folder, array, name in ((tmp_path / "ref", reference, "img"), (tmp_path / "pred", prediction, "img-e0")):
        folder.mkdir()
        _write(array, folder / f"{name}.nii.gz", spacing_zyx=(3.0, 1.0))
    summary = evaluate_referring_folder(tmp_path / "ref", tmp_path / "pred", [Expression("img-e0", "img", "it", (1,))])
    assert summary["metric_per_expression"][0]["hd95"] == pytest.approx(6.0)


def test_missing_files_are_listed_before_any_computation(folders, tmp_path):
    reference_dir, prediction_dir, expressions_file = folders
    (prediction_dir / "case_a-e1.nii.gz").unlink()
    (prediction_dir / "case_b-e0.nii.gz").unlink()
    (reference_dir / "case_b.nii.gz").unlink()
    output_file = tmp_path / "summary.json"
    with pytest.raises(FileNotFoundError) as error:
        evaluate_referring_folder(reference_dir, prediction_dir, expressions_file, output_file=output_file)
    message = str(error.value)
    assert "2 prediction file(s) missing" in message and "case_a-e1, case_b-e0" in message
    assert "1 reference file(s) missing" in message and "case_b.nii.gz" in message
    assert not output_file.exists()


def test_expressions_without_targets_are_rejected(folders):
    reference_dir, prediction_dir, _ = folders
    untargeted = [Expression("case_a-e0", "case_a", "the small lesion", None)]
    with pytest.raises(ExpressionsError, match="case_a-e0 have no targets"):
        evaluate_referring_folder(reference_dir, prediction_dir, untargeted)


def test_grid_mismatch_and_unknown_targets_name_the_files(folders):
    reference_dir, prediction_dir, _ = folders
    _write(np.zeros((4, 12, 10), dtype=np.uint8), prediction_dir / "case_a-e0.nii.gz")
    with pytest.raises(EvaluationInputError) as error:
        evaluate_referring_folder(reference_dir, prediction_dir, EXPRESSIONS[:1])
    assert "case_a-e0.nii.gz" in str(error.value) and "case_a.nii.gz" in str(error.value)
    with pytest.raises(EvaluationInputError, match=r"targets region id\(s\) \[7\] absent"):
        evaluate_referring_folder(reference_dir, prediction_dir, [Expression("case_a-e1", "case_a", "x", (1, 7))])
    _write(np.zeros(SHAPE, dtype=np.uint8), prediction_dir / "case_a-e0.nii.gz", spacing_zyx=(1.0, 0.8, 0.6))
    with pytest.raises(EvaluationInputError, match=r"case_a-e0.nii.gz has spacing \[1.0, 0.8"):
        evaluate_referring_folder(reference_dir, prediction_dir, EXPRESSIONS[:1])
    with pytest.raises(EvaluationInputError, match="num_processes"):
        evaluate_referring_folder(reference_dir, prediction_dir, EXPRESSIONS[:1], num_processes=0)


def _run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'LSMSv2_evaluate'; "  # as the script
                                                 "from lsms_nnunet.evaluation.evaluate import evaluate_entry; "
                                                 "evaluate_entry()", *arguments],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120, cwd=Path(__file__).resolve().parents[1])


def test_cli_writes_summary_into_prediction_folder_and_prints_table(folders):
    reference_dir, prediction_dir, expressions_file = folders
    result = _run_cli("-ref", str(reference_dir), "-pred", str(prediction_dir), "-e", str(expressions_file),
                      "--nsd_tolerance", "2.0")
    assert result.returncode == 0, result.stderr
    summary = _strict_json(prediction_dir / "summary.json")
    assert summary["settings"]["nsd_tolerance_mm"] == 2.0
    assert summary["aggregate"]["n_expressions"] == 5
    assert (prediction_dir / "summary.md").is_file()
    assert "| Mean Dice" in result.stdout


def test_cli_reports_missing_predictions_clearly(folders, tmp_path):
    reference_dir, prediction_dir, expressions_file = folders
    (prediction_dir / "case_b-e1.nii.gz").unlink()
    result = _run_cli("-ref", str(reference_dir), "-pred", str(prediction_dir), "-e", str(expressions_file),
                      "-o", str(tmp_path / "elsewhere.json"))
    assert result.returncode == 1
    assert "LSMSv2_evaluate: error:" in result.stderr and "case_b-e1" in result.stderr
    assert not (tmp_path / "elsewhere.json").exists()
