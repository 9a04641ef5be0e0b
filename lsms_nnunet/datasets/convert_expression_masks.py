"""Convert "one mask per expression" data (RefHL-Seg style) into an nnU-Net referring dataset, losslessly.

Masks of different expressions may overlap, so they cannot share one label map directly. Instead every voxel is
labelled by the set of expressions that cover it: voxels with the same set form one region ("atom"), and each
expression's targets are the atoms inside its mask. The union of an expression's atoms is then exactly its mask,
which ``verify_roundtrip`` proves from the files on disk at the end of every conversion.

Optional per-image columns make the maps complete: an all-lesion mask (binary or instance map) splits atoms by lesion
and keeps lesions that no expression names as regions of their own, and an anatomy label map is kept as context
regions (ids 1..C, before the lesion atoms), declared in dataset.json as LSMSv2_convert_semantic declares its organ.
Rows marked `split` test go to imagesTs/labelsTs/imagesTs/expressions.json of the same dataset; rows marked `phrasing`
heldout of training images go to expressions_heldout.json, which LSMSv2_benchmark scores but training never reads.

2D PNG inputs stay PNG (nnU-Net's NaturalImage2DIO convention for 2D images, so nnU-Net plans them as 2D natural
images with no invented spacing); every other input (NIfTI, NRRD, MHA, DICOM series folders, ...) becomes .nii.gz.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk

from lsms_nnunet.datasets.convert_semantic import CONNECTIVITY, context_name
from lsms_nnunet.datasets.geometry import (ConversionError, Geometry, binary_mask, case_stem, check_region_count,
                                           check_same_geometry, dataset_folder, folders_with_dataset_id,
                                           geometry_mismatches, image_ending, map_with_progress, read_image,
                                           referring_labels, region_map_image, resample_like, resolve_raw_root,
                                           staged_dataset, stored_grid, write_image_atomically)
from lsms_nnunet.preprocessing.prompts import EXPRESSIONS_FILE, check_label_values, context_labels
from text_conditioning.expressions import (CATEGORY_PATTERN, HELDOUT_EXPRESSIONS_FILE, HELDOUT_PHRASING,
                                           NO_TARGET_CATEGORY, PHRASINGS, SAFE_ID_PATTERN, SEEN_PHRASING, Expression,
                                           ExpressionsError, json_too_deep_message, load_expressions,
                                           save_expressions)
from text_conditioning.io import write_json_atomically
from lsms_nnunet.cli import console_entry

MANIFEST_NAME = ".lsms_convert.json"
CONVERTER_NAME = "LSMSv2_convert_expression_masks"
MANIFEST_VERSION = 2
TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)
#: (images folder, labels folder) of each split; a test split's expressions go to imagesTs/expressions.json.
SPLIT_FOLDERS = {TRAIN: ("imagesTr", "labelsTr"), TEST: ("imagesTs", "labelsTs")}
#: The table's columns and what they hold (shown by --help and docs/data_format.md).
COLUMNS = {
    "image": "required: the image (any file SimpleITK reads, or a DICOM series folder)",
    "text": "required: the referring expression",
    "mask": "required column: binary mask of what the text refers to; an empty cell means it refers to nothing "
            "(an intended no-target row, no warning)",
    "id": "expression id (default <case>-e<k>); names output files",
    "category": f"report group, a lowercase identifier such as 'size'; '{NO_TARGET_CATEGORY}' marks an intended "
                "no-target row (its mask must be empty); an empty mask cell gets it by default",
    "split": f"{TRAIN} (default) or {TEST}: test images go to imagesTs/, labelsTs/ and imagesTs/expressions.json",
    "phrasing": f"{SEEN_PHRASING} (default) or {HELDOUT_PHRASING}: wording never trained on; held-out rows of "
                f"training images go to {HELDOUT_EXPRESSIONS_FILE} (scored by LSMSv2_benchmark) and must repeat "
                "the targets of a seen row of their image",
    "all_lesions": "per image: mask (each connected component is one lesion) or instance map of every lesion, so "
                   "lesions that no expression names stay lesion regions",
    "anatomy": "per image: organ label map, kept as context regions (dataset.json lsms_context); name its values "
               "with --anatomy_labels",
}
REQUIRED_COLUMNS = ("image", "text", "mask")
ALLOWED_COLUMNS = tuple(COLUMNS)
PER_IMAGE_COLUMNS = ("split", "all_lesions", "anatomy")
DEFAULT_ANATOMY_NAME = context_name("")  # "organ", as LSMSv2_convert_semantic names an organ without a name
LISTED_ROWS = 3
RESAMPLE_FIX = ("export the mask on the image's voxel grid, or pass resample_masks=True (--resample_masks) to "
                "resample masks onto their image with nearest neighbour.")
ALL_LESIONS_FIX = ("add an all_lesions column giving, for each image, a mask (or instance map) of every lesion in "
                   "it, named or not")


@dataclass(frozen=True)
class ExpressionSpec:
    """One table row: where it is (for messages), its expression id, text, mask file (None: refers to nothing),
    optional category, phrasing, and whether it says on purpose that it refers to nothing."""

    where: str
    expression_id: str
    text: str
    mask: Path | None
    category: str | None = None
    phrasing: str = SEEN_PHRASING
    intended_no_target: bool = False


@dataclass(frozen=True)
class CaseSpec:
    """One image, its split, its optional all-lesion and anatomy maps, and every expression on it, in table order."""

    case: str
    image: Path
    expressions: tuple[ExpressionSpec, ...]
    split: str = TRAIN
    all_lesions: Path | None = None
    anatomy: Path | None = None


@dataclass(frozen=True)
class TableRow:
    """One parsed row of the table, with absolute paths and where it came from (for messages)."""

    where: str
    image: Path
    text: str
    mask: Path | None
    expression_id: str | None
    category: str | None = None
    split: str | None = None  # None: as the image's other rows say, else TRAIN
    phrasing: str = SEEN_PHRASING
    all_lesions: Path | None = None
    anatomy: Path | None = None


def _resolve(table: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else table.parent / path


def _header_fix() -> str:
    return f"use the header 'image,text,mask', optionally with {', '.join(ALLOWED_COLUMNS[3:])} (see --help)."


def _rows_from_csv(table: Path) -> Iterator[tuple[str, dict]]:
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [column.strip() for column in reader.fieldnames or []]
        missing = [column for column in REQUIRED_COLUMNS if column not in columns]
        unknown = [column for column in columns if column not in ALLOWED_COLUMNS]
        if missing or unknown:
            raise ConversionError(f"Table {table} has columns {columns}; missing {missing}, unknown {unknown}. Fix: "
                                  f"{_header_fix()}")
        reader.fieldnames = columns
        for row_number, row in enumerate(reader, start=1):
            yield f"{table} row {row_number} (line {reader.line_num})", row


def _rows_from_json(table: Path) -> Iterator[tuple[str, dict]]:
    try:
        entries = json.loads(table.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"Table {table} is not valid UTF-8 JSON ({error}). Fix: write a JSON list of "
                              '{"image": ..., "text": ..., "mask": ...} objects.') from error
    except RecursionError:
        raise ConversionError(f"Table {json_too_deep_message(table)}") from None
    if not isinstance(entries, list):
        raise ConversionError(f"Table {table} holds a {type(entries).__name__}, not a list. Fix: write a JSON list "
                              'of {"image": ..., "text": ..., "mask": ...} objects.')
    for index, entry in enumerate(entries):
        where = f"{table} entry {index}"
        if not isinstance(entry, dict):
            raise ConversionError(f"{where} is a {type(entry).__name__}, not an object. Fix: write "
                                  '{"image": ..., "text": ..., "mask": ...}.')
        unknown = sorted(set(entry) - set(ALLOWED_COLUMNS))
        if unknown:
            raise ConversionError(f"{where} has unknown key(s) {unknown}. Fix: use only {list(ALLOWED_COLUMNS)}.")
        yield where, entry


def _cell(values: Mapping, column: str) -> str | None:
    """A cell's stripped text; None when empty or absent (JSON null)."""
    value = values.get(column)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _row_problems(where: str, values: Mapping, default_split: str) -> list[str]:
    """Everything wrong with one row's values (besides missing files), each with its fix."""
    problems = []
    missing = [key for key in ("image", "text") if _cell(values, key) is None]
    if "mask" not in values:
        missing.append("mask")
    if missing:
        problems.append(f"{where} has no {', '.join(missing)}. Fix: fill in image and text, and give the mask "
                        "(an empty mask means the text refers to nothing in the image).")
    expression_id = _cell(values, "id")
    if expression_id is not None and not SAFE_ID_PATTERN.match(expression_id):
        problems.append(f"{where} has the unsafe id {expression_id!r}. Fix: use letters, digits, '.', '_', '-' "
                        "(it names output files), or leave it empty for '<case>-e<k>'.")
    category = _cell(values, "category")
    if category is not None and not CATEGORY_PATTERN.match(category):
        problems.append(f"{where} has the category {category!r}. Fix: use a short lowercase identifier (e.g. "
                        "'size'), or leave it empty.")
    split = _cell(values, "split") or default_split
    if split not in SPLITS:
        problems.append(f"{where} has split {split!r}. Fix: write {TRAIN} or {TEST}, or leave it empty ({TRAIN}).")
    elif default_split == TEST and split != TEST:
        problems.append(f"{where} is in the --test table but has split {split!r}. Fix: move the row to the main "
                        f"table, or clear its split cell.")
    phrasing = _cell(values, "phrasing") or SEEN_PHRASING
    if phrasing not in PHRASINGS:
        problems.append(f"{where} has phrasing {phrasing!r}. Fix: write {SEEN_PHRASING} or {HELDOUT_PHRASING}, or "
                        f"leave it empty ({SEEN_PHRASING}).")
    return problems


def read_table(table: str | os.PathLike, default_split: str = TRAIN) -> list[TableRow]:
    """Parse and check the whole table before any image is read; all problems are reported at once.

    ``default_split`` is the split of rows with an empty split cell: TEST for a table given as --test."""
    table = Path(table)
    if not table.is_file():
        raise ConversionError(f"Table {table} does not exist. Fix: pass a CSV (image,text,mask) or JSON table.")
    raw_rows = _rows_from_json(table) if table.suffix.lower() == ".json" else _rows_from_csv(table)
    rows, problems = [], []
    for where, values in raw_rows:
        problems += _row_problems(where, values, default_split)
        if _cell(values, "image") is None or _cell(values, "text") is None or "mask" not in values:
            continue
        paths = {column: _resolve(table, _cell(values, column)) if _cell(values, column) else None
                 for column in ("image", "mask", "all_lesions", "anatomy")}
        for column, path in paths.items():
            if path is not None and not path.exists():
                problems.append(f"{where}: {column} {path} does not exist. Fix: correct the path (relative paths "
                                f"start at {table.parent}).")
        rows.append(TableRow(where, paths["image"], _cell(values, "text"), paths["mask"], _cell(values, "id"),
                             _cell(values, "category"), _cell(values, "split") or (TEST if default_split == TEST
                                                                                     else None),
                             _cell(values, "phrasing") or SEEN_PHRASING, paths["all_lesions"], paths["anatomy"]))
    if not rows and not problems:
        problems.append(f"{table} has no rows. Fix: add one row per (image, expression, mask).")
    if problems:
        raise ConversionError(f"Table {table} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return rows


def _per_image_value(image_rows: Sequence[TableRow], column: str, problems: list[str]) -> str | Path | None:
    """The one value a per-image column has over an image's rows (empty cells take it from the others)."""
    given = {}
    for row in image_rows:
        value = getattr(row, column)
        if value is not None:
            given.setdefault(value.resolve() if isinstance(value, Path) else value, row)
    if len(given) > 1:
        (first, first_row), (second, second_row) = list(given.items())[:2]
        problems.append(f"{second_row.where} gives {column} {second!r}, but {first_row.where} gives {first!r} for "
                        f"the same image {image_rows[0].image}. Fix: give every row of an image the same {column} "
                        "(or leave the cell empty on all but one of them).")
    return getattr(next(iter(given.values())), column) if given else None


def plan_cases(rows: Sequence[TableRow]) -> list[CaseSpec]:
    """Group rows by image; case ids come from file stems (made safe and unique), ids default to <case>-e<k>.

    Refuses, listing every instance: an image whose rows disagree on a per-image column, duplicate expression ids,
    anatomy for some images but not all, and a training image asked only in held-out wording (the benchmark needs
    a seen expression on every training case)."""
    rows_by_image: dict[Path, list[TableRow]] = {}
    for row in rows:
        rows_by_image.setdefault(row.image.resolve(), []).append(row)
    used_cases: set[str] = set()
    cases, problems = [], []
    for image, image_rows in rows_by_image.items():
        stem = case_stem(image)
        case, suffix = stem, 2
        while case in used_cases:
            case, suffix = f"{stem}_{suffix}", suffix + 1
        used_cases.add(case)
        expressions = tuple(ExpressionSpec(
            row.where, row.expression_id or f"{case}-e{index}", row.text, row.mask,
            row.category or (NO_TARGET_CATEGORY if row.mask is None else None), row.phrasing,
            row.mask is None or row.category == NO_TARGET_CATEGORY) for index, row in enumerate(image_rows))
        per_image = {column: _per_image_value(image_rows, column, problems) for column in PER_IMAGE_COLUMNS}
        spec = CaseSpec(case, image_rows[0].image, expressions, **{**per_image, "split": per_image["split"] or TRAIN})
        if spec.split == TRAIN and all(expression.phrasing == HELDOUT_PHRASING for expression in expressions):
            problems.append(f"{expressions[0].where}: every row of training image {spec.image} is held-out wording, "
                            "so nothing trains on this case. Fix: mark at least one of its rows phrasing seen, or "
                            "make the image a test image (split test).")
        cases.append(spec)
    with_anatomy = [spec for spec in cases if spec.anatomy is not None]
    if with_anatomy and len(with_anatomy) < len(cases):
        without = [spec.expressions[0].where for spec in cases if spec.anatomy is None]
        problems.append(f"{len(without)} image(s) have no anatomy map although others have one, e.g. "
                        f"{'; '.join(without[:LISTED_ROWS])}. Fix: give every image an anatomy map (context regions "
                        "are declared for the whole dataset), or none.")
    first_row_of_id: dict[str, str] = {}
    for spec in cases:
        for expression in spec.expressions:
            if expression.expression_id in first_row_of_id:
                problems.append(f"{expression.where} repeats expression id {expression.expression_id!r} of "
                                f"{first_row_of_id[expression.expression_id]}. Fix: give each row a unique id.")
            first_row_of_id.setdefault(expression.expression_id, expression.where)
    if problems:
        raise ConversionError(f"The table has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return cases


def atomize(masks: np.ndarray, lesions: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Region map of atoms and each mask's atom ids, from bool masks stacked on axis 0.

    Voxels covered by the same set of masks (and, with ``lesions``, an instance map of every lesion, in the same
    lesion) share one id; ids 1..K follow the order in which they first appear in C order; voxels in no mask and
    no lesion are 0. Mask m is exactly the union of the atoms listed as its targets.
    """
    num_masks = masks.shape[0]
    flat = masks.reshape(num_masks, -1)
    inside = flat.any(axis=0) if lesions is None else flat.any(axis=0) | (lesions.ravel() > 0)
    covered = np.flatnonzero(inside)
    region_map = np.zeros(flat.shape[1], dtype=np.int32)
    if covered.size == 0:
        return region_map.reshape(masks.shape[1:]), [() for _ in range(num_masks)]
    packed = np.packbits(flat[:, covered], axis=0).T
    if lesions is not None:
        lesion_bytes = lesions.ravel()[covered].astype("<i8").view(np.uint8).reshape(covered.size, -1)
        packed = np.concatenate([packed, lesion_bytes], axis=1)
    packed = np.ascontiguousarray(packed)
    signatures = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first_voxel, inverse = np.unique(signatures, return_index=True, return_inverse=True)
    order_of_appearance = np.argsort(first_voxel)
    atom_id = np.empty_like(order_of_appearance)
    atom_id[order_of_appearance] = np.arange(1, len(order_of_appearance) + 1)
    region_map[covered] = atom_id[inverse.ravel()]
    membership = flat[:, covered[first_voxel[order_of_appearance]]]
    targets = [tuple(int(atom) + 1 for atom in np.flatnonzero(membership[index])) for index in range(num_masks)]
    return region_map.reshape(masks.shape[1:]), targets


def _onto_grid(reference: sitk.Image, reference_path: Path, image: sitk.Image, path: Path, where: str,
               resample_masks: bool, kind: str) -> np.ndarray:
    """The array of a mask or label map on the reference grid: refused on a geometry mismatch, or resampled with
    nearest neighbour when resample_masks allows (never across dimensions, never to nothing)."""
    mismatches = geometry_mismatches(Geometry.of(reference), Geometry.of(image))
    if not resample_masks or not mismatches or mismatches[0][0] == "dimension":
        check_same_geometry(reference, image, reference_path, path, where, RESAMPLE_FIX, other_kind=kind)
        return sitk.GetArrayFromImage(image)
    resampled = sitk.GetArrayFromImage(resample_like(image, reference))
    if sitk.GetArrayFromImage(image).any() and not resampled.any():
        raise ConversionError(f"{where}: {kind} {path} is not empty, but after resampling onto image "
                              f"{reference_path} nothing is left: it lies outside the image's physical extent (or is "
                              "thinner than one image voxel). Fix: check that it belongs to this image and that both "
                              "share one coordinate system.")
    return resampled


def mask_on_grid(reference: sitk.Image, reference_path: Path, mask_path: Path, where: str,
                 resample_masks: bool) -> np.ndarray:
    """A binary mask as bool array on the reference grid, after the geometry and binary checks."""
    mask = read_image(mask_path, where)
    binary = sitk.GetImageFromArray(binary_mask(mask, mask_path, where).astype(np.uint8))
    binary.CopyInformation(mask)
    return _onto_grid(reference, reference_path, binary, mask_path, where, resample_masks, "mask") != 0


def label_map_on_grid(reference: sitk.Image, reference_path: Path, path: Path, where: str, resample_masks: bool,
                      kind: str) -> np.ndarray:
    """An integer label map (all-lesion instance map, anatomy) on the reference grid, after the geometry checks."""
    label_map = read_image(path, where)
    if label_map.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{where}: {kind} {path} has {label_map.GetNumberOfComponentsPerPixel()} channels per "
                              "pixel. Fix: save it as a single-channel integer label map.")
    array = _onto_grid(reference, reference_path, label_map, path, where, resample_masks, kind)
    values = np.unique(array)
    bad = values[(values != np.round(values)) | (values < 0)]
    if bad.size:
        raise ConversionError(f"{where}: {kind} {path} holds non-integer or negative values, e.g. "
                              f"{[float(value) for value in bad[:5]]}. Fix: save it as an integer label map (0 "
                              "outside), resampled with nearest neighbour.")
    return array.astype(np.int64)


def lesion_instances(all_lesions: np.ndarray) -> np.ndarray:
    """An instance map of every lesion: a map with one value besides 0 is a mask, split into its connected
    components (26-/8-connectivity, as LSMSv2_convert_semantic); any other map already is one."""
    if np.unique(all_lesions[all_lesions != 0]).size > 1:
        return all_lesions
    return cc3d.connected_components((all_lesions != 0).astype(np.uint8),
                                     connectivity=CONNECTIVITY[all_lesions.ndim]).astype(np.int64)


def context_map(anatomy: np.ndarray, anatomy_labels: Mapping[str, int] | None, path: Path, where: str) -> np.ndarray:
    """Context ids 1..C of an anatomy label map: the i-th of anatomy_labels (name -> value in the map) is id i;
    without anatomy_labels the map must be a mask, id 1 (DEFAULT_ANATOMY_NAME)."""
    values = np.unique(anatomy[anatomy != 0])
    if anatomy_labels is None:
        if values.size > 1:
            raise ConversionError(f"{where}: anatomy {path} holds the values {values[:8].tolist()}. Fix: name them "
                                  "with --anatomy_labels (anatomy_labels=), e.g. --anatomy_labels liver=1 spleen=2, "
                                  "or pass a mask of one organ.")
        return (anatomy != 0).astype(np.int64)
    lookup = {value: index for index, value in enumerate(anatomy_labels.values(), start=1)}
    unknown = [int(value) for value in values if int(value) not in lookup]
    if unknown:
        raise ConversionError(f"{where}: anatomy {path} holds the value(s) {unknown[:8]}, which --anatomy_labels "
                              f"({dict(anatomy_labels)}) does not name. Fix: name every organ value of the maps.")
    result = np.zeros(anatomy.shape, dtype=np.int64)
    for value, context_id in lookup.items():
        result[anatomy == value] = context_id
    return result


@dataclass(frozen=True)
class _CaseJob:
    spec: CaseSpec
    image_output: Path
    label_output: Path
    ending: str
    resample_masks: bool
    anatomy_labels: Mapping[str, int] | None
    num_context: int


@dataclass(frozen=True)
class _CaseResult:
    case: str
    highest_id: int
    targets: dict[str, tuple[int, ...]]


def _convert_case(job: _CaseJob) -> _CaseResult:
    """Read one image and its masks, build the region map (context, then atoms) and write both (worker process)."""
    spec = job.spec
    where = spec.expressions[0].where
    image = read_image(spec.image, where)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{where}: image {spec.image} has {image.GetNumberOfComponentsPerPixel()} channels per "
                              "pixel. Fix: convert it to a single-channel (grayscale) image.")
    write_image_atomically(image, job.image_output)
    # Resample onto the grid as written, the one verify_roundtrip reads back, so both round voxel centres alike.
    grid = stored_grid(job.image_output) if job.resample_masks else image
    shape = sitk.GetArrayViewFromImage(grid).shape
    masks = np.stack([np.zeros(shape, bool) if expression.mask is None else
                      mask_on_grid(grid, spec.image, expression.mask, expression.where, job.resample_masks)
                      for expression in spec.expressions])
    lesions = None
    if spec.all_lesions is not None:
        lesions = lesion_instances(label_map_on_grid(grid, spec.image, spec.all_lesions, where, job.resample_masks,
                                                     "all-lesion map"))
        _refuse_masks_outside_lesions(spec, masks, lesions)
    for expression, mask in zip(spec.expressions, masks):
        if expression.mask is not None and expression.category == NO_TARGET_CATEGORY and mask.any():
            raise ConversionError(f"{expression.where} has category {NO_TARGET_CATEGORY} (refers to nothing), but "
                                  f"mask {expression.mask} has {int(mask.sum())} voxel(s). Fix: give it its real "
                                  "category, or an empty mask.")
    atoms, targets = atomize(masks, lesions)
    highest_id = job.num_context + int(atoms.max(initial=0))
    check_region_count(highest_id, f"image {spec.image} ({where} and the other rows of this image)",
                       "its masks overlap in too many different ways; split its expressions over copies of the "
                       "image (one table row group per copy).")
    region_map = atoms
    if spec.anatomy is not None:
        context = context_map(label_map_on_grid(grid, spec.image, spec.anatomy, where, job.resample_masks,
                                                "anatomy"), job.anatomy_labels, spec.anatomy, where)
        region_map = np.where(atoms > 0, atoms + job.num_context, context)
        if not (context[atoms == 0] > 0).any():
            raise ConversionError(f"{where}: anatomy {spec.anatomy} of image {spec.image} labels no voxel outside "
                                  "the lesions, so its map would hold no context region (training refuses such a "
                                  "case as unlabelled). Fix: give the image its organ map.")
        targets = [tuple(target + job.num_context for target in expression_targets) for expression_targets in targets]
    write_image_atomically(region_map_image(region_map, image, job.ending), job.label_output)
    return _CaseResult(spec.case, highest_id, {expression.expression_id: expression_targets
                                               for expression, expression_targets in zip(spec.expressions, targets)})


def _refuse_masks_outside_lesions(spec: CaseSpec, masks: np.ndarray, lesions: np.ndarray) -> None:
    """An all-lesion map holds every lesion, so a mask reaching outside it means one of the two files is wrong."""
    outside = [(expression, int((mask & (lesions == 0)).sum())) for expression, mask in zip(spec.expressions, masks)]
    outside = [(expression, voxels) for expression, voxels in outside if voxels]
    if outside:
        listed = "; ".join(f"{expression.where} (mask {expression.mask}: {voxels} voxel(s))"
                           for expression, voxels in outside[:LISTED_ROWS])
        raise ConversionError(f"{len(outside)} mask(s) of image {spec.image} reach outside its all-lesion map "
                              f"{spec.all_lesions}: {listed}. Fix: the all-lesion map must hold every lesion an "
                              "expression refers to (add them to it), or correct the masks.")


def _file_state(path: Path | None) -> list | None:
    """Path, size and modification time (of every file, for DICOM folders): changes when the input changes."""
    if path is None:
        return None
    if path.is_dir():
        return [_file_state(child) for child in sorted(path.iterdir()) if child.is_file()]
    status = path.stat()
    return [str(path.resolve()), status.st_size, status.st_mtime_ns]


def _fingerprint(spec: CaseSpec, ending: str, resample_masks: bool, anatomy_labels: Mapping[str, int] | None,
                 num_context: int) -> str:
    inputs = {"image": _file_state(spec.image), "ending": ending, "resample_masks": resample_masks,
              "split": spec.split, "all_lesions": _file_state(spec.all_lesions),
              "anatomy": _file_state(spec.anatomy), "anatomy_labels": dict(anatomy_labels or {}),
              "num_context": num_context,
              "expressions": [[expression.expression_id, expression.text, _file_state(expression.mask),
                               expression.category == NO_TARGET_CATEGORY] for expression in spec.expressions]}
    return hashlib.sha256(json.dumps(inputs).encode("utf-8")).hexdigest()


def _output_ending(cases: Sequence[CaseSpec]) -> str:
    """.png when every image is a PNG (kept 2D PNG for NaturalImage2DIO), else .nii.gz; 2D and 3D never mix."""
    dimensions = {}
    for spec in cases:
        if spec.image.is_dir():
            dimensions[spec.image] = 3
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(spec.image))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise ConversionError(f"{spec.expressions[0].where}: SimpleITK cannot read {spec.image}. Fix: convert it "
                                  "to NIfTI (.nii.gz), NRRD, MHA or PNG.") from error
        dimensions[spec.image] = reader.GetDimension()
    if len(set(dimensions.values())) > 1:
        example_2d = next(path for path, dimension in dimensions.items() if dimension == 2)
        example_3d = next(path for path, dimension in dimensions.items() if dimension == 3)
        raise ConversionError(f"The table mixes 2D images (e.g. {example_2d}) and 3D images (e.g. {example_3d}). "
                              "Fix: convert them into separate datasets; nnU-Net plans one dimensionality per dataset.")
    return ".png" if all(image_ending(spec.image) == ".png" for spec in cases) else ".nii.gz"


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("converter") == CONVERTER_NAME else None


def _link_or_copy(source: Path, destination: Path) -> None:
    """Reuse an unchanged output (hard link: instant and keeps its timestamps; copy where links are not allowed)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _check_anatomy_labels(anatomy_labels: Mapping[str, int] | None) -> None:
    """Organ names become dataset.json label names beside region_<id>: lowercase identifiers with distinct values."""
    if anatomy_labels is None:
        return
    problems = [] if anatomy_labels else ["names no organ"]
    for organ, value in anatomy_labels.items():
        if context_name(organ) != organ or organ == "background":
            problems.append(f"{organ!r} is not a usable label name (use a lowercase identifier such as "
                            f"{context_name(organ)!r}, not background or region_<k>)")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append(f"{organ!r} has the value {value!r}, not a positive integer")
    if len(set(anatomy_labels.values())) != len(anatomy_labels):
        problems.append(f"{dict(anatomy_labels)} gives two organs one value")
    if problems:
        raise ConversionError(f"--anatomy_labels {'; '.join(problems)}. Fix: pass NAME=VALUE pairs of the anatomy "
                              "maps, e.g. liver=1 spleen=2.")


def _read_tables(table: Path, test_table: Path | None) -> list[TableRow]:
    return read_table(table) + (read_table(test_table, default_split=TEST) if test_table is not None else [])


def _placement(spec: CaseSpec, expression: ExpressionSpec) -> str:
    """Which expressions file holds the row: the test images', the held-out wordings', or the training one."""
    if spec.split == TEST:
        return TEST
    return HELDOUT_PHRASING if expression.phrasing == HELDOUT_PHRASING else TRAIN


def _expression_files(folder: Path) -> dict[str, Path]:
    return {TRAIN: folder / EXPRESSIONS_FILE, HELDOUT_PHRASING: folder / HELDOUT_EXPRESSIONS_FILE,
            TEST: folder / SPLIT_FOLDERS[TEST][0] / EXPRESSIONS_FILE}


def _warn(message: str) -> None:
    """One line on stderr (no Python warning with its source line): something the user should know and can fix."""
    print(f"{CONVERTER_NAME}: warning: {message}", file=sys.stderr, flush=True)


def _listed(wheres: Sequence[str]) -> str:
    return "; ".join(wheres[:LISTED_ROWS]) + (f"; and {len(wheres) - LISTED_ROWS} more" if len(wheres) > LISTED_ROWS
                                              else "")


def convert_expression_masks(table: str | os.PathLike, dataset_id: int, name: str,
                             raw_root: str | os.PathLike | None = None, resample_masks: bool = False,
                             num_processes: int = 1, overwrite: bool = False, channel_name: str = "CT",
                             test_table: str | os.PathLike | None = None,
                             anatomy_labels: Mapping[str, int] | None = None) -> Path:
    """Build DatasetXXX_name in nnUNet_raw from a table of (image, text, mask, ...) rows; returns the dataset folder.

    Test images (split column, or every row of ``test_table``) go to imagesTs/labelsTs of the same dataset.
    ``anatomy_labels`` names the organ values of the anatomy maps (name -> value; context ids 1, 2, ... in this
    order); without it an anatomy map is a mask of one organ, named DEFAULT_ANATOMY_NAME.
    Re-running into a dataset this converter made only redoes cases whose inputs changed (path, size, modification
    time, texts, ids). The new dataset is assembled and verified in a hidden folder beside it and only then replaces
    the old one, so a failed run leaves the existing dataset untouched. ``channel_name`` goes into dataset.json and
    selects nnU-Net's normalisation ("CT" for CT, anything else, e.g. "MR", for z-scoring).
    """
    table = Path(table)
    test_table = Path(test_table) if test_table is not None else None
    _check_anatomy_labels(anatomy_labels)
    cases = plan_cases(_read_tables(table, test_table))
    if not any(spec.split == TRAIN for spec in cases):
        raise ConversionError(f"Every image of {table} is a test image, so nothing would train. Fix: mark the training "
                              f"images split {TRAIN} (an empty split cell means {TRAIN}).")
    has_anatomy = any(spec.anatomy is not None for spec in cases)
    if anatomy_labels is not None and not has_anatomy:
        raise ConversionError(f"--anatomy_labels was given, but no row of {table} has an anatomy map. Fix: add the "
                              "anatomy column, or drop --anatomy_labels.")
    context = {organ: index for index, organ in enumerate(anatomy_labels or {DEFAULT_ANATOMY_NAME: 1}, start=1)
               } if has_anatomy else {}
    ending = _output_ending(cases)
    root = resolve_raw_root(raw_root)
    destination = dataset_folder(root, dataset_id, name)
    existing = folders_with_dataset_id(root, dataset_id)
    previous = _read_manifest(destination) if existing == [destination] and not overwrite else None
    if existing and not overwrite and (previous is None or previous.get("file_ending") != ending):
        reason = ("was not made by this converter" if previous is None else
                  f"was written with file ending {previous.get('file_ending')} (now {ending})")
        raise ConversionError(f"Dataset id {dataset_id} is taken by {', '.join(str(p) for p in existing)}, which "
                              f"{reason}. Fix: choose another id, or pass overwrite=True (--overwrite) to replace it.")
    previous_cases = previous["cases"] if previous and previous.get("manifest_version") == MANIFEST_VERSION else {}
    without_lesion_maps = [spec for spec in cases if spec.all_lesions is None]
    if without_lesion_maps:
        _warn(f"{len(without_lesion_maps)} of {len(cases)} image(s) have no all_lesions map, so lesions that no "
              "expression names become background there (the 'all lesions' prompt learns them as not lesions, and "
              f"all-lesion scores count them as false positives). Fix: {ALL_LESIONS_FIX}.")

    with staged_dataset(root, destination, existing) as staging:
        for split in {spec.split for spec in cases}:
            for subfolder in SPLIT_FOLDERS[split]:
                (staging / subfolder).mkdir()
        jobs, records = [], {}
        for spec in cases:
            fingerprint = _fingerprint(spec, ending, resample_masks, anatomy_labels, len(context))
            images, labels = SPLIT_FOLDERS[spec.split]
            outputs = (Path(images) / f"{spec.case}_0000{ending}", Path(labels) / f"{spec.case}{ending}")
            old = previous_cases.get(spec.case)
            if old is not None and old.get("fingerprint") == fingerprint and all(
                    (destination / output).is_file() for output in outputs):
                for output in outputs:
                    _link_or_copy(destination / output, staging / output)
                records[spec.case] = old
            else:
                jobs.append(_CaseJob(spec, staging / outputs[0], staging / outputs[1], ending, resample_masks,
                                     anatomy_labels, len(context)))
                records[spec.case] = {"fingerprint": fingerprint}
        for result in map_with_progress(_convert_case, jobs, num_processes, "Converting cases"):
            records[result.case].update(highest_id=result.highest_id,
                                        targets={key: list(value) for key, value in result.targets.items()})
        print(f"{CONVERTER_NAME}: converted {len(jobs)} case(s), kept {len(cases) - len(jobs)} unchanged case(s).")
        _refuse_heldout_without_seen_twin(cases, records)
        unmarked = [expression.where for spec in cases for expression in spec.expressions if not
                    expression.intended_no_target and not records[spec.case]["targets"][expression.expression_id]]
        if unmarked:
            _warn(f"{len(unmarked)} row(s) have an empty mask file but no no-target marker, so they refer to nothing "
                  f"(targets []): {_listed(unmarked)}. Fix: if that is intended, leave their mask cell empty or set "
                  f"category {NO_TARGET_CATEGORY}; otherwise check those mask files.")
        _write_dataset_files(staging, cases, records, ending, channel_name, table, test_table, resample_masks,
                             context, anatomy_labels)
        verify_roundtrip(staging, table, test_table)
    return destination


def _refuse_heldout_without_seen_twin(cases: Sequence[CaseSpec], records: Mapping[str, dict]) -> None:
    """A held-out row of a training image rewords a seen row: the benchmark compares the two wordings on the same
    validation targets (expressions_heldout.json's contract), so it must refer to what a seen row refers to."""
    unmatched = []
    for spec in cases:
        targets = records[spec.case]["targets"]
        seen = {tuple(targets[e.expression_id]) for e in spec.expressions if e.phrasing == SEEN_PHRASING}
        unmatched += [e.where for e in spec.expressions if spec.split == TRAIN and e.phrasing == HELDOUT_PHRASING
                      and tuple(targets[e.expression_id]) not in seen]
    if unmatched:
        raise ConversionError(f"{len(unmatched)} held-out row(s) of training images refer to what no seen row of "
                              f"their image refers to: {_listed(unmatched)}. Fix: a held-out row rewords a seen row "
                              "of its image, so give it that row's mask (or both an empty mask), or mark it phrasing "
                              f"{SEEN_PHRASING}.")


def _write_dataset_files(folder: Path, cases: Sequence[CaseSpec], records: dict[str, dict], ending: str,
                         channel_name: str, table: Path, test_table: Path | None, resample_masks: bool,
                         context: Mapping[str, int], anatomy_labels: Mapping[str, int] | None) -> None:
    expressions: dict[str, list[Expression]] = {placement: [] for placement in _expression_files(folder)}
    for spec in cases:
        for expression in spec.expressions:
            expressions[_placement(spec, expression)].append(Expression(
                id=expression.expression_id, case=spec.case, text=expression.text,
                targets=tuple(records[spec.case]["targets"][expression.expression_id]), category=expression.category,
                phrasing=HELDOUT_PHRASING if expression.phrasing == HELDOUT_PHRASING else None))
    for placement, path in _expression_files(folder).items():
        if expressions[placement] or placement == TRAIN:
            save_expressions(path, expressions[placement])
    highest_id = max(record["highest_id"] for record in records.values())
    if highest_id == len(context):
        raise ConversionError(f"Every mask in {table} is empty (and no all-lesion map holds a lesion), so the dataset "
                              "would have no region to segment. Fix: check the mask files (inside = values > 0).")
    write_json_atomically(folder / "dataset.json", {
        "channel_names": {"0": channel_name},
        **referring_labels(highest_id, context),
        "numTraining": sum(spec.split == TRAIN for spec in cases),
        "file_ending": ending,
        "description": (f"Referring dataset made by {CONVERTER_NAME} from {table}: region ids are atoms (sets of "
                        "overlapping expression masks" + (", split by lesion" if any(spec.all_lesions for spec in cases)
                                                          else "") + ")"
                        + (f", after the context regions {dict(context)}" if context else "")
                        + "; expressions.json lists each expression's atoms."),
    })
    write_json_atomically(folder / MANIFEST_NAME, {
        "converter": CONVERTER_NAME, "manifest_version": MANIFEST_VERSION, "table": str(table.resolve()),
        "test_table": str(test_table.resolve()) if test_table else None, "file_ending": ending,
        "resample_masks": resample_masks, "anatomy_labels": dict(anatomy_labels) if anatomy_labels else None,
        "cases": records})


def verify_roundtrip(dataset_folder: str | os.PathLike, table: str | os.PathLike,
                     test_table: str | os.PathLike | None = None) -> None:
    """Re-read tables, masks, region maps and expression files; prove every mask == isin(region map, targets), the
    lesion regions == the all-lesion map, and the context regions == the anatomy map outside the lesions."""
    folder = Path(dataset_folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise ConversionError(f"{folder} has no {MANIFEST_NAME} from {CONVERTER_NAME}. Fix: verify a dataset made by "
                              "convert_expression_masks.")
    dataset_file = folder / "dataset.json"
    try:
        dataset_json = json.loads(dataset_file.read_text(encoding="utf-8"))
        check_label_values(dataset_file, dataset_json)
        num_context = len(context_labels(dataset_json, dataset_file))
        stored = {expression.id: (placement, expression) for placement, path in _expression_files(folder).items()
                  if path.is_file() for expression in load_expressions(path)}
    except (ExpressionsError, OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"Round trip of {folder} failed: {error}") from error
    test_table = Path(test_table) if test_table is not None else None
    cases = plan_cases(_read_tables(Path(table), test_table))
    ending, resample_masks = manifest["file_ending"], manifest["resample_masks"]
    problems = []
    expected_ids = {expression.expression_id for spec in cases for expression in spec.expressions}
    problems += [f"{folder} holds expression {extra!r}, which is not in the table(s)"
                 for extra in sorted(set(stored) - expected_ids)]
    for spec in cases:
        where = spec.expressions[0].where
        label_path = folder / SPLIT_FOLDERS[spec.split][1] / f"{spec.case}{ending}"
        if not label_path.is_file():
            problems.append(f"region map {label_path} is missing")
            continue
        region_map_file = sitk.ReadImage(str(label_path))
        region_map = sitk.GetArrayFromImage(region_map_file)
        for expression in spec.expressions:
            placement, saved = stored.get(expression.expression_id, (None, None))
            if saved is None or placement != _placement(spec, expression) or saved.case != spec.case \
                    or saved.text != expression.text:
                problems.append(f"{expression.where}: expression {expression.expression_id!r} is missing or differs "
                                f"in {_expression_files(folder)[_placement(spec, expression)]}")
                continue
            mask = np.zeros(region_map.shape, bool) if expression.mask is None else \
                mask_on_grid(region_map_file, label_path, expression.mask, expression.where, resample_masks)
            rebuilt = np.isin(region_map, saved.targets)
            if not np.array_equal(mask, rebuilt):
                problems.append(f"{expression.where}: targets {list(saved.targets)} rebuild {int(rebuilt.sum())} "
                                f"voxels, mask {expression.mask} has {int(mask.sum())} "
                                f"({int((mask != rebuilt).sum())} differ)")
        lesion_area = region_map > num_context
        if spec.all_lesions is not None:
            lesions = label_map_on_grid(region_map_file, label_path, spec.all_lesions, where, resample_masks,
                                        "all-lesion map") != 0
            if not np.array_equal(lesions, lesion_area):
                problems.append(f"{where}: the lesion regions of {label_path} cover {int(lesion_area.sum())} voxels, "
                                f"all-lesion map {spec.all_lesions} {int(lesions.sum())}")
        if spec.anatomy is not None:
            anatomy = context_map(label_map_on_grid(region_map_file, label_path, spec.anatomy, where, resample_masks,
                                                    "anatomy"), manifest["anatomy_labels"], spec.anatomy, where)
            if not np.array_equal(np.where(lesion_area, 0, region_map), np.where(lesion_area, 0, anatomy)):
                problems.append(f"{where}: the context regions of {label_path} differ from anatomy {spec.anatomy} "
                                "outside the lesions")
    if problems:
        raise ConversionError(f"Round trip of {folder} against {table} failed:\n  - " + "\n  - ".join(problems))


def _anatomy_label(value: str) -> tuple[str, int]:
    organ, _, number = value.partition("=")
    if not organ or not number.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE (e.g. liver=1)")
    return organ.strip(), int(number)


def _columns_help() -> str:
    """The table's columns, as --help lists them after the options."""
    width = max(len(column) for column in COLUMNS)
    lines = [textwrap.fill(description, 100, initial_indent=f"  {column:<{width}}  ",
                           subsequent_indent=" " * (width + 4)) for column, description in COLUMNS.items()]
    return ("table columns (CSV header, or JSON keys of a list of objects; one row per expression; the per-image "
            "columns\nsplit, all_lesions, anatomy may be given on one row of an image and left empty on the others):\n"
            + "\n".join(lines))


@console_entry
def convert_expression_masks_entry() -> None:
    """LSMSv2_convert_expression_masks -i TABLE -d ID -n NAME [--test TABLE] [--anatomy_labels ...] [...]."""
    parser = argparse.ArgumentParser(description="Convert per-expression masks (a CSV or JSON table, one row per "
                                                 "expression) into an nnU-Net referring dataset in nnUNet_raw.",
                                     epilog=_columns_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True, help="CSV or JSON table (columns below); relative paths "
                                                             "start at its folder")
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    parser.add_argument("-n", "--name", required=True, help="dataset name, e.g. LiverLesions")
    parser.add_argument("--test", default=None, help="a second table of test images (every row split test), written "
                                                     "to imagesTs/, labelsTs/ and imagesTs/expressions.json")
    parser.add_argument("--anatomy_labels", nargs="+", type=_anatomy_label, default=None, metavar="NAME=VALUE",
                        help="organ names of the anatomy maps' values, e.g. liver=1 spleen=2 (context ids 1, 2, ... "
                             f"in this order); default: each anatomy map is a mask of one organ, "
                             f"'{DEFAULT_ANATOMY_NAME}'")
    parser.add_argument("--resample_masks", action="store_true",
                        help="resample masks and maps onto their image with nearest neighbour instead of refusing a "
                             "mismatch")
    parser.add_argument("-np", "--num_processes", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    parser.add_argument("--channel_name", default="CT",
                        help="channel name for dataset.json; 'CT' selects CT normalisation (default CT)")
    args = parser.parse_args()
    folder = convert_expression_masks(args.input, args.dataset_id, args.name, resample_masks=args.resample_masks,
                                      num_processes=args.num_processes, overwrite=args.overwrite,
                                      channel_name=args.channel_name, test_table=args.test,
                                      anatomy_labels=dict(args.anatomy_labels) if args.anatomy_labels else None)
    print(f"Wrote {folder}")
