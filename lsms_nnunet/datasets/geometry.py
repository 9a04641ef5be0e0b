"""Image reading, geometry checks and atomic writes shared by the dataset converters.

A referring dataset is only as good as the alignment of its masks with their images, so every converter reads through
these helpers: one reader for files and DICOM series folders, one geometry check that names both files and prints the
numbers that differ, and writers that never leave a half-written file where nnU-Net would find it.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import SimpleITK as sitk

from tqdm import tqdm

from lsms_nnunet.preprocessing.prompts import CONTEXT_KEY
from text_conditioning.io import atomic_path

Job = TypeVar("Job")
Result = TypeVar("Result")

# nnU-Net preprocesses segmentations as int16, so a region map can hold at most this many regions.
MAX_REGIONS = int(np.iinfo(np.int16).max)
# Geometry tolerances: relative on spacing; origins may differ by this fraction of the smallest voxel spacing
# (NIfTI stores float32); direction cosines by an absolute amount.
SPACING_RELATIVE_TOLERANCE = 1e-4
ORIGIN_TOLERANCE_IN_VOXELS = 1e-2
DIRECTION_TOLERANCE = 1e-4
COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd")
NNUNET_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")
UNSAFE_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
DATASET_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ConversionError(ValueError):
    """Input that a converter cannot turn into a valid dataset; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie in physical space (ITK convention: LPS millimetres)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(value), 6) + 0.0 for value in values)  # + 0.0 prints -0.0 as 0.0


def geometry_mismatches(reference: Geometry, other: Geometry) -> list[tuple[str, tuple, tuple]]:
    """(property, reference value, other value) for every property that differs beyond the tolerances."""
    if len(reference.size) != len(other.size):
        return [("dimension", (len(reference.size),), (len(other.size),)), ("size", reference.size, other.size)]
    mismatches = []
    if reference.size != other.size:
        mismatches.append(("size", reference.size, other.size))
    if not np.allclose(reference.spacing, other.spacing, rtol=SPACING_RELATIVE_TOLERANCE, atol=0):
        mismatches.append(("spacing", _rounded(reference.spacing), _rounded(other.spacing)))
    origin_tolerance = ORIGIN_TOLERANCE_IN_VOXELS * min(reference.spacing)
    if not np.allclose(reference.origin, other.origin, rtol=0, atol=origin_tolerance):
        mismatches.append(("origin", _rounded(reference.origin), _rounded(other.origin)))
    if not np.allclose(reference.direction, other.direction, rtol=0, atol=DIRECTION_TOLERANCE):
        mismatches.append(("direction", _rounded(reference.direction), _rounded(other.direction)))
    return mismatches


def check_same_geometry(image: sitk.Image, other: sitk.Image, image_path: Path, other_path: Path, where: str,
                        fix: str, other_kind: str = "mask") -> None:
    """Raise a ConversionError listing each differing property with the numbers of both files."""
    mismatches = geometry_mismatches(Geometry.of(image), Geometry.of(other))
    if mismatches:
        details = "; ".join(f"{name}: image {image_value} vs {other_kind} {other_value}"
                            for name, image_value, other_value in mismatches)
        raise ConversionError(f"{where}: {other_path} does not lie on the grid of image {image_path} ({details}). "
                              f"Fix: {fix}")


def resample_like(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling onto the reference grid: keeps mask values exact, fills outside with 0."""
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


def stored_grid(path: Path) -> sitk.Image:
    """An empty image on the grid a written file declares (NIfTI rounds origins to float32), read from its header."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    grid = sitk.Image(reader.GetSize(), sitk.sitkUInt8)
    grid.SetSpacing(reader.GetSpacing())
    grid.SetOrigin(reader.GetOrigin())
    grid.SetDirection(reader.GetDirection())
    return grid


def read_image(path: Path, where: str) -> sitk.Image:
    """Read any file SimpleITK understands, or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{where}: {path} does not exist. Fix: correct the path (relative paths start at the "
                              "table's folder).")
    try:
        if path.is_dir():
            return _read_dicom_series(path, where)
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ConversionError(f"{where}: SimpleITK cannot read {path} ({str(error).strip().splitlines()[-1]}). "
                              "Fix: convert it to NIfTI (.nii.gz), NRRD, MHA or PNG.") from error


def _read_dicom_series(folder: Path, where: str) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series_ids) != 1:
        found = f"{len(series_ids)} series ({', '.join(series_ids)})" if series_ids else "no DICOM series"
        raise ConversionError(f"{where}: folder {folder} holds {found}. Fix: point to a folder with exactly one "
                              "DICOM series.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    return reader.Execute()


def binary_mask(mask: sitk.Image, mask_path: Path, where: str) -> np.ndarray:
    """The mask as a bool array; refuses anything but one value besides 0 (0/1 and 0/255 both pass)."""
    array = sitk.GetArrayFromImage(mask)
    if mask.GetNumberOfComponentsPerPixel() > 1:
        components = np.moveaxis(array, -1, 0)
        if not all(np.array_equal(components[0], component) for component in components[1:]):
            raise ConversionError(f"{where}: mask {mask_path} has {mask.GetNumberOfComponentsPerPixel()} different "
                                  "colour channels. Fix: save it as a single-channel (grayscale) binary mask.")
        array = components[0]
    values = np.unique(array)
    nonzero = values[values != 0]
    if len(nonzero) > 1:
        shown = ", ".join(str(value) for value in values[:8]) + (" ..." if len(values) > 8 else "")
        raise ConversionError(f"{where}: mask {mask_path} is not binary (values {shown}). Fix: write one mask per "
                              "expression with 0 outside and a single value (e.g. 1) inside.")
    return array != 0


def physical_points(image: sitk.Image, index_zyx: np.ndarray) -> np.ndarray:
    """Physical LPS coordinates (N, dim) of continuous voxel indices given in numpy (z, y, x) order."""
    index_xyz = np.asarray(index_zyx, dtype=np.float64)[:, ::-1]
    direction = np.asarray(image.GetDirection()).reshape(image.GetDimension(), image.GetDimension())
    return np.asarray(image.GetOrigin()) + (index_xyz * np.asarray(image.GetSpacing())) @ direction.T


def image_ending(path: Path) -> str:
    """The file ending including compound ones such as .nii.gz; '' for folders (DICOM series)."""
    if path.is_dir():
        return ""
    name = path.name.lower()
    for suffix in COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def case_stem(path: Path) -> str:
    """A file-name-safe case identifier from an image path (nnU-Net's _0000 channel suffix is dropped)."""
    ending = image_ending(path)
    stem = path.name[:len(path.name) - len(ending)] if ending else path.name
    stem = NNUNET_CHANNEL_SUFFIX.sub("", stem)
    stem = UNSAFE_ID_CHARACTERS.sub("_", stem).lstrip("._-")
    return stem or "case"


def region_map_pixel_type(num_regions: int, ending: str) -> int:
    """The smallest pixel type that holds the ids and that the file format (PNG: unsigned only) can store."""
    if num_regions <= 255:
        return sitk.sitkUInt8
    return sitk.sitkUInt16 if ending == ".png" else sitk.sitkInt16


def check_region_count(num_regions: int, where: str, fix: str) -> None:
    if num_regions > MAX_REGIONS:
        raise ConversionError(f"{where}: {num_regions} regions, but nnU-Net stores region maps as int16 (at most "
                              f"{MAX_REGIONS}). Fix: {fix}")


def referring_labels(highest_id: int, context: Mapping[str, int]) -> dict:
    """dataset.json's "labels" (and, with context, its `lsms_context`) of a referring dataset: background, each
    context region (anatomy) under its name and id, and `region_<id>` for every other id up to the highest, so the
    values stay consecutive and prompts.context_labels reads the anatomy back."""
    names_of_ids = {value: name for name, value in context.items()}
    labels = {"background": 0, **{names_of_ids.get(value, f"region_{value}"): value
                                  for value in range(1, highest_id + 1)}}
    return {"labels": labels, **({CONTEXT_KEY: list(context)} if context else {})}


def region_map_image(region_map: np.ndarray, reference: sitk.Image, ending: str) -> sitk.Image:
    """A region map on the reference grid, in the smallest pixel type that holds its ids."""
    image = sitk.GetImageFromArray(region_map.astype(np.int32))
    image.CopyInformation(reference)
    return sitk.Cast(image, region_map_pixel_type(int(region_map.max(initial=0)), ending))


def write_image_atomically(image: sitk.Image, path: Path) -> None:
    """Write through a temporary file in the same folder so nnU-Net never sees a partial image."""
    with atomic_path(path, f".tmp{image_ending(path)}") as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)


def copy_file_atomically(source: Path, destination: Path) -> None:
    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)


def resolve_raw_root(raw_root: str | os.PathLike | None) -> Path:
    """The nnUNet_raw folder: the argument, else the environment variable."""
    if raw_root is None:
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root:
            raise ConversionError("nnUNet_raw is not set and no raw_root was given. Fix: export nnUNet_raw=/path/to/"
                                  "nnUNet_raw (as for nnU-Net) or pass raw_root.")
    return Path(raw_root)


def dataset_folder(raw_root: Path, dataset_id: int, name: str) -> Path:
    """nnU-Net's DatasetXXX_Name folder, after checking the id and name are ones nnU-Net accepts."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConversionError(f"Dataset id {dataset_id!r} is invalid. Fix: use an integer from 1 to 999 that no other "
                              "dataset in nnUNet_raw uses.")
    if not DATASET_NAME_PATTERN.match(name):
        raise ConversionError(f"Dataset name {name!r} is invalid. Fix: use letters, digits, '_' and '-' only, e.g. "
                              "'LiverLesions'.")
    return raw_root / f"Dataset{dataset_id:03d}_{name}"


def folders_with_dataset_id(raw_root: Path, dataset_id: int) -> list[Path]:
    """Every folder nnU-Net would take for this id (it must be unique, or nnU-Net refuses the id)."""
    if not raw_root.is_dir():
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(path for path in raw_root.iterdir() if path.is_dir() and path.name.startswith(prefix))


def refuse_existing_dataset(raw_root: Path, dataset_id: int, overwrite: bool) -> list[Path]:
    """The folders with this id that overwrite=True will replace; an error naming them when overwrite is False."""
    existing = folders_with_dataset_id(raw_root, dataset_id)
    if existing and not overwrite:
        raise ConversionError(f"Dataset id {dataset_id} is already used by {', '.join(str(p) for p in existing)}. "
                              "Fix: choose another id, or pass overwrite=True (--overwrite) to replace it.")
    return existing


def publish_dataset(staging: Path, destination: Path, replaced: Sequence[Path]) -> None:
    """Move a finished dataset into place, replacing the folders of the same dataset id: they are moved aside first,
    put back if the move fails, and deleted only once the new dataset is in place, so a failed run damages nothing."""
    aside = destination.parent / f".{destination.name}.replaced-{uuid.uuid4().hex}"
    aside.mkdir()
    moved = []
    try:
        for old in replaced:
            os.replace(old, aside / old.name)
            moved.append(old)
        os.replace(staging, destination)
    except BaseException:
        for old in moved:
            os.replace(aside / old.name, old)
        aside.rmdir()
        raise
    shutil.rmtree(aside)


@contextmanager
def staged_dataset(raw_root: Path, destination: Path, replaced: Sequence[Path]) -> Iterator[Path]:
    """A staging folder beside `destination` to write a dataset into: published (publish_dataset) when the block
    ends normally, deleted when it fails, so nnU-Net never sees half a dataset. The one way every dataset writer
    (synthetic generator, LiTS, both converters) puts a dataset into nnUNet_raw."""
    staging = staging_folder(raw_root, destination)
    try:
        yield staging
        publish_dataset(staging, destination, replaced)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staging_folder(raw_root: Path, destination: Path) -> Path:
    """A hidden folder beside the destination (same file system, so publishing is a rename)."""
    raw_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=raw_root, prefix=f".{destination.name}.staging-"))


def map_with_progress(function: Callable[[Job], Result], jobs: Sequence[Job], num_processes: int,
                      description: str) -> Iterator[Result]:
    """Results of function over jobs (in completion order) with a progress bar; a spawn pool when num_processes > 1.

    Spawned workers start clean (no forked SimpleITK threads); with one process everything runs here, which keeps
    small conversions and tests fast.
    """
    progress = dict(total=len(jobs), desc=description, unit="case", disable=not jobs)
    if num_processes <= 1 or len(jobs) <= 1:
        yield from tqdm(map(function, jobs), **progress)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        yield from tqdm(pool.imap_unordered(function, jobs), **progress)
