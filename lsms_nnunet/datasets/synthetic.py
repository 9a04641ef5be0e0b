"""The embedded synthetic referring dataset: CT-like livers whose lesions only the text can tell apart.

Each image holds 2-5 liver lesions of four kinds with distinct looks (cyst, hemangioma, HCC, metastasis) and of
clearly different sizes. Each expression refers to a subset of them by kind, lobe, size rank, attribute or count, and
about one in eight refers to nothing in the image; a model that ignores the text therefore cannot reach a high Dice.
The dataset lets the whole pipeline (planning, text encoding, training, inference, evaluation) run offline in minutes.
Every expression carries a report category (kind, kind_lobe, lobe, attribute, plural, size, no_target). With
--heldout_phrasing, a second phrasebook of synonyms and templates never used in training words the test cases and a
copy of the training expressions (expressions_heldout.json), so that generalisation to new wording can be measured.

Lobe convention (radiological display): arrays have the x axis last and SimpleITK's identity direction (LPS), so a
low x index, the image's left side, is the patient's right. The liver sits on the patient's right. A thin dark
interlobar fissure crosses it: the part on the image-left side is the "right lobe", the part on the image-right side
the "left lobe". A lesion belongs to the lobe of its centre; lesions never cross the fissure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from text_conditioning.expressions import (HELDOUT_EXPRESSIONS_FILE, HELDOUT_PHRASING, NO_TARGET_CATEGORY, Expression,
                                           save_expressions)

from lsms_nnunet.datasets.geometry import resolve_raw_root
from lsms_nnunet.cli import console_entry

KINDS = ("cyst", "hemangioma", "hcc", "metastasis")
PLAIN_LABELS = {"background": 0, **{kind: index + 1 for index, kind in enumerate(KINDS)}}
LOBES = ("right", "left")
MIN_LESIONS, MAX_LESIONS = 2, 5
DEFAULT_SHAPES = {2: (96, 96), 3: (32, 64, 64)}
SPACINGS = {2: (1.0, 1.0), 3: (2.0, 1.0, 1.0)}  # array axis order; 3D is anisotropic on purpose
MIN_SHAPE = 16
CASE_PREFIX = "synliver"
FILE_ENDING = ".nii.gz"
REGIONS_FORMAT = "lsms-synthetic-regions"
REGIONS_VERSION = 1
MIN_SIZE_RATIO = 1.2  # consecutive size ranks differ at least by this factor, so "largest"/"smallest" are clear-cut
EXPRESSIONS_PER_CASE = (5, 8)
NO_TARGET_CASE_PROBABILITY = 0.8  # one no-target expression in 80% of cases: about 12% of all expressions
PLACEMENT_ATTEMPTS_PER_COUNT = 6
DATASET_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
LOBE_CONVENTION = ("Radiological display: the image's left side (low x index; SimpleITK identity direction, LPS) is "
                   "the patient's right. The right lobe is the part of the liver on the image-left side of the dark "
                   "interlobar fissure, the left lobe the part on its image-right side; a lesion belongs to the lobe "
                   "of its centre.")

KIND_SINGULAR = {"cyst": ("cyst", "hepatic cyst", "simple cyst"),
                 "hemangioma": ("hemangioma", "hepatic hemangioma"),
                 "hcc": ("HCC", "hepatocellular carcinoma"),
                 "metastasis": ("metastasis", "liver metastasis", "metastatic lesion")}
KIND_PLURAL = {"cyst": ("cysts", "hepatic cysts"),
               "hemangioma": ("hemangiomas", "hepatic hemangiomas"),
               "hcc": ("HCCs", "hepatocellular carcinomas"),
               "metastasis": ("metastases", "metastatic lesions")}
# Each attribute word names the kinds whose look it describes; the intensity profiles below honour these words.
ATTRIBUTE_KINDS = {"hypodense": ("cyst", "metastasis"),
                   "hyperdense": ("hemangioma", "hcc"),
                   "fluid-density": ("cyst",),
                   "peripherally enhancing": ("hemangioma",),
                   "heterogeneous": ("hcc",),
                   "encapsulated": ("hcc",),
                   "ring-enhancing": ("metastasis",),
                   "target-like": ("metastasis",)}
LOBE_PHRASES = ("in the {lobe} lobe", "in the {lobe} hepatic lobe", "in the {lobe} liver lobe")
HELDOUT_STREAM = 1  # the held-out wording draws from its own random stream: [seed, case index, HELDOUT_STREAM]
HELDOUT_ID_SUFFIX = "-h"


@dataclass(frozen=True)
class Phrasebook:
    """The words and templates of one phrasing set. Templates use {noun}, {plural}, {lobe}, {adjective} and {where}
    (a lobe phrase); a slot with one template draws no random number, so the seen dataset stays reproducible."""

    kind_singular: Mapping[str, tuple[str, ...]]
    kind_plural: Mapping[str, tuple[str, ...]]
    attribute_words: Mapping[str, tuple[str, ...]]  # per ATTRIBUTE_KINDS key
    lobe_phrases: tuple[str, ...]
    the_kind: tuple[str, ...]  # the only lesion of a kind (or none)
    largest_kind: tuple[str, ...]
    smallest_kind: tuple[str, ...]
    all_kind: tuple[str, ...]
    kind_in_lobe: tuple[str, ...]  # 0 or 1 lesion of a kind in a lobe
    kinds_in_lobe: tuple[str, ...]  # 2 or more
    largest: tuple[str, ...]
    smallest: tuple[str, ...]
    second_largest: tuple[str, ...]
    all_lesions: tuple[str, ...]
    no_lesion_in_lobe: tuple[str, ...]
    lesion_in_lobe: tuple[str, ...]
    lesions_in_lobe: tuple[str, ...]
    largest_in_lobe: tuple[str, ...]
    smallest_in_lobe: tuple[str, ...]
    attribute_one: tuple[str, ...]  # 0 or 1 lesion with the attribute
    attribute_all: tuple[str, ...]
    attribute_in_lobe: tuple[str, ...]


SEEN_PHRASEBOOK = Phrasebook(
    kind_singular=KIND_SINGULAR, kind_plural=KIND_PLURAL,
    attribute_words={adjective: (adjective,) for adjective in ATTRIBUTE_KINDS}, lobe_phrases=LOBE_PHRASES,
    the_kind=("the {noun}",), largest_kind=("the largest {noun}",), smallest_kind=("the smallest {noun}",),
    all_kind=("all {plural}", "all the {plural}", "every {noun}"),
    kind_in_lobe=("the {noun} {where}", "the {lobe}-lobe {noun}"), kinds_in_lobe=("all {plural} {where}",),
    largest=("the largest lesion", "the biggest lesion", "the largest liver lesion"),
    smallest=("the smallest lesion", "the tiniest lesion", "the smallest liver lesion"),
    second_largest=("the second largest lesion",),
    all_lesions=("all lesions", "every liver lesion", "all focal liver lesions"),
    no_lesion_in_lobe=("any lesion {where}", "the lesion {where}"),
    lesion_in_lobe=("the lesion {where}", "the only lesion {where}"),
    lesions_in_lobe=("all lesions {where}", "every lesion {where}"),
    largest_in_lobe=("the largest lesion {where}",), smallest_in_lobe=("the smallest lesion {where}",),
    attribute_one=("the {adjective} lesion",), attribute_all=("all {adjective} lesions",),
    attribute_in_lobe=("the {adjective} lesion {where}",))

# Validation and test wordings only (--heldout_phrasing): every synonym below is absent from the seen phrasebook, and
# every template differs from the seen ones, so a model can only answer them by generalising.
HELDOUT_SYNONYMS = {
    "kind_singular": {"cyst": ("fluid-filled cyst", "benign cyst"), "hemangioma": ("vascular tumour", "haemangioma"),
                      "hcc": ("primary liver cancer", "hepatoma"),
                      "metastasis": ("secondary deposit", "metastatic deposit")},
    "kind_plural": {"cyst": ("fluid-filled cysts", "benign cysts"),
                    "hemangioma": ("vascular tumours", "haemangiomas"),
                    "hcc": ("primary liver cancers", "hepatomas"),
                    "metastasis": ("secondary deposits", "metastatic deposits")},
    "attribute_words": {"hypodense": ("hypoattenuating", "low-attenuation"),
                        "hyperdense": ("hyperattenuating", "high-attenuation"),
                        "fluid-density": ("water-attenuation",),
                        "peripherally enhancing": ("globularly enhancing", "peripherally nodular"),
                        "heterogeneous": ("inhomogeneous", "mosaic-pattern"),
                        "encapsulated": ("capsule-bearing",),
                        "ring-enhancing": ("rim-enhancing",),
                        "target-like": ("targetoid", "bull's-eye")},
}
HELDOUT_PHRASEBOOK = Phrasebook(
    **HELDOUT_SYNONYMS,
    lobe_phrases=("located within the {lobe} lobe", "within the {lobe} lobe of the liver"),
    the_kind=("find the {noun}", "segment the {noun}", "show me the {noun}"),
    largest_kind=("the most sizeable {noun}", "the {noun} greatest in size"),
    smallest_kind=("the least voluminous {noun}", "the most diminutive {noun}"),
    all_kind=("show me every {noun}", "segment each {noun}", "find all {plural}"),
    kind_in_lobe=("find the {noun} {where}", "the {noun} {where}"),
    kinds_in_lobe=("every {noun} {where}", "{plural} of the {lobe} lobe"),
    largest=("which lesion is the largest?", "the lesion of greatest volume", "the most sizeable lesion"),
    smallest=("which lesion is the smallest?", "the least voluminous lesion", "the most diminutive lesion"),
    second_largest=("the second most sizeable lesion", "the lesion second in size"),
    all_lesions=("show me all lesions", "segment every lesion in the liver", "each and every lesion"),
    no_lesion_in_lobe=("find any lesion {where}", "lesions of the {lobe} lobe"),
    lesion_in_lobe=("segment the lesion {where}", "the sole lesion {where}"),
    lesions_in_lobe=("lesions of the {lobe} lobe", "show me every lesion {where}"),
    largest_in_lobe=("the most sizeable lesion {where}", "which lesion {where} is the largest?"),
    smallest_in_lobe=("the least voluminous lesion {where}", "which lesion {where} is the smallest?"),
    attribute_one=("find the {adjective} lesion", "segment the {adjective} lesion"),
    attribute_all=("show me every {adjective} lesion", "find all {adjective} lesions"),
    attribute_in_lobe=("find the {adjective} lesion {where}", "the {adjective} lesion {where}"))


@dataclass(frozen=True)
class SyntheticLesion:
    """One lesion of a synthetic case, as recorded in regions.json."""

    region_id: int
    kind: str
    lobe: str
    centre: tuple[float, ...]  # voxel indices in array axis order
    size_voxels: int
    size_rank: int  # 1 = largest lesion of the case
    mean_intensity: float  # HU


@dataclass(frozen=True)
class SyntheticExpression:
    """One chosen expression: its report category, its seen and held-out wordings, and the region ids it means."""

    category: str
    text: str
    heldout_text: str
    targets: tuple[int, ...]


@dataclass(frozen=True)
class SyntheticCase:
    """A generated image with its region map, lesion attributes and referring expressions."""

    case_id: str
    image: np.ndarray  # int16 HU, array axis order
    region_map: np.ndarray  # uint8: 0 background, 1..k one id per lesion
    lesions: tuple[SyntheticLesion, ...]
    expressions: tuple[SyntheticExpression, ...]

    def semantic_map(self) -> np.ndarray:
        """The plain-task label map: each lesion labelled with its kind (PLAIN_LABELS)."""
        lookup = np.zeros(MAX_LESIONS + 1, dtype=np.uint8)
        for lesion in self.lesions:
            lookup[lesion.region_id] = PLAIN_LABELS[lesion.kind]
        return lookup[self.region_map]


@dataclass
class _PlacedLesion:
    """A lesion during generation: where it is and which voxels of its bounding box it covers."""

    kind: str
    lobe: str
    box: tuple[slice, ...]
    normalized_coordinates: list[np.ndarray]  # per axis, (coordinate - centre) / radius, broadcastable over the box
    inside: np.ndarray  # bool over the box


def default_dataset_name(dim: int, plain: bool) -> str:
    """SynthLiverRLS2D/3D for the referring task, SynthLiverLesions2D/3D for the plain semantic task."""
    return f"SynthLiver{'Lesions' if plain else 'RLS'}{dim}D"


def case_identifier(case_index: int) -> str:
    """'synliver_000': training cases first, then test cases, one running index."""
    return f"{CASE_PREFIX}_{case_index:03d}"


def _physical_axes(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Sparse, broadcastable mm coordinates of every axis, 0 at the image centre."""
    axes = []
    for axis, (size, step) in enumerate(zip(shape, spacing)):
        view = [1] * len(shape)
        view[axis] = size
        axes.append(((np.arange(size) - (size - 1) / 2) * step).reshape(view))
    return axes


def _ellipse_radius(axes: Sequence[np.ndarray], centre: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """Normalized ellipsoidal radius: below 1 inside the ellipse(oid)."""
    return np.sqrt(sum(((axis - c) / a) ** 2 for axis, c, a in zip(axes, centre, semi_axes)))


def _draw_body(axes: list[np.ndarray], half_extent: np.ndarray, shape: tuple[int, ...],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Air, a body cross-section with subcutaneous fat, spine, aorta and spleen; returns (image, liver allowed mask).

    Only the two in-plane axes matter, so in 3D the body is a cylinder along z.
    """
    y_axis, x_axis = axes[-2], axes[-1]
    half_y, half_x = half_extent[-2], half_extent[-1]
    image = np.full(shape, -1000.0, dtype=np.float32)
    body_radius = _ellipse_radius((y_axis, x_axis), (0.0, 0.0), (0.8 * half_y, 0.93 * half_x))
    body_shape = np.broadcast_shapes(body_radius.shape, shape)

    def paint(mask: np.ndarray, value: float) -> None:
        image[np.broadcast_to(mask, body_shape)] = value

    paint(body_radius <= 1.0, rng.normal(-95.0, 5.0))  # fat, later covered by muscle inside
    paint(body_radius <= 0.88, rng.normal(25.0, 4.0))  # soft tissue: muscle and visceral fat, darker than liver
    small = min(half_x, half_y)
    paint(_ellipse_radius((y_axis, x_axis), (0.55 * half_y, 0.0), (0.11 * small, 0.11 * small)) <= 1.0,
          rng.normal(420.0, 30.0))  # vertebral body
    paint(_ellipse_radius((y_axis, x_axis), (0.3 * half_y, 0.1 * half_x), (0.05 * small, 0.05 * small)) <= 1.0,
          rng.normal(160.0, 10.0))  # aorta: a bright round distractor outside the liver
    paint(_ellipse_radius((y_axis, x_axis), (0.2 * half_y, 0.5 * half_x), (0.22 * half_y, 0.15 * half_x)) <= 1.0,
          rng.normal(50.0, 4.0))  # spleen on the patient's left
    return image, np.broadcast_to(body_radius <= 0.84, shape)


def _draw_liver(axes: list[np.ndarray], half_extent: np.ndarray, allowed: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A deformed ellipse(oid) on the patient's right and its fissure; returns (mask, fissure distance mm, semi-axes).

    The fissure distance is signed: negative on the image-left side (right lobe), positive on the image-right side.
    """
    dim = len(axes)
    centre = np.zeros(dim)
    centre[-1] = (-0.28 + rng.uniform(-0.04, 0.04)) * half_extent[-1]
    centre[-2] = (-0.05 + rng.uniform(-0.05, 0.05)) * half_extent[-2]
    semi_axes = np.empty(dim)
    semi_axes[-1] = 0.55 * half_extent[-1] * rng.uniform(0.93, 1.07)
    semi_axes[-2] = 0.55 * half_extent[-2] * rng.uniform(0.93, 1.07)
    if dim == 3:
        centre[0] = rng.uniform(-0.05, 0.05) * half_extent[0]
        semi_axes[0] = 0.8 * half_extent[0] * rng.uniform(0.9, 1.05)
    normalized = [(axis - c) / a for axis, c, a in zip(axes, centre, semi_axes)]
    radius = np.sqrt(sum(component ** 2 for component in normalized))
    safe_radius = np.maximum(radius, 1e-6)
    bumps = np.zeros_like(radius)
    for _ in range(3):  # smooth random bulges of the outline
        direction = rng.normal(size=dim)
        direction /= np.linalg.norm(direction)
        cosine = sum(component * d for component, d in zip(normalized, direction)) / safe_radius
        amplitude, frequency, phase = rng.uniform(0.03, 0.07), rng.integers(1, 4), rng.uniform(0, 2 * np.pi)
        bumps = bumps + amplitude * np.cos(np.pi * frequency * cosine + phase)
    liver = (radius <= 1.0 + bumps) & allowed

    fissure_normal = np.zeros(dim)
    fissure_normal[-1] = 1.0
    fissure_normal[-2] = rng.uniform(-0.35, 0.35)
    if dim == 3:
        fissure_normal[0] = rng.uniform(-0.2, 0.2)
    fissure_normal /= np.linalg.norm(fissure_normal)
    fissure_point = centre.copy()
    fissure_point[-1] += rng.uniform(0.05, 0.25) * semi_axes[-1]  # right of centre: the right lobe is the larger
    fissure_distance = sum((axis - p) * n for axis, p, n in zip(axes, fissure_point, fissure_normal))
    return liver, np.broadcast_to(fissure_distance, liver.shape), semi_axes


def _lesion_box(centre_mm: np.ndarray, radii_mm: np.ndarray, shape: Sequence[int],
                spacing: Sequence[float]) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """The voxel box around a lesion and its normalized coordinates per axis (broadcastable over the box)."""
    box, normalized = [], []
    for axis, (size, step) in enumerate(zip(shape, spacing)):
        centre_index = centre_mm[axis] / step + (size - 1) / 2
        reach = int(np.ceil(radii_mm[axis] / step)) + 1
        start, stop = max(0, int(round(centre_index)) - reach), min(size, int(round(centre_index)) + reach + 1)
        view = [1] * len(shape)
        view[axis] = stop - start
        box.append(slice(start, stop))
        mm = (np.arange(start, stop) - (size - 1) / 2) * step
        normalized.append(((mm - centre_mm[axis]) / radii_mm[axis]).reshape(view))
    return tuple(box), normalized


@dataclass(frozen=True)
class _LiverVoxels:
    """Per liver voxel: mm position, depth below the liver surface (mm) and signed distance to the fissure (mm)."""

    shape: tuple[int, ...]
    spacing: np.ndarray
    semi_axes: np.ndarray
    position: np.ndarray  # [N, dim]
    depth: np.ndarray
    fissure_distance: np.ndarray

    @classmethod
    def of(cls, liver: np.ndarray, fissure_distance: np.ndarray, semi_axes: np.ndarray,
           spacing: Sequence[float]) -> _LiverVoxels:
        spacing_array = np.asarray(spacing, dtype=float)
        position = (np.argwhere(liver) - (np.asarray(liver.shape) - 1) / 2) * spacing_array
        depth = distance_transform_edt(liver, sampling=spacing_array)[liver]
        return cls(liver.shape, spacing_array, semi_axes, position, depth, fissure_distance[liver])


def _try_place_lesions(kinds: Sequence[str], liver: _LiverVoxels,
                       rng: np.random.Generator) -> list[_PlacedLesion] | None:
    """One attempt to fit the lesions, largest first, inside the liver, off the fissure and apart; None if not."""
    shape, spacing_array = liver.shape, liver.spacing
    smallest_radius = max(spacing_array.max(), 2.0 * spacing_array.min(),
                          rng.uniform(0.11, 0.15) * min(liver.semi_axes[-2:]))
    growth = rng.uniform(1.25, 1.4)
    radii = smallest_radius * growth ** np.arange(len(kinds))[::-1]
    liver_mm, liver_depth, liver_fissure = liver.position, liver.depth, liver.fissure_distance
    fissure_clearance = 0.6 * spacing_array[-1] + 0.5 * spacing_array.min()

    placed: list[_PlacedLesion] = []
    centres: list[np.ndarray] = []
    bounds: list[float] = []
    for kind, radius in zip(kinds, radii):
        radii_mm = radius * rng.uniform(0.95, 1.05, size=len(shape))
        bound = float(radii_mm.max())
        fits = (liver_depth >= bound + spacing_array.min()) & (np.abs(liver_fissure) >= bound + fissure_clearance)
        for centre, other_bound in zip(centres, bounds):
            fits &= np.linalg.norm(liver_mm - centre, axis=1) >= bound + other_bound + spacing_array.max()
        preferred = "right" if rng.random() < 0.6 else "left"
        for lobe in (preferred, "left" if preferred == "right" else "right"):
            candidates = np.flatnonzero(fits & ((liver_fissure < 0) == (lobe == "right")))
            if candidates.size:
                break
        else:
            return None
        centre = liver_mm[candidates[rng.integers(candidates.size)]]
        box, normalized = _lesion_box(centre, radii_mm, shape, spacing_array)
        inside = np.sqrt(sum(component ** 2 for component in normalized)) <= 1.0
        placed.append(_PlacedLesion(kind, lobe, box, normalized, inside))
        centres.append(centre)
        bounds.append(bound)
    sizes = sorted((int(lesion.inside.sum()) for lesion in placed), reverse=True)
    if any(larger < MIN_SIZE_RATIO * smaller for larger, smaller in zip(sizes, sizes[1:])):
        return None
    return placed


def _place_lesions(liver: np.ndarray, fissure_distance: np.ndarray, liver_semi_axes: np.ndarray,
                   spacing: Sequence[float], rng: np.random.Generator, case_id: str) -> list[_PlacedLesion]:
    """Place 2-5 lesions of random kinds; fewer when the liver is too small for the drawn number."""
    kinds = [KINDS[index] for index in rng.integers(len(KINDS), size=MAX_LESIONS)]
    liver_voxels = _LiverVoxels.of(liver, fissure_distance, liver_semi_axes, spacing)
    for count in range(int(rng.integers(MIN_LESIONS, MAX_LESIONS + 1)), MIN_LESIONS - 1, -1):
        for _ in range(PLACEMENT_ATTEMPTS_PER_COUNT):
            placed = _try_place_lesions(kinds[:count], liver_voxels, rng)
            if placed is not None:
                return placed
    raise ValueError(f"Case {case_id}: the image of shape {liver.shape} is too small to fit {MIN_LESIONS} lesions of "
                     f"distinct sizes in the liver. Fix: use a larger --shape (default 2D {DEFAULT_SHAPES[2]}, "
                     f"3D {DEFAULT_SHAPES[3]}).")


def _lesion_profile(kind: str, normalized: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """HU values over a lesion's box, by kind, from its normalized coordinates (radius 1 = lesion edge)."""
    radius = np.sqrt(sum(component ** 2 for component in normalized))
    dim = len(normalized)
    if kind == "cyst":  # homogeneous water density, sharp edge
        return np.full(radius.shape, rng.uniform(2.0, 16.0))
    if kind == "hemangioma":  # bright peripheral nodules; the centre fills in more faintly (centripetal filling)
        nodules = np.zeros(radius.shape)
        for _ in range(int(rng.integers(3, 7))):
            direction = rng.normal(size=dim)
            direction /= np.linalg.norm(direction)
            distance_sq = sum((component - 0.78 * d) ** 2 for component, d in zip(normalized, direction))
            nodules = np.maximum(nodules, np.exp(-distance_sq / (2 * 0.22 ** 2)))
        return 45.0 + 35.0 * radius ** 2 + rng.uniform(110.0, 140.0) * nodules
    if kind == "hcc":  # heterogeneous mosaic, hyperdense overall, darker capsule ring (drawn per axial slice, so that
        # small lesions on thick slices stay hyperdense)
        mosaic = np.zeros(radius.shape)
        for _ in range(4):
            direction = rng.normal(size=dim)
            direction /= np.linalg.norm(direction)
            mosaic = mosaic + np.cos(rng.uniform(4.0, 8.0) * sum(c * d for c, d in zip(normalized, direction))
                                     + rng.uniform(0, 2 * np.pi))
        interior = rng.uniform(96.0, 108.0) + 9.0 * mosaic
        in_plane_radius = np.sqrt(normalized[-2] ** 2 + normalized[-1] ** 2)
        return np.where(in_plane_radius > 0.86, rng.uniform(30.0, 40.0), interior)
    # metastasis: target-like, a necrotic hypodense centre, an enhancing ring and a hypodense outer rim
    return np.select([radius < 0.55, radius < 0.75], [rng.uniform(15.0, 25.0), rng.uniform(88.0, 100.0)],
                     rng.uniform(25.0, 35.0))


class _Candidate(NamedTuple):
    """One thing this case may be asked: its category, one wording, and the region ids it means."""

    category: str
    text: str
    targets: tuple[int, ...]


def _expression_candidates(lesions: Sequence[SyntheticLesion], book: Phrasebook,
                           rng: np.random.Generator) -> list[_Candidate]:
    """Every unambiguous (category, text, targets) for this case; singular phrases only where 0 or 1 lesion fits.

    The list's order, categories and targets depend on the lesions only, so the seen and held-out phrasebooks give
    aligned lists: entry i of one says in other words what entry i of the other says.
    """
    def ids(predicate: Callable[[SyntheticLesion], bool]) -> tuple[int, ...]:
        return tuple(sorted(lesion.region_id for lesion in lesions if predicate(lesion)))

    def pick(options: Sequence[str]) -> str:
        """One option; a single option draws nothing, so adding a slot to a phrasebook keeps older draws."""
        return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]

    def say(templates: Sequence[str], **values: str) -> str:
        """Fill every template (a fresh lobe phrase for each "{where}", drawn in template order), then pick one."""
        return pick([template.format(where=pick(book.lobe_phrases).format(lobe=values["lobe"])
                                     if "{where}" in template else "", **values) for template in templates])

    def by_size(predicate: Callable[[SyntheticLesion], bool]) -> list[SyntheticLesion]:
        return sorted((lesion for lesion in lesions if predicate(lesion)), key=lambda lesion: lesion.size_rank)

    candidates = []
    for kind in KINDS:
        noun, plural = pick(book.kind_singular[kind]), pick(book.kind_plural[kind])
        of_kind = by_size(lambda lesion: lesion.kind == kind)
        if len(of_kind) <= 1:
            candidates.append(_Candidate("kind", say(book.the_kind, noun=noun),
                                         ids(lambda lesion: lesion.kind == kind)))
        else:
            candidates.append(_Candidate("size", say(book.largest_kind, noun=noun), (of_kind[0].region_id,)))
            candidates.append(_Candidate("size", say(book.smallest_kind, noun=noun), (of_kind[-1].region_id,)))
        candidates.append(_Candidate("plural", say(book.all_kind, noun=noun, plural=plural),
                                     ids(lambda lesion: lesion.kind == kind)))
        for lobe in LOBES:
            targets = ids(lambda lesion: lesion.kind == kind and lesion.lobe == lobe)
            templates = book.kind_in_lobe if len(targets) <= 1 else book.kinds_in_lobe
            candidates.append(_Candidate("kind_lobe", say(templates, noun=noun, plural=plural, lobe=lobe), targets))

    ranked = by_size(lambda lesion: True)
    candidates.append(_Candidate("size", say(book.largest), (ranked[0].region_id,)))
    candidates.append(_Candidate("size", say(book.smallest), (ranked[-1].region_id,)))
    if len(ranked) >= 3:
        candidates.append(_Candidate("size", say(book.second_largest), (ranked[1].region_id,)))
    candidates.append(_Candidate("plural", say(book.all_lesions), ids(lambda lesion: True)))
    for lobe in LOBES:
        lobe_ranked = by_size(lambda lesion: lesion.lobe == lobe)
        targets = tuple(sorted(lesion.region_id for lesion in lobe_ranked))
        templates = {0: book.no_lesion_in_lobe, 1: book.lesion_in_lobe}.get(len(lobe_ranked), book.lesions_in_lobe)
        candidates.append(_Candidate("lobe", say(templates, lobe=lobe), targets))
        if len(lobe_ranked) > 1:
            candidates.append(_Candidate("size", say(book.largest_in_lobe, lobe=lobe), (lobe_ranked[0].region_id,)))
            candidates.append(_Candidate("size", say(book.smallest_in_lobe, lobe=lobe),
                                         (lobe_ranked[-1].region_id,)))

    for adjective, kinds in ATTRIBUTE_KINDS.items():
        word = pick(book.attribute_words[adjective])
        targets = ids(lambda lesion: lesion.kind in kinds)
        candidates.append(_Candidate("attribute", say(book.attribute_one if len(targets) <= 1 else book.attribute_all,
                                                      adjective=word), targets))
        for lobe in LOBES:
            targets = ids(lambda lesion: lesion.kind in kinds and lesion.lobe == lobe)
            if len(targets) == 1:
                candidates.append(_Candidate("attribute", say(book.attribute_in_lobe, adjective=word, lobe=lobe),
                                             targets))
    return candidates


def _choose_candidates(candidates: Sequence[_Candidate], rng: np.random.Generator) -> list[int]:
    """Indices of 5-8 candidates spread over the phrasing categories, at most one referring to nothing."""
    wanted = int(rng.integers(EXPRESSIONS_PER_CASE[0], EXPRESSIONS_PER_CASE[1] + 1))
    no_target = [index for index, candidate in enumerate(candidates) if not candidate.targets]
    chosen = []
    if no_target and rng.random() < NO_TARGET_CASE_PROBABILITY:
        chosen.append(no_target[int(rng.integers(len(no_target)))])
    by_category: dict[str, list[int]] = {}
    for index, candidate in enumerate(candidates):
        if candidate.targets:
            by_category.setdefault(candidate.category, []).append(index)
    pools = [by_category[category] for category in sorted(by_category)]
    for pool in pools:
        rng.shuffle(pool)
    rng.shuffle(pools)
    while len(chosen) < wanted and any(pools):  # round robin over categories, so the phrasing stays varied
        for pool in pools:
            if pool and len(chosen) < wanted:
                chosen.append(pool.pop())
    order = rng.permutation(len(chosen))
    return [chosen[index] for index in order]


def _choose_expressions(lesions: Sequence[SyntheticLesion], rng: np.random.Generator,
                        heldout_rng: np.random.Generator) -> tuple[SyntheticExpression, ...]:
    """The case's expressions, each in seen and in held-out wording (the latter drawn from its own random stream,
    so that the seen dataset does not depend on the held-out phrasebook)."""
    seen = _expression_candidates(lesions, SEEN_PHRASEBOOK, rng)
    heldout = _expression_candidates(lesions, HELDOUT_PHRASEBOOK, heldout_rng)
    chosen = _choose_candidates(seen, rng)
    return tuple(SyntheticExpression(NO_TARGET_CATEGORY if not seen[index].targets else seen[index].category,
                                     seen[index].text, heldout[index].text, seen[index].targets) for index in chosen)


def generate_case(case_index: int, seed: int = 0, dim: int = 2,
                  shape: Sequence[int] | None = None) -> SyntheticCase:
    """Generate one case; the same (seed, case_index, dim, shape) always gives the same arrays and expressions."""
    shape = tuple(int(size) for size in (shape if shape is not None else DEFAULT_SHAPES[dim]))
    spacing = SPACINGS[dim]
    case_id = case_identifier(case_index)
    rng = np.random.default_rng([seed, case_index])
    axes = _physical_axes(shape, spacing)
    half_extent = np.asarray(shape) * np.asarray(spacing) / 2
    image, liver_allowed = _draw_body(axes, half_extent, shape, rng)
    liver, fissure_distance, liver_semi_axes = _draw_liver(axes, half_extent, liver_allowed, rng)
    image[liver] = rng.normal(60.0, 4.0)
    image[liver & (np.abs(fissure_distance) < 0.6 * spacing[-1])] = rng.normal(-30.0, 5.0)

    placed = _place_lesions(liver, fissure_distance, liver_semi_axes, spacing, rng, case_id)
    region_ids = rng.permutation(len(placed)) + 1  # ids carry no hint of size, kind or position
    region_map = np.zeros(shape, dtype=np.uint8)
    for lesion, region_id in zip(placed, region_ids):
        box_image, box_regions = image[lesion.box], region_map[lesion.box]
        box_image[lesion.inside] = _lesion_profile(lesion.kind, lesion.normalized_coordinates, rng)[lesion.inside]
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
    return SyntheticCase(case_id, image, region_map, tuple(lesions), _choose_expressions(lesions, rng, heldout_rng))


def _write_image(array: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    """NIfTI with the spacing in SimpleITK's (x, y, z) order and identity direction (see the lobe convention)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(step) for step in reversed(spacing)])
    sitk.WriteImage(image, str(path), True)


def _validate_parameters(dataset_id: int, dim: int, num_cases: int, num_test_cases: int,
                         shape: Sequence[int] | None, name: str) -> None:
    """Reject bad parameters before anything is written, each with its fix."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"Dataset id {dataset_id} is out of range. Fix: use an id from 1 to 999 (-d).")
    if dim not in DEFAULT_SHAPES:
        raise ValueError(f"dim {dim} is not supported. Fix: use --dim 2 or --dim 3.")
    if num_cases < 1 or num_test_cases < 0:
        raise ValueError(f"Got {num_cases} training and {num_test_cases} test cases. Fix: use --cases >= 1 and "
                         "--test_cases >= 0.")
    if shape is not None and (len(shape) != dim or min(shape) < MIN_SHAPE):
        raise ValueError(f"Shape {tuple(shape)} does not fit dim {dim}. Fix: give {dim} sizes, each >= {MIN_SHAPE} "
                         f"(e.g. --shape {' '.join(str(size) for size in DEFAULT_SHAPES[dim])}).")
    if not DATASET_NAME_PATTERN.match(name):
        raise ValueError(f"Dataset name {name!r} is not folder-name safe. Fix: use letters, digits, '_', '-', '.' "
                         "(--name).")


def _regions_entry(case: SyntheticCase, split: str) -> dict:
    """regions.json's record of one case: what converters and evaluation need to know about each region id."""
    return {"split": split, "regions": {str(lesion.region_id): {
        "kind": lesion.kind, "lobe": lesion.lobe, "centre": list(lesion.centre), "size_voxels": lesion.size_voxels,
        "size_rank": lesion.size_rank, "mean_intensity": lesion.mean_intensity} for lesion in case.lesions}}


def _dataset_json(name: str, dim: int, shape: tuple[int, ...], seed: int, num_cases: int, plain: bool,
                  heldout_phrasing: bool) -> dict:
    """nnU-Net's dataset.json, plus the generator settings so that the dataset can be regenerated (the held-out
    phrasing flag only when set, so a default dataset.json stays as it was)."""
    if plain:
        labels = dict(PLAIN_LABELS)
        task = "plain semantic lesion segmentation (label = lesion kind)"
    else:
        labels = {"background": 0, **{f"region_{index}": index for index in range(1, MAX_LESIONS + 1)}}
        task = ("referring lesion segmentation: labels are region maps (one id per lesion) and expressions.json says "
                "which regions each text refers to")
    settings = {"seed": seed, "dim": dim, "shape": list(shape), "spacing": list(SPACINGS[dim]),
                "mode": "plain" if plain else "referring"}
    if heldout_phrasing:
        settings["heldout_phrasing"] = True
    return {
        "name": name,
        "description": f"Synthetic CT-like {dim}D liver lesion dataset generated by LSMSv2_make_synthetic (not "
                       f"patient data) for {task}. Lobe convention: {LOBE_CONVENTION}",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": num_cases,
        "file_ending": FILE_ENDING,
        "lsms_synthetic": settings,
    }


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")


def _case_expressions(case: SyntheticCase, heldout: bool) -> list[Expression]:
    """The case's expressions in seen wording, or in held-out wording (marked, ids suffixed with HELDOUT_ID_SUFFIX)."""
    if not heldout:
        return [Expression(f"{case.case_id}-e{index}", case.case_id, expression.text, expression.targets,
                           expression.category) for index, expression in enumerate(case.expressions)]
    return [Expression(f"{case.case_id}-e{index}{HELDOUT_ID_SUFFIX}", case.case_id, expression.heldout_text,
                       expression.targets, expression.category, HELDOUT_PHRASING)
            for index, expression in enumerate(case.expressions)]


def _write_dataset(folder: Path, dataset_name: str, dim: int, shape: tuple[int, ...], num_cases: int,
                   num_test_cases: int, seed: int, plain: bool, heldout_phrasing: bool) -> None:
    """Write every file of the dataset into folder (a staging folder that is renamed once complete).

    With heldout_phrasing the test cases are asked in held-out wording only, and the training cases' held-out
    wordings go to HELDOUT_EXPRESSIONS_FILE beside expressions.json: nnU-Net's folds are drawn at random from the
    training cases, so the benchmark scores each fold's validation cases on that file, never training on it.
    """
    splits = {"Tr": range(num_cases), "Ts": range(num_cases, num_cases + num_test_cases)}
    expressions: dict[str, list[Expression]] = {"Tr": [], "Ts": [], "heldout": []}
    regions = {}
    for split in ("Tr", "Ts") if num_test_cases else ("Tr",):
        (folder / f"images{split}").mkdir()
        (folder / f"labels{split}").mkdir()
    progress = tqdm(total=num_cases + num_test_cases, desc=f"Generating {dataset_name}", unit="case")
    with progress:
        for split, case_indices in splits.items():
            for case_index in case_indices:
                case = generate_case(case_index, seed, dim, shape)
                _write_image(case.image, SPACINGS[dim], folder / f"images{split}" / f"{case.case_id}_0000{FILE_ENDING}")
                labels = case.semantic_map() if plain else case.region_map
                _write_image(labels, SPACINGS[dim], folder / f"labels{split}" / f"{case.case_id}{FILE_ENDING}")
                regions[case.case_id] = _regions_entry(case, "train" if split == "Tr" else "test")
                expressions[split].extend(_case_expressions(case, heldout_phrasing and split == "Ts"))
                if heldout_phrasing and split == "Tr":
                    expressions["heldout"].extend(_case_expressions(case, True))
                progress.update()
    _write_json(folder / "dataset.json", _dataset_json(dataset_name, dim, shape, seed, num_cases, plain,
                                                       heldout_phrasing))
    if plain:
        return
    save_expressions(folder / "expressions.json", expressions["Tr"])
    if heldout_phrasing:
        save_expressions(folder / HELDOUT_EXPRESSIONS_FILE, expressions["heldout"])
    if num_test_cases:
        save_expressions(folder / "imagesTs" / "expressions.json", expressions["Ts"])
    _write_json(folder / "regions.json", {
        "format": REGIONS_FORMAT, "version": REGIONS_VERSION, "lobe_convention": LOBE_CONVENTION,
        "centre_convention": "voxel indices in array axis order ((y, x) or (z, y, x))",
        "size_rank_convention": "1 = largest lesion of the case", "cases": regions})


def _swap_in(staging: Path, target: Path, replaced: Sequence[Path]) -> None:
    """Move the complete staging folder to target, replacing the folders of the same dataset id.

    The old folders are first moved aside, so a failed rename puts them back and nothing is lost.
    """
    aside = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex}"
    aside.mkdir()
    moved = []
    try:
        for old in replaced:
            os.rename(old, aside / old.name)
            moved.append(old)
        os.rename(staging, target)
    except BaseException:
        for old in moved:
            os.rename(aside / old.name, old)
        aside.rmdir()
        raise
    shutil.rmtree(aside)


def make_synthetic_dataset(dataset_id: int, dim: int = 2, num_cases: int = 40, num_test_cases: int = 6,
                           seed: int = 0, shape: tuple[int, ...] | None = None, name: str | None = None,
                           plain: bool = False, overwrite: bool = False,
                           raw_root: str | os.PathLike | None = None, heldout_phrasing: bool = False) -> Path:
    """Write the synthetic dataset to raw_root (default $nnUNet_raw)/DatasetXXX_Name and return that folder.

    The dataset is written to a hidden staging folder next to it and renamed at the end, so a failed or interrupted
    run never leaves a half dataset that nnU-Net would pick up.
    """
    name = name or default_dataset_name(dim, plain)
    _validate_parameters(dataset_id, dim, num_cases, num_test_cases, shape, name)
    shape = tuple(int(size) for size in shape) if shape is not None else DEFAULT_SHAPES[dim]
    root = resolve_raw_root(raw_root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"Dataset{dataset_id:03d}_{name}"
    existing = sorted(path for path in root.glob(f"Dataset{dataset_id:03d}_*") if path.is_dir())
    if existing and not overwrite:
        raise FileExistsError(f"Dataset id {dataset_id} already exists in {root}: "
                              f"{', '.join(path.name for path in existing)}. Fix: pass --overwrite "
                              "(overwrite=True) to replace it, or choose another id with -d.")
    staging = root / f".{target.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        _write_dataset(staging, target.name, dim, shape, num_cases, num_test_cases, seed, plain, heldout_phrasing)
        _swap_in(staging, target, existing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@console_entry
def make_synthetic_entry() -> None:
    """LSMSv2_make_synthetic: write the embedded synthetic dataset into $nnUNet_raw."""
    parser = argparse.ArgumentParser(
        prog="LSMSv2_make_synthetic",
        description="Write a synthetic CT-like liver lesion dataset to $nnUNet_raw/DatasetXXX_Name: a referring "
                    "dataset (region maps + expressions.json) or, with --plain, a semantic lesion-kind dataset.")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset id (1-999)")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2, help="2D or 3D images (default 2)")
    parser.add_argument("--cases", type=int, default=40, help="number of training cases (default 40)")
    # --test-cases: the spelling before the flags were made consistent, still accepted.
    parser.add_argument("--test_cases", "--test-cases", dest="test_cases", type=int, default=6,
                        help="number of test cases in imagesTs (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default 0)")
    parser.add_argument("--shape", type=int, nargs="+", default=None,
                        help=f"image shape in array order (default 2D {' '.join(map(str, DEFAULT_SHAPES[2]))}, "
                             f"3D {' '.join(map(str, DEFAULT_SHAPES[3]))})")
    parser.add_argument("--name", default=None,
                        help="dataset name (default SynthLiverRLS2D/3D, or SynthLiverLesions2D/3D with --plain)")
    parser.add_argument("--plain", action="store_true",
                        help="plain semantic task (labels cyst, hemangioma, hcc, metastasis), no expressions")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same id")
    parser.add_argument("--heldout_phrasing", action="store_true",
                        help=f"ask the test cases in wordings never used in training, and write the training cases' "
                             f"held-out wordings to {HELDOUT_EXPRESSIONS_FILE} (scored by LSMSv2_benchmark)")
    args = parser.parse_args()
    try:
        folder = make_synthetic_dataset(args.dataset_id, dim=args.dim, num_cases=args.cases,
                                        num_test_cases=args.test_cases, seed=args.seed,
                                        shape=tuple(args.shape) if args.shape else None, name=args.name,
                                        plain=args.plain, overwrite=args.overwrite,
                                        heldout_phrasing=args.heldout_phrasing)
    except (ValueError, FileExistsError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"Wrote {folder}")
