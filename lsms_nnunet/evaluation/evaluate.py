"""Evaluate referring-segmentation predictions against region maps: `LSMSv2_evaluate`.

One prediction per expression (`<pred_dir>/<expression id><ending>`, foreground > 0) is compared with the union of
the expression's target regions in the case's region map (`<ref_dir>/<case><ending>`). The result is a summary.json
in the spirit of nnU-Net's (`metric_per_expression`, `aggregate`, `settings`) plus a Markdown table next to it.
`per_category` scores each expression category (the expressions file's optional `category`; "uncategorized" when
absent) and, when some expressions are marked `phrasing: "heldout"`, `per_phrasing` scores seen vs held-out wording.
"""
import argparse
import os
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
from tqdm import tqdm

from lsms_nnunet.evaluation.metrics import (DEFAULT_DETECTION_MIN_OVERLAP, HAUSDORFF_PERCENTILE,
                                            PRECISION_IOU_THRESHOLDS, aggregate_metrics, expression_metrics,
                                            lesion_detection, per_category_metrics, per_phrasing_metrics)
from text_conditioning.expressions import (HELDOUT_PHRASING, Expression, ExpressionsError, expressions_by_case,
                                           load_expressions)
from text_conditioning.io import write_json_atomically, write_text_atomically
from lsms_nnunet.cli import console_entry

MAX_LISTED_MISSING = 20
SPACING_RELATIVE_TOLERANCE = 1e-3


class EvaluationInputError(ValueError):
    """Reference, prediction or expressions that cannot be compared as given."""


def _list_with_limit(items: Sequence[str]) -> str:
    listed = ", ".join(items[:MAX_LISTED_MISSING])
    return listed + (f" ... and {len(items) - MAX_LISTED_MISSING} more" if len(items) > MAX_LISTED_MISSING else "")


def resolve_expressions(expressions: str | os.PathLike | Sequence[Expression], require_targets: bool) -> tuple[
        list[Expression], str]:
    """The expressions to process and a description of where they came from (for settings and errors)."""
    if isinstance(expressions, (str, os.PathLike)):
        return load_expressions(expressions, require_targets=require_targets), str(Path(expressions).resolve())
    expressions = list(expressions)
    if not expressions:
        raise ExpressionsError("The list of expressions is empty. Fix: pass at least one expression.")
    if require_targets:
        without_targets = [expression.id for expression in expressions if expression.targets is None]
        if without_targets:
            raise ExpressionsError(f"Expressions {_list_with_limit(without_targets)} have no targets, so there is no "
                                   "reference to compare with. Fix: give every expression its target region ids "
                                   "([] when it refers to nothing).")
    return expressions, f"<list of {len(expressions)} expressions>"


def raise_if_files_missing(missing_by_kind: dict[str, list[str]], folder_by_kind: dict[str, Path],
                           file_ending: str) -> None:
    """One error for every missing input, before any computation, so a run never fails halfway."""
    problems = [f"{len(missing)} {kind} file(s) missing in {folder_by_kind[kind]}: {_list_with_limit(missing)}"
                for kind, missing in missing_by_kind.items() if missing]
    if problems:
        raise FileNotFoundError("Cannot start: " + "; ".join(problems) + f". Fix: check the folders and the file "
                                f"ending ({file_ending!r}), or restrict the expressions file to the available cases.")


def reader_for(file_ending: str, example_file: Path) -> type[BaseReaderWriter]:
    """nnU-Net's reader for this file ending (the one nnU-Net itself would pick), so spacing is read the same way."""
    return determine_reader_writer_from_file_ending(file_ending, str(example_file), verbose=False)


def _rounded(spacing: Sequence[float]) -> list[float]:
    return [round(float(value), 4) for value in spacing]


def _evaluate_case(reference_file: Path, expressions_with_predictions: list[tuple[Expression, Path]],
                   reader_class: type[BaseReaderWriter], nsd_tolerance_mm: float) -> list[dict]:
    """All expressions of one case, reading its region map once."""
    reader = reader_class()
    region_map, reference_properties = reader.read_seg(str(reference_file))
    region_map = region_map[0].astype(np.int64)
    spacing = [float(s) for s in reference_properties["spacing"]]
    present_regions = set(np.unique(region_map).tolist()) - {0}
    entries = []
    for expression, prediction_file in expressions_with_predictions:
        absent = sorted(set(expression.targets) - present_regions)
        if absent:
            raise EvaluationInputError(
                f"Expression {expression.id!r} targets region id(s) {absent} absent from {reference_file}, which "
                f"holds {sorted(present_regions) or 'no regions'}. Fix: correct the expression's targets or use the "
                f"matching reference folder.")
        prediction, prediction_properties = reader.read_seg(str(prediction_file))
        if prediction[0].shape != region_map.shape:
            raise EvaluationInputError(
                f"Prediction {prediction_file} has shape {prediction[0].shape} but reference {reference_file} has "
                f"shape {region_map.shape}. Fix: export predictions in the reference geometry (nnU-Net does this).")
        if not np.allclose(prediction_properties["spacing"], spacing, rtol=SPACING_RELATIVE_TOLERANCE):
            raise EvaluationInputError(
                f"Prediction {prediction_file} has spacing {_rounded(prediction_properties['spacing'])} but reference "
                f"{reference_file} has spacing {_rounded(spacing)}. Fix: compare files on the same voxel grid.")
        predicted = prediction[0] > 0
        referred = np.isin(region_map, expression.targets)
        entries.append({
            "id": expression.id, "case": expression.case, "text": expression.text,
            "category": expression.category, "phrasing": expression.phrasing,
            "reference_file": str(reference_file), "prediction_file": str(prediction_file),
            **expression_metrics(predicted, referred, spacing, nsd_tolerance_mm),
            **lesion_detection(predicted, np.where(referred, region_map, 0)),
        })
    return entries


def _evaluate_case_from_task(task: tuple) -> list[dict]:
    return _evaluate_case(*task)


def evaluate_referring_folder(ref_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                              expressions: str | os.PathLike | Sequence[Expression], file_ending: str = ".nii.gz",
                              nsd_tolerance_mm: float = 1.0, output_file: str | os.PathLike | None = None,
                              num_processes: int = 1) -> dict:
    """Score every expression's prediction and aggregate; write summary.json (+ .md) when `output_file` is given.

    All inputs are checked first (targets known, every file present), so a bad folder fails in seconds.
    """
    ref_dir, pred_dir = Path(ref_dir).resolve(), Path(pred_dir).resolve()
    expressions, expressions_source = resolve_expressions(expressions, require_targets=True)
    if num_processes < 1:
        raise EvaluationInputError(f"num_processes must be at least 1, got {num_processes}.")
    grouped_expressions = expressions_by_case(expressions)
    reference_files = {case: ref_dir / f"{case}{file_ending}" for case in grouped_expressions}
    prediction_files = {expression.id: pred_dir / f"{expression.id}{file_ending}" for expression in expressions}
    raise_if_files_missing(
        {"reference": sorted(file.name for file in reference_files.values() if not file.is_file()),
         "prediction": [expression_id for expression_id, file in prediction_files.items() if not file.is_file()]},
        {"reference": ref_dir, "prediction": pred_dir}, file_ending)
    reader_class = reader_for(file_ending, next(iter(reference_files.values())))
    tasks = [(reference_files[case], [(expression, prediction_files[expression.id]) for expression in case_expressions],
              reader_class, nsd_tolerance_mm)
             for case, case_expressions in grouped_expressions.items()]

    entries_by_id = {}
    with tqdm(total=len(expressions), desc="Evaluating expressions", unit="expr") as progress:
        if num_processes == 1:
            for case_entries in map(_evaluate_case_from_task, tasks):
                entries_by_id.update((entry["id"], entry) for entry in case_entries)
                progress.update(len(case_entries))
        else:
            with get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
                for case_entries in pool.imap_unordered(_evaluate_case_from_task, tasks):
                    entries_by_id.update((entry["id"], entry) for entry in case_entries)
                    progress.update(len(case_entries))
    per_expression = [entries_by_id[expression.id] for expression in expressions]

    summary = {
        "metric_per_expression": per_expression,
        "aggregate": aggregate_metrics(per_expression),
        "per_category": per_category_metrics(per_expression),
        **({"per_phrasing": per_phrasing_metrics(per_expression)}
           if any(expression.phrasing == HELDOUT_PHRASING for expression in expressions) else {}),
        "settings": {
            "reference_folder": str(ref_dir), "prediction_folder": str(pred_dir), "expressions": expressions_source,
            "file_ending": file_ending, "reader_writer": reader_class.__name__,
            "nsd_tolerance_mm": nsd_tolerance_mm, "hausdorff_percentile": HAUSDORFF_PERCENTILE,
            "precision_iou_thresholds": list(PRECISION_IOU_THRESHOLDS),
            "detection_min_overlap": DEFAULT_DETECTION_MIN_OVERLAP,
            "detection_rule": "a reference region is detected when one predicted connected component (full "
                              "connectivity) covers at least detection_min_overlap of it; a predicted component "
                              "touching no referred region is a false positive",
            "empty_rule": "both empty: dice=iou=nsd=1, hd95=0; exactly one empty: dice=iou=nsd=0, hd95=null",
        },
    }
    if output_file is not None:
        output_file = Path(output_file)
        write_json_atomically(output_file, summary, indent=2, allow_nan=False)
        write_text_atomically(output_file.with_suffix(".md"), format_summary_table(summary) + "\n")
    return summary


def _format_value(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary_table(summary: dict) -> str:
    """The aggregate as a readable Markdown table (printed by the CLI and saved as summary.md)."""
    aggregate, settings = summary["aggregate"], summary["settings"]
    presence = aggregate["presence_counts"]
    no_target = (f"{_format_value(aggregate['no_target_accuracy'])} (of {aggregate['no_target_count']})"
                 if aggregate["no_target_count"] else "n/a (no expression refers to nothing)")
    rows = [
        ("Expressions", str(aggregate["n_expressions"])),
        ("Mean Dice", _format_value(aggregate["mean_dice"])),
        ("mIoU", _format_value(aggregate["mIoU"])),
        ("oIoU", _format_value(aggregate["oIoU"])),
        *((f"Prec@{threshold}", _format_value(aggregate[f"precision@{threshold}"]))
          for threshold in PRECISION_IOU_THRESHOLDS),
        (f"Mean HD{settings['hausdorff_percentile']} (mm)",
         f"{_format_value(aggregate['mean_hd95'], 2)} (undefined for {aggregate['hd95_undefined_count']} expressions)"),
        (f"Mean NSD @ {settings['nsd_tolerance_mm']} mm", _format_value(aggregate["mean_nsd"])),
        ("No-target accuracy", no_target),
        ("Lesion detection precision", _format_value(aggregate["detection_precision"])),
        ("Lesion detection recall", _format_value(aggregate["detection_recall"])),
        ("Lesion detection F1", _format_value(aggregate["detection_f1"])),
        ("Lesions TP / FP / FN",
         f"{aggregate['detection_tp']} / {aggregate['detection_fp']} / {aggregate['detection_fn']}"),
        ("Both present / pred empty / ref empty / both empty",
         f"{presence['both_present']} / {presence['pred_empty']} / {presence['ref_empty']} / {presence['both_empty']}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'Metric'.ljust(width)} | Value |", f"|{'-' * (width + 2)}|-------|"]
    lines.extend(f"| {name.ljust(width)} | {value} |" for name, value in rows)
    lines += ["", *_group_table("Category", summary.get("per_category", {}))]
    if "per_phrasing" in summary:
        lines += ["", *_group_table("Phrasing", summary["per_phrasing"])]
    return "\n".join(lines)


def _group_table(title: str, groups: dict[str, dict]) -> list[str]:
    """One row per expression group, so nobody has to sort expressions by type by hand."""
    header = (title, "Expressions", "Mean Dice", "mIoU", "No-target accuracy")
    rows = [header, *((name, str(group["n_expressions"]), _format_value(group["mean_dice"]),
                       _format_value(group["mIoU"]), _format_value(group["no_target_accuracy"]))
                      for name, group in groups.items())]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return lines


@console_entry
def evaluate_entry() -> None:
    """`LSMSv2_evaluate -ref REF_DIR -pred PRED_DIR -e EXPRESSIONS_JSON [-o OUT_JSON]`."""
    parser = argparse.ArgumentParser(description="Evaluate referring lesion segmentation: one predicted mask per "
                                                 "expression against the expression's target regions.")
    parser.add_argument("-ref", required=True, help="folder with the reference region maps, <case><file_ending>")
    parser.add_argument("-pred", required=True, help="folder with the predictions, <expression id><file_ending>")
    parser.add_argument("-e", required=True, help="expressions.json with targets for every expression")
    parser.add_argument("-o", default=None, help="output JSON (default: PRED_DIR/summary.json); a Markdown table "
                                                 "is written next to it with the suffix .md")
    parser.add_argument("--file_ending", default=".nii.gz", help="file ending of references and predictions")
    parser.add_argument("--nsd_tolerance", type=float, default=1.0, help="NSD (surface Dice) tolerance in mm")
    parser.add_argument("-np", type=int, default=1, help="number of worker processes")
    args = parser.parse_args()
    output_file = Path(args.o) if args.o is not None else Path(args.pred) / "summary.json"
    summary = evaluate_referring_folder(args.ref, args.pred, args.e, file_ending=args.file_ending,
                                        nsd_tolerance_mm=args.nsd_tolerance, output_file=output_file,
                                        num_processes=args.np)
    print(format_summary_table(summary))
    print(f"Written {output_file} and {output_file.with_suffix('.md')}")
