"""Referring-segmentation metrics against values computed by hand on tiny arrays."""
import json
import math

import numpy as np
import pytest

from lsms_nnunet.evaluation.metrics import aggregate_metrics, dice_score, expression_metrics, lesion_detection

# Marching-squares contour length of a convex corner pixel with spacing (3, 1): the diagonal through half a voxel.
CORNER_LENGTH_3x1 = math.hypot(1.5, 0.5)


def _square_pair(shift_rows: int = 0, shift_cols: int = 0, shape=(12, 12)):
    """A 4x4 reference square at rows/cols 2..5 and the same square shifted."""
    reference = np.zeros(shape, dtype=bool)
    reference[2:6, 2:6] = True
    prediction = np.zeros(shape, dtype=bool)
    prediction[2 + shift_rows:6 + shift_rows, 2 + shift_cols:6 + shift_cols] = True
    return prediction, reference


def test_dice_iou_and_voxel_counts_by_hand():
    reference = np.zeros((4, 4), dtype=bool)
    reference[0, :] = True  # 4 voxels
    prediction = np.zeros((4, 4), dtype=bool)
    prediction[0, 3] = prediction[1, 3] = True  # 2 voxels, 1 shared
    metrics = expression_metrics(prediction, reference, (1.0, 1.0))
    assert metrics["presence"] == "both_present"
    assert metrics["dice"] == pytest.approx(2 * 1 / (4 + 2))
    assert metrics["iou"] == pytest.approx(1 / 5)
    assert (metrics["ref_voxels"], metrics["pred_voxels"]) == (4, 2)
    assert (metrics["intersection_voxels"], metrics["union_voxels"]) == (1, 5)
    assert dice_score(prediction, reference) == pytest.approx(1 / 3)
    assert dice_score(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_hd95_uses_anisotropic_spacing_2d():
    """Shifting 2 rows at 3 mm/row puts the whole top edge (20% of the contour) 6 mm away, nothing further."""
    prediction, reference = _square_pair(shift_rows=2)
    assert expression_metrics(prediction, reference, (3.0, 1.0))["hd95"] == pytest.approx(6.0)
    assert expression_metrics(prediction, reference, (1.0, 1.0))["hd95"] == pytest.approx(2.0)
    prediction, reference = _square_pair(shift_cols=2)
    assert expression_metrics(prediction, reference, (3.0, 1.0))["hd95"] == pytest.approx(2.0)


def test_nsd_matches_hand_computed_contour_lengths():
    """Squares shifted 2 rows (6 mm) with spacing (3, 1), tolerance 1 mm.

    Each contour (marching squares): 2 vertical sides of 3 straight pixels x 3 mm, 2 horizontal sides of 3 x 1 mm,
    4 corners of hypot(1.5, 0.5). Within 1 mm of the other contour: 4 straight side pixels lying on it (4 x 3 mm),
    the 2 corners lying on it, and 2 bottom-edge pixels 1 mm from the other square's sides (2 x 1 mm).
    By symmetry both directions agree.
    """
    prediction, reference = _square_pair(shift_rows=2)
    within_tolerance = 4 * 3.0 + 2 * CORNER_LENGTH_3x1 + 2 * 1.0
    contour_length = 2 * 3 * 3.0 + 2 * 3 * 1.0 + 4 * CORNER_LENGTH_3x1
    metrics = expression_metrics(prediction, reference, (3.0, 1.0), nsd_tolerance_mm=1.0)
    assert metrics["nsd"] == pytest.approx(within_tolerance / contour_length, abs=1e-9)
    assert expression_metrics(prediction, reference, (3.0, 1.0), nsd_tolerance_mm=6.0)["nsd"] == pytest.approx(1.0)


def test_nsd_with_an_extra_false_blob_is_two_thirds():
    """Prediction = reference square + an identical square far away: 2 of 3 equal contours match."""
    reference = np.zeros((20, 12), dtype=bool)
    reference[2:6, 2:6] = True
    prediction = reference.copy()
    prediction[12:16, 2:6] = True
    for spacing in ((3.0, 1.0), (0.7, 1.9)):
        assert expression_metrics(prediction, reference, spacing)["nsd"] == pytest.approx(2 / 3)


def test_hd95_3d_anisotropic_and_single_slice_volume_is_2d():
    reference = np.zeros((10, 10, 10), dtype=bool)
    reference[2:6, 2:6, 2:6] = True
    prediction = np.zeros_like(reference)
    prediction[3:7, 2:6, 2:6] = True
    metrics = expression_metrics(prediction, reference, (2.5, 1.0, 1.0))
    assert metrics["hd95"] == pytest.approx(2.5)
    assert metrics["dice"] == pytest.approx(2 * 48 / 128)
    prediction_2d, reference_2d = _square_pair(shift_rows=2)
    as_volume = expression_metrics(prediction_2d[None], reference_2d[None], (999.0, 3.0, 1.0))
    assert as_volume == expression_metrics(prediction_2d, reference_2d, (3.0, 1.0))


@pytest.mark.parametrize("has_prediction, has_reference, presence, expected", [
    (False, False, "both_empty", {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}),
    (True, False, "ref_empty", {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95": None}),
    (False, True, "pred_empty", {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95": None}),
])
def test_every_empty_category_is_explicit_and_json_safe(has_prediction, has_reference, presence, expected):
    prediction = np.zeros((3, 5, 5), dtype=bool)
    reference = np.zeros((3, 5, 5), dtype=bool)
    prediction[1, 1:3, 1:3] = has_prediction
    reference[1, 2:4, 2:4] = has_reference
    metrics = expression_metrics(prediction, reference, (2.0, 1.0, 1.0))
    assert metrics["presence"] == presence
    assert {key: metrics[key] for key in expected} == expected
    json.dumps(metrics, allow_nan=False)


def test_expression_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="shape"):
        expression_metrics(np.zeros((4, 4)), np.zeros((4, 5)), (1.0, 1.0))
    with pytest.raises(ValueError, match="Spacing"):
        expression_metrics(np.zeros((4, 4)), np.zeros((4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="2D or 3D"):
        expression_metrics(np.zeros(4), np.zeros(4), (1.0,))


def _detection_map():
    """Lesions 1 (9 voxels), 3 (9 voxels) and 5 (4 voxels); predictions: all of 1, one voxel of 3, a diagonal
    two-pixel blob touching nothing (one component under 8-connectivity)."""
    lesions = np.zeros((14, 14), dtype=np.int16)
    lesions[1:4, 1:4] = 1
    lesions[7:10, 7:10] = 3
    lesions[11:13, 1:3] = 5
    prediction = np.zeros((14, 14), dtype=bool)
    prediction[1:5, 1:4] = True
    prediction[9, 9] = True
    prediction[1, 11] = prediction[2, 12] = True
    return prediction, lesions


def test_lesion_detection_counts_by_hand():
    prediction, lesions = _detection_map()
    assert lesion_detection(prediction, lesions) == {"tp": 2, "fp": 1, "fn": 1}
    # At 50%, one voxel of lesion 3 no longer detects it, and the component touching it is not an FP either.
    assert lesion_detection(prediction, lesions, min_overlap=0.5) == {"tp": 1, "fp": 1, "fn": 2}
    assert lesion_detection(np.zeros_like(prediction), lesions) == {"tp": 0, "fp": 0, "fn": 3}
    assert lesion_detection(prediction, np.zeros_like(lesions)) == {"tp": 0, "fp": 3, "fn": 0}


def test_lesion_detection_3d_uses_full_connectivity():
    lesions = np.zeros((4, 4, 4), dtype=np.int32)
    lesions[0, 0, 0] = 2
    prediction = np.zeros((4, 4, 4), dtype=bool)
    prediction[2, 2, 2] = prediction[3, 3, 3] = True  # corner neighbours: one component
    assert lesion_detection(prediction, lesions) == {"tp": 0, "fp": 1, "fn": 1}
    with pytest.raises(TypeError, match="integer"):
        lesion_detection(prediction, lesions.astype(np.float32))
    with pytest.raises(ValueError, match="min_overlap"):
        lesion_detection(prediction, lesions, min_overlap=0.0)


def _entry(presence, dice, iou, hd95, nsd, intersection, union, pred_voxels, tp, fp, fn):
    return {"presence": presence, "dice": dice, "iou": iou, "hd95": hd95, "nsd": nsd,
            "intersection_voxels": intersection, "union_voxels": union, "pred_voxels": pred_voxels,
            "tp": tp, "fp": fp, "fn": fn}


def test_aggregate_metrics_by_hand():
    entries = [
        _entry("both_present", 0.8, 0.6, 2.0, 0.9, 6, 10, 8, 1, 0, 0),
        _entry("both_present", 2 / 3, 0.5, 4.0, 0.5, 5, 10, 7, 1, 1, 1),
        _entry("both_empty", 1.0, 1.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0),
        _entry("ref_empty", 0.0, 0.0, None, 0.0, 0, 4, 4, 0, 1, 0),
    ]
    aggregate = aggregate_metrics(entries)
    assert aggregate["n_expressions"] == 4
    assert aggregate["presence_counts"] == {"both_empty": 1, "ref_empty": 1, "pred_empty": 0, "both_present": 2}
    assert aggregate["mean_dice"] == pytest.approx((0.8 + 2 / 3 + 1.0 + 0.0) / 4)
    assert aggregate["mIoU"] == pytest.approx(0.525)
    assert aggregate["oIoU"] == pytest.approx(11 / 24)
    # IoU > t is strict: 0.6 passes 0.5 but not 0.6; 0.5 never passes 0.5.
    assert aggregate["precision@0.5"] == pytest.approx(0.5)
    for threshold in (0.6, 0.7, 0.8, 0.9):
        assert aggregate[f"precision@{threshold}"] == pytest.approx(0.25)
    assert aggregate["mean_hd95"] == pytest.approx(2.0)
    assert aggregate["hd95_undefined_count"] == 1
    assert aggregate["mean_nsd"] == pytest.approx(0.6)
    assert (aggregate["no_target_accuracy"], aggregate["no_target_count"]) == (0.5, 2)
    assert (aggregate["detection_tp"], aggregate["detection_fp"], aggregate["detection_fn"]) == (2, 2, 1)
    assert aggregate["detection_precision"] == pytest.approx(0.5)
    assert aggregate["detection_recall"] == pytest.approx(2 / 3)
    assert aggregate["detection_f1"] == pytest.approx(4 / 7)
    json.dumps(aggregate, allow_nan=False)


def test_aggregate_metrics_undefined_ratios_are_none():
    all_empty = aggregate_metrics([_entry("both_empty", 1.0, 1.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0)])
    assert all_empty["oIoU"] == 1.0
    assert all_empty["no_target_accuracy"] == 1.0
    assert all_empty["detection_precision"] is None
    assert all_empty["detection_recall"] is None
    assert all_empty["detection_f1"] is None
    missed = aggregate_metrics([_entry("pred_empty", 0.0, 0.0, None, 0.0, 0, 5, 0, 0, 0, 1)])
    assert (missed["no_target_accuracy"], missed["no_target_count"]) == (None, 0)
    assert (missed["mean_hd95"], missed["hd95_undefined_count"]) == (None, 1)
    assert missed["detection_f1"] == 0.0


def test_aggregate_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="zero expressions"):
        aggregate_metrics([])
    with pytest.raises(ValueError, match="lacks"):
        aggregate_metrics([{"presence": "both_empty", "dice": 1.0}])
    with pytest.raises(ValueError, match="unknown presence"):
        aggregate_metrics([_entry("maybe", 1.0, 1.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0)])
