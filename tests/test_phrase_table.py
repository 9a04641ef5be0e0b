"""The phrase table: interchangeable radiology wordings that rewrite the training expressions (text_conditioning/
phrases.py), so that a wording only the table knows is answered like the one it stands for."""
import json
import random

import numpy as np
import pytest

from text_conditioning.encoders import EncodedTexts
from text_conditioning.expressions import Expression
from text_conditioning.phrases import (PhraseTable, PhraseTableError, load_phrase_tables, read_phrase_table)

from lsms_nnunet.preprocessing.prompts import Prompt
from lsms_nnunet.selection.candidates import FindingAnswer
from lsms_nnunet.selection.evidence import TextFeatures, case_evidence, fitting_examples
from lsms_nnunet.selection.selector import choose, fit_selectors
from lsms_nnunet.selection.settings import CaseLevelSettings


def _table(tmp_path, groups, name="table.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": "lsms-phrase-table", "version": 1, "groups": groups}), encoding="utf-8")
    return path


def test_variants_swap_whole_phrases_of_one_group_longest_first():
    table = PhraseTable((("cyst", "fluid-filled cyst"), ("cysts", "fluid-filled cysts"),
                         ("largest", "biggest", "dominant"), ("left lobe", "left hemiliver"), ("lobe", "segment")))
    variants = table.variants("The largest cyst in the left lobe", 10)
    assert set(variants) == {"The biggest cyst in the left lobe", "The dominant cyst in the left lobe",
                             "The largest fluid-filled cyst in the left lobe", "The largest cyst in the left hemiliver"}
    assert table.variants("all cysts", 10) == ["all fluid-filled cysts"]  # "cyst" is no part of "cysts"
    assert table.variants("a non-cyst lesion", 10) == []  # nor of "non-cyst"
    assert table.variants("The largest cyst in the left lobe", 10) == variants  # deterministic
    two = table.variants("The largest cyst in the left lobe", 2)
    assert len(two) == 2 and len({v.split()[1] for v in two} - {"largest"}) <= 1  # two phrases swapped, not one twice
    assert table.variants("no table words", 4) == [] and table.variants("the largest cyst", 0) == []


def test_tables_load_merge_and_refuse_with_the_file_and_the_fix(tmp_path):
    shipped = load_phrase_tables(["shipped"])
    assert any("hepatoma" in group and "hcc" in group for group in shipped.groups)
    assert load_phrase_tables(["none"]).groups == ()
    mine = _table(tmp_path, [["HCC", "hepatocellular cancer"], ["kidney", "renal unit"]])
    merged = load_phrase_tables(["shipped", str(mine)])
    hcc = next(group for group in merged.groups if "hcc" in group)
    assert "hepatoma" in hcc and "hepatocellular cancer" in hcc  # groups sharing a phrase become one
    assert ("kidney", "renal unit") in merged.groups and merged.sha256 != shipped.sha256
    with pytest.raises(PhraseTableError, match=r"missing\.json: no such phrase table\. Fix"):
        load_phrase_tables([str(tmp_path / "missing.json")])
    with pytest.raises(PhraseTableError, match=r"'none' cannot be combined"):
        load_phrase_tables(["none", "shipped"])
    with pytest.raises(PhraseTableError, match=r"one\.json: group 1 .*one phrase only"):
        read_phrase_table(_table(tmp_path, [["a", "b"], ["Cyst", "cyst "]], "one.json"))
    with pytest.raises(PhraseTableError, match=r"short\.json: group 0 is \['cyst'\]; a group lists two or more"):
        read_phrase_table(_table(tmp_path, [["cyst"]], "short.json"))
    (tmp_path / "bad.json").write_text('{"groups": [["a", "b"]]}', encoding="utf-8")
    with pytest.raises(PhraseTableError, match=r"bad\.json: expected a JSON object with \"format\""):
        read_phrase_table(tmp_path / "bad.json")


def test_a_prompt_asks_its_rewrites_half_the_time():
    prompt = Prompt(("the largest cyst",), (1,), "e0", variants=("the biggest cyst", "the dominant cyst"))
    rng = random.Random(0)
    drawn = [prompt.draw_text(rng) for _ in range(2000)]
    assert 0.45 < drawn.count("the largest cyst") / len(drawn) < 0.55
    assert set(drawn) == {"the largest cyst", "the biggest cyst", "the dominant cyst"}
    assert {Prompt(("a",), (1,)).draw_text(rng) for _ in range(20)} == {"a"}


# -- the learning test: a synonym only the table knows, over cases of bright and dark lesions
WORDS = ("all", "the", "largest", "bright", "dark", "lesions", "lesion", "hyperdense", "hypodense")
WORD_VECTORS = {word: vector for word, vector in zip(WORDS, np.random.default_rng(11).normal(
    size=(len(WORDS), 16)).astype(np.float32))}


def _features(texts, vectors=WORD_VECTORS):
    tokens = [np.stack([vectors[w] for w in text.split()]) for text in texts]
    length = max(len(t) for t in tokens)
    padded = np.zeros((len(texts), length, 16), dtype=np.float32)
    mask = np.zeros((len(texts), length), dtype=bool)
    for row, t in enumerate(tokens):
        padded[row, :len(t)], mask[row, :len(t)] = t, True
    return TextFeatures(list(texts), EncodedTexts(tokens=padded, mask=mask, pooled=padded.mean(1), truncated=0))


class _Cases:
    def __init__(self, count: int, seed: int):
        rng = np.random.default_rng(seed)
        self.cases, self.bright = {}, {}
        for index in range(count):
            region_map = np.zeros((1, 48, 48), dtype=np.int16)
            image = np.full((1, 48, 48), 100.0, dtype=np.float32)
            bright = []
            for region, (row, column) in enumerate([(2, 2), (2, 26), (26, 2), (26, 26)][:int(rng.integers(2, 5))], 1):
                side = int(rng.integers(4, 12))
                region_map[0, row:row + side, column:column + side] = region
                bright.append(bool(rng.random() < 0.5))
                image[0, row:row + side, column:column + side] = 200.0 if bright[-1] else 20.0
            case = f"case_{seed}_{index}"
            self.cases[case], self.bright[case] = (image[None], region_map), bright

    def load_case(self, case: str):
        data, region_map = self.cases[case]
        return data, region_map[None], None, {}

    def expressions(self, bright_word: str, dark_word: str) -> list[Expression]:
        expressions = []
        for case, bright in self.bright.items():
            regions = np.arange(1, len(bright) + 1)
            for word, wanted in ((bright_word, np.asarray(bright)), (dark_word, ~np.asarray(bright))):
                expressions.append(Expression(f"{case}-{word}", case, f"all {word} lesions",
                                              targets=tuple(int(r) for r in regions[wanted])))
            expressions.append(Expression(f"{case}-all", case, "all lesions", targets=tuple(map(int, regions))))
        return expressions


def test_a_synonym_only_in_the_phrase_table_is_answered_like_its_seen_counterpart():
    """Fitted on "all bright/dark lesions" with a table saying bright = hyperdense and dark = hypodense, the stage
    answers "all hyperdense lesions" on new cases as it answers "all bright lesions"; fitted without the table, the
    unknown word leaves it guessing. Both over four draws of the unknown words' vectors: one draw can point along
    "bright" by chance (WORD_VECTORS' own did with other candidate descriptors), and is then answered without the
    table too."""
    table = PhraseTable((("bright", "hyperdense"), ("dark", "hypodense")))
    training, probe = _Cases(30, seed=1), _Cases(30, seed=2)
    fitted_expressions = training.expressions("bright", "dark")
    variants = {e.text: table.variants(e.text, 4) for e in fitted_expressions}
    assert variants["all bright lesions"] == ["all hyperdense lesions"]
    texts = sorted({e.text for e in fitted_expressions} | {"all hyperdense lesions", "all hypodense lesions"})
    settings = CaseLevelSettings(fit_steps=150, operations_first_steps=30)

    def accuracy(with_table: bool, vectors: dict) -> tuple[float, float]:
        features = _features(texts, vectors)
        evidence = case_evidence(training, sorted(training.cases), fitted_expressions, features, (1.0, 1.0),
                                 settings=settings, variants=variants if with_table else None)
        selectors = fit_selectors(fitting_examples(evidence), settings, members=1, log=lambda *_: None)[0]
        scores = []
        for words in (("bright", "dark"), ("hyperdense", "hypodense")):
            asked = [e for e in probe.expressions(*words) if not e.id.endswith("-all")]
            examples = fitting_examples(case_evidence(probe, sorted(probe.cases), asked, features, (1.0, 1.0),
                                                      settings=settings))
            scores.append(float(np.mean([np.array_equal(answer, example.referred)
                                         for answer, example in zip(choose(selectors, examples), examples)])))
        return scores[0], scores[1]

    draws = [np.random.default_rng(100 + draw).normal(size=(2, 16)).astype(np.float32) for draw in range(4)]
    vectors = [{**WORD_VECTORS, "hyperdense": unknown[0], "hypodense": unknown[1]} for unknown in draws]
    with_table = [accuracy(True, v) for v in vectors]
    seen, synonym = np.mean(with_table, axis=0)
    assert seen >= 0.9 and synonym >= seen - 0.05, with_table
    without = [accuracy(False, v) for v in vectors]
    seen_without, synonym_without = np.mean(without, axis=0)
    assert seen_without >= 0.9 and synonym_without <= 0.7, without


def test_the_verdict_refits_on_the_written_expressions_and_the_stage_fits_their_rewrites_too(monkeypatch):
    """The rewrites teach the stage wording (fitting_examples holds them), over the candidates inference sees (the
    network's); the verdict scores written expressions, so its refits read those alone."""
    from lsms_nnunet.selection import evidence as evidence_module
    from lsms_nnunet.selection.evidence import ScoredExpression, cross_validated_verdict

    table = PhraseTable((("bright", "hyperdense"), ("dark", "hypodense")))
    cases = _Cases(6, seed=3)
    written = cases.expressions("bright", "dark")
    variants = {e.text: table.variants(e.text, 4) for e in written}
    texts = sorted({e.text for e in written} | {v for vs in variants.values() for v in vs})
    settings = CaseLevelSettings(fit_steps=4, operations_first_steps=1, verdict_folds=2)
    # the network's finding answer: the true lesions, confidently (a second candidate set beside the true one)
    found_by_network = lambda data: FindingAnswer(np.where(data[0] != 100, 6.0, -6.0).astype(np.float32))  # noqa: E731
    evidence = case_evidence(cases, sorted(cases.cases), written, _features(texts), (1.0, 1.0), settings=settings,
                             variants=variants, network_finding=found_by_network)
    for case, found in evidence.items():  # rewrites over the network's candidates only: its examples' second half
        over_network = {example.expression: example for example in found.examples[len(found.examples) // 2:]}
        assert len(found.rewrites) == sum(len(variants[e.text]) for e in written if e.case == case)
        for rewrite in found.rewrites:
            assert rewrite.descriptors is over_network[rewrite.expression.split("\n")[0]].descriptors
    for found in evidence.values():
        found.scored = [ScoredExpression(example, np.ones(len(example.volumes)), example.referred.astype(float),
                                         int(example.referred.sum()), 0.5)
                        for example in found.examples[len(found.examples) // 2:]]
    assert {example.expression for example in fitting_examples(evidence)} == \
        {e.id for e in written} | {f"{e.id}\n{v}" for e in written for v in variants[e.text]}
    refitted_on, fit = [], evidence_module.fit_selectors

    def recording_fit(examples, *args, **kwargs):
        refitted_on.append(examples)
        return fit(examples, *args, **kwargs)

    monkeypatch.setattr(evidence_module, "fit_selectors", recording_fit)
    verdict = cross_validated_verdict(evidence, settings, log=lambda *_: None)
    assert verdict is not None and verdict.expressions == len(written)
    assert sorted({example.expression for example in refitted_on[0]}) == sorted(e.id for e in written)
