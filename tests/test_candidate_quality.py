"""Candidate quality against reference lesions: matched, split, merged, missed, poorly outlined."""
import numpy as np

from lsms_nnunet.evaluation.candidate_quality import candidate_quality, choice_ceiling
from lsms_nnunet.selection.candidates import Candidates


def test_each_reference_lesion_is_counted_by_what_the_candidates_made_of_it():
    regions = np.zeros((1, 40, 60), dtype=np.int16)
    candidates = np.zeros_like(regions)
    regions[0, 0:10, 0:10] = candidates[0, 0:10, 0:10] = 1  # matched: one candidate, exactly
    regions[0, 0:10, 20:30] = 2  # split in three pieces (IoU at most 0.4)
    candidates[0, 0:10, 20:24], candidates[0, 0:10, 24:27], candidates[0, 0:10, 27:30] = 2, 3, 4
    regions[0, 20:30, 0:10], regions[0, 20:30, 10:20] = 3, 4  # merged: both in one candidate
    candidates[0, 20:31, 0:20] = 5
    regions[0, 20:30, 40:50] = 6  # missed
    regions[0, 32:40, 40:50] = 7  # one candidate 2.5 times its size: poorly outlined
    candidates[0, 30:40, 30:50] = 6
    regions[0, 35:37, 0:3] = 8  # too small to count (6 voxels)
    quality = candidate_quality(candidates, regions, range(1, 9), min_voxels=50)
    assert quality == {"lesions": 6, "too_small": 1, "matched": 1, "split": 1, "merged": 2, "missed": 1,
                       "poorly_outlined": 1}
    exact = candidate_quality(np.where(regions == 8, 0, regions), regions, range(1, 9), min_voxels=50)
    assert exact["matched"] == exact["lesions"] == 6


def test_the_choice_ceiling_is_the_dice_of_choosing_exactly_the_referred_candidates_where_they_are_kept():
    regions = np.zeros((1, 20, 40), dtype=np.int16)
    regions[0, 0:10, 0:10], regions[0, 0:10, 20:30], regions[0, 12:14, 30:40] = 1, 2, 3
    labels = np.zeros_like(regions)
    labels[0, 0:10, 0:10] = 1  # lesion 1 exactly
    labels[0, 0:10, 20:35] = 2  # lesion 2 and 50 voxels of tissue: two thirds of it referred by lesion 2
    labels[0, 15:20, 0:10] = 3  # tissue only
    candidates = Candidates(labels, 3, np.bincount(labels.ravel())[1:].astype(float))
    everywhere = np.ones(regions.shape, dtype=bool)
    assert choice_ceiling(candidates, everywhere, regions, [1]) == 1.0
    assert choice_ceiling(candidates, everywhere, regions, [2]) == 2 * 100 / (150 + 100)
    assert choice_ceiling(candidates, everywhere, regions, [1, 2]) == 2 * 200 / (250 + 200)
    assert choice_ceiling(candidates, everywhere, regions, []) == 1.0  # nothing referred, nothing chosen
    kept = everywhere.copy()
    kept[0, 0:5, 0:10] = False  # the stage keeps a candidate only where its finding logits are positive
    assert choice_ceiling(candidates, kept, regions, [1]) == 2 * 50 / (50 + 100)
    assert choice_ceiling(candidates, everywhere, regions, [3]) == 0.0  # a lesion the finding answer missed
