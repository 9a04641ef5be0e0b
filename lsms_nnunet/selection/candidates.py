"""Lesion candidates of a whole case and what the case-level selector knows about each.

A candidate is a connected component of an all-lesion mask: the ground-truth region map when the selector is
fitted, the network's answer to the finding prompt at inference. Each is described by numbers that mean the same in
every case of a dataset (nnU-Net's preprocessed intensities, physical size, position in the case), so relations such
as "the largest" or "in the left lobe" can be decided over the whole case rather than inside one patch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from lsms_nnunet.selection.anatomy import organ_relative_descriptors
from lsms_nnunet.selection.settings import CaseLevelSettings

DEFAULT_SETTINGS = CaseLevelSettings()

INTENSITY_FEATURES = ("mean", "std", "p10", "p90", "core", "rim", "shell", "contrast")


@dataclass(frozen=True)
class Candidates:
    """Connected lesion candidates of one case: `labels` holds 1..count, 0 elsewhere."""

    labels: np.ndarray
    count: int
    volumes_mm3: np.ndarray  # [count]

    def masks(self, selected: Sequence[int] | np.ndarray) -> np.ndarray:
        """The union of the selected candidates (indices 0..count-1) as a bool array."""
        lookup = np.zeros(self.count + 1, dtype=bool)
        lookup[np.asarray(selected, dtype=np.int64) + 1] = True
        return lookup[self.labels]


@dataclass(frozen=True)
class FindingAnswer:
    """The network's text-free answers on one preprocessed case: all-lesion logits [*spatial] (the candidates) and,
    from a network with an anatomy output, its map of the context regions (0..K) that places them in their organs."""

    lesion_logits: np.ndarray
    anatomy: np.ndarray | None = None


def find_candidates(lesion_mask: np.ndarray, spacing: Sequence[float], logits: np.ndarray | None = None,
                    settings: CaseLevelSettings = DEFAULT_SETTINGS) -> Candidates:
    """The lesions of a bool mask, without speckles, numbered from 1: connected components, and touching lesions
    split apart by a watershed seeded at maxima that rise above their surroundings. Lesions lie close together, and a
    finding answer bridging them would make one candidate of several. A ground-truth mask is split along the distance
    to the background (seeds one voxel high); the network's answer along its own logits, capped at
    `settings.logit_ceiling` and smoothed (seeds `settings.logit_seed_height` high): its confidence dips between
    lesions it bridged, and the boundary it draws there sets the volumes that "the smallest" compares.
    The split, and the smoothing it reads, run inside the lesions' bounding box with one voxel of background around
    it: the same result as on the whole image (background only ever connects lesions at the lowest elevation), at a
    cost that follows the lesions rather than the image."""
    labels = np.zeros(lesion_mask.shape, dtype=np.int32)
    extent = ndimage.find_objects(lesion_mask.astype(np.uint8))
    if not extent:
        return Candidates(labels, 0, np.zeros(0))
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(extent[0], lesion_mask.shape))
    mask = lesion_mask[box]
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    if logits is None:
        elevation, seed_height = ndimage.distance_transform_edt(mask, sampling=spacing), min(spacing)
    else:
        smoothed = _capped_and_smoothed_inside(logits, box, settings)
        # the background lies a seed height below every lesion voxel: every component keeps a seed however faint,
        # and any such floor gives the same seeds (a maximum's rise over it is then always enough)
        floor = smoothed.min() - settings.logit_seed_height
        elevation, seed_height = np.where(mask, smoothed, floor), settings.logit_seed_height
    seeds, _ = ndimage.label(h_maxima(elevation, seed_height) & mask, structure)
    split = watershed(-elevation, seeds, mask=mask)
    count = int(split.max())
    sizes = np.bincount(split.ravel(), minlength=count + 1)
    keep = np.flatnonzero(sizes >= settings.min_candidate_voxels)
    keep = keep[keep > 0]
    renumber = np.zeros(count + 1, dtype=np.int32)
    renumber[keep] = np.arange(1, len(keep) + 1)
    labels[box] = renumber[split]
    volumes = sizes[keep].astype(np.float64) * float(np.prod(spacing))
    return Candidates(labels, len(keep), volumes)


def _capped_and_smoothed_inside(logits: np.ndarray, box: tuple[slice, ...], settings: CaseLevelSettings
                                ) -> np.ndarray:
    """The logits capped at the ceiling and Gaussian-smoothed on `box`, computed on the box grown by the filter's
    radius: the same values as capping and smoothing the whole image (the filter reaches no further; at the image
    border it reflects there either way), at a cost that follows the box."""
    sigma = settings.logit_smoothing_voxels
    radius = int(4.0 * sigma + 0.5)  # scipy's default truncation at 4 sigma
    grown = tuple(slice(max(s.start - radius, 0), min(s.stop + radius, n)) for s, n in zip(box, logits.shape))
    capped = np.minimum(np.asarray(logits[grown], dtype=np.float32), settings.logit_ceiling)
    smoothed = ndimage.gaussian_filter(capped, sigma)
    return smoothed[tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown))]


def candidates_of_answer(logits: np.ndarray, spacing: Sequence[float],
                         settings: CaseLevelSettings = DEFAULT_SETTINGS) -> Candidates:
    """The lesions of the network's all-lesion answer (its logits): where it says lesion, split along its logits."""
    return find_candidates(logits > 0, spacing, logits, settings)


def referred_fraction(candidates: Candidates, region_map: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Per candidate, the share of its voxels whose region id is one of `targets`."""
    if candidates.count == 0:
        return np.zeros(0)
    referred = np.isin(region_map, np.asarray(list(targets), dtype=region_map.dtype))
    inside = ndimage.sum_labels(referred, candidates.labels, np.arange(1, candidates.count + 1))
    return np.asarray(inside) / np.bincount(candidates.labels.ravel(), minlength=candidates.count + 1)[1:]


def describe_candidates(image: np.ndarray, candidates: Candidates, spacing: Sequence[float],
                        shell_voxels: int = DEFAULT_SETTINGS.shell_voxels, anatomy: np.ndarray | None = None,
                        anatomy_regions: int = 0) -> np.ndarray:
    """[count, features]: where the candidate lies and, per image channel, the intensity statistics of
    INTENSITY_FEATURES (core and rim split the lesion at half its inner depth; shell is the `shell_voxels` of tissue
    just around it, other candidates excluded). Where it lies: with `anatomy_regions` context regions, its place in
    its organ (`anatomy`: the case's map of them, 1..anatomy_regions; selection/anatomy.py); without, its centroid in
    the case (-1..1 per axis). Absolute size is left out on purpose: the selector's set operations compare volumes; a
    size descriptor lets the match score imitate "the largest" on the training cases instead."""
    spatial = candidates.labels.shape
    channels = image.reshape(-1, *spatial)
    extent = np.maximum(np.asarray(spatial, dtype=np.float64) - 1, 1)
    rows = []
    for index, box in enumerate(ndimage.find_objects(candidates.labels), start=1):
        if box is None:
            continue
        padded = tuple(slice(max(s.start - shell_voxels, 0), min(s.stop + shell_voxels, n))
                       for s, n in zip(box, spatial))
        local = candidates.labels[padded]
        inside = local == index
        depth = ndimage.distance_transform_edt(inside, sampling=spacing)
        core = inside & (depth >= 0.5 * depth.max())
        rim = inside & ~core
        shell = ndimage.binary_dilation(inside, iterations=shell_voxels) & (local == 0)
        centroid = np.array([c.mean() + s.start for c, s in zip(np.nonzero(inside), padded)])
        row = list(2 * centroid / extent - 1)
        for channel in channels:
            values = channel[padded]
            lesion = values[inside]
            around = values[shell] if shell.any() else lesion
            row += [lesion.mean(), lesion.std(), np.percentile(lesion, 10), np.percentile(lesion, 90),
                    values[core].mean(), values[rim].mean() if rim.any() else lesion.mean(), around.mean(),
                    lesion.mean() - around.mean()]
        rows.append(row)
    described = np.asarray(rows, dtype=np.float32).reshape(-1, len(spatial) + len(INTENSITY_FEATURES) * len(channels))
    if not anatomy_regions:
        return described
    if anatomy is None:
        raise ValueError(f"Describing candidates in {anatomy_regions} context region(s) needs their map (anatomy).")
    place = organ_relative_descriptors(candidates, anatomy, anatomy_regions, spacing, described[:, :len(spatial)],
                                       shell_voxels)
    return np.concatenate((place, described[:, len(spatial):]), axis=1)
