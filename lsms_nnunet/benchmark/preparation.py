"""Benchmark step 1: check that the dataset is planned, preprocessed and text-encoded, and fix the splits, so every
variant trains and validates on the same cases; the checked settings travel as one BenchmarkSetup."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lsms_nnunet.benchmark.variants import VARIANTS, VARIANTS_BY_NAME, Variant
from lsms_nnunet.preprocessing.encode_text import TEXT_FOLDER
from lsms_nnunet.preprocessing.prompts import REFERRING, context_labels, read_prompt_set
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.training.variants import (BUDGET_CASE_LEVEL_ENV, BUDGET_EPOCHS_ENV, BUDGET_ITERATIONS_ENV,
                                           BUDGET_SEED_ENV)
from text_conditioning.encoders import EncoderIdentity
from text_conditioning.expressions import HELDOUT_EXPRESSIONS_FILE, Expression, ExpressionsError, load_expressions
from text_conditioning.io import write_json_atomically


NETWORK_ALONE_SECTION = "network_alone"
CANDIDATES_SECTION = "candidates"
#: What the candidates section records: candidate quality per source, and the choice ceiling per expression.
CANDIDATE_SOURCES, CHOICE_CEILING = ("network", "true_lesions"), "choice_ceiling"
TEST_SECTION = "test"
SECTIONS = ("training", "referring", NETWORK_ALONE_SECTION, "plain", "network", "inference", "probe", "step_profile",
            "expression_scaling", CANDIDATES_SECTION)


HELDOUT_SECTION = "heldout"


class BenchmarkSetupError(RuntimeError):
    """The dataset, folds or options cannot be benchmarked as given (the message names the fix)."""


@dataclass(frozen=True)
class TestSplit:
    """The raw dataset's test cases: images (imagesTs), region maps (labelsTs) and their expressions file (seen and
    held-out wording, marked by `phrasing`). No training, verdict or tuned value reads them, so they measure what the
    validation folds chose."""
    images_folder: Path
    labels_folder: Path
    expressions_file: Path
    expressions: tuple[Expression, ...]
    file_ending: str

    @property
    def cases(self) -> list[str]:
        return list(dict.fromkeys(expression.case for expression in self.expressions))

    def signature(self) -> str:
        """What a test measurement was made on: the expressions file's content, and the name, size and modification
        time of each case's images and region map. A record of another signature is measured again: test cases
        added, expressions rewritten or images regenerated must not be reported with the old answers."""
        digest = hashlib.sha256(self.expressions_file.read_bytes())
        for case in self.cases:
            images = sorted(self.images_folder.glob(f"{case}_[0-9][0-9][0-9][0-9]{self.file_ending}"))
            for path in (*images, self.labels_folder / f"{case}{self.file_ending}"):
                status = path.stat()
                digest.update(f"{path.name}:{status.st_size}:{status.st_mtime_ns}\n".encode())
        return digest.hexdigest()


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
    results_root: Path  # nnUNet_results, or a seed's own copy of the layout inside the output folder
    heldout_expressions: tuple[Expression, ...] = ()
    seed: int | None = None  # None: nnU-Net's unseeded training in nnUNet_results
    case_level_settings: CaseLevelSettings | None = None  # None: each LSMS trainer's own
    test_split: TestSplit | None = None  # None: the raw dataset has no labelled test cases with expressions

    def for_seed(self, seed: int) -> BenchmarkSetup:
        """The same benchmark as one seeded repetition: its models and measurements in `seed_<seed>/`."""
        folder = self.output_folder / f"seed_{seed}"
        return dataclasses.replace(self, seed=seed, output_folder=folder, results_root=folder / "nnUNet_results")

    @property
    def sections(self) -> tuple[str, ...]:
        """What is measured per model: held-out wording and the test split only where the dataset has them."""
        return SECTIONS + ((HELDOUT_SECTION,) if self.heldout_expressions else ()) + \
            ((TEST_SECTION,) if self.test_split else ())

    @property
    def gt_folder(self) -> Path:
        return self.preprocessed_folder / "gt_segmentations"

    @property
    def context_ids(self) -> tuple[int, ...]:
        """The label ids of the dataset's context regions (anatomy): never lesions in any score."""
        dataset_json = json.loads((self.preprocessed_folder / "dataset.json").read_text(encoding="utf-8"))
        return tuple(context_labels(dataset_json, self.preprocessed_folder / "dataset.json").values())

    @property
    def splits_file(self) -> Path:
        return self.preprocessed_folder / "splits_final.json"

    def model_folder(self, variant: Variant) -> Path:
        """nnU-Net's model folder layout (nnunetv2.utilities.file_path_utilities.get_output_folder) under the
        setup's results root."""
        return self.results_root / self.dataset_name / f"{variant.trainer}__{self.plans}__{self.configuration}"

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
        environment = {**os.environ, BUDGET_EPOCHS_ENV: str(self.epochs), BUDGET_ITERATIONS_ENV: str(self.iterations),
                       "nnUNet_results": str(self.results_root)}
        if self.seed is not None:
            environment[BUDGET_SEED_ENV] = str(self.seed)
        environment.pop(BUDGET_CASE_LEVEL_ENV, None)  # only what results.json records
        if self.case_level_settings is not None:
            environment[BUDGET_CASE_LEVEL_ENV] = json.dumps(self.case_level_settings.to_dict())
        return environment


def say(message: str) -> None:
    print(f"LSMSv2_benchmark: {message}", flush=True)


def prepare_benchmark(dataset: str | int, configuration: str, folds: Sequence[int], epochs: int, iterations: int,
                      plans: str = "nnUNetPlans", variants: Sequence[str] | None = None,
                      output_folder: str | os.PathLike | None = None, device: str = "cpu",
                      case_level_settings: CaseLevelSettings | None = None) -> BenchmarkSetup:
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
                          file_ending=dataset_json["file_ending"], splits=tuple(splits), results_root=Path(nnUNet_results),
                          heldout_expressions=heldout, case_level_settings=case_level_settings,
                          test_split=read_test_split(raw_folder, dataset_json["file_ending"]))


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


def read_test_split(raw_folder: Path, file_ending: str) -> TestSplit | None:
    """imagesTs/expressions.json with the images and labelsTs region maps of its cases; None when the dataset has no
    test expressions (the benchmark then reports validation folds only)."""
    images, labels = raw_folder / "imagesTs", raw_folder / "labelsTs"
    path = images / "expressions.json"
    if not path.is_file():
        return None
    try:
        expressions = tuple(load_expressions(path))
    except ExpressionsError as error:
        raise BenchmarkSetupError(str(error)) from None
    cases = dict.fromkeys(expression.case for expression in expressions)
    without_image = [case for case in cases if not (images / f"{case}_0000{file_ending}").is_file()]
    without_labels = [case for case in cases if not (labels / f"{case}{file_ending}").is_file()]
    if without_image or without_labels:
        raise BenchmarkSetupError(
            f"{path} asks about test cases without " + " and ".join(
                part for part in (f"an image in {images} ({without_image[:5]})" if without_image else "",
                                  f"a region map in {labels} ({without_labels[:5]})" if without_labels else "")
                if part) + f". Fix: add <case>_0000{file_ending} / <case>{file_ending} for them, or remove their "
            f"expressions from {path.name}.")
    return TestSplit(images_folder=images, labels_folder=labels, expressions_file=path, expressions=expressions,
                     file_ending=file_ending)


def ensure_splits(preprocessed_folder: Path, data_folder: Path) -> list[dict]:
    """nnU-Net's splits_final.json; when missing, made now exactly as nnUNetTrainer.do_split would make it."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits_file = preprocessed_folder / "splits_final.json"
    if not splits_file.is_file():
        identifiers = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
        say(f"{splits_file} missing: making nnU-Net's 5-fold split of {len(identifiers)} cases (seed 12345)")
        splits = generate_crossval_split(identifiers, seed=12345, n_splits=5)
        write_json_atomically(splits_file, splits, indent=4, ensure_ascii=True)
    return json.loads(splits_file.read_text(encoding="utf-8"))
