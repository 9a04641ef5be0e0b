"""Benchmark step 3: score and cost each trained model, one record per model and fold in `records/`.

Records are keyed by the final checkpoint, so a retrained model is measured again and a re-run computes only what
is missing; the test answers also by the test split's signature, so a changed test split is answered again.
"""

from __future__ import annotations

import dataclasses

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lsms_nnunet.benchmark.accuracy import (ALL_LESIONS_PROMPT, evaluate_text_blind_answers, plain_lesion_dice,
                                            write_all_lesion_reference_masks)
from lsms_nnunet.benchmark.costs import (forward_gflops, median_seconds, parameter_counts, seconds_per_iteration,
                                         text_encoder_parameters, texts_for_counts, time_cases)
from lsms_nnunet.benchmark.preparation import (CANDIDATE_SOURCES, CANDIDATES_SECTION, CHOICE_CEILING,
                                               HELDOUT_SECTION, NETWORK_ALONE_SECTION, TEST_SECTION, BenchmarkSetup,
                                               say)
from lsms_nnunet.benchmark.training_probe import probe_training
from lsms_nnunet.benchmark.training_runner import recorded_budget
from lsms_nnunet.benchmark.variants import Variant
from lsms_nnunet.evaluation.candidate_quality import candidate_quality, choice_ceiling
from lsms_nnunet.evaluation.evaluate import evaluate_referring_folder
from lsms_nnunet.network.case_position import network_input_channels
from lsms_nnunet.preprocessing.orientation import CanonicallyOrientedDataset
from lsms_nnunet.preprocessing.prompts import lesion_voxels
from lsms_nnunet.selection.candidates import candidates_of_answer, find_candidates
from lsms_nnunet.selection.evidence import preprocessed_spacing
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.training.checkpoints import load_checkpoint_safely
from text_conditioning.encoders import EncoderIdentity
from text_conditioning.expressions import Expression, expressions_by_case
from text_conditioning.io import write_json_atomically
from text_conditioning.model_texts import embed_texts


class _FoldModel:
    """The trained network of one variant and fold, loaded once and only when a measurement needs it."""

    def __init__(self, setup: BenchmarkSetup, variant: Variant, fold: int):
        self.setup, self.variant, self.fold = setup, variant, fold
        self._predictor = None
        self._dataset = None

    @property
    def predictor(self):
        """nnU-Net's predictor (an LSMSPredictor for LSMS checkpoints), single pass: no test-time mirroring."""
        if self._predictor is None:
            predictor = self.file_predictor()
            # The fold's weights are loaded; predicting on the loaded network directly keeps torch's thread count
            # the same for every variant (the multi-fold path resets it to nnUNet_def_n_proc).
            predictor.list_of_parameters = []
            self._predictor = predictor
        return self._predictor

    def file_predictor(self, expressions_file: Path | None = None):
        """A fresh predictor of the fold for raw image files, as a user's prediction runs (without mirroring): an
        LSMSPredictor answering expressions_file for text variants, nnU-Net's own for the others."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from lsms_nnunet.inference.predictor import LSMSPredictor, PredictionRequest

        device = torch.device(self.setup.device)
        options = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                       perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                       allow_tqdm=False)
        predictor = LSMSPredictor(**options, request=PredictionRequest(expressions_file=str(expressions_file))) \
            if expressions_file is not None else nnUNetPredictor(**options)
        predictor.initialize_from_trained_model_folder(str(self.setup.model_folder(self.variant)), (self.fold,),
                                                       "checkpoint_final.pth")
        return predictor

    def load_case(self, case: str) -> tuple[torch.Tensor, dict]:
        """A preprocessed validation case in the orientation the network was trained in (canonical for LSMS)."""
        data, _, properties = self.load_case_with_regions(case)
        return data, properties

    def load_case_with_regions(self, case: str) -> tuple[torch.Tensor, np.ndarray, dict]:
        """`load_case` with the case's preprocessed region map [*spatial], in the same orientation."""
        if self._dataset is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            folder = str(self.setup.preprocessed_folder /
                         self.predictor.configuration_manager.data_identifier)
            self._dataset = infer_dataset_class(folder)(folder, self.setup.validation_cases(self.fold))
            if self.variant.uses_text:
                self._dataset = CanonicallyOrientedDataset(self._dataset,
                                                           self.predictor.plans_manager.transpose_forward)
        data, seg, _, properties = self._dataset.load_case(case)
        return torch.from_numpy(np.asarray(data[:], dtype=np.float32)), np.asarray(seg[:])[0], properties

    def answer(self, questions: dict[str, list[tuple[str, str]]], folder: Path, description: str) -> None:
        """Masks `<id><file_ending>` in folder answering each case's (id, text) questions as the final validation
        answers them: one pass per case, no mirroring, logits flipped back from the canonical orientation."""
        folder.mkdir(parents=True, exist_ok=True)
        for case, asked in tqdm(questions.items(), desc=f"{self.variant.name}: {description}", unit="case"):
            data, properties = self.load_case(case)
            self.predictor.export_answers(data, properties, [id_ for id_, _ in asked], [text for _, text in asked],
                                          folder)  # the user's text cache

    def answer_and_score(self, expressions: Sequence[Expression], folder: Path, description: str) -> dict:
        """Referring metrics of `answer` on expressions."""
        self.answer({case: [(e.id, e.text) for e in case_expressions]
                     for case, case_expressions in expressions_by_case(expressions).items()}, folder, description)
        summary = evaluate_referring_folder(self.setup.gt_folder, folder, list(expressions),
                                            file_ending=self.setup.file_ending, output_file=folder / "summary.json")
        return {"per_expression": summary["metric_per_expression"], "aggregate": summary["aggregate"]}

    def text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        identity = EncoderIdentity.from_dict(self.predictor.network.model_card["text_encoder"])
        return embed_texts(texts, identity, self.setup.text_cache_folder)


def measure_training(model: _FoldModel) -> dict:
    fold_folder = model.setup.fold_folder(model.variant, model.fold)
    logging = load_checkpoint_safely(fold_folder / "checkpoint_final.pth")["logging"]
    _, iterations = recorded_budget(fold_folder) or (model.setup.epochs, model.setup.iterations)
    return {"epochs": len(logging["epoch_end_timestamps"]), "iterations_per_epoch": iterations,
            "seconds_per_iteration": seconds_per_iteration(logging["epoch_start_timestamps"],
                                                           logging["epoch_end_timestamps"], iterations),
            "pseudo_dice": [float(v) for v in logging["mean_fg_dice"]],
            "ema_pseudo_dice": [float(v) for v in logging["ema_fg_dice"]],
            "train_loss": [float(v) for v in logging["train_losses"]],
            "val_loss": [float(v) for v in logging["val_losses"]]}


def measure_referring(model: _FoldModel) -> dict:
    setup, variant, fold = model.setup, model.variant, model.fold
    validation_folder = setup.fold_folder(variant, fold) / "validation"
    if variant.uses_text:
        summary = json.loads((validation_folder / "summary.json").read_text(encoding="utf-8"))
    else:
        summary = evaluate_text_blind_answers(validation_folder, setup.gt_folder, setup.validation_expressions(fold),
                                              setup.file_ending, setup.work_folder(variant, fold, "referring"))
    return {"per_expression": summary["metric_per_expression"], "aggregate": summary["aggregate"]}


def measure_plain(model: _FoldModel) -> dict:
    """Plain all-lesion Dice: vanilla's validation label maps; LSMS answers the ad hoc prompt ALL_LESIONS_PROMPT."""
    setup, variant, fold = model.setup, model.variant, model.fold
    cases = setup.validation_cases(fold)
    if not variant.uses_text:
        folder = setup.fold_folder(variant, fold) / "validation"
        return {"prompt": None, **plain_lesion_dice(folder, setup.gt_folder, cases, setup.file_ending,
                                                    setup.context_ids)}
    folder = setup.work_folder(variant, fold, "all_lesions")
    model.answer({case: [(case, ALL_LESIONS_PROMPT)] for case in cases}, folder, f"'{ALL_LESIONS_PROMPT}'")
    return {"prompt": ALL_LESIONS_PROMPT, **plain_lesion_dice(folder, setup.gt_folder, cases, setup.file_ending,
                                                              setup.context_ids)}


def measure_network(model: _FoldModel) -> dict:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    predictor = model.predictor
    network = predictor.network.to(torch.device(model.setup.device)).eval()
    channels = determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                            predictor.dataset_json)
    if model.variant.uses_text:
        channels = network_input_channels(channels, network.config.case_position)
    patch_size = list(predictor.configuration_manager.patch_size)
    patch = torch.zeros((1, channels, *patch_size), device=model.setup.device)
    frozen = 0
    if model.variant.uses_text:
        tokens, mask = model.text_tokens([model.setup.validation_expressions(model.fold)[0].text])
        tokens, mask = tokens.to(patch.device), mask.to(patch.device)
        gflops = forward_gflops(lambda: network(patch, tokens, mask))
        frozen = text_encoder_parameters(EncoderIdentity.from_dict(network.model_card["text_encoder"]))
    else:
        gflops = forward_gflops(lambda: network(patch))
    return {**parameter_counts(network), "frozen_text_encoder": frozen, "gflops_per_patch": gflops,
            "patch_size": patch_size}


def measure_inference(model: _FoldModel) -> dict:
    """Seconds per validation case answering all of its expressions (one sliding-window pass per case for vanilla)."""
    setup, variant, fold = model.setup, model.variant, model.fold
    predictor = model.predictor
    texts_per_case: dict[str, list[str]] = {}
    for expression in setup.validation_expressions(fold):
        texts_per_case.setdefault(expression.case, []).append(expression.text)
    cases = setup.validation_cases(fold)
    loaded = {}

    def predict(case: str) -> None:
        data = loaded[case]
        if variant.uses_text:
            predictor.predict_prompt_logits(data, texts_per_case[case], setup.text_cache_folder)
        else:
            predictor.predict_sliding_window_return_logits(data)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)  # CUDA runs asynchronously: count the work, not its launch

    for case in cases:  # read from disk before timing
        loaded[case] = model.load_case(case)[0]
    return {**time_cases(predict, cases, {case: len(texts_per_case.get(case, ())) for case in cases},
                         f"{variant.name}: timing inference"),
            "mirroring": False, "tile_step_size": 0.5}


def measure_probe(model: _FoldModel) -> dict:
    """Peak memory and seconds per training step, from a fresh process running a few training steps."""
    setup = model.setup
    return probe_training(setup.dataset_name, setup.configuration, model.fold, model.variant.trainer, setup.plans,
                          setup.device, setup.training_environment())


PROFILED_STEPS = 3


def measure_step_profile(model: _FoldModel) -> dict:
    """Where a training step's time goes (step_profile.py), median of PROFILED_STEPS steps in a fresh process."""
    setup = model.setup
    return probe_training(setup.dataset_name, setup.configuration, model.fold, model.variant.trainer, setup.plans,
                          setup.device, setup.training_environment(), timed_steps=1,
                          profile_steps=PROFILED_STEPS)["profile"]


def measure_expression_scaling(model: _FoldModel) -> dict:
    """Seconds to answer E expressions of the first validation image, E in costs.EXPRESSION_COUNTS (the validation
    texts, repeated as needed); a text-blind model predicts the image once."""
    setup, variant, fold = model.setup, model.variant, model.fold
    predictor = model.predictor
    case = setup.validation_cases(fold)[0]
    data = model.load_case(case)[0]

    def synchronised(call: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            call()
            if predictor.device.type == "cuda":
                torch.cuda.synchronize(predictor.device)
        return run

    if not variant.uses_text:
        return {"case": case, "seconds_per_image": median_seconds(
            synchronised(lambda: predictor.predict_sliding_window_return_logits(data)))}
    texts = list(dict.fromkeys(e.text for e in setup.validation_expressions(fold)))
    seconds = {str(count): median_seconds(synchronised(
        lambda asked=asked: predictor.predict_prompt_logits(data, asked, setup.text_cache_folder)))
        for count, asked in tqdm(texts_for_counts(texts).items(), desc=f"{variant.name}: expressions per image")}
    return {"case": case, "seconds_by_expressions": seconds}


def measure_heldout(model: _FoldModel) -> dict:
    """The validation cases' expressions in held-out wording, predicted as measure_plain predicts (one pass per case,
    no mirroring); a text-blind model answers with its validation label maps, as for the seen wording."""
    setup, variant, fold = model.setup, model.variant, model.fold
    expressions = setup.validation_heldout_expressions(fold)
    folder = setup.work_folder(variant, fold, HELDOUT_SECTION)
    if not variant.uses_text:
        summary = evaluate_text_blind_answers(setup.fold_folder(variant, fold) / "validation", setup.gt_folder,
                                              expressions, setup.file_ending, folder)
        return {"per_expression": summary["metric_per_expression"], "aggregate": summary["aggregate"]}
    return model.answer_and_score(expressions, folder, "held-out wording")


def measure_network_alone(model: _FoldModel) -> dict:
    """The validation expressions answered the way the model does not answer them, on the same trained weights
    ({} for models without a case-level stage): by the network alone when its stage answers (what that stage adds),
    else by the stage its verdict declined (`declined_case_level`: what it would have given)."""
    setup, variant, fold = model.setup, model.variant, model.fold
    if not variant.uses_text:
        return {}
    predictor = model.predictor
    stage = predictor.case_level
    if stage is None:
        return {}
    declined = not stage.answers
    predictor.case_level = dataclasses.replace(stage, verdicts={}) if declined else None
    try:
        section, description = ("case_level", "case-level step") if declined else \
            (NETWORK_ALONE_SECTION, "network alone")
        scores = model.answer_and_score(setup.validation_expressions(fold), setup.work_folder(variant, fold, section),
                                        description)
    finally:
        predictor.case_level = stage
    return {**scores, "declined_case_level": declined}


def measure_candidates(model: _FoldModel) -> dict:
    """How the case-level stage's candidates stand for the validation cases' lesions (the regions of their label
    maps): those of the network's finding answer and, for reference, those split from the true lesion mask, with the
    stage's candidate settings; and per validation expression the choice ceiling, the Dice of a perfect choice among
    the network's candidates, on nnU-Net's preprocessed grid ({} for models without a finding answer;
    evaluation/candidate_quality.py)."""
    setup, variant = model.setup, model.variant
    if not variant.uses_text:
        return {}
    predictor = model.predictor
    settings = predictor.case_level.settings if predictor.case_level is not None else CaseLevelSettings()
    counts = {source: Counter() for source in CANDIDATE_SOURCES}
    expressions = expressions_by_case(setup.validation_expressions(model.fold))
    ceiling = []
    for case in setup.validation_cases(model.fold):
        data, region_map, _ = model.load_case_with_regions(case)
        spacing = preprocessed_spacing(predictor.configuration_manager.spacing, region_map.ndim)
        lesion_ids = [int(i) for i in np.unique(region_map) if i > 0 and i not in setup.context_ids]
        finding_logits = predictor.predict_finding(data, setup.text_cache_folder).lesion_logits.float().numpy()
        network = candidates_of_answer(finding_logits, spacing, settings)
        for source, candidates in (("network", network),
                                   ("true_lesions", find_candidates(lesion_voxels(region_map, setup.context_ids),
                                                                    spacing, settings=settings))):
            counts[source].update(candidate_quality(candidates.labels, region_map, lesion_ids))
        ceiling += [{"id": e.id, "category": e.category,
                     "dice": choice_ceiling(network, finding_logits > 0, region_map, e.targets or ())}
                    for e in expressions.get(case, ())]
    return {**{source: dict(counted) for source, counted in counts.items()}, CHOICE_CEILING: ceiling}


def measure_test(model: _FoldModel) -> dict:
    """The raw test images (imagesTs) answered by the fold as `LSMSv2_predict --disable_tta` answers them (nnU-Net's
    preprocessing of the raw files, the case-level stage the fold carries), scored against labelsTs. A text-blind
    model predicts each image's label map once; it answers every expression of the image."""
    setup, variant, fold = model.setup, model.variant, model.fold
    split = setup.test_split
    folder = setup.work_folder(variant, fold, TEST_SECTION)
    shutil.rmtree(folder, ignore_errors=True)  # no answer to an earlier test split stays beside the new ones
    predicted = folder / ("masks" if variant.uses_text else "label_maps")
    predicted.mkdir(parents=True, exist_ok=True)  # nnU-Net writes its arguments there before it makes the folder
    predictor = model.file_predictor(split.expressions_file if variant.uses_text else None)
    predictor.predict_from_files_sequential(str(split.images_folder), str(predicted))
    if variant.uses_text:
        summary = evaluate_referring_folder(split.labels_folder, predicted, list(split.expressions),
                                            file_ending=setup.file_ending, output_file=folder / "summary.json")
    else:
        summary = evaluate_text_blind_answers(predicted, split.labels_folder, split.expressions, setup.file_ending,
                                              folder / "masks")
    return {"per_expression": summary["metric_per_expression"], "aggregate": summary["aggregate"],
            "split": split.signature()}


MEASUREMENTS: dict[str, Callable[[_FoldModel], dict]] = {
    "training": measure_training, "referring": measure_referring, "plain": measure_plain,
    "network": measure_network, "inference": measure_inference, "probe": measure_probe,
    "step_profile": measure_step_profile, "expression_scaling": measure_expression_scaling,
    NETWORK_ALONE_SECTION: measure_network_alone, HELDOUT_SECTION: measure_heldout,
    CANDIDATES_SECTION: measure_candidates, TEST_SECTION: measure_test}


def checkpoint_signature(checkpoint: Path) -> dict:
    status = checkpoint.stat()
    return {"file": str(checkpoint), "mtime_ns": status.st_mtime_ns, "size": status.st_size}


def measure_variant(setup: BenchmarkSetup, variant: Variant, fold: int) -> dict:
    """All measurements of one trained variant and fold; each is saved as soon as it is done and reused later."""
    record_file = setup.output_folder / "records" / f"{variant.name}__fold_{fold}.json"
    signature = checkpoint_signature(setup.fold_folder(variant, fold) / "checkpoint_final.pth")
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    if record.get("checkpoint") != signature:
        record = {"variant": variant.name, "trainer": variant.trainer, "fold": fold, "checkpoint": signature}
    if TEST_SECTION in record and (not setup.test_split or record[TEST_SECTION].get("split")
                                   != setup.test_split.signature()):
        del record[TEST_SECTION]  # made on another test split (or on one that is gone): measured again if asked
    missing = [section for section in setup.sections if section not in record]
    if not missing:
        say(f"{variant.name} fold {fold}: all measurements recorded earlier, reused")
        return record
    model = _FoldModel(setup, variant, fold)
    for section in missing:
        start = time.perf_counter()
        record[section] = MEASUREMENTS[section](model)
        write_json_atomically(record_file, record, ensure_ascii=True, allow_nan=False)
        say(f"{variant.name} fold {fold}: measured {section} in {time.perf_counter() - start:.1f} s")
    return record


def measure_text_blind_ceiling(setup: BenchmarkSetup, fold: int) -> dict:
    """Referring metrics of the perfect all-lesion mask answering every validation expression of the fold."""
    return _text_blind_ceiling(setup, f"fold_{fold}", setup.gt_folder, setup.validation_cases(fold),
                               setup.validation_expressions(fold), {"fold": fold})


def measure_test_text_blind_ceiling(setup: BenchmarkSetup) -> dict:
    """The same on the test split (labelsTs)."""
    split = setup.test_split
    return _text_blind_ceiling(setup, TEST_SECTION, split.labels_folder, split.cases, split.expressions,
                               {"split": split.signature()})


def _text_blind_ceiling(setup: BenchmarkSetup, name: str, gt_folder: Path, cases: Sequence[str],
                        expressions: Sequence[Expression], keys: dict) -> dict:
    """Computed once and kept in records/text_blind_ceiling__<name>.json."""
    record_file = setup.output_folder / "records" / f"text_blind_ceiling__{name}.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if {key: record.get(key) for key in keys} == keys:
            return record
    folder = setup.output_folder / "predictions" / "text_blind_ceiling" / name
    write_all_lesion_reference_masks(gt_folder, cases, setup.file_ending, folder / "lesion_masks", setup.context_ids)
    summary = evaluate_text_blind_answers(folder / "lesion_masks", gt_folder, expressions, setup.file_ending,
                                          folder / "referring")
    record = {**keys, "per_expression": summary["metric_per_expression"]}
    write_json_atomically(record_file, record, ensure_ascii=True, allow_nan=False)
    return record
