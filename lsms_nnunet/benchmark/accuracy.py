"""How well a benchmarked model answers: referring metrics per expression, and plain all-lesion Dice per case.

The text-blind baseline gives the same answer to every expression of an image — its lesion mask — so it is scored on
the same expressions as LSMS by writing that mask once per expression. Plain lesion segmentation is scored against the
union of all regions of a case's region map.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from text_conditioning.expressions import Expression
from text_conditioning.io import atomic_path

from lsms_nnunet.evaluation.evaluate import evaluate_referring_folder, reader_for
from lsms_nnunet.evaluation.metrics import dice_score
from lsms_nnunet.preprocessing.prompts import lesion_voxels

#: The text that asks an LSMS model for every lesion. It is chosen by the benchmark (ad hoc), not learned from a
#: dataset convention; the synthetic dataset happens to use it among its phrasings.
ALL_LESIONS_PROMPT = "all lesions"


def evaluate_text_blind_answers(label_map_folder: Path, gt_folder: Path, expressions: Sequence[Expression],
                                file_ending: str, work_folder: Path) -> dict:
    """Score a text-blind model: its label map of a case (foreground > 0) answers every expression of that case."""
    work_folder.mkdir(parents=True, exist_ok=True)
    missing = sorted({e.case for e in expressions if not (label_map_folder / f"{e.case}{file_ending}").is_file()})
    if missing:
        raise FileNotFoundError(f"{label_map_folder} lacks the validation label maps of {missing[:10]} "
                                f"({len(missing)} cases). Fix: rerun the final validation (nnUNetv2_train ... --val).")
    for expression in expressions:
        shutil.copyfile(label_map_folder / f"{expression.case}{file_ending}",
                        work_folder / f"{expression.id}{file_ending}")
    return evaluate_referring_folder(gt_folder, work_folder, list(expressions), file_ending=file_ending,
                                     output_file=work_folder / "summary.json")


def write_all_lesion_reference_masks(gt_folder: Path, cases: Sequence[str], file_ending: str,
                                     output_folder: Path, context_ids: Sequence[int] = ()) -> None:
    """The perfect all-lesion mask of each case (union of its lesion regions, context left out): the best answer a
    text-blind model can give."""
    output_folder.mkdir(parents=True, exist_ok=True)
    reader_writer = reader_for(file_ending, gt_folder / f"{cases[0]}{file_ending}")()
    for case in cases:
        region_map, properties = reader_writer.read_seg(str(gt_folder / f"{case}{file_ending}"))
        target = output_folder / f"{case}{file_ending}"
        with atomic_path(target, f".tmp{file_ending}") as temporary:
            reader_writer.write_seg(lesion_voxels(region_map[0], context_ids).astype(np.uint8), str(temporary),
                                    properties)


def plain_lesion_dice(prediction_folder: Path, gt_folder: Path, cases: Sequence[str], file_ending: str,
                      context_ids: Sequence[int] = ()) -> dict:
    """Dice of each case's predicted lesion mask (foreground > 0) against the union of all its lesion regions."""
    if not cases:
        raise ValueError("No case to score plain lesion segmentation on.")
    reader = reader_for(file_ending, gt_folder / f"{cases[0]}{file_ending}")()
    dice_per_case = {}
    for case in tqdm(list(cases), desc="Plain lesion Dice", unit="case", disable=len(cases) < 20):
        prediction_file, reference_file = prediction_folder / f"{case}{file_ending}", gt_folder / f"{case}{file_ending}"
        if not prediction_file.is_file():
            raise FileNotFoundError(f"{prediction_file} is missing: no lesion mask to score for {case}.")
        prediction, _ = reader.read_seg(str(prediction_file))
        reference, _ = reader.read_seg(str(reference_file))
        if prediction.shape != reference.shape:
            raise ValueError(f"{prediction_file} has shape {prediction.shape}, its reference {reference_file} "
                             f"{reference.shape}. Fix: export predictions in the reference geometry.")
        dice_per_case[case] = dice_score(prediction > 0, lesion_voxels(reference, context_ids))
    return {"dice_per_case": dice_per_case, "mean_dice": float(np.mean(list(dice_per_case.values())))}
