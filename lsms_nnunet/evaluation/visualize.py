"""Overlay pictures of referring-segmentation results: `LSMSv2_visualize`.

One PNG per expression: the most informative axial slice in grayscale, the predicted contour in red, the reference
contour in green, and the expression text (plus Dice when a reference is given) as caption, so a reader can judge at
a glance whether the model segmented the lesion the text refers to.
"""
import argparse
import io
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from lsms_nnunet.evaluation.evaluate import (EvaluationInputError, raise_if_files_missing, reader_for,
                                             resolve_expressions)
from lsms_nnunet.evaluation.metrics import dice_score
from text_conditioning.expressions import Expression, ExpressionsError, expressions_by_case
from text_conditioning.io import write_bytes_atomically
from lsms_nnunet.cli import console_entry

OVERLAY_WIDTH_PX, OVERLAY_HEIGHT_PX = 640, 760
CAPTION_HEIGHT_PX = 120
DOTS_PER_INCH = 100
PREDICTION_COLOR, REFERENCE_COLOR = "#ff0000", "#00ff00"
WINDOW_PERCENTILES = (0.5, 99.5)
CAPTION_CHARACTERS_PER_LINE = 88
CAPTION_MAX_LINES = 4


def _slice_to_show(pred_mask: np.ndarray, ref_mask: np.ndarray | None) -> int:
    """The axial slice with most reference voxels, else most predicted voxels, else the middle one."""
    for mask in (ref_mask, pred_mask):
        if mask is not None and mask.any():
            return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    return pred_mask.shape[0] // 2


def _draw_contour(axes, mask_slice: np.ndarray, color: str) -> None:
    if mask_slice.any() and not mask_slice.all():
        axes.contour(mask_slice.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.5)


def render_overlay(image: np.ndarray, pred_mask: np.ndarray, ref_mask: np.ndarray | None, text: str,
                   out_png: str | os.PathLike, spacing: Sequence[float] | None = None) -> None:
    """Write a OVERLAY_WIDTH_PX x OVERLAY_HEIGHT_PX PNG of one expression's result (atomically).

    Arrays are 2D or 3D in numpy axis order (3D: axis 0 is axial); `spacing` (same order) keeps the in-plane aspect
    ratio true. Gray levels are windowed to the shown slice's 0.5-99.5 percentiles, which suits CT and MR alike.
    """
    image = np.asarray(image, dtype=np.float32)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = None if ref_mask is None else np.asarray(ref_mask, dtype=bool)
    if image.ndim not in (2, 3):
        raise ValueError(f"The image must be 2D or 3D, got shape {image.shape}.")
    for name, mask in (("prediction", pred_mask), ("reference", ref_mask)):
        if mask is not None and mask.shape != image.shape:
            raise ValueError(f"The {name} mask has shape {mask.shape} but the image has shape {image.shape}.")
    if image.ndim == 2:
        image, pred_mask = image[None], pred_mask[None]
        ref_mask = None if ref_mask is None else ref_mask[None]
    shown_slice = _slice_to_show(pred_mask, ref_mask)
    window_low, window_high = np.percentile(image[shown_slice], WINDOW_PERCENTILES)
    window_high = max(window_high, window_low + 1e-6)
    pixel_aspect = 1.0 if spacing is None else float(spacing[-2]) / float(spacing[-1])

    figure = Figure(figsize=(OVERLAY_WIDTH_PX / DOTS_PER_INCH, OVERLAY_HEIGHT_PX / DOTS_PER_INCH), dpi=DOTS_PER_INCH,
                    facecolor="black")
    FigureCanvasAgg(figure)
    caption_fraction = CAPTION_HEIGHT_PX / OVERLAY_HEIGHT_PX
    axes = figure.add_axes((0.0, caption_fraction, 1.0, 1.0 - caption_fraction))
    axes.set_axis_off()
    axes.imshow(image[shown_slice], cmap="gray", vmin=window_low, vmax=window_high, aspect=pixel_aspect,
                interpolation="nearest")
    _draw_contour(axes, pred_mask[shown_slice], PREDICTION_COLOR)
    if ref_mask is not None:
        _draw_contour(axes, ref_mask[shown_slice], REFERENCE_COLOR)

    caption_lines = textwrap.wrap(text, width=CAPTION_CHARACTERS_PER_LINE, max_lines=CAPTION_MAX_LINES,
                                  placeholder=" ...")
    details = [f"slice {shown_slice + 1}/{image.shape[0]}", "red: prediction"]
    if ref_mask is not None:
        details += ["green: reference", f"Dice {dice_score(pred_mask, ref_mask):.3f}"]
    figure.text(0.02, caption_fraction - 0.01, "\n".join(caption_lines + ["  |  ".join(details)]), color="white",
                fontsize=10, va="top", ha="left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DOTS_PER_INCH, facecolor="black")
    write_bytes_atomically(out_png, buffer.getvalue())


def _select_expressions(expressions: list[Expression], ids: Sequence[str] | None,
                        max_count: int | None) -> list[Expression]:
    if max_count is not None and max_count < 1:
        raise EvaluationInputError(f"The maximum number of pictures must be at least 1, got {max_count}.")
    if ids:
        known_ids = {expression.id for expression in expressions}
        unknown = [expression_id for expression_id in ids if expression_id not in known_ids]
        if unknown:
            raise ExpressionsError(f"Expression id(s) {unknown} are not in the expressions file. Fix: pass ids "
                                   "listed in that file.")
        expressions = [expression for expression in expressions if expression.id in set(ids)]
    return expressions if max_count is None else expressions[:max_count]


def _check_same_grid(name: str, mask: np.ndarray, mask_file: Path, image: np.ndarray, image_file: Path) -> None:
    if mask.shape != image.shape[1:]:
        raise EvaluationInputError(f"The {name} {mask_file} has shape {mask.shape} but the image {image_file} has "
                                   f"shape {image.shape[1:]}. Fix: use files on the same voxel grid.")


def visualize_folder(images_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                     expressions: str | os.PathLike | Sequence[Expression], out_dir: str | os.PathLike,
                     ref_dir: str | os.PathLike | None = None, ids: Sequence[str] | None = None,
                     max_count: int | None = None, file_ending: str = ".nii.gz") -> list[Path]:
    """Render `<out_dir>/<expression id>.png` for the chosen expressions; returns the written files.

    Images are `<images_dir>/<case>_0000<ending>` (first channel shown), predictions `<pred_dir>/<id><ending>`,
    and, when `ref_dir` is given, references are the expression's targets in `<ref_dir>/<case><ending>`.
    """
    images_dir, pred_dir, out_dir = Path(images_dir), Path(pred_dir), Path(out_dir)
    ref_dir = None if ref_dir is None else Path(ref_dir)
    expressions, _ = resolve_expressions(expressions, require_targets=ref_dir is not None)
    expressions = _select_expressions(expressions, ids, max_count)
    image_files = {expression.id: images_dir / f"{expression.case}_0000{file_ending}" for expression in expressions}
    prediction_files = {expression.id: pred_dir / f"{expression.id}{file_ending}" for expression in expressions}
    reference_files = {} if ref_dir is None else {expression.id: ref_dir / f"{expression.case}{file_ending}"
                                                  for expression in expressions}
    missing = {"image": sorted({file.name for file in image_files.values() if not file.is_file()}),
               "prediction": [expression_id for expression_id, file in prediction_files.items() if not file.is_file()],
               "reference": sorted({file.name for file in reference_files.values() if not file.is_file()})}
    raise_if_files_missing(missing, {"image": images_dir, "prediction": pred_dir, "reference": ref_dir}, file_ending)
    reader = reader_for(file_ending, next(iter(image_files.values())))()
    written = []
    with tqdm(total=len(expressions), desc="Rendering overlays", unit="expr") as progress:
        for case_expressions in expressions_by_case(expressions).values():
            image_file = image_files[case_expressions[0].id]
            image, properties = reader.read_images([str(image_file)])
            region_map = None
            if ref_dir is not None:
                region_map = reader.read_seg(str(reference_files[case_expressions[0].id]))[0][0].astype(np.int64)
                _check_same_grid("reference", region_map, reference_files[case_expressions[0].id], image, image_file)
            for expression in case_expressions:
                prediction = reader.read_seg(str(prediction_files[expression.id]))[0][0] > 0
                _check_same_grid("prediction", prediction, prediction_files[expression.id], image, image_file)
                reference = None if region_map is None else np.isin(region_map, expression.targets)
                out_png = out_dir / f"{expression.id}.png"
                render_overlay(image[0], prediction, reference, expression.text, out_png,
                               spacing=properties["spacing"])
                written.append(out_png)
                progress.update()
    return written


@console_entry
def visualize_entry() -> None:
    """`LSMSv2_visualize -i IMAGES_DIR -pred PRED_DIR -e EXPRESSIONS_JSON -o OUT_DIR [-ref REF_DIR]`."""
    parser = argparse.ArgumentParser(description="Render one overlay PNG per expression: prediction in red, "
                                                 "reference in green, the expression as caption.")
    parser.add_argument("-i", required=True, help="folder with the images, <case>_0000<file_ending>")
    parser.add_argument("-pred", required=True, help="folder with the predictions, <expression id><file_ending>")
    parser.add_argument("-e", required=True, help="expressions.json")
    parser.add_argument("-o", required=True, help="output folder for <expression id>.png")
    parser.add_argument("-ref", default=None, help="optional folder with the reference region maps "
                                                   "(<case><file_ending>); needs targets in the expressions file")
    parser.add_argument("--ids", nargs="+", default=None, help="only these expression ids")
    parser.add_argument("--max", type=int, default=None, help="at most this many pictures")
    parser.add_argument("--file_ending", default=".nii.gz", help="file ending of images, predictions, references")
    args = parser.parse_args()
    written = visualize_folder(args.i, args.pred, args.e, args.o, ref_dir=args.ref, ids=args.ids,
                               max_count=args.max, file_ending=args.file_ending)
    print(f"Written {len(written)} picture(s) to {args.o}")
