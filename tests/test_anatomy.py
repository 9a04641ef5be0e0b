"""Organ-relative candidates: where a lesion lies in its organ, and what the case-level stage learns from it.

The learning tests are micro tasks (real fitting, seconds): an organ that sits off-centre and moves between images,
so that where a lesion lies in the image cannot say "in the left part of the organ" but where it lies in the organ
can; and two organs of one label told apart by side.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from text_conditioning.encoders import EncodedTexts
from text_conditioning.expressions import Expression

from lsms_nnunet.planning.variants import make_plans_variant
from lsms_nnunet.preprocessing.prompts import anatomy_index_map
from lsms_nnunet.selection.anatomy import ORGAN_PLACE_FEATURES, organ_relative_descriptors
from lsms_nnunet.selection.candidates import INTENSITY_FEATURES, FindingAnswer, describe_candidates, find_candidates
from lsms_nnunet.selection.evidence import TextFeatures, case_evidence
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.selection.stage import STAGE_FILE, STAGE_STATE_KEY, CaseLevelStage
from lsms_nnunet.training.checkpoints import load_checkpoint_safely

ORGAN = 5
WORDS = ("the", "lesion", "in", "left", "right", "part", "of", "organ", "kidney")
WORD_VECTORS = {word: np.random.default_rng(11 + i).normal(size=16).astype(np.float32) for i, word in enumerate(WORDS)}


def test_a_candidate_is_placed_in_its_organ_instance():
    region_map = np.zeros((1, 40, 60), dtype=np.int16)
    region_map[0, 10:30, 5:25] = ORGAN  # left kidney: x 5..24
    region_map[0, 10:30, 35:55] = ORGAN  # right kidney: x 35..54
    region_map[0, 12:16, 6:10] = 1  # near the upper left edge of the left kidney: 2 voxels in
    region_map[0, 18:22, 43:47] = 2  # in the middle of the right kidney
    region_map[0, 2:5, 2:5] = 3  # in no organ
    candidates = find_candidates(np.isin(region_map, (1, 2, 3)), (1.0, 1.0, 1.0))
    anatomy = anatomy_index_map(region_map, (ORGAN,))
    case_relative = np.array([[9.0, 9.0, 9.0]] * candidates.count)
    rows = organ_relative_descriptors(candidates, anatomy, 1, (1.0, 1.0, 1.0), case_relative, shell_voxels=2)
    by_label = {int(region_map[candidates.labels == i + 1].max()): row for i, row in enumerate(rows)}
    edge, middle, outside = by_label[1], by_label[2], by_label[3]
    assert rows.shape == (3, ORGAN_PLACE_FEATURES + 1)
    assert np.allclose(edge[1:3], [2 * 3.5 / 19 - 1, 2 * 2.5 / 19 - 1])  # centroid (13.5, 7.5) in box 10..29, 5..24
    side = 2 * 9.5 / 49 - 1  # each kidney's centroid (x 14.5, 44.5) in the extent of both (x 5..54)
    assert np.allclose(edge[4:6], [0.0, side]) and np.allclose(middle[4:6], [0.0, -side])  # left / right instance
    assert np.isclose(edge[6], np.log1p(2.0)) and middle[6] > np.log1p(5.0)  # mm from its nearest voxel to outside
    assert np.isclose(middle[7], 16 / 400) and edge[-1] == middle[-1] == 1.0
    assert np.allclose(outside, [9.0, 9.0, 9.0] + [0.0] * (ORGAN_PLACE_FEATURES - 3 + 1))  # fallback: in the case
    data = np.random.default_rng(0).random((1, 1, 40, 60)).astype(np.float32)
    described = describe_candidates(data, candidates, (1.0, 1.0, 1.0), 2, anatomy, 1)
    assert described.shape == (3, ORGAN_PLACE_FEATURES + 1 + len(INTENSITY_FEATURES))
    assert describe_candidates(data, candidates, (1.0, 1.0, 1.0)).shape == (3, 3 + len(INTENSITY_FEATURES))


def _text_features(texts):
    words = [np.stack([WORD_VECTORS[w] for w in text.split()]) for text in texts]
    length = max(len(w) for w in words)
    tokens = np.stack([np.pad(w, ((0, length - len(w)), (0, 0))) for w in words])
    mask = np.stack([np.arange(length) < len(w) for w in words])
    return TextFeatures(texts, EncodedTexts(tokens=tokens, mask=mask, pooled=tokens.mean(1), truncated=0))


class _Cases:
    def __init__(self, cases: dict):
        self.cases = cases

    def load_case(self, case: str):
        data, region_map = self.cases[case]
        return data, region_map[None], None, {}


def _lesion(region_map, label, y, x):
    region_map[0, y - 2:y + 2, x - 2:x + 2] = label


def _moving_organ_case(rng):
    """One organ of random size anywhere in the image; lesion 1 in its left third, lesion 2 in its right third, one
    of them absent in a third of the cases (its expression then refers to nothing: the leftmost lesion of the image,
    which a superlative over position would find, is not always the one meant)."""
    region_map = np.zeros((1, 64, 64), dtype=np.int16)
    height, width = int(rng.integers(16, 24)), int(rng.integers(24, 32))
    top, left = int(rng.integers(0, 64 - height)), int(rng.integers(0, 64 - width))
    region_map[0, top:top + height, left:left + width] = ORGAN
    absent = int(rng.integers(1, 3)) if rng.random() < 1 / 3 else None
    for label, (low, high) in ((1, (0.15, 0.3)), (2, (0.7, 0.85))):
        if label != absent:
            _lesion(region_map, label, top + int(rng.uniform(0.3, 0.7) * height),
                    left + int(rng.uniform(low, high) * width))
    return region_map, {"the lesion in the left part of the organ": 1, "the lesion in the right part of the organ": 2}


def _two_kidneys_case(rng):
    """Two organs of one label, side by side with random shifts; one lesion anywhere in each."""
    region_map = np.zeros((1, 64, 64), dtype=np.int16)
    for label, x0 in ((1, int(rng.integers(0, 12))), (2, int(rng.integers(34, 44)))):
        top = int(rng.integers(4, 24))
        region_map[0, top:top + 30, x0:x0 + 18] = ORGAN
        _lesion(region_map, label, top + int(rng.integers(4, 26)), x0 + int(rng.integers(4, 14)))
    return region_map, {"the lesion in the left kidney": 1, "the lesion in the right kidney": 2}


def _image(region_map, rng):
    image = np.where(region_map == ORGAN, 1.0, np.where(region_map > 0, 0.4, 0.0))
    image = image + 0.05 * rng.normal(size=region_map.shape)
    return image[None].astype(np.float32)


def _fit_and_score(make_case, anatomy: bool, seed: int = 0) -> float:
    """Fit the stage on 30 cases' true lesions, then the share of 20 other cases' expressions it answers exactly."""
    rng = np.random.default_rng(seed)
    cases, expressions = {}, []
    for index in range(50):
        region_map, asked = make_case(rng)
        cases[f"c{index}"] = (_image(region_map, rng), region_map)
        expressions += [Expression(f"c{index}-{target}", f"c{index}", text,
                                   targets=(target,) if (region_map == target).any() else ())
                        for text, target in asked.items()]
    texts = sorted({e.text for e in expressions})
    features, settings = _text_features(texts), CaseLevelSettings(ensemble_members=1)
    anatomy_ids = (ORGAN,) if anatomy else ()
    fitted = [f"c{index}" for index in range(30)]
    evidence = case_evidence(_Cases(cases), fitted, expressions, features, (1.0, 1.0), settings=settings,
                             context_ids=(ORGAN,), anatomy_ids=anatomy_ids)
    stage = CaseLevelStage.fit(evidence, settings, "abc", anatomy_regions=len(anatomy_ids), log=lambda *_: None)
    correct = []
    for index in range(30, 50):
        data, region_map = cases[f"c{index}"]
        lesions = np.isin(region_map, (1, 2))
        finding = FindingAnswer(np.where(lesions, 4.0, -4.0).astype(np.float32),
                                anatomy_index_map(region_map, (ORGAN,)) if anatomy else None)
        case_texts = [e.text for e in expressions if e.case == f"c{index}"]
        answers = stage.apply(finding, torch.from_numpy(data), case_texts, features, (1.0, 1.0)) > 0
        for text, answer in zip(case_texts, answers.numpy()):
            targets = next(e.targets for e in expressions if e.case == f"c{index}" and e.text == text)
            correct.append(np.array_equal(answer, np.isin(region_map, targets)))
    return float(np.mean(correct))


def test_the_stage_finds_the_left_part_of_an_organ_that_moves_where_the_image_position_cannot():
    in_the_organ, in_the_image = _fit_and_score(_moving_organ_case, True), _fit_and_score(_moving_organ_case, False)
    assert in_the_organ >= 0.95, in_the_organ
    assert in_the_organ - in_the_image >= 0.1, (in_the_organ, in_the_image)


def test_the_stage_tells_two_organs_of_one_label_apart_by_side():
    assert _fit_and_score(_two_kidneys_case, True) >= 0.95


def _as_if_trained_without_the_anatomy_head(checkpoint: dict) -> dict:
    """The checkpoint an earlier lsms-nnunet wrote: a card without anatomy_regions, no anatomy-head weights, and
    an optimiser state without their parameters (the optimiser numbers parameters in registration order)."""
    weights = checkpoint["network_weights"]
    card = weights["_extra_state"]
    card["network"].pop("anatomy_regions")
    card.pop(STAGE_STATE_KEY, None)
    seen, parameters = set(), []  # the parameters in registration order: a module held twice is listed once
    for name, value in weights.items():
        if name != "_extra_state" and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            parameters.append(name)
    dropped = {index for index, name in enumerate(parameters) if name.startswith("anatomy_heads.")}
    checkpoint["network_weights"] = {name: value for name, value in weights.items()
                                     if not name.startswith("anatomy_heads.")}
    optimizer = checkpoint["optimizer_state"]
    for group in optimizer["param_groups"]:
        group["params"] = [index for index in group["params"] if index not in dropped]
    optimizer["state"] = {index: state for index, state in optimizer["state"].items() if index not in dropped}
    return checkpoint


# --- end to end: the network learns the anatomy, prediction needs no organ mask ------------------------------------
@pytest.mark.slow  # trains a tiny model (1 epoch x 2 iterations)
def test_a_dataset_with_context_trains_an_anatomy_head_and_prediction_places_candidates_without_an_organ_mask(
        run, nnunet_dirs, tmp_path):
    dataset, plans, trainer = 560, "nnUNetPlans_tiny", "LSMSTrainer_test"
    run("LSMSv2_make_synthetic", "-d", dataset, "--dim", 2, "--cases", 5, "--test_cases", 2, "--shape", 64, 64,
        "--organ_context", "--varied_anatomy")
    run("LSMSv2_plan_and_preprocess", "-d", dataset, "-c", "2d", "-np", 1, nnUNet_n_proc_DA="1")
    make_plans_variant(dataset, plans, max_features=16, batch_size=2)
    run("nnUNetv2_train", dataset, "2d", 0, "-tr", trainer, "-p", plans, "-device", "cpu", nnUNet_n_proc_DA="0")
    raw = next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{dataset}_*"))
    fold = Path(nnunet_dirs["nnUNet_results"]) / raw.name / f"{trainer}__{plans}__2d" / "fold_0"
    checkpoint = load_checkpoint_safely(fold / "checkpoint_final.pth")
    card = checkpoint["network_weights"]["_extra_state"]
    assert card["network"]["anatomy_regions"] == 1  # the liver, the dataset's one context region
    assert CaseLevelStage.load(fold / STAGE_FILE, card["text_encoder"]["sha256"]).anatomy_regions == 1

    answer_always = tmp_path / "answer_without_verdict.json"  # one judged expression: no verdict, the stage answers
    answer_always.write_text('{"verdict_voxels": 1, "verdict_min_expressions": 1, "fit_steps": 60, '
                             '"operations_first_steps": 10}', encoding="utf-8")
    run("LSMSv2_fit_case_level", "-d", dataset, "-c", "2d", "-f", 0, "-tr", trainer, "-p", plans, "-device", "cpu",
        "--settings", answer_always)
    predicted = run("nnUNetv2_predict", "-i", raw / "imagesTs", "-o", tmp_path / "masks", "-d", dataset, "-c", "2d",
                    "-tr", trainer, "-p", plans, "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1)
    expressions = json.loads((raw / "imagesTs" / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.nii.gz")) == sorted(
        f"{e['id']}.nii.gz" for e in expressions)
    assert "candidates placed in 1 context region" in predicted.stdout + predicted.stderr
    in_the_case = tmp_path / "in_the_case.json"  # the same weights, candidates placed in the case
    in_the_case.write_text(answer_always.read_text(encoding="utf-8")[:-1] + ', "organ_relative": false}',
                           encoding="utf-8")
    run("LSMSv2_fit_case_level", "-d", dataset, "-c", "2d", "-f", 0, "-tr", trainer, "-p", plans, "-device", "cpu",
        "--settings", in_the_case)
    assert CaseLevelStage.load(fold / STAGE_FILE, card["text_encoder"]["sha256"]).anatomy_regions == 0
    checkpoint = load_checkpoint_safely(fold / "checkpoint_final.pth")
    card = checkpoint["network_weights"]["_extra_state"]

    # a fold trained before the anatomy head (its card has no anatomy_regions, its weights no anatomy heads) is
    # refitted with its own network, not with the one this version would train for the dataset
    torch.save(_as_if_trained_without_the_anatomy_head(checkpoint), fold / "checkpoint_final.pth")
    refitted = run("LSMSv2_fit_case_level", "-d", dataset, "-c", "2d", "-f", 0, "-tr", trainer, "-p", plans,
                   "-device", "cpu", "--settings", answer_always)
    assert "the fold keeps its own" in refitted.stdout + refitted.stderr
    assert CaseLevelStage.load(fold / STAGE_FILE, card["text_encoder"]["sha256"]).anatomy_regions == 0
