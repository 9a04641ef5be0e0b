"""Where a candidate lies in its organ: the organ-relative descriptors of the case-level stage.

"The lesion in the right lobe", "at the lower pole of the left kidney", "subcapsular" speak of the organ, not of the
image. Where a referring dataset declares context regions (anatomy, dataset.json `lsms_context`), each candidate is
placed in the organ around it: the context map of ground truth when the stage is fitted on true lesions, the
network's anatomy output otherwise (at prediction the user gives no organ mask). The arrays are nnU-Net's
preprocessed ones in the canonical orientation, so array axes are patient axes.

An organ here is its region plus the candidates inside it: a lesion replaces organ tissue in a label map, and its
place in the organ must not depend on whether it was cut out. An organ label may hold several instances (the left
and the right kidney as one "kidney" label): each connected component at least `MIN_INSTANCE_SHARE` of the label's
largest one is an instance; smaller ones are specks of a predicted map and count as no organ.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from lsms_nnunet.selection.candidates import Candidates

MIN_INSTANCE_SHARE = 0.1
#: Per candidate: its centroid within its organ instance's extent (-1..1 per axis), the instance's centroid within
#: the extent of all instances of its label (-1..1 per axis; 0 for a single instance: "the left kidney"),
#: log(1 + mm) from the candidate's nearest voxel to the organ's surface ("subcapsular"), the candidate's share of the
#: instance's volume; then which organ label (one column per context region, all 0: in no organ).
ORGAN_PLACE_FEATURES = 2 * 3 + 2


def organ_descriptor_width(regions: int) -> int:
    return ORGAN_PLACE_FEATURES + regions


def organ_relative_descriptors(candidates: Candidates, anatomy: np.ndarray, regions: int, spacing: Sequence[float],
                               case_relative: np.ndarray, shell_voxels: int) -> np.ndarray:
    """[count, ORGAN_PLACE_FEATURES + regions] for the candidates of one case and its anatomy map (0..regions).

    A candidate belongs to the organ label most frequent in it and in the `shell_voxels` around it; one in no organ
    keeps its `case_relative` position ([count, 3]: where it lies in the case) and zeros elsewhere."""
    rows = np.zeros((candidates.count, organ_descriptor_width(regions)), dtype=np.float32)
    rows[:, :3] = case_relative
    if candidates.count == 0:
        return rows
    organ_of = _organ_of_each(candidates, anatomy, regions, shell_voxels)
    for region in range(1, regions + 1):
        members = np.flatnonzero(organ_of == region)
        if not len(members):
            continue
        organ = (anatomy == region) | candidates.masks(members)
        instances, count = ndimage.label(organ, ndimage.generate_binary_structure(organ.ndim, organ.ndim))
        sizes = np.bincount(instances.ravel(), minlength=count + 1)
        sizes[0] = 0
        kept = np.flatnonzero(sizes >= MIN_INSTANCE_SHARE * sizes.max())
        boxes = ndimage.find_objects(instances)
        centroids = np.asarray(ndimage.center_of_mass(organ, instances, kept)).reshape(len(kept), organ.ndim)
        union_low = np.min([[s.start for s in boxes[i - 1]] for i in kept], axis=0)
        union_high = np.max([[s.stop - 1 for s in boxes[i - 1]] for i in kept], axis=0)
        for member in members:
            inside = candidates.labels == member + 1
            instance = int(np.bincount(instances[inside]).argmax())
            if instance not in kept:
                continue
            box = boxes[instance - 1]
            low, high = np.array([s.start for s in box]), np.array([s.stop - 1 for s in box])
            centroid = np.array([c.mean() for c in np.nonzero(inside)])
            place = centroids[np.flatnonzero(kept == instance)[0]]
            rows[member, :3] = _within(centroid, low, high)
            rows[member, 3:6] = _within(place, union_low, union_high) if len(kept) > 1 else 0.0
            rows[member, 6] = np.log1p(_distance_to_surface_mm(instances, instance, box, inside, spacing))
            rows[member, 7] = inside.sum() / sizes[instance]
            rows[member, ORGAN_PLACE_FEATURES + region - 1] = 1.0
    return rows


def _organ_of_each(candidates: Candidates, anatomy: np.ndarray, regions: int, shell_voxels: int) -> np.ndarray:
    """Per candidate, the organ label (1..regions) most frequent in it and its shell, 0 where there is none."""
    organ_of = np.zeros(candidates.count, dtype=np.int64)
    for index, box in enumerate(ndimage.find_objects(candidates.labels)):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - shell_voxels, 0), min(s.stop + shell_voxels, n))
                      for s, n in zip(box, anatomy.shape))
        near = ndimage.binary_dilation(candidates.labels[grown] == index + 1, iterations=shell_voxels)
        counts = np.bincount(np.asarray(anatomy[grown][near], dtype=np.int64).clip(0, regions),
                             minlength=regions + 1)[1:]
        organ_of[index] = int(counts.argmax()) + 1 if counts.any() else 0
    return organ_of


def _within(point: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """`point` as -1..1 of the extent low..high per axis (0 along an axis of one voxel)."""
    span = np.maximum(high - low, 1e-6)
    return np.where(high > low, 2 * (point - low) / span - 1, 0.0)


def _distance_to_surface_mm(instances: np.ndarray, instance: int, box: tuple[slice, ...], inside: np.ndarray,
                            spacing: Sequence[float]) -> float:
    """mm from the candidate's nearest voxel to the outside of its organ instance, computed on the instance's box
    grown by one voxel. The image border is not a surface (the organ goes on beyond the field of view; a 2D image
    has no outside above or below); an instance with no outside at all gets the box's diagonal."""
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, instances.shape))
    organ = instances[grown] == instance
    if organ.all():
        return float(np.linalg.norm(np.asarray(organ.shape) * np.asarray(spacing)))
    depth = ndimage.distance_transform_edt(organ, sampling=spacing)
    return float(depth[inside[grown]].min())
