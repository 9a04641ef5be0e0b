"""The case-level selector: lesion candidates, their descriptors, and set operations learned from few examples.

The learning tests are micro tasks in the style of test_text_is_learned.py (real optimisation, seconds): "the
largest/smallest/second largest (bright or dark) lesion" over random cases in which only the volumes tell the
answer, with word vectors standing in for a text encoder, and combinations of words never seen together in
fitting.
"""
import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from text_conditioning.encoders import EncodedTexts
from text_conditioning.expressions import Expression

from lsms_nnunet.selection.candidates import (INTENSITY_FEATURES, FindingAnswer, describe_candidates, find_candidates,
                                              referred_fraction)
from lsms_nnunet.selection.evidence import (TextFeatures, Verdict, case_evidence, cross_validated_verdict,
                                            selection_examples, verdict_expressions)
from lsms_nnunet.selection.selector import (OPERATIONS, CaseSelector, SelectionBatch, SelectionExample,
                                            _over_common_orderings, choose, fit_selectors, member_words_read)
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.selection.stage import (STAGE_FILE, STAGE_STATE_KEY, CaseLevelStage,
                                         CaseLevelStageError, stage_for_prediction, weights_identity)

DEFAULTS = CaseLevelSettings()
LOGIT_CEILING, LOGIT_SEED_HEIGHT = DEFAULTS.logit_ceiling, DEFAULTS.logit_seed_height
LOGIT_SMOOTHING_VOXELS, MIN_CANDIDATE_VOXELS = DEFAULTS.logit_smoothing_voxels, DEFAULTS.min_candidate_voxels
WORDS = ("the", "all", "largest", "smallest", "second", "bright", "dark", "lesion", "lesions")
rng_words = np.random.default_rng(7)
WORD_VECTORS = {word: rng_words.normal(size=16).astype(np.float32) for word in WORDS}


def _words(sentence: str) -> np.ndarray:
    return np.stack([WORD_VECTORS[w] for w in sentence.split()])


def _answer(sentence: str, bright: np.ndarray, volumes: np.ndarray) -> np.ndarray:
    wanted = bright if "bright" in sentence else ~bright if "dark" in sentence else np.ones_like(bright)
    order = [i for i in np.argsort(-volumes) if wanted[i]]
    answer = np.zeros(len(volumes), dtype=bool)
    if "second" in sentence:
        answer[order[1:2]] = True
    elif "largest" in sentence:
        answer[order[:1]] = True
    elif "smallest" in sentence:
        answer[order[-1:]] = True
    else:
        answer[order] = True
    return answer


def _example(sentence: str, rng: np.random.Generator) -> SelectionExample:
    count = int(rng.integers(2, 6))
    bright = rng.random(count) < 0.5
    volumes = rng.permutation(np.geomspace(20, 400, count)) * rng.uniform(0.8, 1.2)
    descriptors = np.stack([np.where(bright, 1.0, -1.0) + 0.1 * rng.normal(size=count),
                            rng.normal(size=count)], axis=1).astype(np.float32)  # brightness, an irrelevant feature
    return SelectionExample(descriptors, volumes, _words(sentence), _answer(sentence, bright, volumes))


def fit_selector(examples, steps: int = DEFAULTS.fit_steps) -> CaseSelector:
    """One selector (seed 0) fitted with the default settings but `steps`."""
    settings = CaseLevelSettings(fit_steps=steps, operations_first_steps=min(DEFAULTS.operations_first_steps, steps))
    return fit_selectors(examples, settings, members=1, log=lambda *_: None)[0][0]


def _stage(selectors, **settings) -> CaseLevelStage:
    return CaseLevelStage(CaseLevelSettings(**settings), list(selectors), "abc")


def _accuracy(selector, examples) -> float:
    return float(np.mean([np.array_equal(answer, e.referred) for answer, e in zip(choose([selector], examples),
                                                                                   examples)]))


def test_selector_learns_size_relations_and_combines_them_with_a_description():
    fitted = ["the largest lesion", "the smallest lesion", "the second largest lesion", "all bright lesions",
              "all dark lesions", "the largest bright lesion", "the smallest dark lesion"]
    unseen_combinations = ["the smallest bright lesion", "the largest dark lesion"]
    rng = np.random.default_rng(0)
    training = [_example(sentence, rng) for _ in range(40) for sentence in fitted]
    selector = fit_selector(training, steps=500)
    for sentence in fitted:
        assert _accuracy(selector, [_example(sentence, rng) for _ in range(40)]) >= 0.9, sentence
    for sentence in unseen_combinations:
        assert _accuracy(selector, [_example(sentence, rng) for _ in range(40)]) >= 0.8, sentence


SUPERLATIVE_WORDS = {word: vector for word, vector in zip(
    "the all largest smallest second most cranial lowest brightest darkest lesion lesions".split(),
    np.random.default_rng(3).normal(size=(12, 16)).astype(np.float32))}
#: descriptor_superlatives is opt-in, with bounded votes learned at their own rate (settings.py)
SUPERLATIVE_SETTINGS = dict(descriptor_superlatives=True, vote_bound=8.0, vote_learning_rate=1e-2)
SUPERLATIVES = ["the largest lesion", "the smallest lesion", "the second largest lesion", "the most cranial lesion",
                "the lowest lesion", "the brightest lesion", "the darkest lesion", "all lesions"]


def _superlative_example(sentence: str, rng: np.random.Generator) -> SelectionExample:
    """Candidates described by their height (z), brightness and a feature that means nothing; each sentence refers
    to the extreme of one of them or of volume (or to the second largest, or to all)."""
    count = int(rng.integers(2, 6))
    volumes = rng.permutation(np.geomspace(20, 400, count)) * rng.uniform(0.8, 1.2)
    height, brightness = rng.uniform(-1, 1, count), rng.normal(size=count)
    descriptors = np.stack([height, brightness, rng.normal(size=count)], axis=1).astype(np.float32)
    order_of = {"largest": volumes, "smallest": -volumes, "cranial": height, "lowest": -height,
                "brightest": brightness, "darkest": -brightness}
    referred = np.zeros(count, dtype=bool)
    if sentence.startswith("all"):
        referred[:] = True
    elif "second" in sentence:
        referred[np.argsort(-volumes)[1]] = True
    else:
        referred[np.argmax(order_of[next(word for word in order_of if word in sentence)])] = True
    return SelectionExample(descriptors, volumes, np.stack([SUPERLATIVE_WORDS[w] for w in sentence.split()]),
                            referred)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_superlative_is_the_extreme_of_what_its_words_choose(seed):
    """"The most cranial", "the lowest", "the brightest", "the darkest" lesion: the extreme of a descriptor the words
    choose (learned which), beside the size superlatives and "second largest"; ordering by volume alone cannot."""
    rng = np.random.default_rng(seed)
    training = [_superlative_example(sentence, rng) for _ in range(30) for sentence in SUPERLATIVES]
    probes = {sentence: [_superlative_example(sentence, rng) for _ in range(40)] for sentence in SUPERLATIVES}

    def accuracy(members: int, **settings) -> dict:
        settings = CaseLevelSettings(**{**SUPERLATIVE_SETTINGS, **settings})
        selectors = fit_selectors(training, settings, members, log=lambda *_: None)[0]
        return {sentence: float(np.mean([np.array_equal(answer, e.referred) for answer, e in
                                         zip(choose(selectors, examples), examples)]))
                for sentence, examples in probes.items()}

    learned = accuracy(members=DEFAULTS.ensemble_members)  # as the stage fits them
    assert all(score >= 0.9 for score in learned.values()), learned
    by_volume = accuracy(members=1, descriptor_superlatives=False)
    assert by_volume["the most cranial lesion"] <= 0.6 and by_volume["the brightest lesion"] <= 0.6, by_volume


class _FixedSelector(CaseSelector):
    """Answers with given per-operation probabilities, to test the decision rule alone."""

    def __init__(self, by_operation: torch.Tensor, operation: str):
        super().__init__(1, 1)
        self.fixed = by_operation, torch.log(torch.nn.functional.one_hot(
            torch.tensor([OPERATIONS.index(operation)]), len(OPERATIONS)).float().clamp_min(1e-6))

    def forward(self, *inputs, words_read=None):
        return self.fixed


def test_a_superlative_answers_with_one_candidate_when_one_is_likely_meant():
    example = [SelectionExample(np.zeros((3, 1), np.float32), np.array([30.0, 20.0, 10.0]), np.ones((2, 1)))]
    split_between_two = torch.zeros(1, 3, len(OPERATIONS))
    split_between_two[0, :, OPERATIONS.index("second_largest")] = torch.tensor([0.0, 0.35, 0.3])
    assert choose([_FixedSelector(split_between_two, "second_largest")], example)[0].tolist() == [False, True, False]
    unlikely = split_between_two * 0.5  # any meant with chance 0.325: nothing is referred
    assert not choose([_FixedSelector(unlikely, "second_largest")], example)[0].any()
    plural = torch.zeros(1, 3, len(OPERATIONS))
    plural[0, :, 0] = torch.tensor([0.9, 0.6, 0.3])
    assert choose([_FixedSelector(plural, "all")], example)[0].tolist() == [True, True, False]


def test_candidates_are_components_without_speckles_and_know_what_is_referred():
    regions = np.zeros((1, 20, 20), dtype=np.int16)
    regions[0, 2:6, 2:6] = 3  # 16 voxels
    regions[0, 10:12, 10:14] = 1  # 8 voxels
    regions[0, 10:12, 14:16] = 2  # touches region 1: one candidate, mostly region 1
    regions[0, 18, 18] = 4  # a speckle below MIN_CANDIDATE_VOXELS
    candidates = find_candidates(regions > 0, (1.0, 2.0, 1.0))
    referred = referred_fraction(candidates, regions, targets=[1]) > 0.5
    assert candidates.count == 2
    assert sorted(candidates.volumes_mm3) == [2 * 12, 2 * 16]
    assert referred[candidates.labels[0, 10, 10] - 1] and not referred[candidates.labels[0, 3, 3] - 1]
    assert MIN_CANDIDATE_VOXELS > 1 and candidates.labels[0, 18, 18] == 0
    image = np.where(regions > 0, 100.0, 0.0)[None].astype(np.float32)
    descriptors = describe_candidates(image, candidates, (1.0, 2.0, 1.0))
    assert descriptors.shape == (2, 3 + len(INTENSITY_FEATURES))
    contrast = descriptors[:, -1]
    assert np.allclose(contrast, 100.0)  # lesion 100, surrounding tissue 0


def test_touching_lesions_are_separate_candidates_and_one_lesion_stays_whole():
    yy, xx = np.mgrid[:40, :40]
    touching = (((yy - 12) ** 2 + (xx - 12) ** 2 <= 36) | ((yy - 12) ** 2 + (xx - 24) ** 2 <= 25))[None]
    candidates = find_candidates(touching, (1.0, 1.0, 1.0))
    assert candidates.count == 2
    assert candidates.labels[0, 12, 12] != candidates.labels[0, 12, 24]
    elongated = np.zeros((1, 40, 40), dtype=bool)
    elongated[0, 5:15, 5:30] = True
    assert find_candidates(elongated, (1.0, 1.0, 1.0)).count == 1


def test_the_network_answer_is_split_along_its_own_logits():
    """Two lesions the finding answer bridges into one even band (no distance valley) are two candidates when the
    logits dip between them; one lesion of even confidence stays whole."""
    yy, xx = np.mgrid[:40, :40]
    band = np.zeros((40, 40), dtype=bool)
    band[15:25, 5:31] = True
    peaks = np.exp(-((yy - 20) ** 2 + (xx - 11) ** 2) / 20.0) + np.exp(-((yy - 20) ** 2 + (xx - 25) ** 2) / 20.0)
    logits = np.where(band, 0.5 + 6.0 * peaks, -5.0)[None].astype(np.float32)
    mask = logits > 0
    assert find_candidates(mask, (1.0, 1.0, 1.0)).count == 1  # the distance split sees one lesion
    candidates = find_candidates(mask, (1.0, 1.0, 1.0), logits)
    assert candidates.count == 2 and candidates.labels[0, 20, 11] != candidates.labels[0, 20, 25]
    assert abs(candidates.volumes_mm3[0] - candidates.volumes_mm3[1]) <= 20  # split at the valley, in the middle
    even = np.where(mask, 5.0, -5.0).astype(np.float32)
    assert find_candidates(mask, (1.0, 1.0, 1.0), even).count == 1


def test_a_lesion_the_network_is_sure_of_stays_whole_however_uneven_its_confidence():
    """Logits above the ceiling that rise and fall inside one lesion (two summits 12 voxels apart, a valley ~10 below
    them) are one candidate; the same relief at half height below the ceiling, a valley between two bridged lesions,
    splits."""
    yy, xx = np.mgrid[:40, :40]
    disk = (yy - 20) ** 2 + (xx - 20) ** 2 <= 100
    summits = np.exp(-((yy - 20) ** 2 + (xx - 14) ** 2) / 8.0) + np.exp(-((yy - 20) ** 2 + (xx - 26) ** 2) / 8.0)
    relief = 10.0 * summits
    sure = np.where(disk, LOGIT_CEILING + 2.0 + relief, -5.0)[None].astype(np.float32)
    assert find_candidates(sure > 0, (1.0, 1.0, 1.0), sure).count == 1
    unsure = np.where(disk, 0.5 + 0.5 * relief, -5.0)[None].astype(np.float32)
    assert unsure.max() < LOGIT_CEILING
    assert find_candidates(unsure > 0, (1.0, 1.0, 1.0), unsure).count == 2


@pytest.mark.parametrize("shape, contrast, offset", [((1, 64, 64), 40.0, 2.0), ((12, 40, 40), 10.0, 0.5)])
def test_splitting_inside_the_lesions_box_equals_splitting_the_whole_image(shape, contrast, offset):
    """Oracle: the seeded watershed of the whole image capped and smoothed whole, as the candidates' definition states
    it (the background a seed height below the lowest elevation, so that every component, however faint, keeps a
    seed)."""
    rng = np.random.default_rng(3)
    logits = (ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * contrast - offset).astype(np.float32)
    logits[..., :shape[-1] // 3] = -6.0  # lesions far from one border, touching the others
    mask = logits > 0
    smoothed = ndimage.gaussian_filter(np.minimum(logits, LOGIT_CEILING), LOGIT_SMOOTHING_VOXELS)
    elevation = np.where(mask, smoothed, smoothed.min() - LOGIT_SEED_HEIGHT)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    reference = watershed(-elevation, ndimage.label(h_maxima(elevation, LOGIT_SEED_HEIGHT) & mask, structure)[0],
                          mask=mask)
    sizes = np.bincount(reference.ravel())
    reference[np.isin(reference, np.flatnonzero(sizes < MIN_CANDIDATE_VOXELS))] = 0
    candidates = find_candidates(mask, (1.0,) * len(shape), logits)
    assert candidates.count == len(np.unique(reference)) - 1 >= 3
    pairs = np.unique(np.stack([reference.ravel(), candidates.labels.ravel()]), axis=1)
    assert pairs.shape[1] == candidates.count + 1  # the same partition, numbered alike or not


def test_a_faint_lesion_of_the_answer_stays_a_candidate():
    """A component barely above the threshold, in an image whose logits are nowhere far below it, is still a
    candidate: seeds rise from a floor below every lesion voxel, not from the image's own lowest logit."""
    logits = np.full((1, 30, 30), -0.5, dtype=np.float32)
    logits[0, 5:10, 5:10] = 0.5  # faint
    logits[0, 18:26, 18:26] = 8.0  # confident
    candidates = find_candidates(logits > 0, (1.0, 1.0, 1.0), logits)
    assert candidates.count == 2 and candidates.labels[0, 7, 7] > 0


def _size_only_example(sentence: str, width: int, rng: np.random.Generator) -> SelectionExample:
    count = int(rng.integers(2, 6))
    volumes = rng.permutation(np.geomspace(20, 400, count))
    return SelectionExample(rng.normal(size=(count, width)).astype(np.float32), volumes, _words(sentence),
                            _answer(sentence, np.ones(count, dtype=bool), volumes))


def test_operation_votes_read_an_unseen_word_as_its_nearest_fitted_word():
    """After fitting, a word never fitted (nearest to "smallest", the rest a new direction) casts the operation vote
    of "smallest" itself; the match still reads the raw word. Without the vocabulary its vote differs."""
    rng = np.random.default_rng(4)
    examples = [_size_only_example(sentence, 4, rng) for sentence in ("the largest lesion", "the smallest lesion",
                                                                      "all lesions") for _ in range(20)]
    selector = fit_selector(examples)
    smallest = WORD_VECTORS["smallest"]
    other = rng.normal(size=smallest.shape)
    other -= other @ smallest / (smallest @ smallest) * smallest
    unseen = (0.7 * smallest + 0.71 * other / np.linalg.norm(other) * np.linalg.norm(smallest)).astype(np.float32)
    case = _size_only_example("the smallest lesion", 4, rng)

    def operation_weights(fitted: CaseSelector, middle_word: np.ndarray) -> torch.Tensor:
        words = np.stack([WORD_VECTORS["the"], middle_word, WORD_VECTORS["lesion"]])
        inputs = SelectionBatch.of([SelectionExample(case.descriptors, case.volumes, words)]).inputs()
        with torch.no_grad():  # the operation's weight, summed over what a superlative orders by
            return fitted(*inputs)[1].exp().reshape(len(OPERATIONS), -1).sum(-1)

    assert torch.allclose(operation_weights(selector, unseen), operation_weights(selector, smallest), atol=1e-3)
    selector.vocabulary = torch.zeros(0, selector.text_dim)
    raw_gap = (operation_weights(selector, unseen) - operation_weights(selector, smallest)).abs().max()
    assert raw_gap > 5e-3  # five times what snapping leaves


def test_a_word_never_fitted_added_to_known_words_keeps_their_answer():
    """An unknown word (a random direction, like "kindly" or "focal" to a text encoder) added to a fitted sentence
    leaves its answer as it was: the word is unlike every fitted word, so it neither constrains nor votes. Read raw,
    the same words change a third of the answers and empty one in six (the no-target answer wins)."""
    fitted = ["the largest lesion", "the smallest lesion", "the second largest lesion", "all bright lesions",
              "all dark lesions", "the largest bright lesion", "the smallest dark lesion", "all lesions"]
    rng = np.random.default_rng(0)
    selector = fit_selector([_example(sentence, rng) for _ in range(40) for sentence in fitted])
    probes = np.random.default_rng(5)
    unknown_words = [probes.normal(size=16).astype(np.float32) for _ in range(12)]
    cases = [_example(sentence, probes) for sentence in fitted for _ in range(8)]

    def agreement(familiarity: bool) -> tuple[float, float]:
        selector.word_familiarity = familiarity
        known = choose([selector], cases)
        same, emptied = [], []
        for unknown in unknown_words:
            added = choose([selector], [SelectionExample(case.descriptors, case.volumes,
                                                         np.vstack([unknown[None], case.words])) for case in cases])
            same += [np.array_equal(a, k) for a, k in zip(added, known)]
            emptied += [k.any() and not a.any() for a, k in zip(added, known)]
        return float(np.mean(same)), float(np.mean(emptied))

    snapped_same, snapped_emptied = agreement(True)
    raw_same, raw_emptied = agreement(False)
    assert snapped_same >= 0.9 and snapped_emptied <= 0.05, (snapped_same, snapped_emptied)
    assert raw_same <= 0.8 and raw_emptied >= 0.08, (raw_same, raw_emptied)  # what the familiarity prevents


def test_the_stage_answers_with_whole_finding_components():
    """Two found lesions; the selector answers "the largest/smallest lesion" with one whole finding component."""
    finding = torch.full((1, 32, 32), -5.0)
    finding[0, 2:12, 2:12] = 3.0  # the larger lesion
    finding[0, 20:25, 20:25] = 2.0  # the smaller one
    data = torch.rand(1, 1, 32, 32)
    texts = ["the largest lesion", "the smallest lesion"]
    width = 3 + len(INTENSITY_FEATURES)  # position (3 axes) + one channel's intensity statistics
    rng = np.random.default_rng(1)
    # 100 draws per text: with fewer, the match fits the random descriptors (30 draws: 65-85% of new draws right)
    selector = fit_selector([_size_only_example(t, width, rng) for _ in range(100) for t in texts])
    words = [np.stack([WORD_VECTORS[w] for w in t.split()]) for t in texts]
    encoded = EncodedTexts(tokens=np.stack(words), mask=np.ones((2, 3), dtype=bool),
                           pooled=np.stack([w.mean(0) for w in words]), truncated=0)
    answers = _stage([selector]).apply(FindingAnswer(finding), data, texts, TextFeatures(texts, encoded), (1.0, 1.0))
    largest, smallest = (answers > 0).numpy()
    assert largest[0, 2:12, 2:12].all() and largest.sum() == 100
    assert smallest[0, 20:25, 20:25].all() and smallest.sum() == 25


def test_stage_round_trip_keeps_settings_verdict_and_answers(tmp_path):
    rng = np.random.default_rng(2)
    examples = [_size_only_example("the largest lesion", 4, rng) for _ in range(10)]
    selector = fit_selector(examples, steps=20)
    stage = _stage([selector], logit_ceiling=6.0, fit_steps=20, operations_first_steps=5)
    stage.verdicts = {"this fold": Verdict(0.7, 0.5, 12)}
    stage.save(tmp_path / STAGE_FILE)
    loaded = CaseLevelStage.load(tmp_path / STAGE_FILE, "abc")
    assert loaded.settings == stage.settings and loaded.settings.logit_ceiling == 6.0
    assert list(loaded.verdicts.values()) == [Verdict(0.7, 0.5, 12)] and loaded.answers
    assert all(torch.equal(value, loaded.selectors[0].state_dict()[key])
               for key, value in selector.state_dict().items())
    assert torch.allclose(loaded.selectors[0].vocabulary, selector.vocabulary, atol=1e-2)
    assert len(selector.vocabulary) == 3
    assert all(np.array_equal(a, b) for a, b in zip(choose([selector], examples), choose(loaded.selectors, examples)))
    with pytest.raises(CaseLevelStageError, match="another text encoder"):
        CaseLevelStage.load(tmp_path / STAGE_FILE, "other")
    earlier_version = {**stage.to_payload(), "version": 1}
    torch.save(earlier_version, tmp_path / STAGE_FILE)
    with pytest.raises(CaseLevelStageError,
                       match=r"no case-level stage of version 2/3/4/5/6\. Fix: .*LSMSv2_fit_case_level"):
        CaseLevelStage.load(tmp_path / STAGE_FILE, "abc")
    unknown = {**stage.to_payload(), "settings": {"logit_cieling": 6.0}}
    with pytest.raises(CaseLevelStageError, match=r"the checkpoint: unknown case-level setting.*logit_cieling.*"
                                                  r"Fix: refit it with LSMSv2_fit_case_level"):
        CaseLevelStage.from_payload(unknown, "abc", "the checkpoint")
    (tmp_path / "damaged.pt").write_bytes((tmp_path / STAGE_FILE).read_bytes()[:200])  # a truncated stage
    with pytest.raises(CaseLevelStageError, match=r"damaged\.pt is not a readable case-level stage.*Fix: delete"):
        CaseLevelStage.load(tmp_path / "damaged.pt", "abc")


def test_members_of_one_fitting_share_their_vocabulary_and_folds_keep_theirs():
    rng = np.random.default_rng(2)
    two_members = fit_selectors([_size_only_example("the largest lesion", 4, rng) for _ in range(10)],
                                CaseLevelSettings(fit_steps=20, operations_first_steps=5), members=2)[0]
    other = fit_selector([_size_only_example("the smallest lesion", 4, rng) for _ in range(10)], steps=20)
    folds = two_members + [other]
    rows = SelectionBatch.of([_size_only_example("the second lesion", 4, rng)]).word_rows
    words_read = member_words_read(folds, rows)
    assert words_read[0] is words_read[1] and words_read[2] is not words_read[0]
    assert all(torch.allclose(shared[0], member.read_words(rows)[0]) for shared, member in zip(words_read, folds))


def test_a_stage_fitted_before_the_stage_refactor_answers_exactly_as_it_did():
    """tests/data/case_level_stage_07f87bd.pt: a selector payload (format 2, no settings recorded) fitted by the code
    of commit 07f87bd, an image with its finding logits, seven texts, and the logits that code answered with."""
    from pathlib import Path

    reference = torch.load(Path(__file__).parent / "data" / "case_level_stage_07f87bd.pt", weights_only=True)
    stage = CaseLevelStage.from_payload(reference["payload"], "abc", "the reference")
    assert stage.settings == CaseLevelSettings(word_familiarity=False, snap_match=False, phrase_variants=0,
                                               descriptor_superlatives=False, vote_bound=0.0,
                                               vote_learning_rate=1e-3)
    assert len(stage.selectors) == 3 and stage.answers
    tokens, mask = reference["tokens"].numpy(), reference["token_mask"].numpy()
    encoded = EncodedTexts(tokens=tokens, mask=mask, pooled=tokens.mean(1), truncated=0)
    answer = stage.apply(FindingAnswer(reference["finding_logits"]), reference["data"], reference["texts"],
                         TextFeatures(reference["texts"], encoded), reference["spacing"])
    assert torch.equal(answer, reference["answer_logits"])
    assert len({tuple((answer[i] > 0).flatten().tolist()) for i in range(len(answer))}) >= 4  # answers differ


def test_selectors_fitted_together_each_fit_their_own_subset():
    """Two subsets fitted in one batched optimisation: one sees only "the largest lesion", the other only "the
    smallest lesion", both worded "the lesion": each answers as its own subset taught it."""
    rng = np.random.default_rng(8)
    largest = [_size_only_example("the largest lesion", 4, rng) for _ in range(30)]
    smallest = [_size_only_example("the smallest lesion", 4, rng) for _ in range(30)]
    neutral = [SelectionExample(e.descriptors, e.volumes, _words("the lesion"), e.referred) for e in largest + smallest]
    only_largest = np.arange(60) < 30
    fitted = fit_selectors(neutral, CaseLevelSettings(fit_steps=150), members=1,
                           subsets=[only_largest, ~only_largest])
    tests = [SelectionExample(e.descriptors, e.volumes, _words("the lesion")) for e in
             [_size_only_example("the largest lesion", 4, rng) for _ in range(20)]]
    for selectors, operation in zip(fitted, (np.argmax, np.argmin)):
        answers = choose(selectors, tests)
        assert np.mean([answer.sum() == 1 and answer[operation(e.volumes)] for answer, e in zip(answers, tests)]) \
            >= 0.9


def test_fold_stages_come_from_the_checkpoint_else_the_file_else_none(tmp_path, capsys):
    rng = np.random.default_rng(3)
    selector = fit_selector([_size_only_example("the largest lesion", 4, rng) for _ in range(4)], steps=5)
    in_checkpoint = {"_extra_state": {STAGE_STATE_KEY: _stage([selector]).to_payload()}}
    (tmp_path / "fold_1").mkdir()
    _stage([selector, selector]).save(tmp_path / "fold_1" / STAGE_FILE)  # validated before checkpoints carried it
    stage = stage_for_prediction(tmp_path, [0, 1], [in_checkpoint, {"_extra_state": {}}], "abc")
    assert len(stage.selectors) == 3 and stage.answers
    log = capsys.readouterr().out
    assert "no case selector" not in log and "answered by the case-level stage" in log
    assert stage_for_prediction(tmp_path, [0, 2], [in_checkpoint, {"_extra_state": {}}], "abc") is None
    warning = capsys.readouterr().out
    assert "no case selector" in warning and "fold_2" in warning and "LSMSv2_fit_case_level" in warning


def test_a_stage_fitted_on_other_weights_is_refused():
    """A stage records the weights it was fitted on: beside or inside a checkpoint of other weights, or with
    folds that find candidates differently, it is refused with the fix."""
    rng = np.random.default_rng(3)
    selector = fit_selector([_size_only_example("the largest lesion", 4, rng) for _ in range(4)], steps=5)
    weights = {"encoder.weight": torch.ones(3, 3), "_extra_state": {}}
    stage = _stage([selector])
    stage.fitted_on = weights_identity(weights)
    own = {**weights, "_extra_state": {STAGE_STATE_KEY: stage.to_payload()}}
    assert weights_identity(own) == stage.fitted_on  # the stage itself is not part of the identity
    assert stage_for_prediction("unused", [0], [own], "abc", log=lambda *_: None) is not None
    retrained = {"encoder.weight": torch.full((3, 3), 2.0), "_extra_state": {STAGE_STATE_KEY: stage.to_payload()}}
    with pytest.raises(CaseLevelStageError, match=r"fitted on other weights .* fold 0 .* LSMSv2_fit_case_level"):
        stage_for_prediction("unused", [0], [retrained], "abc")
    other_split = _stage([selector], logit_ceiling=4.0).to_payload()
    with pytest.raises(CaseLevelStageError, match="logit_ceiling"):
        stage_for_prediction("unused", [0, 1], [own, {"_extra_state": {STAGE_STATE_KEY: other_split}}], "abc")


def test_case_level_settings_are_checked_and_read_from_json(tmp_path):
    with pytest.raises(ValueError, match="dropout"):
        CaseLevelSettings(dropout=1.5)
    with pytest.raises(ValueError, match="operations_first_steps"):
        CaseLevelSettings(fit_steps=10, operations_first_steps=20)
    with pytest.raises(ValueError, match="integer"):
        CaseLevelSettings(fit_steps=10.5)
    with pytest.raises(ValueError, match="organ_relative must be true or false"):
        CaseLevelSettings(organ_relative=1)
    with pytest.raises(ValueError, match="must be a number"):
        CaseLevelSettings(fit_steps=True)
    changes = tmp_path / "settings.json"
    changes.write_text('{"logit_ceiling": 6, "fit_steps": 100}')
    base = CaseLevelSettings(ensemble_members=2)
    assert CaseLevelSettings.from_json_file(changes, base) == CaseLevelSettings(logit_ceiling=6.0, fit_steps=100,
                                                                               ensemble_members=2)
    changes.write_text('{"logit_cieling": 6}')
    with pytest.raises(ValueError, match=r"settings\.json: unknown case-level setting.*logit_cieling"):
        CaseLevelSettings.from_json_file(changes)


class _OneCaseDataset:
    """nnU-Net's dataset interface for one preprocessed case: data [1, Z, Y, X], seg [1, Z, Y, X] (region ids)."""

    def __init__(self, data: np.ndarray, region_map: np.ndarray):
        self.data, self.seg = data, region_map[None]

    def load_case(self, case: str):
        return self.data, self.seg, None, {}


def test_selector_fits_on_the_true_lesions_and_on_the_networks_answer():
    """Every expression is an example over the case's ground-truth lesions and, given the network, over the lesions
    of its finding answer: here it found the referred lesion only in part and a lesion that is none."""
    region_map = np.zeros((1, 24, 24), dtype=np.int16)
    region_map[0, 2:8, 2:8] = 1  # 36 voxels, the referred lesion
    region_map[0, 14:18, 14:18] = 2  # 16 voxels
    data = np.where(region_map > 0, 100.0, 0.0)[None].astype(np.float32)
    found = np.full(region_map.shape, -5.0, dtype=np.float32)
    found[0, 2:8, 2:5] = 3.0  # part of lesion 1
    found[0, 20:23, 2:5] = 3.0  # nothing there
    texts = ["the largest lesion"]
    words = _words(texts[0])[None]
    features = TextFeatures(texts, EncodedTexts(tokens=words, mask=np.ones(words.shape[:2], dtype=bool),
                                                pooled=words.mean(1), truncated=0))
    expressions = [Expression("e0", "case", texts[0], targets=(1,))]
    dataset = _OneCaseDataset(data, region_map)

    true_lesions, answered = selection_examples(dataset, ["case"], expressions, features, (1.0, 1.0),
                                                network_finding=lambda _: FindingAnswer(found))
    assert sorted(true_lesions.volumes) == [16, 36] and true_lesions.referred.sum() == 1
    assert true_lesions.referred[np.argmax(true_lesions.volumes)]
    assert sorted(answered.volumes) == [9, 18] and answered.referred.tolist() == [True, False]
    assert answered.descriptors.shape == true_lesions.descriptors.shape == (2, 3 + len(INTENSITY_FEATURES))
    assert len(selection_examples(dataset, ["case"], expressions, features, (1.0, 1.0))) == 1
    assert not selection_examples(dataset, ["another case"], expressions, features, (1.0, 1.0))


def test_most_folds_preferring_the_network_alone_make_it_answer(capsys):
    """A fold's verdict travels with its stage; the folds in use answer with the case-level stage unless most of
    them found the network alone better on their training cases."""
    rng = np.random.default_rng(4)
    selector = fit_selector([_size_only_example("the largest lesion", 4, rng) for _ in range(4)], steps=5)
    alone_better = Verdict(case_level_dice=0.4, network_alone_dice=0.6, expressions=20)
    case_level_better = Verdict(case_level_dice=0.8, network_alone_dice=0.6, expressions=20)

    def fold(verdict):
        stage = _stage([selector])
        stage.verdicts = {"this fold": verdict}
        return {"_extra_state": {STAGE_STATE_KEY: stage.to_payload()}}

    stage = stage_for_prediction("unused", [0, 1], [fold(alone_better), fold(case_level_better)], "abc")
    assert len(stage.selectors) == 2 and stage.answers
    stage = stage_for_prediction("unused", [0, 1, 2], [fold(alone_better), fold(alone_better), fold(None)], "abc")
    assert len(stage.selectors) == 3 and not stage.answers
    note = capsys.readouterr().out
    assert "answered by the network alone" in note and "fold 0" in note and "0.400" in note and "fold 2" not in note


class _CasesDataset:
    def __init__(self, cases: dict):
        self.cases = cases

    def load_case(self, case: str):
        self.current = case
        data, region_map = self.cases[case]
        return data, region_map[None], None, {}


def test_the_verdict_keeps_the_case_level_step_only_where_it_answers_better():
    """"The largest lesion" over cases of two lesions whose finding answer catches only half of the larger one: the
    case-level step (fitted without the cases it is scored on) picks that half, Dice 2/3. It beats a network that
    answers nothing and loses to one that outlines the referred lesion exactly."""
    rng = np.random.default_rng(5)
    cases, finding, expressions = {}, {}, []
    for index in range(6):
        region_map = np.zeros((1, 32, 32), dtype=np.int16)
        row, column = rng.integers(1, 10, size=2)
        region_map[0, row:row + 8, column:column + 8] = 1  # 64 voxels, referred
        region_map[0, 20 + row // 2:24 + row // 2, 20:24] = 2  # 16 voxels
        logits = np.where(region_map > 0, 4.0, -4.0).astype(np.float32)
        logits[0, row:row + 8, column + 4:column + 8] = -4.0  # the network found half of the larger lesion
        case = f"case_{index}"
        cases[case] = (np.where(region_map > 0, 100.0, 0.0)[None].astype(np.float32), region_map)
        finding[case] = logits
        expressions.append(Expression(f"e{index}", case, "the largest lesion", targets=(1,)))
    words = _words("the largest lesion")[None]
    features = TextFeatures(["the largest lesion"], EncodedTexts(tokens=words, mask=np.ones(words.shape[:2], bool),
                                                                 pooled=words.mean(1), truncated=0))
    dataset = _CasesDataset(cases)

    def verdict(network_answer):
        evidence = case_evidence(dataset, sorted(cases), expressions, features, (1.0, 1.0),
                                 network_finding=lambda _: FindingAnswer(finding[dataset.current]),
                                 network_alone_logits=lambda data, texts: np.stack(
                                     [network_answer(data) for _ in texts]))
        return cross_validated_verdict(evidence, CaseLevelSettings(verdict_folds=2), log=lambda *_: None)

    silent = verdict(lambda data: np.full(data.shape[1:], -4.0))
    assert silent.case_level_dice == pytest.approx(2 / 3) and silent.network_alone_dice == 0.0
    assert silent.case_level_answers and silent.expressions == 6
    upper_rows = np.arange(32)[:, None] < 20  # the larger lesion lies there, the smaller below
    exact = verdict(lambda data: np.where((data[0] > 50) & upper_rows, 4.0, -4.0))
    assert exact.network_alone_dice == 1.0 and not exact.case_level_answers


def test_the_verdict_asks_the_network_alone_a_fixed_draw_within_a_voxel_budget():
    by_case = {case: [Expression(f"{case}-{i}", case, "the lesion", None) for i in range(count)]
               for case, count in (("b", 30), ("a", 10), ("c", 20))}
    every = {e.id for expressions in by_case.values() for e in expressions}
    voxels = {"a": 100, "b": 100, "c": 100}.__getitem__
    drawn = verdict_expressions(by_case, voxels, voxel_budget=1200, at_least=5)
    assert len(drawn) == 12 and drawn <= every and len({name[0] for name in drawn}) == 3
    assert verdict_expressions(dict(reversed(list(by_case.items()))), voxels, 1200, 5) == drawn
    assert len(verdict_expressions(by_case, voxels, voxel_budget=100, at_least=5)) == 5  # large cases: at least
    assert verdict_expressions(by_case, voxels, voxel_budget=10 ** 6, at_least=5) == every


def test_members_with_and_without_descriptor_orderings_answer_together():
    """A fold fitted with descriptor superlatives and one without answer as one ensemble (of_folds), the latter
    giving the descriptor orderings no weight."""
    rng = np.random.default_rng(6)
    training = [_superlative_example(sentence, rng) for _ in range(10) for sentence in SUPERLATIVES[:2]]
    with_orderings = fit_selectors(training, CaseLevelSettings(**SUPERLATIVE_SETTINGS, fit_steps=30,
                                                               operations_first_steps=10), members=1)[0]
    volume_only = fit_selectors(training, CaseLevelSettings(fit_steps=30, operations_first_steps=10), members=1)[0]
    probe = [_superlative_example(sentence, rng) for sentence in SUPERLATIVES[:2] for _ in range(5)]
    inputs = SelectionBatch.of(probe).inputs()
    with torch.no_grad():
        outputs = [selector.eval()(*inputs) for selector in with_orderings + volume_only]
    assert outputs[0][1].shape[-1] == len(OPERATIONS) * 4 and outputs[1][1].shape[-1] == len(OPERATIONS)
    (_, wide), (probabilities, weights) = _over_common_orderings(outputs)
    assert weights.shape == wide.shape
    by_ordering = weights.exp().unflatten(-1, (len(OPERATIONS), 4))
    assert torch.equal(by_ordering[..., 0], outputs[1][1].exp()) and by_ordering[..., 1:].max() == 0
    assert torch.equal(probabilities.unflatten(-1, (len(OPERATIONS), 4))[..., 0], outputs[1][0])
    together = choose(with_orderings + volume_only, probe)
    assert all(answer.shape == e.volumes.shape for answer, e in zip(together, probe))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_the_fitting_dropout_drops_each_word_feature_with_probability_p(p):
    from lsms_nnunet.selection.selector import dropout_keep_mask
    torch.manual_seed(0)
    kept = dropout_keep_mask((500, 384), p)
    assert kept.shape == (500, 384) and kept.dtype == torch.bool
    dropped = 1 - kept.float()
    assert abs(dropped.mean().item() - round(p * 256) / 256) < 0.004
    # every position is drawn alike (no byte of the random words biased): per-column rates spread binomially
    assert dropped.mean(0).std().item() < 3 * (p * (1 - p) / 500) ** 0.5
