"""The synthetic expressions: which subsets of a case's lesions can be named, in which words, and which are chosen.

Each expression refers to a subset of the lesions by kind, lobe, size rank, attribute or count, and about one in
eight refers to nothing in the image. Every expression carries a report category (kind, kind_lobe, lobe, attribute,
plural, size, no_target). The held-out phrasebook holds synonyms and templates never used in training
(--heldout_phrasing), so that generalisation to new wording can be measured.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from text_conditioning.expressions import NO_TARGET_CATEGORY

from lsms_nnunet.datasets.synthetic.anatomy import KINDS, LOBES, SyntheticLesion

EXPRESSIONS_PER_CASE = (5, 8)
NO_TARGET_CASE_PROBABILITY = 0.8  # one no-target expression in 80% of cases: about 12% of all expressions
KIND_SINGULAR = {"cyst": ("cyst", "hepatic cyst", "simple cyst"),
                 "hemangioma": ("hemangioma", "hepatic hemangioma"),
                 "hcc": ("HCC", "hepatocellular carcinoma"),
                 "metastasis": ("metastasis", "liver metastasis", "metastatic lesion")}
KIND_PLURAL = {"cyst": ("cysts", "hepatic cysts"),
               "hemangioma": ("hemangiomas", "hepatic hemangiomas"),
               "hcc": ("HCCs", "hepatocellular carcinomas"),
               "metastasis": ("metastases", "metastatic lesions")}
# Each attribute word names the kinds whose look it describes; the intensity profiles below honour these words.
ATTRIBUTE_KINDS = {"hypodense": ("cyst", "metastasis"),
                   "hyperdense": ("hemangioma", "hcc"),
                   "fluid-density": ("cyst",),
                   "peripherally enhancing": ("hemangioma",),
                   "heterogeneous": ("hcc",),
                   "encapsulated": ("hcc",),
                   "ring-enhancing": ("metastasis",),
                   "target-like": ("metastasis",)}
LOBE_PHRASES = ("in the {lobe} lobe", "in the {lobe} hepatic lobe", "in the {lobe} liver lobe")
HELDOUT_STREAM = 1  # the held-out wording draws from its own random stream: [seed, case index, HELDOUT_STREAM]
HELDOUT_ID_SUFFIX = "-h"


@dataclass(frozen=True)
class Phrasebook:
    """The words and templates of one phrasing set. Templates use {noun}, {plural}, {lobe}, {adjective} and {where}
    (a lobe phrase); a slot with one template draws no random number, so the seen dataset stays reproducible."""

    kind_singular: Mapping[str, tuple[str, ...]]
    kind_plural: Mapping[str, tuple[str, ...]]
    attribute_words: Mapping[str, tuple[str, ...]]  # per ATTRIBUTE_KINDS key
    lobe_phrases: tuple[str, ...]
    the_kind: tuple[str, ...]  # the only lesion of a kind (or none)
    largest_kind: tuple[str, ...]
    smallest_kind: tuple[str, ...]
    all_kind: tuple[str, ...]
    kind_in_lobe: tuple[str, ...]  # 0 or 1 lesion of a kind in a lobe
    kinds_in_lobe: tuple[str, ...]  # 2 or more
    largest: tuple[str, ...]
    smallest: tuple[str, ...]
    second_largest: tuple[str, ...]
    all_lesions: tuple[str, ...]
    no_lesion_in_lobe: tuple[str, ...]
    lesion_in_lobe: tuple[str, ...]
    lesions_in_lobe: tuple[str, ...]
    largest_in_lobe: tuple[str, ...]
    smallest_in_lobe: tuple[str, ...]
    attribute_one: tuple[str, ...]  # 0 or 1 lesion with the attribute
    attribute_all: tuple[str, ...]
    attribute_in_lobe: tuple[str, ...]


SEEN_PHRASEBOOK = Phrasebook(
    kind_singular=KIND_SINGULAR, kind_plural=KIND_PLURAL,
    attribute_words={adjective: (adjective,) for adjective in ATTRIBUTE_KINDS}, lobe_phrases=LOBE_PHRASES,
    the_kind=("the {noun}",), largest_kind=("the largest {noun}",), smallest_kind=("the smallest {noun}",),
    all_kind=("all {plural}", "all the {plural}", "every {noun}"),
    kind_in_lobe=("the {noun} {where}", "the {lobe}-lobe {noun}"), kinds_in_lobe=("all {plural} {where}",),
    largest=("the largest lesion", "the biggest lesion", "the largest liver lesion"),
    smallest=("the smallest lesion", "the tiniest lesion", "the smallest liver lesion"),
    second_largest=("the second largest lesion",),
    all_lesions=("all lesions", "every liver lesion", "all focal liver lesions"),
    no_lesion_in_lobe=("any lesion {where}", "the lesion {where}"),
    lesion_in_lobe=("the lesion {where}", "the only lesion {where}"),
    lesions_in_lobe=("all lesions {where}", "every lesion {where}"),
    largest_in_lobe=("the largest lesion {where}",), smallest_in_lobe=("the smallest lesion {where}",),
    attribute_one=("the {adjective} lesion",), attribute_all=("all {adjective} lesions",),
    attribute_in_lobe=("the {adjective} lesion {where}",))

# Validation and test wordings only (--heldout_phrasing): every synonym below is absent from the seen phrasebook, and
# every template differs from the seen ones, so a model can only answer them by generalising.
HELDOUT_SYNONYMS = {
    "kind_singular": {"cyst": ("fluid-filled cyst", "benign cyst"), "hemangioma": ("vascular tumour", "haemangioma"),
                      "hcc": ("primary liver cancer", "hepatoma"),
                      "metastasis": ("secondary deposit", "metastatic deposit")},
    "kind_plural": {"cyst": ("fluid-filled cysts", "benign cysts"),
                    "hemangioma": ("vascular tumours", "haemangiomas"),
                    "hcc": ("primary liver cancers", "hepatomas"),
                    "metastasis": ("secondary deposits", "metastatic deposits")},
    "attribute_words": {"hypodense": ("hypoattenuating", "low-attenuation"),
                        "hyperdense": ("hyperattenuating", "high-attenuation"),
                        "fluid-density": ("water-attenuation",),
                        "peripherally enhancing": ("globularly enhancing", "peripherally nodular"),
                        "heterogeneous": ("inhomogeneous", "mosaic-pattern"),
                        "encapsulated": ("capsule-bearing",),
                        "ring-enhancing": ("rim-enhancing",),
                        "target-like": ("targetoid", "bull's-eye")},
}
HELDOUT_PHRASEBOOK = Phrasebook(
    **HELDOUT_SYNONYMS,
    lobe_phrases=("located within the {lobe} lobe", "within the {lobe} lobe of the liver"),
    the_kind=("find the {noun}", "segment the {noun}", "show me the {noun}"),
    largest_kind=("the most sizeable {noun}", "the {noun} greatest in size"),
    smallest_kind=("the least voluminous {noun}", "the most diminutive {noun}"),
    all_kind=("show me every {noun}", "segment each {noun}", "find all {plural}"),
    kind_in_lobe=("find the {noun} {where}", "the {noun} {where}"),
    kinds_in_lobe=("every {noun} {where}", "{plural} of the {lobe} lobe"),
    largest=("which lesion is the largest?", "the lesion of greatest volume", "the most sizeable lesion"),
    smallest=("which lesion is the smallest?", "the least voluminous lesion", "the most diminutive lesion"),
    second_largest=("the second most sizeable lesion", "the lesion second in size"),
    all_lesions=("show me all lesions", "segment every lesion in the liver", "each and every lesion"),
    no_lesion_in_lobe=("find any lesion {where}", "lesions of the {lobe} lobe"),
    lesion_in_lobe=("segment the lesion {where}", "the sole lesion {where}"),
    lesions_in_lobe=("lesions of the {lobe} lobe", "show me every lesion {where}"),
    largest_in_lobe=("the most sizeable lesion {where}", "which lesion {where} is the largest?"),
    smallest_in_lobe=("the least voluminous lesion {where}", "which lesion {where} is the smallest?"),
    attribute_one=("find the {adjective} lesion", "segment the {adjective} lesion"),
    attribute_all=("show me every {adjective} lesion", "find all {adjective} lesions"),
    attribute_in_lobe=("find the {adjective} lesion {where}", "the {adjective} lesion {where}"))

@dataclass(frozen=True)
class SyntheticExpression:
    """One chosen expression: its report category, its seen and held-out wordings, and the region ids it means."""

    category: str
    text: str
    heldout_text: str
    targets: tuple[int, ...]



class _Candidate(NamedTuple):
    """One thing this case may be asked: its category, one wording, and the region ids it means."""

    category: str
    text: str
    targets: tuple[int, ...]


def _expression_candidates(lesions: Sequence[SyntheticLesion], book: Phrasebook,
                           rng: np.random.Generator) -> list[_Candidate]:
    """Every unambiguous (category, text, targets) for this case; singular phrases only where 0 or 1 lesion fits.

    The list's order, categories and targets depend on the lesions only, so the seen and held-out phrasebooks give
    aligned lists: entry i of one says in other words what entry i of the other says.
    """
    def ids(predicate: Callable[[SyntheticLesion], bool]) -> tuple[int, ...]:
        return tuple(sorted(lesion.region_id for lesion in lesions if predicate(lesion)))

    def pick(options: Sequence[str]) -> str:
        """One option; a single option draws nothing, so adding a slot to a phrasebook keeps older draws."""
        return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]

    def say(templates: Sequence[str], **values: str) -> str:
        """Fill every template (a fresh lobe phrase for each "{where}", drawn in template order), then pick one."""
        return pick([template.format(where=pick(book.lobe_phrases).format(lobe=values["lobe"])
                                     if "{where}" in template else "", **values) for template in templates])

    def by_size(predicate: Callable[[SyntheticLesion], bool]) -> list[SyntheticLesion]:
        return sorted((lesion for lesion in lesions if predicate(lesion)), key=lambda lesion: lesion.size_rank)

    candidates = []
    for kind in KINDS:
        noun, plural = pick(book.kind_singular[kind]), pick(book.kind_plural[kind])
        of_kind = by_size(lambda lesion: lesion.kind == kind)
        if len(of_kind) <= 1:
            candidates.append(_Candidate("kind", say(book.the_kind, noun=noun),
                                         ids(lambda lesion: lesion.kind == kind)))
        else:
            candidates.append(_Candidate("size", say(book.largest_kind, noun=noun), (of_kind[0].region_id,)))
            candidates.append(_Candidate("size", say(book.smallest_kind, noun=noun), (of_kind[-1].region_id,)))
        candidates.append(_Candidate("plural", say(book.all_kind, noun=noun, plural=plural),
                                     ids(lambda lesion: lesion.kind == kind)))
        for lobe in LOBES:
            targets = ids(lambda lesion: lesion.kind == kind and lesion.lobe == lobe)
            templates = book.kind_in_lobe if len(targets) <= 1 else book.kinds_in_lobe
            candidates.append(_Candidate("kind_lobe", say(templates, noun=noun, plural=plural, lobe=lobe), targets))

    ranked = by_size(lambda lesion: True)
    candidates.append(_Candidate("size", say(book.largest), (ranked[0].region_id,)))
    candidates.append(_Candidate("size", say(book.smallest), (ranked[-1].region_id,)))
    if len(ranked) >= 3:
        candidates.append(_Candidate("size", say(book.second_largest), (ranked[1].region_id,)))
    candidates.append(_Candidate("plural", say(book.all_lesions), ids(lambda lesion: True)))
    for lobe in LOBES:
        lobe_ranked = by_size(lambda lesion: lesion.lobe == lobe)
        targets = tuple(sorted(lesion.region_id for lesion in lobe_ranked))
        templates = {0: book.no_lesion_in_lobe, 1: book.lesion_in_lobe}.get(len(lobe_ranked), book.lesions_in_lobe)
        candidates.append(_Candidate("lobe", say(templates, lobe=lobe), targets))
        if len(lobe_ranked) > 1:
            candidates.append(_Candidate("size", say(book.largest_in_lobe, lobe=lobe), (lobe_ranked[0].region_id,)))
            candidates.append(_Candidate("size", say(book.smallest_in_lobe, lobe=lobe),
                                         (lobe_ranked[-1].region_id,)))

    for adjective, kinds in ATTRIBUTE_KINDS.items():
        word = pick(book.attribute_words[adjective])
        targets = ids(lambda lesion: lesion.kind in kinds)
        candidates.append(_Candidate("attribute", say(book.attribute_one if len(targets) <= 1 else book.attribute_all,
                                                      adjective=word), targets))
        for lobe in LOBES:
            targets = ids(lambda lesion: lesion.kind in kinds and lesion.lobe == lobe)
            if len(targets) == 1:
                candidates.append(_Candidate("attribute", say(book.attribute_in_lobe, adjective=word, lobe=lobe),
                                             targets))
    return candidates


def _choose_candidates(candidates: Sequence[_Candidate], rng: np.random.Generator) -> list[int]:
    """Indices of 5-8 candidates spread over the phrasing categories, at most one referring to nothing."""
    wanted = int(rng.integers(EXPRESSIONS_PER_CASE[0], EXPRESSIONS_PER_CASE[1] + 1))
    no_target = [index for index, candidate in enumerate(candidates) if not candidate.targets]
    chosen = []
    if no_target and rng.random() < NO_TARGET_CASE_PROBABILITY:
        chosen.append(no_target[int(rng.integers(len(no_target)))])
    by_category: dict[str, list[int]] = {}
    for index, candidate in enumerate(candidates):
        if candidate.targets:
            by_category.setdefault(candidate.category, []).append(index)
    pools = [by_category[category] for category in sorted(by_category)]
    for pool in pools:
        rng.shuffle(pool)
    rng.shuffle(pools)
    while len(chosen) < wanted and any(pools):  # round robin over categories, so the phrasing stays varied
        for pool in pools:
            if pool and len(chosen) < wanted:
                chosen.append(pool.pop())
    order = rng.permutation(len(chosen))
    return [chosen[index] for index in order]


def choose_expressions(lesions: Sequence[SyntheticLesion], rng: np.random.Generator,
                        heldout_rng: np.random.Generator) -> tuple[SyntheticExpression, ...]:
    """The case's expressions, each in seen and in held-out wording (the latter drawn from its own random stream,
    so that the seen dataset does not depend on the held-out phrasebook)."""
    seen = _expression_candidates(lesions, SEEN_PHRASEBOOK, rng)
    heldout = _expression_candidates(lesions, HELDOUT_PHRASEBOOK, heldout_rng)
    chosen = _choose_candidates(seen, rng)
    return tuple(SyntheticExpression(NO_TARGET_CATEGORY if not seen[index].targets else seen[index].category,
                                     seen[index].text, heldout[index].text, seen[index].targets) for index in chosen)


