"""Case-level selection in the pipeline: fitting the selector on a fold's training cases, applying it at inference.

At inference every image is also asked the finding prompt (preprocessing/prompts.FINDING_TEXT); the components of
that answer are the candidates, and each expression's mask becomes the union of the candidates the selector picks
for it. Everything happens on nnU-Net's preprocessed arrays (the same intensities and voxel grid the selector was
fitted on), before the logits are resampled back to the original geometry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from text_conditioning.encoders import EncodedTexts
from text_conditioning.expressions import Expression

from lsms_nnunet.network.prompting import CASE_SELECTOR_STATE_KEY
from lsms_nnunet.selection.candidates import (candidates_of_answer, describe_candidates, find_candidates,
                                              referred_fraction)
from lsms_nnunet.selection.selector import (SELECTOR_FILE, CaseSelector, SelectionExample, choose, fit_selectors,
                                            read_selector_payload, selectors_from_payload)

#: Groups of a fold's training cases the selector is refitted without, to judge it against the network alone; each
#: refit is one member (the product fits ENSEMBLE_MEMBERS): the verdict is a mean over many expressions, and the
#: refits are its cost (the demo on a shared CPU: 7 minutes of refits beside 2.4 for fitting the selector itself).
VERDICT_FOLDS, VERDICT_MEMBERS = 5, 1
#: How many training expressions the network answers alone for that judgement (verdict_expressions): as many as
#: 2^24 voxels hold (32 volumes of 32 x 128 x 128, 128 blocks of 32 x 64 x 64), at least 24.
VERDICT_VOXELS, VERDICT_MIN_EXPRESSIONS = 2 ** 24, 24
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
                       network_alone_logits: Callable[[np.ndarray, list[str]], np.ndarray] | None = None,
                       log=print) -> tuple[list[CaseSelector], Verdict | None]:
    """Fit on the lesions of `cases` (an nnU-Net dataset of preprocessed cases) and their expressions
    (`case_evidence`), and judge whether it should answer at all (`cross_validated_verdict`)."""
    evidence = case_evidence(dataset, cases, expressions, text_features, configured_spacing, text_of, finding_logits,
                             network_alone_logits)
    examples = [example for case in evidence.values() for example in case.examples]
    if not examples:
        raise ValueError("No training expression to fit the case selector on. Fix: check that expressions.json has "
                         "expressions for the training cases of this fold.")
    log(f"case selector: fitting on {len(examples)} examples (expressions x candidate sets) of "
        f"{len(evidence)} training cases")
    selectors = fit_selectors(examples, log=log)
    verdict = cross_validated_verdict(evidence, log=log)
    if verdict is not None:
        log(f"case selector: {verdict.describe()}")
    return selectors, verdict


def selection_examples(dataset, cases: Sequence[str], expressions: Sequence[Expression], text_features: TextFeatures,
                       configured_spacing: Sequence[float], text_of: Callable[[str], str] = lambda text: text,
                       finding_logits: Callable[[np.ndarray], np.ndarray] | None = None) -> list[SelectionExample]:
    """The fitting examples of the expressions of `cases` (`case_evidence`), in one list."""
    evidence = case_evidence(dataset, cases, expressions, text_features, configured_spacing, text_of, finding_logits)
    return [example for case in evidence.values() for example in case.examples]


@dataclass
class ScoredExpression:
    """A training expression asked of the network's candidates, with what each candidate holds of the referred
    regions, so that any choice of candidates is scored without the arrays; and the network's own answer's Dice."""

    example: SelectionExample
    candidate_voxels: np.ndarray  # [K]
    referred_inside: np.ndarray  # [K] referred voxels inside each candidate
    referred_voxels: int
    network_alone_dice: float

    def dice(self, chosen: np.ndarray) -> float:
        total = self.candidate_voxels[chosen].sum() + self.referred_voxels
        return 1.0 if total == 0 else float(2.0 * self.referred_inside[chosen].sum() / total)


@dataclass
class CaseEvidence:
    """What one training case gives the case-level step: fitting examples, and its expressions scored both ways."""

    examples: list[SelectionExample]
    scored: list[ScoredExpression]


def case_evidence(dataset, cases: Sequence[str], expressions: Sequence[Expression], text_features: TextFeatures,
                  configured_spacing: Sequence[float], text_of: Callable[[str], str] = lambda text: text,
                  finding_logits: Callable[[np.ndarray], np.ndarray] | None = None,
                  network_alone_logits: Callable[[np.ndarray, list[str]], np.ndarray] | None = None
                  ) -> dict[str, CaseEvidence]:
    """Per case of `cases` with expressions: each expression is a fitting example over the case's ground-truth
    lesions and, with `finding_logits` (preprocessed data -> the network's all-lesion logits), again over the lesions
    of that answer; with `network_alone_logits` too (data, texts -> [E, *spatial] logits of the network answering
    alone), the expressions of `verdict_expressions` are also scored both ways (`cross_validated_verdict`).

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
    judged = verdict_expressions(by_case, lambda case: int(np.prod(dataset.load_case(case)[0].shape[1:]))) \
        if network_alone_logits is not None else set()
    evidence = {}
    for case, case_expressions in by_case.items():
        data, seg, _, _ = dataset.load_case(case)
        data, region_map = np.asarray(data[:]), np.asarray(seg[:])[0]
        spacing = preprocessed_spacing(configured_spacing, region_map.ndim)
        candidate_sets = [find_candidates(region_map > 0, spacing)]
        if finding_logits is not None:
            candidate_sets.append(candidates_of_answer(finding_logits(data), spacing))
        examples = []
        for candidates in candidate_sets:
            descriptors = describe_candidates(data, candidates, spacing)
            examples.append([text_features.example(text_of(expression.text), descriptors, candidates.volumes_mm3,
                                                   referred_fraction(candidates, region_map,
                                                                     expression.targets or ()) > 0.5)
                             for expression in case_expressions])
        asked = [(example, expression) for example, expression in zip(examples[-1], case_expressions)
                 if expression.id in judged]
        scored = []
        if asked and network_alone_logits is not None and finding_logits is not None:
            alone = network_alone_logits(data, [expression.text for _, expression in asked]) > 0
            scored = [_scored(example, candidate_sets[-1], region_map, expression, answer)
                      for (example, expression), answer in zip(asked, alone)]
        evidence[case] = CaseEvidence([example for per_set in examples for example in per_set], scored)
    return evidence


def verdict_expressions(by_case: Mapping[str, Sequence[Expression]], voxels_of: Callable[[str], int],
                        voxel_budget: int = VERDICT_VOXELS, at_least: int = VERDICT_MIN_EXPRESSIONS) -> set[str]:
    """The ids of the expressions to judge the case-level step by: a random draw (fixed seed: the same draw for the
    same training set, every kind of expression and case can be in it), taken while the voxels the network answers
    alone stay within `voxel_budget`, and at least `at_least` of them. The network answers each in its own pass:
    a 3D benchmark volume costs ~7 s per expression on a 2-core CPU, a whole fold's expressions half an hour; 24
    expressions judged one LiTS training the other way round than all 115 of its training expressions did (0.547 vs
    0.536 mean Dice, against 0.478 vs 0.502)."""
    case_of = {expression.id: case for case, expressions in by_case.items() for expression in expressions}
    chosen, voxels, size = [], 0, {}
    for expression_id in np.random.default_rng(0).permutation(sorted(case_of)).tolist():
        case = case_of[expression_id]
        size[case] = size[case] if case in size else voxels_of(case)
        if len(chosen) >= at_least and voxels + size[case] > voxel_budget:
            break
        chosen.append(expression_id)
        voxels += size[case]
    return set(chosen)


def _scored(example: SelectionExample, candidates, region_map: np.ndarray, expression: Expression,
            network_answer: np.ndarray) -> ScoredExpression:
    referred = np.isin(region_map, np.asarray(list(expression.targets or ()), dtype=region_map.dtype))
    index = np.arange(1, candidates.count + 1)
    inside = np.asarray(ndimage.sum_labels(referred, candidates.labels, index)).reshape(-1)
    voxels = np.bincount(candidates.labels.ravel(), minlength=candidates.count + 1)[1:]
    total = network_answer.sum() + referred.sum()
    alone = 1.0 if total == 0 else float(2.0 * (network_answer & referred).sum() / total)
    return ScoredExpression(example, voxels, inside, int(referred.sum()), alone)


@dataclass
class Verdict:
    """Which answers a fold's training expressions better, the case-level step (cross-validated over the training
    cases) or the network alone; the model answers with the winner."""

    case_level_dice: float
    network_alone_dice: float
    expressions: int

    @property
    def case_level_answers(self) -> bool:
        return self.case_level_dice >= self.network_alone_dice

    def describe(self) -> str:
        winner = "the case-level step" if self.case_level_answers else "the network alone"
        return (f"on {self.expressions} training expressions, case-level step (cross-validated over the training "
                f"cases) mean Dice {self.case_level_dice:.3f}, network alone {self.network_alone_dice:.3f}: "
                f"{winner} answers")


def cross_validated_verdict(evidence: Mapping[str, CaseEvidence], folds: int = VERDICT_FOLDS, log=print
                            ) -> Verdict | None:
    """The case-level step against the network alone on the training cases (None without two scored cases). The
    selector is refitted `folds` times, each time without a group of cases whose expressions it then answers, so its
    figure is what it does on cases it was not fitted on. The network's figure is on cases it was trained on, which
    favours it: the case-level step is kept only where it wins despite that. On real CT at a small budget the
    selector answered worse than the network alone (LiTS, one training: 0.27 vs 0.35 mean Dice on validation);
    on the synthetic benchmarks it answered far better (2D 0.85-0.93 vs 0.56-0.62, 3D 0.71-0.74 vs 0.31-0.37)."""
    cases = sorted(case for case, found in evidence.items() if found.scored)
    if len(cases) < 2:
        return None
    groups = [cases[start::min(folds, len(cases))] for start in range(min(folds, len(cases)))]
    case_level, network_alone = [], []
    for group, held_out in enumerate(groups):
        fitting = [example for case, found in evidence.items() if case not in held_out for example in found.examples]
        scored = [expression for case in held_out for expression in evidence[case].scored]
        log(f"case selector: verdict fit {group + 1}/{len(groups)} ({len(fitting)} examples)")
        answers = choose(fit_selectors(fitting, members=VERDICT_MEMBERS, log=lambda *_: None),
                         [expression.example for expression in scored])
        case_level += [expression.dice(answer) for expression, answer in zip(scored, answers)]
        network_alone += [expression.network_alone_dice for expression in scored]
    return Verdict(float(np.mean(case_level)), float(np.mean(network_alone)), len(case_level))


def load_case_selectors(model_folder: str | Path, folds: Sequence, fold_weights: Sequence[Mapping],
                        text_encoder_sha256: str, log=print) -> tuple[list[CaseSelector], bool]:
    """The selectors of the folds used for prediction (each fold's members), from each fold's checkpoint weights or,
    for models validated before checkpoints carried them, from `fold_X/case_selector.pt` (none if a fold has
    neither), and whether they answer: not if most folds' verdicts (`cross_validated_verdict`) chose the network
    alone."""
    selectors, missing, declined = [], [], []
    for fold, weights in zip(folds, fold_weights):
        payload = weights.get("_extra_state", {}).get(CASE_SELECTOR_STATE_KEY)
        path = Path(model_folder) / f"fold_{fold}" / SELECTOR_FILE
        source = f"the checkpoint of fold {fold}"
        if payload is None and path.is_file():
            payload, source = read_selector_payload(path), str(path)
        if payload is None:
            missing.append(str(path))
            continue
        selectors.extend(selectors_from_payload(payload, text_encoder_sha256, source))
        verdict = Verdict(**payload["verdict"]) if payload.get("verdict") else None
        if verdict is not None and not verdict.case_level_answers:
            declined.append(f"fold {fold}: {verdict.describe()}")
    if missing:
        log(f"WARNING: no case selector for {missing} (in the checkpoint or beside it): these models answer without "
            f"case-level selection. Fix: rerun their validation (nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER "
            f"--val) to fit it.")
        return [], False
    if 2 * len(declined) > len(folds):
        log("Expressions are answered by the network alone, as its training cases advised (" + "; ".join(declined)
            + ")")
        return selectors, False
    return selectors, True


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

