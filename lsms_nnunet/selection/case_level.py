"""Case-level selection in the pipeline: fitting the selector on a fold's training cases, applying it at inference.

At inference every image is also asked the finding prompt (preprocessing/prompts.FINDING_TEXT); the components of
that answer are the candidates, and each expression's mask becomes the union of the candidates the selector picks
for it. Everything happens on nnU-Net's preprocessed arrays (the same intensities and voxel grid the selector was
fitted on), before the logits are resampled back to the original geometry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from text_conditioning.encoders import EncodedTexts
from text_conditioning.expressions import Expression

from lsms_nnunet.network.prompting import CASE_SELECTOR_STATE_KEY
from lsms_nnunet.selection.candidates import (candidates_of_answer, describe_candidates, find_candidates,
                                              referred_fraction)
from lsms_nnunet.selection.selector import (SELECTOR_FILE, CaseSelector, SelectionExample, choose, fit_selectors,
                                            load_selectors, selectors_from_payload)

UNSELECTED_LOGIT = -1.0  # outside the chosen candidates: below the mask threshold, saved probabilities still rank


class TextFeatures:
    """Per text, the real tokens' embeddings the selector reads."""

    def __init__(self, texts: Sequence[str], encoded: EncodedTexts):
        self.by_text = {text: encoded.tokens[i][encoded.mask[i]].astype(np.float32) for i, text in enumerate(texts)}

    def example(self, text: str, descriptors: np.ndarray, volumes: np.ndarray,
                referred: np.ndarray | None = None) -> SelectionExample:
        return SelectionExample(descriptors, volumes, self.by_text[text], referred)


def preprocessed_spacing(configured_spacing: Sequence[float], spatial_dims: int) -> list[float]:
    """The voxel spacing of a preprocessed array; a 2D configuration's stacked slices get 1 along the stack (only
    ratios of volumes within one case matter to the selector)."""
    spacing = [float(s) for s in configured_spacing]
    return [1.0] * (spatial_dims - len(spacing)) + spacing


def fit_case_selectors(dataset, cases: Sequence[str], expressions: Sequence[Expression],
                       text_features: TextFeatures,
                       configured_spacing: Sequence[float], text_of: Callable[[str], str] = lambda text: text,
                       finding_logits: Callable[[np.ndarray], np.ndarray] | None = None,
                       log=print) -> list[CaseSelector]:
    """Fit on the lesions of `cases` (an nnU-Net dataset of preprocessed cases) and their expressions
    (`selection_examples`)."""
    examples = selection_examples(dataset, cases, expressions, text_features, configured_spacing, text_of,
                                  finding_logits)
    if not examples:
        raise ValueError("No training expression to fit the case selector on. Fix: check that expressions.json has "
                         "expressions for the training cases of this fold.")
    log(f"case selector: fitting on {len(examples)} examples (expressions x candidate sets) of "
        f"{len({expression.case for expression in expressions} & set(cases))} training cases")
    return fit_selectors(examples, log=log)


def selection_examples(dataset, cases: Sequence[str], expressions: Sequence[Expression], text_features: TextFeatures,
                       configured_spacing: Sequence[float], text_of: Callable[[str], str] = lambda text: text,
                       finding_logits: Callable[[np.ndarray], np.ndarray] | None = None) -> list[SelectionExample]:
    """The fitting examples of the expressions of `cases`: each over the case's ground-truth lesions and, with
    `finding_logits` (preprocessed data -> the network's all-lesion logits), again over the lesions of that answer.

    The network's candidates are those of inference, a candidate referred when most of it lies in referred regions:
    descriptors of predicted outlines differ from those of ground-truth outlines (a selector fitted on the latter
    alone scored 0.70 instead of 0.88 on one benchmark fold). The true outlines show each kind's look and each
    relation's volumes without the network's errors (a hemangioma found in pieces looks like no hemangioma, and its
    pieces change which lesion is "the largest"). Both, against the network's candidates alone, on the 3D benchmark's
    candidates of two trainings (seen wording, 5-fold cross-validation over the 40 cases): mean Dice 0.752 -> 0.777
    and 0.699 -> 0.718, size rank 0.64 -> 0.75 and 0.52 -> 0.65; 2D unchanged (0.894 -> 0.895).
    `text_of` maps an expression's text to the text the model is given (the constant-text control gives one text).
    """
    wanted = set(cases)
    by_case: dict[str, list[Expression]] = {}
    for expression in expressions:
        if expression.case in wanted:
            by_case.setdefault(expression.case, []).append(expression)
    examples = []
    for case, case_expressions in by_case.items():
        data, seg, _, _ = dataset.load_case(case)
        data, region_map = np.asarray(data[:]), np.asarray(seg[:])[0]
        spacing = preprocessed_spacing(configured_spacing, region_map.ndim)
        candidate_sets = [find_candidates(region_map > 0, spacing)]
        if finding_logits is not None:
            candidate_sets.append(candidates_of_answer(finding_logits(data), spacing))
        for candidates in candidate_sets:
            descriptors = describe_candidates(data, candidates, spacing)
            for expression in case_expressions:
                referred = referred_fraction(candidates, region_map, expression.targets or ()) > 0.5
                examples.append(text_features.example(text_of(expression.text), descriptors,
                                                      candidates.volumes_mm3, referred))
    return examples


def load_case_selectors(model_folder: str | Path, folds: Sequence, fold_weights: Sequence[Mapping],
                        text_encoder_sha256: str) -> list[CaseSelector]:
    """The selectors of the folds used for prediction (each fold's members), from each fold's checkpoint weights or,
    for models validated before checkpoints carried them, from `fold_X/case_selector.pt`; if a fold has neither, no
    selector is used."""
    selectors, missing = [], []
    for fold, weights in zip(folds, fold_weights):
        payload = weights.get("_extra_state", {}).get(CASE_SELECTOR_STATE_KEY)
        path = Path(model_folder) / f"fold_{fold}" / SELECTOR_FILE
        if payload is not None:
            selectors.extend(selectors_from_payload(payload, text_encoder_sha256, f"the checkpoint of fold {fold}"))
        elif path.is_file():
            selectors.extend(load_selectors(path, text_encoder_sha256))
        else:
            missing.append(str(path))
    if missing:
        print(f"WARNING: no case selector for {missing} (in the checkpoint or beside it): these models answer without "
              f"case-level selection. Fix: rerun their validation (nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER "
              f"--val) to fit it.")
        return []
    return selectors


def select_case_lesions(finding_logits: torch.Tensor, data: torch.Tensor,
                        texts: Sequence[str], text_features: TextFeatures, selectors: Sequence[CaseSelector],
                        configured_spacing: Sequence[float]) -> torch.Tensor:
    """[E, *spatial] logits for the E `texts` on one image: positive on the union of the finding candidates the
    selectors (averaged over folds and seeds) pick for each text, where they keep the finding logits."""
    finding = finding_logits.float().cpu()
    spacing = preprocessed_spacing(configured_spacing, finding.ndim)
    candidates = candidates_of_answer(finding.numpy(), spacing)
    descriptors = describe_candidates(np.asarray(data.float().cpu()), candidates, spacing)
    examples = [text_features.example(text, descriptors, candidates.volumes_mm3) for text in texts]
    answers = choose(selectors, examples)
    selected = torch.stack([torch.from_numpy(candidates.masks(np.flatnonzero(answer))) for answer in answers])
    chosen = torch.where(selected, finding.clamp_min(0.0).unsqueeze(0), torch.tensor(UNSELECTED_LOGIT))
    return chosen.to(finding_logits.dtype)

