"""The synthetic image: a CT-like body, a liver with its interlobar fissure, and lesions of four kinds placed in it.

Lobe convention (radiological display): arrays have the x axis last and SimpleITK's identity direction (LPS), so a
low x index, the image's left side, is the patient's right. The liver sits on the patient's right. A thin dark
interlobar fissure crosses it: the part on the image-left side is the "right lobe", the part on the image-right side
the "left lobe". A lesion belongs to the lobe of its centre; lesions never cross the fissure.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

KINDS = ("cyst", "hemangioma", "hcc", "metastasis")
PLAIN_LABELS = {"background": 0, **{kind: index + 1 for index, kind in enumerate(KINDS)}}
LOBES = ("right", "left")
MIN_LESIONS, MAX_LESIONS = 2, 5
LIVER_LABEL = MAX_LESIONS + 1  # referring region maps: the liver is a context region after the lesion ids
DEFAULT_SHAPES = {2: (96, 96), 3: (32, 64, 64)}
SPACINGS = {2: (1.0, 1.0), 3: (2.0, 1.0, 1.0)}  # array axis order; 3D is anisotropic on purpose
MIN_SHAPE = 16
MIN_SIZE_RATIO = 1.2  # consecutive size ranks differ at least by this factor, so "largest"/"smallest" are clear-cut
PLACEMENT_ATTEMPTS_PER_COUNT = 6
MIN_BODY_SCALE = 0.5  # --varied_anatomy: the smallest body, as a fraction of the default ...
MAX_LIVER_SHIFT = 0.2  # ... and the liver's largest shift inside it, as a fraction of the body's half extent
VARIATION_STREAM = 2  # the body placement draws from its own random stream: [seed, case index, VARIATION_STREAM]
LOBE_CONVENTION = ("Radiological display: the image's left side (low x index; SimpleITK identity direction, LPS) is "
                   "the patient's right. The right lobe is the part of the liver on the image-left side of the dark "
                   "interlobar fissure, the left lobe the part on its image-right side; a lesion belongs to the lobe "
                   "of its centre.")



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


@dataclass
class _PlacedLesion:
    """A lesion during generation: where it is and which voxels of its bounding box it covers."""

    kind: str
    lobe: str
    box: tuple[slice, ...]
    normalized_coordinates: list[np.ndarray]  # per axis, (coordinate - centre) / radius, broadcastable over the box
    inside: np.ndarray  # bool over the box


@dataclass(frozen=True)
class BodyPlacement:
    """Where the body (and with it the liver) lies in the image: in-plane offset of its centre from the image centre
    (mm, array axis order) and its size as a fraction of the default. The default fills the centred image as scans
    of one protocol do; `varied` moves and resizes it per case, so that position in the image and position in the
    liver disagree (which lobe holds a lesion cannot be read off its place in the image)."""

    offset_mm: tuple[float, ...]
    scale: float = 1.0
    liver_offset_mm: tuple[float, ...] | None = None  # the liver's shift inside the body (None: none)

    @classmethod
    def centred(cls, dim: int) -> BodyPlacement:
        return cls((0.0,) * dim)

    @classmethod
    def varied(cls, half_extent: np.ndarray, rng: np.random.Generator) -> BodyPlacement:
        scale = rng.uniform(MIN_BODY_SCALE, 1.0)
        offset, liver_offset = np.zeros(len(half_extent)), np.zeros(len(half_extent))
        for axis, body_fraction in ((-2, 0.8), (-1, 0.93)):  # the body ellipse's semi-axes, as in draw_body
            room = max(0.0, 1.0 - body_fraction * scale - 0.02) * half_extent[axis]
            offset[axis] = rng.uniform(-room, room)
            liver_offset[axis] = rng.uniform(-MAX_LIVER_SHIFT, MAX_LIVER_SHIFT) * scale * half_extent[axis]
        return cls(tuple(float(value) for value in offset), float(scale),
                   tuple(float(value) for value in liver_offset))

    def body_axes(self, axes: list[np.ndarray]) -> list[np.ndarray]:
        """The image's mm axes with their origin moved to the body's centre."""
        return [axis - offset for axis, offset in zip(axes, self.offset_mm)]

    def liver_axes(self, axes: list[np.ndarray]) -> list[np.ndarray]:
        """The body's mm axes with their origin moved by the liver's own shift."""
        body = self.body_axes(axes)
        return body if self.liver_offset_mm is None else [axis - offset
                                                          for axis, offset in zip(body, self.liver_offset_mm)]

    def body_half_extent(self, half_extent: np.ndarray) -> np.ndarray:
        """The in-plane extent the body is drawn within (the axial axis of a 3D image keeps its length)."""
        scaled = np.asarray(half_extent, dtype=float).copy()
        scaled[-2:] *= self.scale
        return scaled


def physical_axes(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
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


def draw_body(axes: list[np.ndarray], half_extent: np.ndarray, shape: tuple[int, ...],
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


def draw_liver(axes: list[np.ndarray], half_extent: np.ndarray, allowed: np.ndarray,
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


def place_lesions(liver: np.ndarray, fissure_distance: np.ndarray, liver_semi_axes: np.ndarray,
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


def lesion_profile(kind: str, normalized: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
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


