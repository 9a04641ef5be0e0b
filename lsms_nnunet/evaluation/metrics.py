"""Referring-segmentation metrics: per-expression overlap and surface scores, lesion detection, and aggregates.

Everything here is pure numpy on one binary prediction and one binary reference, 2D or 3D, with the voxel
spacing in numpy axis order (nnU-Net's `properties['spacing']`). Surface distances come from DeepMind's
`surface_distance` package, so HD95 and NSD are surface-area weighted rather than voxel-count weighted.

Empty masks are handled explicitly, never as NaN; every expression gets a `presence` category:
- both_empty: refers to nothing and nothing was predicted (a perfect answer): dice = iou = nsd = 1, hd95 = 0 mm.
- ref_empty: refers to nothing but something was predicted: dice = iou = nsd = 0, hd95 = None (undefined).
- pred_empty: refers to something but nothing was predicted: dice = iou = nsd = 0, hd95 = None (undefined).
- both_present: the ordinary case, every score computed.
"""
import warnings
from typing import Sequence

import cc3d
import numpy as np
from surface_distance import compute_robust_hausdorff, compute_surface_dice_at_tolerance, compute_surface_distances

PRESENCE_CATEGORIES = ("both_empty", "ref_empty", "pred_empty", "both_present")
PRECISION_IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
HAUSDORFF_PERCENTILE = 95
DEFAULT_DETECTION_MIN_OVERLAP = 0.1
UNCATEGORIZED = "uncategorized"
# Report order of the expression categories (the synthetic generator's and the semantic converter's); others follow.
CATEGORY_ORDER = ("kind", "kind_lobe", "lobe", "attribute", "plural", "size", "position", "no_target")
PHRASING_ORDER = ("seen", "heldout")
GROUP_METRICS = ("n_expressions", "mean_dice", "mIoU", "no_target_accuracy")
REQUIRED_PER_EXPRESSION_KEYS = ("presence", "dice", "iou", "hd95", "nsd", "intersection_voxels", "union_voxels",
                                "tp", "fp", "fn")


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Volumetric Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def _check_same_geometry(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"Prediction shape {pred.shape} differs from reference shape {ref.shape}; "
                         f"both masks must be on the same voxel grid.")
    if pred.ndim not in (2, 3):
        raise ValueError(f"Masks must be 2D or 3D, got shape {pred.shape}.")
    if len(spacing) != pred.ndim or any(s <= 0 for s in spacing):
        raise ValueError(f"Spacing {tuple(spacing)} must hold one positive value per axis of shape {pred.shape}.")


def _drop_singleton_axes(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]):
    """Treat a one-slice volume as the 2D image it is (nnU-Net reads 2D files as 1 x Y x X with a dummy z spacing),
    so surfaces are in-plane contours instead of the faces of a one-voxel slab."""
    non_singleton_axes = [axis for axis, size in enumerate(pred.shape) if size > 1]
    if pred.ndim != 3 or len(non_singleton_axes) != 2:
        return pred, ref, tuple(spacing)
    plane_shape = tuple(pred.shape[axis] for axis in non_singleton_axes)
    return pred.reshape(plane_shape), ref.reshape(plane_shape), tuple(spacing[axis] for axis in non_singleton_axes)

def _surface_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], nsd_tolerance_mm: float):
    pred, ref, spacing = _drop_singleton_axes(pred, ref, spacing)
    with warnings.catch_warnings():
        # surface_distance 0.1 still imports from the deprecated scipy.ndimage.filters/morphology namespaces.
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = compute_surface_distances(ref, pred, [float(s) for s in spacing])
    hd95 = float(compute_robust_hausdorff(distances, HAUSDORFF_PERCENTILE))
    nsd = float(compute_surface_dice_at_tolerance(distances, nsd_tolerance_mm))
    return hd95, nsd


def expression_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                       nsd_tolerance_mm: float = 1.0) -> dict:
    """Dice, IoU, HD95 (mm) and NSD (surface Dice at `nsd_tolerance_mm`) of one expression's mask.

    HD95 is `surface_distance.compute_robust_hausdorff(..., 95)`: the larger of the two directed, surface-area
    weighted 95th percentiles. Empty masks follow the module table; voxel counts (`ref_voxels`, `pred_voxels`,
    `intersection_voxels`, `union_voxels`) are returned so aggregates such as oIoU can be cumulated.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    _check_same_geometry(pred, ref, spacing)
    ref_voxels, pred_voxels = int(ref.sum()), int(pred.sum())
    intersection_voxels = int(np.logical_and(pred, ref).sum())
    union_voxels = ref_voxels + pred_voxels - intersection_voxels
    counts = {"ref_voxels": ref_voxels, "pred_voxels": pred_voxels, "intersection_voxels": intersection_voxels,
              "union_voxels": union_voxels}
    if ref_voxels == 0 and pred_voxels == 0:
        return {"presence": "both_empty", "dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0, **counts}
    if ref_voxels == 0 or pred_voxels == 0:
        presence = "ref_empty" if ref_voxels == 0 else "pred_empty"
        return {"presence": presence, "dice": 0.0, "iou": 0.0, "hd95": None, "nsd": 0.0, **counts}
    hd95, nsd = _surface_scores(pred, ref, spacing, nsd_tolerance_mm)
    return {"presence": "both_present", "dice": 2.0 * intersection_voxels / (ref_voxels + pred_voxels),
            "iou": intersection_voxels / union_voxels, "hd95": hd95, "nsd": nsd, **counts}


def lesion_detection(pred: np.ndarray, ref_lesions: np.ndarray,
                     min_overlap: float = DEFAULT_DETECTION_MIN_OVERLAP) -> dict:
    """Per-lesion true positives, false positives and false negatives of one expression.

    `ref_lesions` is the region map restricted to the expression's targets (0 elsewhere); each non-zero id is one
    reference lesion. Predicted lesions are the connected components of `pred` with full connectivity (8 in 2D,
    26 in 3D). Rule: a reference lesion is detected (TP) when a single predicted component covers at least
    `min_overlap` of its voxels, otherwise it is missed (FN); a predicted component touching no reference lesion
    is a false positive (FP). A component that touches a lesion but covers less than `min_overlap` of it is
    neither a TP nor an FP. Voxel fractions are spacing-invariant, so no spacing is needed.
    """
    pred = np.asarray(pred, dtype=bool)
    ref_lesions = np.asarray(ref_lesions)
    if pred.shape != ref_lesions.shape:
        raise ValueError(f"Prediction shape {pred.shape} differs from lesion map shape {ref_lesions.shape}.")
    if not np.issubdtype(ref_lesions.dtype, np.integer):
        raise TypeError(f"The lesion map must hold integer region ids, got dtype {ref_lesions.dtype}.")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must lie in (0, 1], got {min_overlap}.")
    if pred.ndim not in (2, 3):
        raise ValueError(f"Masks must be 2D or 3D, got shape {pred.shape}.")
    components, num_components = cc3d.connected_components(pred, connectivity=8 if pred.ndim == 2 else 26,
                                                           return_N=True)
    lesion_ids, lesion_sizes = np.unique(ref_lesions[ref_lesions != 0], return_counts=True)
    touching = (components != 0) & (ref_lesions != 0)
    pairs, pair_overlaps = np.unique(np.stack([components[touching].astype(np.int64),
                                               ref_lesions[touching].astype(np.int64)]), axis=1,
                                     return_counts=True)
    best_overlap = {int(lesion): 0 for lesion in lesion_ids}
    for lesion, overlap in zip(pairs[1], pair_overlaps):
        best_overlap[int(lesion)] = max(best_overlap[int(lesion)], int(overlap))
    detected = sum(best_overlap[int(lesion)] >= min_overlap * size for lesion, size in zip(lesion_ids, lesion_sizes))
    components_touching_a_lesion = len(np.unique(pairs[0]))
    return {"tp": int(detected), "fp": int(num_components) - components_touching_a_lesion,
            "fn": int(len(lesion_ids) - detected)}


def _mean_or_none(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def _ratio_or_none(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def aggregate_metrics(per_expression: list[dict]) -> dict:
    """Dataset-level referring-segmentation scores from per-expression entries (expression_metrics + lesion_detection).

    mIoU is the mean of per-expression IoU, oIoU the cumulative intersection over the cumulative union (1.0 when
    every union is empty, matching the both-empty convention), `precision@t` the fraction of expressions with IoU > t.
    HD95 is averaged over the expressions where it is defined and the others are counted. `no_target_accuracy` is the
    fraction of reference-empty expressions with an empty prediction (None when there are none). Detection precision,
    recall and F1 are micro-averaged over lesions; a ratio with a zero denominator is None, never NaN.
    """
    if not per_expression:
        raise ValueError("No per-expression metrics to aggregate: the evaluation covered zero expressions.")
    for index, entry in enumerate(per_expression):
        missing = [key for key in REQUIRED_PER_EXPRESSION_KEYS if key not in entry]
        if missing:
            raise ValueError(f"Per-expression entry {index} ({entry.get('id', 'no id')}) lacks {missing}; build it "
                             f"from expression_metrics(...) merged with lesion_detection(...).")
        if entry["presence"] not in PRESENCE_CATEGORIES:
            raise ValueError(f"Per-expression entry {index} has unknown presence {entry['presence']!r}; "
                             f"expected one of {PRESENCE_CATEGORIES}.")
    ious = [entry["iou"] for entry in per_expression]
    total_intersection = sum(entry["intersection_voxels"] for entry in per_expression)
    total_union = sum(entry["union_voxels"] for entry in per_expression)
    defined_hd95 = [entry["hd95"] for entry in per_expression if entry["hd95"] is not None]
    presence_counts = {category: sum(entry["presence"] == category for entry in per_expression)
                       for category in PRESENCE_CATEGORIES}
    no_target_count = presence_counts["both_empty"] + presence_counts["ref_empty"]
    tp, fp, fn = (sum(entry[key] for entry in per_expression) for key in ("tp", "fp", "fn"))
    return {
        "n_expressions": len(per_expression),
        "presence_counts": presence_counts,
        "mean_dice": _mean_or_none([entry["dice"] for entry in per_expression]),
        "mIoU": _mean_or_none(ious),
        "oIoU": total_intersection / total_union if total_union > 0 else 1.0,
        **{f"precision@{threshold}": float(np.mean([iou > threshold for iou in ious]))
           for threshold in PRECISION_IOU_THRESHOLDS},
        "mean_hd95": _mean_or_none(defined_hd95),
        "hd95_undefined_count": len(per_expression) - len(defined_hd95),
        "mean_nsd": _mean_or_none([entry["nsd"] for entry in per_expression]),
        "no_target_accuracy": _ratio_or_none(presence_counts["both_empty"], no_target_count),
        "no_target_count": no_target_count,
        "detection_tp": tp,
        "detection_fp": fp,
        "detection_fn": fn,
        "detection_precision": _ratio_or_none(tp, tp + fp),
        "detection_recall": _ratio_or_none(tp, tp + fn),
        "detection_f1": _ratio_or_none(2 * tp, 2 * tp + fp + fn),
    }


def grouped_metrics(per_expression: list[dict], key: str, default: str, order: Sequence[str]) -> dict[str, dict]:
    """aggregate_metrics' n_expressions, mean_dice, mIoU and no_target_accuracy for each value of an entry's `key`.

    Entries without the key (or with None) count as `default`. Groups come in `order`, then any other value
    alphabetically, with `default` last unless `order` places it, so tables line up across runs.
    """
    groups: dict[str, list[dict]] = {}
    for entry in per_expression:
        groups.setdefault(entry.get(key) or default, []).append(entry)

    def rank(name: str) -> tuple[int, str]:
        if name in order:
            return order.index(name), ""
        return len(order) + (name == default), name

    return {name: {metric: aggregate_metrics(groups[name])[metric] for metric in GROUP_METRICS}
            for name in sorted(groups, key=rank)}


def per_category_metrics(per_expression: list[dict]) -> dict[str, dict]:
    """Scores per expression category ("size", "no_target", ...); entries without one are "uncategorized"."""
    return grouped_metrics(per_expression, "category", UNCATEGORIZED, CATEGORY_ORDER)


def per_phrasing_metrics(per_expression: list[dict]) -> dict[str, dict]:
    """Scores on seen wording (no phrasing mark) vs held-out wording (phrasing "heldout")."""
    return grouped_metrics(per_expression, "phrasing", PHRASING_ORDER[0], PHRASING_ORDER)
