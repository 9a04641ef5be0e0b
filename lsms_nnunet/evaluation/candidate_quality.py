"""How well the case-level stage's candidates stand for the real lesions, measured directly.

The stage can only answer with whole candidates: a lesion cut in pieces makes "the biggest tumour" a piece of it,
two lesions merged into one candidate make "the smaller one" impossible. Per reference lesion (a region of the label
map, at least `min_voxels`):

- **matched**: one candidate covers it with IoU >= `min_iou` (one-to-one: at IoU > 0.5 no other candidate or lesion
  can share it that much);
- **split**: not matched, and two or more candidates each hold at least `PIECE_SHARE` of it;
- **merged**: not matched, and the candidate holding most of it also holds at least `PIECE_SHARE` of another lesion;
- **missed**: no candidate holds `PIECE_SHARE` of it;
- otherwise **poorly outlined** (one candidate, too large or too small for the IoU).
A lesion can be split and merged at once; the other outcomes exclude each other. Smaller lesions are counted apart
(`too_small`), not scored.

`choice_ceiling` is the other half of the same question, per expression: the Dice of the best answer the stage could
give with these candidates, so that a benchmark can tell the choice's losses from the outlines'.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lsms_nnunet.evaluation.metrics import dice_score
from lsms_nnunet.selection.candidates import Candidates, referred_fraction

PIECE_SHARE = 0.1


def candidate_quality(candidate_labels: np.ndarray, region_map: np.ndarray, lesion_ids: Sequence[int],
                      min_voxels: int = 50, min_iou: float = 0.5) -> dict[str, int]:
    """Counts of reference lesions (the regions `lesion_ids` of `region_map` with at least `min_voxels`) by outcome,
    against candidates numbered 1..n in `candidate_labels` (0: none)."""
    candidates = candidate_labels.ravel().astype(np.int64)
    regions = region_map.ravel().astype(np.int64)
    count = int(candidates.max(initial=0))
    candidate_voxels = np.bincount(candidates, minlength=count + 1)
    present = [int(i) for i in lesion_ids if (regions == i).any()]
    lesions = [i for i in present if int((regions == i).sum()) >= min_voxels]
    overlap = {lesion: np.bincount(candidates[regions == lesion], minlength=count + 1) for lesion in lesions}
    share = {lesion: overlap[lesion][1:] / max(1, overlap[lesion].sum()) for lesion in lesions}
    counts = {"lesions": len(lesions), "too_small": len(present) - len(lesions), "matched": 0, "split": 0,
              "merged": 0, "missed": 0, "poorly_outlined": 0}
    for lesion in lesions:
        inside, size = overlap[lesion][1:], overlap[lesion].sum()
        iou = inside / np.maximum(size + candidate_voxels[1:] - inside, 1)
        if len(iou) and iou.max() >= min_iou:
            counts["matched"] += 1
            continue
        pieces = share[lesion] >= PIECE_SHARE
        if not pieces.any():
            counts["missed"] += 1
            continue
        best = int(np.argmax(inside))
        split = int(pieces.sum()) >= 2
        merged = any(share[other][best] >= PIECE_SHARE for other in lesions if other != lesion)
        counts["split"] += split
        counts["merged"] += merged
        counts["poorly_outlined"] += not (split or merged)
    return counts


def choice_ceiling(candidates: Candidates, kept: np.ndarray, region_map: np.ndarray, targets: Sequence[int]) -> float:
    """Dice of the answer a perfect choice among `candidates` gives an expression referring to the regions `targets`:
    the candidates it refers to (most of each in those regions, the stage's own fitting target), each kept where
    `kept` is true (the stage keeps a chosen candidate where its finding logits are positive). An expression that
    refers to nothing scores 1 when no candidate is referred, as no-target accuracy counts it."""
    referred = np.flatnonzero(referred_fraction(candidates, region_map, targets) > 0.5)
    return dice_score(candidates.masks(referred) & kept, np.isin(region_map, np.asarray(list(targets), dtype=np.int64)))
