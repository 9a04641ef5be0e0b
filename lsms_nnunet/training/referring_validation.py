"""A referring fold after training: fit its case-level stage, then validate it per (case, expression).

Both run on the trainer's network through an `LSMSPredictor`, as nnU-Net's own validation does; `LSMSTrainer.
perform_actual_validation` (so `nnUNetv2_train ... --val` too) calls them in this order, and `LSMSv2_fit_case_level`
runs the fitting alone on a trained fold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from text_conditioning.cache import TextEmbeddingCache

from lsms_nnunet.inference.predictor import LSMSPredictor
from lsms_nnunet.selection.candidates import FindingAnswer
from lsms_nnunet.selection.evidence import TextFeatures, case_evidence
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.selection.stage import STAGE_FILE, STAGE_STATE_KEY, CaseLevelStage, weights_identity


def referring_predictor(trainer) -> LSMSPredictor:
    """A predictor on the trainer's network, as nnU-Net's own validation builds one."""
    predictor = LSMSPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                              perform_everything_on_device=True, device=trainer.device, allow_tqdm=False)
    predictor.manual_initialization(trainer._unwrapped_network(), trainer.plans_manager, trainer.configuration_manager,
                                    None, trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def network_finding(predictor: LSMSPredictor, data: np.ndarray, cache_folder: Path | None = None) -> FindingAnswer:
    """The network's finding answer on one preprocessed image (the stage's candidates), its logits float32 numpy."""
    found = predictor.predict_finding(torch.from_numpy(np.asarray(data)), cache_folder)
    return FindingAnswer(found.lesion_logits.float().numpy(), found.anatomy)


def network_alone_logits(predictor: LSMSPredictor, data: np.ndarray, texts: Sequence[str],
                         cache_folder: Path | None = None) -> np.ndarray:
    """[E, *spatial] logits of the network answering the E texts itself, without the case-level stage (float32)."""
    stage, predictor.case_level = predictor.case_level, None
    try:
        logits = predictor.predict_prompt_logits(torch.from_numpy(np.asarray(data)), texts, cache_folder)
    finally:
        predictor.case_level = stage
    return logits[1:].float().numpy()


def fit_case_level_stage(trainer, predictor: LSMSPredictor, train_keys: Sequence[str],
                         settings: CaseLevelSettings) -> CaseLevelStage:
    """Fit the case-level stage on the fold's training cases (candidates: their lesions and the network's finding
    answers on them), judge it against the network alone on them, and save it beside the fold and inside the
    validated checkpoint, with the identity of the weights it was fitted on."""
    log = trainer.print_to_log_file
    dataset = trainer.canonically_oriented(trainer.dataset_class(trainer.preprocessed_dataset_folder,
                                                                 list(train_keys)))
    texts = trainer.prompt_set.all_texts()  # the constant text of the control is one of them
    constant = trainer.model_card["constant_text"]
    variants = {} if constant else trainer.prompt_set.rewrites
    texts += trainer.prompt_set.variants_of(texts, settings.phrase_variants) if variants else []
    cache = TextEmbeddingCache(trainer.text_cache_folder, trainer.text_encoder_identity)
    # the context regions the network outputs, in its order: where candidates are placed in their organs
    organ_relative = settings.organ_relative and trainer._unwrapped_network().config.anatomy_regions
    anatomy_ids = trainer.prompt_set.context_ids if organ_relative else ()
    evidence = case_evidence(
        dataset, train_keys, trainer.prompt_set.expressions, TextFeatures(texts, cache.load(texts)),
        trainer.configuration_manager.spacing, text_of=(lambda _: constant) if constant else (lambda text: text),
        network_finding=lambda data: network_finding(predictor, data, trainer.text_cache_folder),
        network_alone_logits=lambda data, asked: network_alone_logits(predictor, data, asked,
                                                                      trainer.text_cache_folder),
        settings=settings, context_ids=trainer.prompt_set.context_ids, anatomy_ids=anatomy_ids, variants=variants)
    weights = trainer._unwrapped_network().state_dict()
    stage = CaseLevelStage.fit(evidence, settings, trainer.text_encoder_identity.sha256, weights_identity(weights),
                               len(anatomy_ids), log=log)
    stage.judge(evidence, log=log)
    stage.save(Path(trainer.output_folder) / STAGE_FILE)
    _put_stage_in_validated_checkpoint(trainer, stage)
    return stage


def _put_stage_in_validated_checkpoint(trainer, stage: CaseLevelStage) -> None:
    """The checkpoint whose weights were validated carries the stage fitted on them (atomically rewritten):
    `nnUNetv2_export_model_to_zip` packs checkpoints, and stock prediction reads the stage from the weights it
    loads."""
    from lsms_nnunet.training.checkpoints import load_checkpoint_safely, save_atomically

    path = Path(trainer.validated_checkpoint or Path(trainer.output_folder) / "checkpoint_final.pth")
    if not path.is_file():
        return  # checkpointing disabled: the file beside the fold alone
    checkpoint = load_checkpoint_safely(path)
    weights = checkpoint["network_weights"]
    weights["_extra_state"] = {**weights["_extra_state"], STAGE_STATE_KEY: stage.to_payload()}
    save_atomically(lambda temporary: torch.save(checkpoint, temporary), path)
    trainer.print_to_log_file(f"case selector: stored in {path.name}")


def validate_referring_fold(trainer, predictor: LSMSPredictor, validation_cases: Sequence[str]) -> dict:
    """Final validation of a referring fold: a mask per (case, expression), then RLS metrics into summary.json."""
    from lsms_nnunet.evaluation.evaluate import evaluate_referring_folder

    output_folder = Path(trainer.output_folder) / "validation"
    output_folder.mkdir(parents=True, exist_ok=True)
    dataset = trainer.canonically_oriented(trainer.dataset_class(trainer.preprocessed_dataset_folder,
                                                                 list(validation_cases)))
    ending = trainer.dataset_json["file_ending"]
    expressions = [e for e in trainer.prompt_set.expressions if e.case in set(validation_cases)]
    for case in tqdm(list(validation_cases), desc="Validating expressions"):
        case_expressions = [e for e in expressions if e.case == case]
        data, _, _, properties = dataset.load_case(case)
        predictor.export_answers(torch.from_numpy(np.asarray(data[:])), properties, [e.id for e in case_expressions],
                                 [e.text for e in case_expressions], output_folder,
                                 cache_folder=trainer.text_cache_folder)
    gt_folder = Path(trainer.preprocessed_dataset_folder_base) / "gt_segmentations"
    return evaluate_referring_folder(gt_folder, output_folder, expressions, file_ending=ending,
                                     output_file=output_folder / "summary.json")
