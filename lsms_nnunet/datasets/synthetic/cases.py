"""One synthetic case: the image and region map (anatomy.py) with the expressions chosen for it (phrasing.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lsms_nnunet.datasets.synthetic.anatomy import (DEFAULT_SHAPES, LIVER_LABEL, PLAIN_LABELS, SPACINGS,
                                                    VARIATION_STREAM, BodyPlacement, SyntheticLesion, draw_body,
                                                    draw_liver, lesion_profile, physical_axes, place_lesions)
from lsms_nnunet.datasets.synthetic.phrasing import HELDOUT_STREAM, SyntheticExpression, choose_expressions

CASE_PREFIX = "synliver"


@dataclass(frozen=True)
class SyntheticCase:
    """A generated image with its region map, lesion attributes and referring expressions."""

    case_id: str
    image: np.ndarray  # int16 HU, array axis order
    region_map: np.ndarray  # uint8: 0 background, 1..k one id per lesion, LIVER_LABEL the rest of the liver
    lesions: tuple[SyntheticLesion, ...]
    expressions: tuple[SyntheticExpression, ...]

    def lesion_map(self) -> np.ndarray:
        """The region map without the liver: lesion ids only."""
        return np.where(self.region_map == LIVER_LABEL, 0, self.region_map).astype(self.region_map.dtype)

    def semantic_map(self) -> np.ndarray:
        """The plain-task label map: each lesion labelled with its kind (PLAIN_LABELS); the liver is background."""
        lookup = np.zeros(LIVER_LABEL + 1, dtype=np.uint8)
        for lesion in self.lesions:
            lookup[lesion.region_id] = PLAIN_LABELS[lesion.kind]
        return lookup[self.region_map]


def case_identifier(case_index: int) -> str:
    """'synliver_000': training cases first, then test cases, one running index."""
    return f"{CASE_PREFIX}_{case_index:03d}"


def generate_case(case_index: int, seed: int = 0, dim: int = 2, shape: Sequence[int] | None = None,
                  varied_anatomy: bool = False) -> SyntheticCase:
    """Generate one case; the same (seed, case_index, dim, shape, varied_anatomy) always gives the same arrays and
    expressions. `varied_anatomy` moves and resizes the body and its liver per case (BodyPlacement.varied); without
    it every case is drawn exactly as before the option existed."""
    shape = tuple(int(size) for size in (shape if shape is not None else DEFAULT_SHAPES[dim]))
    spacing = SPACINGS[dim]
    case_id = case_identifier(case_index)
    rng = np.random.default_rng([seed, case_index])
    axes = physical_axes(shape, spacing)
    half_extent = np.asarray(shape) * np.asarray(spacing) / 2
    placement = BodyPlacement.varied(half_extent, np.random.default_rng([seed, case_index, VARIATION_STREAM])) \
        if varied_anatomy else BodyPlacement.centred(dim)
    body_axes, body_half_extent = placement.body_axes(axes), placement.body_half_extent(half_extent)
    image, liver_allowed = draw_body(body_axes, body_half_extent, shape, rng)
    liver, fissure_distance, liver_semi_axes = draw_liver(placement.liver_axes(axes), body_half_extent,
                                                          liver_allowed, rng)
    image[liver] = rng.normal(60.0, 4.0)
    image[liver & (np.abs(fissure_distance) < 0.6 * spacing[-1])] = rng.normal(-30.0, 5.0)

    placed = place_lesions(liver, fissure_distance, liver_semi_axes, spacing, rng, case_id)
    region_ids = rng.permutation(len(placed)) + 1  # ids carry no hint of size, kind or position
    region_map = np.where(liver, LIVER_LABEL, 0).astype(np.uint8)  # the context region, lesions drawn over it
    for lesion, region_id in zip(placed, region_ids):
        box_image, box_regions = image[lesion.box], region_map[lesion.box]
        box_image[lesion.inside] = lesion_profile(lesion.kind, lesion.normalized_coordinates, rng)[lesion.inside]
        box_regions[lesion.inside] = region_id
    image += rng.normal(0.0, 8.0, size=shape).astype(np.float32)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)

    sizes = [int(lesion.inside.sum()) for lesion in placed]
    rank_of = {index: rank + 1 for rank, index in enumerate(np.argsort(sizes)[::-1])}
    lesions = []
    for index, (lesion, region_id) in enumerate(zip(placed, region_ids)):
        voxels = np.argwhere(region_map == region_id)
        lesions.append(SyntheticLesion(
            region_id=int(region_id), kind=lesion.kind, lobe=lesion.lobe,
            centre=tuple(round(float(value), 2) for value in voxels.mean(axis=0)), size_voxels=sizes[index],
            size_rank=rank_of[index], mean_intensity=round(float(image[region_map == region_id].mean()), 1)))
    lesions.sort(key=lambda lesion: lesion.region_id)
    heldout_rng = np.random.default_rng([seed, case_index, HELDOUT_STREAM])
    return SyntheticCase(case_id, image, region_map, tuple(lesions), choose_expressions(lesions, rng, heldout_rng))


