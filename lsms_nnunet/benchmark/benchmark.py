"""`LSMSv2_benchmark`: LSMS against vanilla nnU-Net on one referring dataset — same splits, same budget, one table.

1. Checks that the dataset is planned, preprocessed and text-encoded, and reads nnU-Net's splits_final.json (made
   exactly as nnU-Net makes it when missing), so every variant trains and validates on the same cases.
2. Trains every variant and fold with the stock `nnUNetv2_train` in a subprocess, all with the same budget
   (`*_budget` trainers read LSMS_BUDGET_EPOCHS / LSMS_BUDGET_ITERATIONS). The baseline is vanilla nnU-Net on the
   plain view of the dataset (every region merged into one lesion label): the best a text-blind model can do.
3. Scores every model on the referring expressions of its validation cases (per expression category too) and on
   plain all-lesion segmentation; when the raw dataset has expressions_heldout.json (LSMSv2_make_synthetic
   --heldout_phrasing), also on the held-out wordings of the same validation expressions; and measures its costs
   (parameters, GFLOPs, seconds per training iteration and per inference, peak memory).
   The text-blind ceiling (a perfect all-lesion mask answering every expression) is scored too, as a reference.
4. Writes results.json, results.md (one table) and plots.

Resumable: a finished training (checkpoint_final.pth + validation/summary.json) is never redone or touched, an
interrupted one continues with `--c`; measurements are kept per model and fold in `records/` (keyed by the final
checkpoint, so a retrained model is measured again) and a re-run computes only what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from text_conditioning.encoders import EncoderIdentity
from text_conditioning.expressions import (HELDOUT_EXPRESSIONS_FILE, Expression, ExpressionsError, expressions_by_case,
                                           load_expressions, write_file_atomically)

from lsms_nnunet.benchmark.accuracy import (ALL_LESIONS_PROMPT, evaluate_text_blind_answers, plain_lesion_dice,
                                            write_all_lesion_reference_masks)
from lsms_nnunet.benchmark.costs import (forward_gflops, parameter_counts, seconds_per_iteration,
                                         text_encoder_parameters, time_cases)
from lsms_nnunet.benchmark.report import format_results_table, write_plots
from lsms_nnunet.benchmark.training_probe import probe_training
from lsms_nnunet.evaluation.evaluate import evaluate_referring_folder
from lsms_nnunet.evaluation.metrics import aggregate_metrics, per_category_metrics, per_phrasing_metrics
from lsms_nnunet.preprocessing.encode_text import TEXT_FOLDER
from lsms_nnunet.preprocessing.prompts import REFERRING, read_prompt_set
from lsms_nnunet.network.config import ABLATIONS
from lsms_nnunet.training.variants import (BUDGET_EPOCHS_ENV, BUDGET_ITERATIONS_ENV, FULL_ABLATION,
                                          ablation_trainer_name)

RESULTS_FORMAT, RESULTS_VERSION = "lsms-benchmark", 1
DEFAULT_EPOCHS, DEFAULT_ITERATIONS = 20, 50
PROGRESS_POLL_SECONDS = 2.0
SECTIONS = ("training", "referring", "plain", "network", "inference", "probe")
HELDOUT_SECTION = "heldout"


@dataclass(frozen=True)
class Variant:
    """One benchmarked model: a name for the table and the nnU-Net trainer that trains it."""
    name: str
    trainer: str
    description: str

    @property
    def uses_text(self) -> bool:
        return self.trainer.startswith("LSMSTrainer")


# Readable descriptions of the ablations for results.json; an ablation missing here is described by its overrides.
ABLATION_DESCRIPTIONS = {
    "no_visual": "LSMS without the SVLA scale-aware visual branch",
    "no_language": "LSMS without the SVLA vision-language branch",
    "unet_decoder": "LSMS with a plain U-Net decoder instead of FSD",
    "no_contrastive": "LSMS without the contrastive loss term",
    "static_head": "LSMS with nnU-Net's static output heads (text through SVLA only)",
}


def ablation_variant(ablation: str) -> Variant:
    """The benchmarked model of one entry of ABLATIONS, trained by its generated budget trainer."""
    if ablation == FULL_ABLATION:
        return Variant("lsms", ablation_trainer_name(ablation), "LSMS")
    overrides = ", ".join(f"{key}={value!r}" for key, value in ABLATIONS[ablation].items())
    return Variant(f"lsms_{ablation}", ablation_trainer_name(ablation),
                   ABLATION_DESCRIPTIONS.get(ablation, f"LSMS with {overrides}"))


VANILLA = Variant("nnunet_merged", "nnUNetTrainer_budget_merged",
                  "vanilla nnU-Net on the plain view (all regions = one lesion label); text-blind")
CONSTANT_TEXT = Variant("lsms_constant_text", "LSMSTrainer_budget_constant_text",
                        "LSMS trained and tested with one constant text (is the text used?)")
# Vanilla, LSMS, the constant-text control, then every other entry of the ablation table, in its order.
VARIANTS = (VANILLA, ablation_variant(FULL_ABLATION), CONSTANT_TEXT,
            *(ablation_variant(name) for name in ABLATIONS if name != FULL_ABLATION))
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}


class BenchmarkSetupError(RuntimeError):
    """The dataset, folds or options cannot be benchmarked as given (the message names the fix)."""


class TrainingFailedError(RuntimeError):
    """An `nnUNetv2_train` subprocess failed (the message holds the end of its log)."""


@dataclass(frozen=True)
class BenchmarkSetup:
    """Everything the steps share, checked once before any long work starts."""
    dataset_name: str
    configuration: str
    plans: str
    folds: tuple[int, ...]
    epochs: int
    iterations: int
    device: str
    variants: tuple[Variant, ...]
    output_folder: Path
    preprocessed_folder: Path
    expressions: tuple[Expression, ...]
    text_cache_folder: Path
    file_ending: str
    splits: tuple[dict, ...]
    heldout_expressions: tuple[Expression, ...] = ()

    @property
    def sections(self) -> tuple[str, ...]:
        """What is measured per model: held-out wording only where the dataset has it."""
        return SECTIONS + ((HELDOUT_SECTION,) if self.heldout_expressions else ())

    @property
    def gt_folder(self) -> Path:
        return self.preprocessed_folder / "gt_segmentations"

    @property
    def splits_file(self) -> Path:
        return self.preprocessed_folder / "splits_final.json"

    def model_folder(self, variant: Variant) -> Path:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        return Path(get_output_folder(self.dataset_name, variant.trainer, self.plans, self.configuration))

    def fold_folder(self, variant: Variant, fold: int) -> Path:
        return self.model_folder(variant) / f"fold_{fold}"

    def validation_cases(self, fold: int) -> list[str]:
        return list(self.splits[fold]["val"])

    def validation_expressions(self, fold: int) -> list[Expression]:
        cases = set(self.validation_cases(fold))
        return [e for e in self.expressions if e.case in cases]

    def validation_heldout_expressions(self, fold: int) -> list[Expression]:
        cases = set(self.validation_cases(fold))
        return [e for e in self.heldout_expressions if e.case in cases]

    def work_folder(self, variant: Variant, fold: int, kind: str) -> Path:
        return self.output_folder / "predictions" / variant.name / f"fold_{fold}" / kind

    def training_environment(self) -> dict:
        return {**os.environ, BUDGET_EPOCHS_ENV: str(self.epochs), BUDGET_ITERATIONS_ENV: str(self.iterations)}


def say(message: str) -> None:
    print(f"LSMSv2_benchmark: {message}", flush=True)


# ------------------------------------------------------------------------------------------------ 1. setup
def prepare_benchmark(dataset: str | int, configuration: str, folds: Sequence[int], epochs: int, iterations: int,
                      plans: str = "nnUNetPlans", variants: Sequence[str] | None = None,
                      output_folder: str | os.PathLike | None = None, device: str = "cpu") -> BenchmarkSetup:
    """Check the dataset and options (clear error naming the fix) and make the splits file when it is missing."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    unset = [name for name, value in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed),
                                      ("nnUNet_results", nnUNet_results)) if not value]
    if unset:
        raise BenchmarkSetupError(f"{', '.join(unset)} not set. Fix: export nnUNet_raw, nnUNet_preprocessed and "
                                  f"nnUNet_results as for any nnU-Net command.")
    unknown = sorted(set(variants or ()) - set(VARIANTS_BY_NAME))
    if unknown:
        raise BenchmarkSetupError(f"Unknown variant(s) {unknown}. Fix: choose from {sorted(VARIANTS_BY_NAME)}.")
    if epochs < 1 or iterations < 1:
        raise BenchmarkSetupError(f"The budget must be at least 1 epoch x 1 iteration, got {epochs} x {iterations}.")
    if not folds or any(fold < 0 for fold in folds) or len(set(folds)) != len(folds):
        raise BenchmarkSetupError(f"--folds must be distinct fold numbers >= 0, got {list(folds)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkSetupError("-device cuda was asked for but torch sees no CUDA device. Fix: use -device cpu.")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:
        raise BenchmarkSetupError(f"Dataset {dataset} not found ({error}). Fix: create it (e.g. LSMSv2_make_synthetic "
                                  f"-d {dataset}) and run LSMSv2_plan_and_preprocess -d {dataset} -c "
                                  f"{configuration}.") from None
    raw_folder = Path(nnUNet_raw) / dataset_name
    preprocessed_folder = Path(nnUNet_preprocessed) / dataset_name
    if not (raw_folder / "expressions.json").is_file():
        raise BenchmarkSetupError(f"{raw_folder / 'expressions.json'} is missing: the benchmark compares referring "
                                  f"segmentation, so it needs a referring dataset. Fix: add the expressions file "
                                  f"(or convert the dataset with LSMSv2_convert_semantic / "
                                  f"LSMSv2_convert_expression_masks).")
    plans_file = preprocessed_folder / f"{plans}.json"
    if not plans_file.is_file():
        raise BenchmarkSetupError(f"{plans_file} is missing. Fix: run LSMSv2_plan_and_preprocess -d {dataset} -c "
                                  f"{configuration}" + ("" if plans == "nnUNetPlans" else
                                                        f", then make the plans variant {plans}") + ".")
    plans_manager = PlansManager(json.loads(plans_file.read_text(encoding="utf-8")))
    if configuration not in plans_manager.available_configurations:
        raise BenchmarkSetupError(f"{plans_file} has no configuration {configuration!r} (it has "
                                  f"{plans_manager.available_configurations}). Fix: pick one of those with -c.")
    data_folder = preprocessed_folder / plans_manager.get_configuration(configuration).data_identifier
    if not data_folder.is_dir() or not any(data_folder.iterdir()) or not (preprocessed_folder /
                                                                             "gt_segmentations").is_dir():
        raise BenchmarkSetupError(f"{data_folder} holds no preprocessed cases. Fix: run LSMSv2_plan_and_preprocess "
                                  f"-d {dataset} -c {configuration}.")
    try:
        prompt_set, encoder = read_prompt_set(preprocessed_folder / TEXT_FOLDER)
    except FileNotFoundError as error:
        raise BenchmarkSetupError(str(error)) from None
    if prompt_set.mode != REFERRING:
        raise BenchmarkSetupError(f"{preprocessed_folder / TEXT_FOLDER} was encoded as a plain task (no expressions). "
                                  f"Fix: rerun LSMSv2_encode_text -d {dataset} now that expressions.json exists.")
    splits = ensure_splits(preprocessed_folder, data_folder)
    for fold in folds:
        if fold >= len(splits):
            raise BenchmarkSetupError(f"Fold {fold} does not exist: {preprocessed_folder / 'splits_final.json'} "
                                      f"holds {len(splits)} folds. Fix: use --folds between 0 and {len(splits) - 1}.")
        without = sorted((set(splits[fold]["train"]) | set(splits[fold]["val"])) - prompt_set.cases())
        if without:
            raise BenchmarkSetupError(f"Cases {without[:10]} of fold {fold} have no expression in "
                                      f"{raw_folder / 'expressions.json'}. Fix: add expressions for them (targets [] "
                                      f"for 'nothing referred') and rerun LSMSv2_encode_text -d {dataset}.")
    suffix = configuration if plans == "nnUNetPlans" else f"{plans}_{configuration}"
    output_folder = Path(output_folder) if output_folder else \
        Path(nnUNet_results) / dataset_name / f"lsms_benchmark_{suffix}"
    chosen = tuple(VARIANTS_BY_NAME[name] for name in dict.fromkeys(variants)) if variants else VARIANTS
    heldout = read_heldout_expressions(raw_folder, prompt_set.cases())
    dataset_json = json.loads((preprocessed_folder / "dataset.json").read_text(encoding="utf-8"))
    return BenchmarkSetup(dataset_name=dataset_name, configuration=configuration, plans=plans, folds=tuple(folds),
                          epochs=epochs, iterations=iterations, device=device, variants=chosen,
                          output_folder=output_folder, preprocessed_folder=preprocessed_folder,
                          expressions=tuple(prompt_set.expressions),
                          text_cache_folder=preprocessed_folder / TEXT_FOLDER / EncoderIdentity.from_dict(encoder).slug,
                          file_ending=dataset_json["file_ending"], splits=tuple(splits), heldout_expressions=heldout)


def read_heldout_expressions(raw_folder: Path, known_cases: set[str]) -> tuple[Expression, ...]:
    """The held-out wordings of the training cases' expressions, or () when the dataset has none."""
    path = raw_folder / HELDOUT_EXPRESSIONS_FILE
    if not path.is_file():
        return ()
    try:
        expressions = tuple(load_expressions(path))
    except ExpressionsError as error:
        raise BenchmarkSetupError(str(error)) from None
    unknown = sorted({e.case for e in expressions} - known_cases)
    if unknown:
        raise BenchmarkSetupError(f"{path} names cases {unknown[:10]} that have no expression in "
                                  f"{raw_folder / 'expressions.json'}. Fix: regenerate the dataset "
                                  f"(LSMSv2_make_synthetic --heldout_phrasing) or remove {path.name}.")
    return expressions


def ensure_splits(preprocessed_folder: Path, data_folder: Path) -> list[dict]:
    """nnU-Net's splits_final.json; when missing, made now exactly as nnUNetTrainer.do_split would make it."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits_file = preprocessed_folder / "splits_final.json"
    if not splits_file.is_file():
        identifiers = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
        say(f"{splits_file} missing: making nnU-Net's 5-fold split of {len(identifiers)} cases (seed 12345)")
        splits = generate_crossval_split(identifiers, seed=12345, n_splits=5)
        write_file_atomically(splits_file, json.dumps(splits, indent=4).encode("utf-8"))
    return json.loads(splits_file.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ 2. training
def is_finished(fold_folder: Path) -> bool:
    return (fold_folder / "checkpoint_final.pth").is_file() and (fold_folder / "validation" / "summary.json").is_file()


def recorded_budget(fold_folder: Path) -> tuple[int, int] | None:
    """(epochs, iterations per epoch) that nnU-Net recorded in debug.json when the training started."""
    debug_file = fold_folder / "debug.json"
    if not debug_file.is_file():
        return None
    debug = json.loads(debug_file.read_text(encoding="utf-8"))
    return int(debug["num_epochs"]), int(debug["num_iterations_per_epoch"])


def check_budget(setup: BenchmarkSetup, fold_folder: Path) -> None:
    budget = recorded_budget(fold_folder)
    if budget is not None and budget != (setup.epochs, setup.iterations):
        raise BenchmarkSetupError(
            f"{fold_folder} was trained with a budget of {budget[0]} epochs x {budget[1]} iterations, but this run "
            f"asks for {setup.epochs} x {setup.iterations}; results would mix budgets. Fix: rerun with --epochs "
            f"{budget[0]} --iterations {budget[1]}, or move {fold_folder.parent} away to retrain.")


def resume_flags(fold_folder: Path) -> tuple[list[str], str]:
    """The `nnUNetv2_train` flags that finish an unfinished fold folder, and what they do."""
    if (fold_folder / "checkpoint_final.pth").is_file():
        return ["--val"], "final validation only (--val)"
    if (fold_folder / "checkpoint_latest.pth").is_file():
        return ["--c"], "continuing an interrupted training (--c)"
    return [], "training"


def nnunet_command(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def run_with_epoch_progress(command: list[str], log_file: Path, environment: dict, epochs: int | None,
                            description: str) -> int:
    """Run `command` with its output appended to `log_file`, showing finished epochs (nnU-Net's "Epoch time:" lines)."""
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        with open(log_file, encoding="utf-8", errors="replace") as reader, \
                tqdm(total=epochs, desc=description, unit="epoch") as progress:
            reader.seek(0, os.SEEK_END)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            unfinished_line = ""
            while True:
                finished = process.poll() is not None
                lines = (unfinished_line + reader.read()).split("\n")
                unfinished_line = lines.pop()
                finished_epochs = sum("Epoch time:" in line for line in lines)
                if finished_epochs:
                    progress.update(finished_epochs)
                if finished:
                    return process.returncode
                time.sleep(PROGRESS_POLL_SECONDS)


def train_variant(setup: BenchmarkSetup, variant: Variant, fold: int) -> str:
    """Train (or finish) one variant and fold with the stock `nnUNetv2_train`; returns what was done."""
    fold_folder = setup.fold_folder(variant, fold)
    check_budget(setup, fold_folder)
    if is_finished(fold_folder):
        return "finished earlier, left untouched"
    extra, action = resume_flags(fold_folder)
    log_file = setup.output_folder / "logs" / f"{variant.name}__fold_{fold}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [nnunet_command("nnUNetv2_train"), setup.dataset_name, setup.configuration, str(fold),
               "-tr", variant.trainer, "-p", setup.plans, "-device", setup.device, *extra]
    say(f"{variant.name} fold {fold}: {action}: {' '.join(command[1:])} (log: {log_file})")
    start = time.perf_counter()
    returncode = run_with_epoch_progress(command, log_file, setup.training_environment(),
                                         setup.epochs if not extra else None, f"{variant.name} fold {fold}")
    if returncode != 0 or not is_finished(fold_folder):
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise TrainingFailedError(f"{' '.join(command)} failed (exit code {returncode}). End of {log_file}:\n{tail}\n"
                                  f"Fix the cause and rerun LSMSv2_benchmark: it continues where it stopped.")
    return f"{action} done in {time.perf_counter() - start:.0f} s"


# ------------------------------------------------------------------------------------------------ 3. measuring
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
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            device = torch.device(self.setup.device)
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        verbose=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(self.setup.model_folder(self.variant)), (self.fold,),
                                                           "checkpoint_final.pth")
            # The fold's weights are loaded; predicting on the loaded network directly keeps torch's thread count
            # the same for every variant (the multi-fold path resets it to nnUNet_def_n_proc).
            predictor.list_of_parameters = []
            self._predictor = predictor
        return self._predictor

    def load_case(self, case: str) -> tuple[torch.Tensor, dict]:
        if self._dataset is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            folder = str(self.setup.preprocessed_folder /
                         self.predictor.configuration_manager.data_identifier)
            self._dataset = infer_dataset_class(folder)(folder, self.setup.validation_cases(self.fold))
        data, _, _, properties = self._dataset.load_case(case)
        return torch.from_numpy(np.asarray(data[:], dtype=np.float32)), properties

    def text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from lsms_nnunet.inference.predictor import embed_texts

        identity = EncoderIdentity.from_dict(self.predictor.network.model_card["text_encoder"])
        return embed_texts(texts, identity, self.setup.text_cache_folder)


def _load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def measure_training(model: _FoldModel) -> dict:
    fold_folder = model.setup.fold_folder(model.variant, model.fold)
    logging = _load_checkpoint(fold_folder / "checkpoint_final.pth")["logging"]
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
        return {"prompt": None, **plain_lesion_dice(folder, setup.gt_folder, cases, setup.file_ending)}
    from lsms_nnunet.inference.predictor import export_expression_masks

    predictor = model.predictor
    folder = setup.work_folder(variant, fold, "all_lesions")
    folder.mkdir(parents=True, exist_ok=True)
    reader_writer = predictor.plans_manager.image_reader_writer_class()
    for case in tqdm(cases, desc=f"{variant.name}: '{ALL_LESIONS_PROMPT}'", unit="case"):
        data, properties = model.load_case(case)
        logits = predictor.predict_prompt_logits(data, [ALL_LESIONS_PROMPT])
        export_expression_masks(logits.numpy(), properties, predictor.configuration_manager,
                                predictor.plans_manager, reader_writer, [case], folder, setup.file_ending)
    return {"prompt": ALL_LESIONS_PROMPT, **plain_lesion_dice(folder, setup.gt_folder, cases, setup.file_ending)}


def measure_network(model: _FoldModel) -> dict:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    predictor = model.predictor
    network = predictor.network.to(torch.device(model.setup.device)).eval()
    channels = determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                            predictor.dataset_json)
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
    from lsms_nnunet.inference.predictor import export_expression_masks

    predictor = model.predictor
    folder.mkdir(parents=True, exist_ok=True)
    reader_writer = predictor.plans_manager.image_reader_writer_class()
    by_case = expressions_by_case(expressions)
    for case, case_expressions in tqdm(by_case.items(), desc=f"{variant.name}: held-out wording", unit="case"):
        data, properties = model.load_case(case)
        logits = predictor.predict_prompt_logits(data, [e.text for e in case_expressions])
        export_expression_masks(logits.numpy(), properties, predictor.configuration_manager,
                                predictor.plans_manager, reader_writer, [e.id for e in case_expressions], folder,
                                setup.file_ending)
    summary = evaluate_referring_folder(setup.gt_folder, folder, expressions, file_ending=setup.file_ending,
                                        output_file=folder / "summary.json")
    return {"per_expression": summary["metric_per_expression"], "aggregate": summary["aggregate"]}


MEASUREMENTS: dict[str, Callable[[_FoldModel], dict]] = {
    "training": measure_training, "referring": measure_referring, "plain": measure_plain,
    "network": measure_network, "inference": measure_inference, "probe": measure_probe,
    HELDOUT_SECTION: measure_heldout}


def checkpoint_signature(checkpoint: Path) -> dict:
    status = checkpoint.stat()
    return {"file": str(checkpoint), "mtime_ns": status.st_mtime_ns, "size": status.st_size}


def write_json_atomically(path: Path, content: dict) -> None:
    write_file_atomically(path, (json.dumps(content, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def measure_variant(setup: BenchmarkSetup, variant: Variant, fold: int) -> dict:
    """All measurements of one trained variant and fold; each is saved as soon as it is done and reused later."""
    record_file = setup.output_folder / "records" / f"{variant.name}__fold_{fold}.json"
    signature = checkpoint_signature(setup.fold_folder(variant, fold) / "checkpoint_final.pth")
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    if record.get("checkpoint") != signature:
        record = {"variant": variant.name, "trainer": variant.trainer, "fold": fold, "checkpoint": signature}
    missing = [section for section in setup.sections if section not in record]
    if not missing:
        say(f"{variant.name} fold {fold}: all measurements recorded earlier, reused")
        return record
    model = _FoldModel(setup, variant, fold)
    for section in missing:
        start = time.perf_counter()
        record[section] = MEASUREMENTS[section](model)
        write_json_atomically(record_file, record)
        say(f"{variant.name} fold {fold}: measured {section} in {time.perf_counter() - start:.1f} s")
    return record


def measure_text_blind_ceiling(setup: BenchmarkSetup, fold: int) -> dict:
    """Referring metrics of the perfect all-lesion mask answering every expression (computed once per fold)."""
    record_file = setup.output_folder / "records" / f"text_blind_ceiling__fold_{fold}.json"
    if record_file.is_file():
        return json.loads(record_file.read_text(encoding="utf-8"))
    folder = setup.output_folder / "predictions" / "text_blind_ceiling" / f"fold_{fold}"
    write_all_lesion_reference_masks(setup.gt_folder, setup.validation_cases(fold), setup.file_ending,
                                     folder / "lesion_masks")
    summary = evaluate_text_blind_answers(folder / "lesion_masks", setup.gt_folder, setup.validation_expressions(fold),
                                          setup.file_ending, folder / "referring")
    record = {"fold": fold, "per_expression": summary["metric_per_expression"]}
    write_json_atomically(record_file, record)
    return record


# ------------------------------------------------------------------------------------------------ 4. results
def summarize_variant(setup: BenchmarkSetup, variant: Variant, records: Sequence[dict]) -> dict:
    """One variant over all benchmarked folds: metrics pooled over expressions and cases, costs averaged."""
    per_expression = [entry for record in records for entry in record["referring"]["per_expression"]]
    plain = {case: dice for record in records for case, dice in record["plain"]["dice_per_case"].items()}
    inference_cases = sum(r["inference"]["cases"] for r in records)
    inference_expressions = sum(r["inference"]["expressions"] for r in records)
    inference_seconds = sum(r["inference"]["seconds_per_case"] * r["inference"]["cases"] for r in records)
    network = records[0]["network"]
    return {
        "name": variant.name, "trainer": variant.trainer, "description": variant.description,
        "model_folder": str(setup.model_folder(variant)), "folds": [record["fold"] for record in records],
        "referring": aggregate_metrics(per_expression),
        "referring_per_category": per_category_metrics(per_expression),
        **phrasing_summary(records, per_expression),
        "plain_lesion": {"mean_dice": float(np.mean(list(plain.values()))), "cases": len(plain),
                         "prompt": records[0]["plain"]["prompt"]},
        "cost": {
            "trainable_parameters": network["trainable"], "frozen_parameters": network["frozen_text_encoder"],
            "gflops_per_patch": network["gflops_per_patch"], "patch_size": network["patch_size"],
            "seconds_per_iteration": float(np.mean([r["training"]["seconds_per_iteration"] for r in records])),
            "inference_seconds_per_case": inference_seconds / inference_cases,
            "inference_seconds_per_expression": inference_seconds / inference_expressions
            if inference_expressions else None,
            "probe_seconds_per_iteration": float(np.mean([r["probe"]["seconds_per_step"] for r in records])),
            "peak_memory_bytes": max(r["probe"]["peak_bytes"] for r in records),
            "peak_memory_kind": records[0]["probe"]["kind"],
        },
        "learning_curves": {str(r["fold"]): {"pseudo_dice": r["training"]["pseudo_dice"],
                                             "ema_pseudo_dice": r["training"]["ema_pseudo_dice"]} for r in records},
    }


def phrasing_summary(records: Sequence[dict], per_expression: list[dict]) -> dict:
    """Seen vs held-out wording of the same validation expressions, and their Dice ratio; {} without held-out."""
    heldout = [entry for record in records for entry in record.get(HELDOUT_SECTION, {}).get("per_expression", ())]
    if not heldout:
        return {}
    per_phrasing = per_phrasing_metrics(per_expression + heldout)
    seen_dice, heldout_dice = per_phrasing["seen"]["mean_dice"], per_phrasing["heldout"]["mean_dice"]
    return {"referring_per_phrasing": per_phrasing,
            "heldout_vs_seen_dice": heldout_dice / seen_dice if seen_dice else None,
            "heldout_per_category": per_category_metrics(heldout)}


def build_results(setup: BenchmarkSetup, records: dict[str, list[dict]], ceiling_records: Sequence[dict],
                  wall_seconds: float) -> dict:
    variants = [summarize_variant(setup, variant, records[variant.name]) for variant in setup.variants]
    ceiling = [entry for record in ceiling_records for entry in record["per_expression"]]
    vanilla = next((v for v in variants if v["name"] == VANILLA.name), None)
    for summary in variants:
        for key in ("seconds_per_iteration", "probe_seconds_per_iteration"):
            summary["cost"][f"{key}_vs_vanilla"] = summary["cost"][key] / vanilla["cost"][key] if vanilla else None
    return {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION, "dataset": setup.dataset_name,
        "configuration": setup.configuration, "plans": setup.plans, "folds": list(setup.folds),
        "budget": {"epochs": setup.epochs, "iterations_per_epoch": setup.iterations}, "device": setup.device,
        "splits_file": str(setup.splits_file), "wall_seconds_of_this_run": wall_seconds,
        "text_blind_ceiling": aggregate_metrics(ceiling),
        "text_blind_ceiling_per_category": per_category_metrics(ceiling),
        "variants": variants,
    }


# ------------------------------------------------------------------------------------------------ entry
def run_benchmark(setup: BenchmarkSetup) -> dict:
    """Train what is missing, measure what is missing, write results.json, results.md and plots."""
    start = time.perf_counter()
    setup.output_folder.mkdir(parents=True, exist_ok=True)
    jobs = [(variant, fold) for variant in setup.variants for fold in setup.folds]
    say(f"{setup.dataset_name} {setup.configuration} ({setup.plans}), folds {list(setup.folds)}, budget "
        f"{setup.epochs} epochs x {setup.iterations} iterations, device {setup.device}, {len(jobs)} trainings; "
        f"output {setup.output_folder}")
    for index, (variant, fold) in enumerate(jobs, 1):
        say(f"[{index}/{len(jobs)}] {variant.name} fold {fold}: {train_variant(setup, variant, fold)}")
    records: dict[str, list[dict]] = {variant.name: [] for variant in setup.variants}
    for index, (variant, fold) in enumerate(jobs, 1):
        say(f"[{index}/{len(jobs)}] measuring {variant.name} fold {fold}")
        records[variant.name].append(measure_variant(setup, variant, fold))
    ceiling_records = [measure_text_blind_ceiling(setup, fold) for fold in setup.folds]
    results = build_results(setup, records, ceiling_records, time.perf_counter() - start)
    write_json_atomically(setup.output_folder / "results.json", results)
    table = format_results_table(results)
    write_file_atomically(setup.output_folder / "results.md", (table + "\n").encode("utf-8"))
    plots = write_plots(results, setup.output_folder)
    print(table)
    say(f"wrote {setup.output_folder / 'results.json'}, results.md and {', '.join(p.name for p in plots)} "
        f"in {results['wall_seconds_of_this_run']:.0f} s")
    return results


def benchmark_entry() -> None:
    """`LSMSv2_benchmark -d ID -c CONFIG [--folds 0 ...] [--epochs E] [--iterations I] [-p PLANS] [--variants ...]
    [--out DIR] [-device cpu|cuda]`."""
    parser = argparse.ArgumentParser(
        description="Benchmark LSMS against vanilla nnU-Net (all regions merged into one lesion label) on a "
                    "referring dataset: same splits, same budget; accuracy and cost in one table.")
    parser.add_argument("-d", required=True, help="dataset name or id (planned, preprocessed and text-encoded)")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("--folds", "-f", nargs="+", type=int, default=[0], help="folds of splits_final.json "
                                                                               "(default: 0)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"epochs per training (default {DEFAULT_EPOCHS})")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"training iterations per epoch (default {DEFAULT_ITERATIONS})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS_BY_NAME),
                        help="variants to run (default: all)")
    parser.add_argument("--out", default=None, help="output folder (default: nnUNet_results/DatasetXXX/"
                                                    "lsms_benchmark_<configuration>)")
    parser.add_argument("-device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for training and measurements (default: cuda when available)")
    args = parser.parse_args()
    try:
        setup = prepare_benchmark(args.d, args.c, args.folds, args.epochs, args.iterations, args.p, args.variants,
                                  args.out, args.device)
        run_benchmark(setup)
    except (BenchmarkSetupError, TrainingFailedError) as error:
        sys.exit(f"LSMSv2_benchmark: error: {error}")
