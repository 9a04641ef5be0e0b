"""What a fold's training cases tell the case-level stage: fitting examples, and the verdict against the network.

Per training case, each expression becomes a fitting example over the case's true lesions and over the lesions of
the network's finding answer (`case_evidence`); a draw of them is also answered by the network alone, so that the
stage can be judged against it on cases it was not fitted on (`cross_validated_verdict`). Everything happens on
nnU-Net's preprocessed arrays, the same intensities and voxel grid the stage is applied on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from text_conditioning.encoders import EncodedTexts
from text_conditioning.expressions import Expression

from lsms_nnunet.preprocessing.prompts import anatomy_index_map, lesion_voxels
from lsms_nnunet.selection.candidates import (FindingAnswer, candidates_of_answer, describe_candidates,
                                              find_candidates, referred_fraction)
from lsms_nnunet.selection.selector import SelectionExample, choose, fit_selectors, torch_threads
from lsms_nnunet.selection.settings import CaseLevelSettings


class TextFeatures:
    """Per text, the real tokens' embeddings the selector reads."""

    def __init__(self, texts: Sequence[str], encoded: EncodedTexts):
        self.by_text = {text: encoded.tokens[i][encoded.mask[i]].astype(np.float32) for i, text in enumerate(texts)}

    def example(self, text: str, descriptors: np.ndarray, volumes: np.ndarray,
                referred: np.ndarray | None = None, expression: str | None = None) -> SelectionExample:
        return SelectionExample(descriptors, volumes, self.by_text[text], referred, expression)


def preprocessed_spacing(configured_spacing: Sequence[float], spatial_dims: int) -> list[float]:
    """The voxel spacing of a preprocessed array; a 2D configuration's stacked slices get 1 along the stack (only
    ratios of volumes within one case matter to the selector)."""
    spacing = [float(s) for s in configured_spacing]
    return [1.0] * (spatial_dims - len(spacing)) + spacing


def selection_examples(dataset, cases: Sequence[str], expressions: Sequence[Expression], text_features: TextFeatures,
                       configured_spacing: Sequence[float], text_of: Callable[[str], str] = lambda text: text,
                       network_finding: Callable[[np.ndarray], FindingAnswer] | None = None,
                       settings: CaseLevelSettings = CaseLevelSettings()) -> list[SelectionExample]:
    """The fitting examples of the expressions of `cases` (`case_evidence`), in one list."""
    evidence = case_evidence(dataset, cases, expressions, text_features, configured_spacing, text_of, network_finding,
                             settings=settings)
    return fitting_examples(evidence)


def fitting_examples(evidence: Mapping[str, CaseEvidence]) -> list[SelectionExample]:
    """What the stage is fitted on: every case's examples and their phrase-table rewrites."""
    return [example for case in evidence.values() for example in case.examples + case.rewrites]


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
    """What one training case gives the case-level step: fitting examples (its expressions as written, and
    `rewrites`: the same examples in the phrase table's other words), and its expressions scored both ways."""

    examples: list[SelectionExample]
    scored: list[ScoredExpression]
    rewrites: list[SelectionExample] = field(default_factory=list)


def case_evidence(dataset, cases: Sequence[str], expressions: Sequence[Expression], text_features: TextFeatures,
                  configured_spacing: Sequence[float], text_of: Callable[[str], str] = lambda text: text,
                  network_finding: Callable[[np.ndarray], FindingAnswer] | None = None,
                  network_alone_logits: Callable[[np.ndarray, list[str]], np.ndarray] | None = None,
                  settings: CaseLevelSettings = CaseLevelSettings(),
                  context_ids: Sequence[int] = (), anatomy_ids: Sequence[int] = (),
                  variants: Mapping[str, Sequence[str]] | None = None) -> dict[str, CaseEvidence]:
    """Per case of `cases` with expressions: each expression is a fitting example over the case's ground-truth
    lesions and, with `network_finding` (preprocessed data -> the network's finding answer), again over the lesions
    of that answer; with `network_alone_logits` too (data, texts -> [E, *spatial] logits of the network answering
    alone), the expressions of `verdict_expressions` are also scored both ways (`cross_validated_verdict`). The label
    ids in `context_ids` are anatomy, not lesions; with `anatomy_ids` (those of them the network outputs, in its
    order) candidates are placed in their organs: the true ones in the label map's, the network's in its own.

    The network's candidates are those of inference, a candidate referred when most of it lies in referred regions:
    descriptors of predicted outlines differ from those of ground-truth outlines. The true outlines show each kind's
    look and each relation's volumes without the network's errors (a hemangioma found in pieces looks like no
    hemangioma, and its pieces change which lesion is "the largest"); docs/decisions.md has the measurements.
    `text_of` maps an expression's text to the text the model is given (the constant-text control gives one text).
    `variants` (text -> its phrase-table rewrites) adds, per expression, up to `settings.phrase_variants` fitting
    examples in other words over the candidates inference sees (the network's, where given; else the true ones): a
    wording the training expressions never use is then read like the one it stands for. The rewrites teach words,
    not candidates, so one candidate set suffices. The verdict scores the expressions as written.
    """
    wanted = set(cases)
    by_case: dict[str, list[Expression]] = {}
    for expression in expressions:
        if expression.case in wanted:
            by_case.setdefault(expression.case, []).append(expression)
    judged = verdict_expressions(by_case, lambda case: int(np.prod(dataset.load_case(case)[0].shape[1:])),
                                 settings.verdict_voxels, settings.verdict_min_expressions) \
        if network_alone_logits is not None else set()
    evidence = {}
    for case, case_expressions in by_case.items():
        data, seg, _, _ = dataset.load_case(case)
        data, region_map = np.asarray(data[:]), np.asarray(seg[:])[0]
        spacing = preprocessed_spacing(configured_spacing, region_map.ndim)
        candidate_sets = [(find_candidates(lesion_voxels(region_map, context_ids), spacing, settings=settings),
                           anatomy_index_map(region_map, anatomy_ids) if anatomy_ids else None)]
        if network_finding is not None:
            found = network_finding(data)
            candidate_sets.append((candidates_of_answer(found.lesion_logits, spacing, settings), found.anatomy))
        examples = []
        for candidates, anatomy in candidate_sets:
            descriptors = describe_candidates(data, candidates, spacing, settings.shell_voxels, anatomy,
                                              len(anatomy_ids))
            examples.append([text_features.example(text_of(expression.text), descriptors, candidates.volumes_mm3,
                                                   referred_fraction(candidates, region_map,
                                                                     expression.targets or ()) > 0.5,
                                                   expression.id)
                             for expression in case_expressions])
        rewrites = [SelectionExample(example.descriptors, example.volumes, text_features.by_text[variant],
                                     example.referred, f"{expression.id}\n{variant}")
                    for example, expression in zip(examples[-1], case_expressions)
                    for variant in (variants or {}).get(expression.text, ())[:settings.phrase_variants]]
        asked = [(example, expression) for example, expression in zip(examples[-1], case_expressions)
                 if expression.id in judged]
        scored = []
        if asked and network_alone_logits is not None and network_finding is not None:
            alone = network_alone_logits(data, [expression.text for _, expression in asked]) > 0
            scored = [_scored(example, candidate_sets[-1][0], region_map, expression, answer)
                      for (example, expression), answer in zip(asked, alone)]
        evidence[case] = CaseEvidence([example for per_set in examples for example in per_set], scored, rewrites)
    return evidence


def verdict_expressions(by_case: Mapping[str, Sequence[Expression]], voxels_of: Callable[[str], int],
                        voxel_budget: int, at_least: int) -> set[str]:
    """The ids of the expressions to judge the case-level step by: a random draw (fixed seed: the same draw for the
    same training set, every kind of expression and case can be in it), taken while the voxels the network answers
    alone stay within `voxel_budget`, and at least `at_least` of them. The network answers each in its own pass,
    so the draw is sized by that cost; too small a draw can judge a close call the wrong way round."""
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


def cross_validated_verdict(evidence: Mapping[str, CaseEvidence], settings: CaseLevelSettings = CaseLevelSettings(),
                            log=print) -> Verdict | None:
    """The case-level step against the network alone on the training cases (None without two scored cases). The
    selector is refitted `settings.verdict_folds` times (the refits share one padded batch), each time without a
    group of cases whose expressions it then answers, so its figure is what it does on cases it was not fitted on.
    The network's figure is on cases it was trained on, which favours it: the case-level step is kept only where it
    wins despite that. The refits read the expressions as written, without their phrase-table rewrites: the verdict
    scores written expressions, and the rewrites (which teach wording none of them uses) would more than double
    the refits' cost."""
    cases = sorted(case for case, found in evidence.items() if found.scored)
    if len(cases) < 2:
        return None
    folds = min(settings.verdict_folds, len(cases))
    groups = [cases[start::folds] for start in range(folds)]
    examples, owners = [], []
    for case, found in evidence.items():
        examples += found.examples
        owners += [case] * len(found.examples)
    owners = np.asarray(owners)
    subsets = [~np.isin(owners, held_out) for held_out in groups]
    log(f"case selector: verdict, {folds} refits, each without a group of training cases")
    refits = fit_selectors(examples, settings, members=settings.verdict_members, subsets=subsets,
                           log=lambda *_: None)
    case_level, network_alone = [], []
    with torch_threads(settings.threads):
        for selectors, held_out in zip(refits, groups):
            scored = [expression for case in held_out for expression in evidence[case].scored]
            answers = choose(selectors, [expression.example for expression in scored])
            case_level += [expression.dice(answer) for expression, answer in zip(scored, answers)]
            network_alone += [expression.network_alone_dice for expression in scored]
    return Verdict(float(np.mean(case_level)), float(np.mean(network_alone)), len(case_level))
