"""Candidate quality against reference lesions: matched, split, merged, missed, poorly outlined."""
import numpy as np

from lsms_nnunet.evaluation.candidate_quality import candidate_quality


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
