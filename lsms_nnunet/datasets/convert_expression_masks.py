"""Convert "one mask per expression" data (RefHL-Seg style) into an nnU-Net referring dataset, losslessly.

Masks of different expressions may overlap, so they cannot share one label map directly. Instead every voxel is
labelled by the set of expressions that cover it: voxels with the same set form one region ("atom"), and each
expression's targets are the atoms inside its mask. The union of an expression's atoms is then exactly its mask,
which ``verify_roundtrip`` proves from the files on disk at the end of every conversion.

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
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lsms_nnunet.datasets.geometry import (ConversionError, Geometry, binary_mask, case_stem, check_region_count,
                                           check_same_geometry, dataset_folder, folders_with_dataset_id,
                                           geometry_mismatches, image_ending, map_with_progress,
                                           read_image, region_map_image, resample_like, resolve_raw_root,
                                           staged_dataset, stored_grid, write_image_atomically)
from text_conditioning.expressions import (CATEGORY_PATTERN, SAFE_ID_PATTERN, Expression, ExpressionsError,
                                           json_too_deep_message, load_expressions, save_expressions)
from text_conditioning.io import write_json_atomically
from lsms_nnunet.cli import console_entry

MANIFEST_NAME = ".lsms_convert.json"
CONVERTER_NAME = "LSMSv2_convert_expression_masks"
MANIFEST_VERSION = 1
REQUIRED_COLUMNS = ("image", "text", "mask")
ALLOWED_COLUMNS = REQUIRED_COLUMNS + ("id", "category")  # category: optional report group of the expression
RESAMPLE_FIX = ("export the mask on the image's voxel grid, or pass resample_masks=True (--resample_masks) to "
                "resample masks onto their image with nearest neighbour.")


@dataclass(frozen=True)
class ExpressionSpec:
    """One table row: where it is (for messages), its expression id, text, mask file and optional category."""

    where: str
    expression_id: str
    text: str
    mask: Path
    category: str | None = None


@dataclass(frozen=True)
class CaseSpec:
    """One image and every expression that refers into it, in table order."""

    case: str
    image: Path
    expressions: tuple[ExpressionSpec, ...]


@dataclass(frozen=True)
class TableRow:
    """One parsed row of the table, with absolute paths and where it came from (for messages)."""

    where: str
    image: Path
    text: str
    mask: Path
    expression_id: str | None
    category: str | None = None


def _resolve(table: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else table.parent / path


def _rows_from_csv(table: Path) -> Iterator[tuple[str, dict]]:
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [column.strip() for column in reader.fieldnames or []]
        missing = [column for column in REQUIRED_COLUMNS if column not in columns]
        unknown = [column for column in columns if column not in ALLOWED_COLUMNS]
        if missing or unknown:
            raise ConversionError(f"Table {table} has columns {columns}; missing {missing}, unknown {unknown}. Fix: "
                                  "use the header 'image,text,mask' (optionally ',id' and ',category').")
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


def read_table(table: str | os.PathLike) -> list[TableRow]:
    """Parse and check the whole table before any image is read; all problems are reported at once."""
    table = Path(table)
    if not table.is_file():
        raise ConversionError(f"Table {table} does not exist. Fix: pass a CSV (image,text,mask) or JSON table.")
    raw_rows = _rows_from_json(table) if table.suffix.lower() == ".json" else _rows_from_csv(table)
    rows, problems = [], []
    for where, entry in raw_rows:
        values = {key: entry.get(key) for key in ALLOWED_COLUMNS}
        missing = [key for key in REQUIRED_COLUMNS if not isinstance(values[key], str) or not values[key].strip()]
        if missing:
            problems.append(f"{where} has no {', '.join(missing)}. Fix: fill in image, text and mask.")
            continue
        expression_id = values["id"].strip() if isinstance(values["id"], str) and values["id"].strip() else None
        if expression_id is not None and not SAFE_ID_PATTERN.match(expression_id):
            problems.append(f"{where} has the unsafe id {expression_id!r}. Fix: use letters, digits, '.', '_', '-' "
                            "(it names output files), or leave it empty for '<case>-e<k>'.")
        category = values["category"].strip() if isinstance(values["category"], str) and values["category"].strip() \
            else None
        if category is not None and not CATEGORY_PATTERN.match(category):
            problems.append(f"{where} has the category {category!r}. Fix: use a short lowercase identifier (e.g. "
                            "'size'), or leave it empty.")
        image, mask = _resolve(table, values["image"].strip()), _resolve(table, values["mask"].strip())
        for kind, path in (("image", image), ("mask", mask)):
            if not path.exists():
                problems.append(f"{where}: {kind} {path} does not exist. Fix: correct the path (relative paths start "
                                f"at {table.parent}).")
        rows.append(TableRow(where, image, values["text"].strip(), mask, expression_id, category))
    if not rows and not problems:
        problems.append(f"{table} has no rows. Fix: add one row per (image, expression, mask).")
    if problems:
        raise ConversionError(f"Table {table} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return rows


def plan_cases(rows: Sequence[TableRow]) -> list[CaseSpec]:
    """Group rows by image; case ids come from file stems (made safe and unique), ids default to <case>-e<k>."""
    rows_by_image: dict[Path, list[TableRow]] = {}
    for row in rows:
        rows_by_image.setdefault(row.image.resolve(), []).append(row)
    used_cases: set[str] = set()
    cases = []
    for image, image_rows in rows_by_image.items():
        stem = case_stem(image)
        case, suffix = stem, 2
        while case in used_cases:
            case, suffix = f"{stem}_{suffix}", suffix + 1
        used_cases.add(case)
        expressions = tuple(ExpressionSpec(row.where, row.expression_id or f"{case}-e{index}", row.text, row.mask,
                                           row.category) for index, row in enumerate(image_rows))
        cases.append(CaseSpec(case, image_rows[0].image, expressions))
    first_row_of_id: dict[str, str] = {}
    problems = []
    for case in cases:
        for expression in case.expressions:
            if expression.expression_id in first_row_of_id:
                problems.append(f"{expression.where} repeats expression id {expression.expression_id!r} of "
                                f"{first_row_of_id[expression.expression_id]}. Fix: give each row a unique id.")
            first_row_of_id.setdefault(expression.expression_id, expression.where)
    if problems:
        raise ConversionError("Duplicate expression ids:\n  - " + "\n  - ".join(problems))
    return cases


def atomize(masks: np.ndarray) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Region map of atoms and each mask's atom ids, from bool masks stacked on axis 0.

    Voxels covered by the same set of masks share one id; ids 1..K follow the order in which the sets first appear
    in C order; voxels in no mask are 0. Mask m is exactly the union of the atoms listed as its targets.
    """
    num_masks = masks.shape[0]
    flat = masks.reshape(num_masks, -1)
    covered = np.flatnonzero(flat.any(axis=0))
    region_map = np.zeros(flat.shape[1], dtype=np.int32)
    if covered.size == 0:
        return region_map.reshape(masks.shape[1:]), [() for _ in range(num_masks)]
    packed = np.ascontiguousarray(np.packbits(flat[:, covered], axis=0).T)
    signatures = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first_voxel, inverse = np.unique(signatures, return_index=True, return_inverse=True)
    order_of_appearance = np.argsort(first_voxel)
    atom_id = np.empty_like(order_of_appearance)
    atom_id[order_of_appearance] = np.arange(1, len(order_of_appearance) + 1)
    region_map[covered] = atom_id[inverse.ravel()]
    membership = flat[:, covered[first_voxel[order_of_appearance]]]
    targets = [tuple(int(atom) + 1 for atom in np.flatnonzero(membership[index])) for index in range(num_masks)]
    return region_map.reshape(masks.shape[1:]), targets


def mask_on_grid(reference: sitk.Image, reference_path: Path, expression: ExpressionSpec,
                 resample_masks: bool) -> np.ndarray:
    """The expression's mask as bool array on the reference grid, after the geometry and binary checks."""
    mask = read_image(expression.mask, expression.where)
    mismatches = geometry_mismatches(Geometry.of(reference), Geometry.of(mask))
    if not resample_masks or not mismatches or mismatches[0][0] == "dimension":
        check_same_geometry(reference, mask, reference_path, expression.mask, expression.where, RESAMPLE_FIX)
        return binary_mask(mask, expression.mask, expression.where)
    inside = binary_mask(mask, expression.mask, expression.where)
    binary = sitk.GetImageFromArray(inside.astype(np.uint8))
    binary.CopyInformation(mask)
    resampled = sitk.GetArrayFromImage(resample_like(binary, reference)) != 0
    if inside.any() and not resampled.any():
        raise ConversionError(f"{expression.where}: mask {expression.mask} is not empty, but after resampling onto "
                              f"image {reference_path} nothing is left: it lies outside the image's physical extent "
                              "(or is thinner than one image voxel). Fix: check that the mask belongs to this image "
                              "and that both share one coordinate system.")
    return resampled


@dataclass(frozen=True)
class _CaseJob:
    spec: CaseSpec
    image_output: Path
    label_output: Path
    ending: str
    resample_masks: bool


@dataclass(frozen=True)
class _CaseResult:
    case: str
    num_atoms: int
    targets: dict[str, tuple[int, ...]]
    warnings: tuple[str, ...]


def _convert_case(job: _CaseJob) -> _CaseResult:
    """Read one image and its masks, build the atom map and write image and map (runs in a worker process)."""
    spec = job.spec
    where = spec.expressions[0].where
    image = read_image(spec.image, where)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{where}: image {spec.image} has {image.GetNumberOfComponentsPerPixel()} channels per "
                              "pixel. Fix: convert it to a single-channel (grayscale) image.")
    write_image_atomically(image, job.image_output)
    # Resample onto the grid as written, the one verify_roundtrip reads back, so both round voxel centres alike.
    grid = stored_grid(job.image_output) if job.resample_masks else image
    masks = np.stack([mask_on_grid(grid, spec.image, expression, job.resample_masks)
                      for expression in spec.expressions])
    region_map, targets = atomize(masks)
    num_atoms = int(region_map.max(initial=0))
    check_region_count(num_atoms, f"image {spec.image} ({where} and the other rows of this image)",
                       "its masks overlap in too many different ways; split its expressions over copies of the "
                       "image (one table row group per copy).")
    write_image_atomically(region_map_image(region_map, image, job.ending), job.label_output)
    notes = tuple(f"{expression.where}: mask {expression.mask} is empty, so expression {expression.expression_id!r} "
                  "gets targets [] (it refers to nothing in this image). Fix: if that is not intended, check the "
                  "mask file." for expression, expression_targets in zip(spec.expressions, targets)
                  if not expression_targets)
    return _CaseResult(spec.case, num_atoms, {expression.expression_id: expression_targets
                                              for expression, expression_targets in zip(spec.expressions, targets)},
                       notes)


def _file_state(path: Path) -> list:
    """Path, size and modification time (of every file, for DICOM folders): changes when the input changes."""
    if path.is_dir():
        return [_file_state(child) for child in sorted(path.iterdir()) if child.is_file()]
    status = path.stat()
    return [str(path.resolve()), status.st_size, status.st_mtime_ns]


def _fingerprint(spec: CaseSpec, ending: str, resample_masks: bool) -> str:
    inputs = {"image": _file_state(spec.image), "ending": ending, "resample_masks": resample_masks,
              "expressions": [[expression.expression_id, expression.text, _file_state(expression.mask)]
                              for expression in spec.expressions]}
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


def convert_expression_masks(table: str | os.PathLike, dataset_id: int, name: str,
                             raw_root: str | os.PathLike | None = None, resample_masks: bool = False,
                             num_processes: int = 1, overwrite: bool = False, channel_name: str = "CT") -> Path:
    """Build DatasetXXX_name in nnUNet_raw from a table of (image, text, mask) rows; returns the dataset folder.

    Re-running into a dataset this converter made only redoes cases whose inputs changed (path, size, modification
    time, texts, ids). The new dataset is assembled and verified in a hidden folder beside it and only then replaces
    the old one, so a failed run leaves the existing dataset untouched. ``channel_name`` goes into dataset.json and
    selects nnU-Net's normalisation ("CT" for CT, anything else, e.g. "MR", for z-scoring).
    """
    table = Path(table)
    cases = plan_cases(read_table(table))
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
    previous_cases = previous["cases"] if previous else {}

    with staged_dataset(root, destination, existing) as staging:
        for subfolder in ("imagesTr", "labelsTr"):
            (staging / subfolder).mkdir()
        jobs, records = [], {}
        for spec in cases:
            fingerprint = _fingerprint(spec, ending, resample_masks)
            outputs = (Path("imagesTr") / f"{spec.case}_0000{ending}", Path("labelsTr") / f"{spec.case}{ending}")
            old = previous_cases.get(spec.case)
            if old is not None and old.get("fingerprint") == fingerprint and all(
                    (destination / output).is_file() for output in outputs):
                for output in outputs:
                    _link_or_copy(destination / output, staging / output)
                records[spec.case] = old
            else:
                jobs.append(_CaseJob(spec, staging / outputs[0], staging / outputs[1], ending, resample_masks))
                records[spec.case] = {"fingerprint": fingerprint}
        for result in map_with_progress(_convert_case, jobs, num_processes, "Converting cases"):
            for note in result.warnings:
                warnings.warn(note, stacklevel=2)
            records[result.case].update(num_atoms=result.num_atoms,
                                        targets={key: list(value) for key, value in result.targets.items()})
        print(f"{CONVERTER_NAME}: converted {len(jobs)} case(s), kept {len(cases) - len(jobs)} unchanged case(s).")
        _write_dataset_files(staging, cases, records, ending, channel_name, table, resample_masks)
        verify_roundtrip(staging, table)
    return destination


def _write_dataset_files(folder: Path, cases: Sequence[CaseSpec], records: dict[str, dict], ending: str,
                         channel_name: str, table: Path, resample_masks: bool) -> None:
    expressions = [Expression(id=expression.expression_id, case=spec.case, text=expression.text,
                              targets=tuple(records[spec.case]["targets"][expression.expression_id]),
                              category=expression.category)
                   for spec in cases for expression in spec.expressions]
    save_expressions(folder / "expressions.json", expressions)
    max_regions = max(record["num_atoms"] for record in records.values())
    if max_regions == 0:
        raise ConversionError(f"Every mask in {table} is empty, so the dataset would have no region to segment. "
                              "Fix: check the mask files (inside = values > 0).")
    labels = {"background": 0, **{f"region_{region}": region for region in range(1, max_regions + 1)}}
    write_json_atomically(folder / "dataset.json", {
        "channel_names": {"0": channel_name},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ending,
        "description": (f"Referring dataset made by {CONVERTER_NAME} from {table}: region ids are atoms (sets of "
                        "overlapping expression masks); expressions.json lists each expression's atoms."),
    })
    write_json_atomically(folder / MANIFEST_NAME, {
        "converter": CONVERTER_NAME, "manifest_version": MANIFEST_VERSION, "table": str(table.resolve()),
        "file_ending": ending, "resample_masks": resample_masks, "cases": records})


def verify_roundtrip(dataset_folder: str | os.PathLike, table: str | os.PathLike) -> None:
    """Re-read table, masks, region maps and expressions.json; prove every mask == isin(region map, targets)."""
    folder = Path(dataset_folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise ConversionError(f"{folder} has no {MANIFEST_NAME} from {CONVERTER_NAME}. Fix: verify a dataset made by "
                              "convert_expression_masks.")
    try:
        stored = {expression.id: expression for expression in load_expressions(folder / "expressions.json")}
    except ExpressionsError as error:
        raise ConversionError(f"Round trip failed: {error}") from error
    cases = plan_cases(read_table(table))
    ending = manifest["file_ending"]
    problems = []
    expected_ids = {expression.expression_id for spec in cases for expression in spec.expressions}
    problems += [f"expressions.json holds {extra!r}, which is not in {table}" for extra in sorted(set(stored) -
                                                                                                   expected_ids)]
    for spec in cases:
        label_path = folder / "labelsTr" / f"{spec.case}{ending}"
        if not label_path.is_file():
            problems.append(f"region map {label_path} is missing")
            continue
        region_map_file = sitk.ReadImage(str(label_path))
        region_map = sitk.GetArrayFromImage(region_map_file)
        for expression in spec.expressions:
            saved = stored.get(expression.expression_id)
            if saved is None or saved.case != spec.case or saved.text != expression.text:
                problems.append(f"{expression.where}: expression {expression.expression_id!r} is missing or differs "
                                "in expressions.json")
                continue
            mask = mask_on_grid(region_map_file, label_path, expression, manifest["resample_masks"])
            rebuilt = np.isin(region_map, saved.targets)
            if not np.array_equal(mask, rebuilt):
                problems.append(f"{expression.where}: targets {list(saved.targets)} rebuild {int(rebuilt.sum())} "
                                f"voxels, mask {expression.mask} has {int(mask.sum())} "
                                f"({int((mask != rebuilt).sum())} differ)")
    if problems:
        raise ConversionError(f"Round trip of {folder} against {table} failed:\n  - " + "\n  - ".join(problems))


@console_entry
def convert_expression_masks_entry() -> None:
    """LSMSv2_convert_expression_masks -i TABLE -d ID -n NAME [--resample_masks] [-np N] [--overwrite]."""
    parser = argparse.ArgumentParser(description="Convert per-expression masks (CSV image,text,mask or JSON list) "
                                                 "into an nnU-Net referring dataset in nnUNet_raw.")
    parser.add_argument("-i", "--input", required=True, help="CSV (header image,text,mask[,id]) or JSON table; "
                                                             "relative paths start at its folder")
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    parser.add_argument("-n", "--name", required=True, help="dataset name, e.g. LiverLesions")
    parser.add_argument("--resample_masks", action="store_true",
                        help="resample masks onto their image with nearest neighbour instead of refusing a mismatch")
    parser.add_argument("-np", "--num_processes", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    parser.add_argument("--channel_name", default="CT",
                        help="channel name for dataset.json; 'CT' selects CT normalisation (default CT)")
    args = parser.parse_args()
    folder = convert_expression_masks(args.input, args.dataset_id, args.name, resample_masks=args.resample_masks,
                                      num_processes=args.num_processes, overwrite=args.overwrite,
                                      channel_name=args.channel_name)
    print(f"Wrote {folder}")
