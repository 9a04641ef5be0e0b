"""Trainer variants, selectable with `-tr NAME` like nnU-Net's own `nnUNetTrainer_5epochs` family.

- `LSMSTrainer_test` / `nnUNetTrainer_test`: 1 epoch x 2 iterations (and a short case-level fit), for tests and
  smoke runs.
- `LSMSTrainer_quick`: a short demo run that still learns on the synthetic dataset (CPU: minutes). It seeds every
  generator first (LSMS_BUDGET_SEED, default 0), so a run with in-process augmentation (nnUNet_n_proc_DA=0, which
  `LSMSv2_demo` sets) repeats: the demo's figures are then one outcome, not a draw from a spread.
- `*_budget`: the benchmark's equal-budget runs; epochs and iterations come from LSMS_BUDGET_EPOCHS and
  LSMS_BUDGET_ITERATIONS (set by `LSMSv2_benchmark`), so LSMS and vanilla nnU-Net get exactly the same budget;
  LSMS_BUDGET_SEED, when set, seeds Python's, NumPy's and PyTorch's generators first (`LSMSv2_benchmark --seeds`:
  the initial weights and, with in-process augmentation (nnUNet_n_proc_DA=0), the batches repeat);
  LSMS_BUDGET_CASE_LEVEL_SETTINGS, when set, holds the CaseLevelSettings (a JSON object) that the LSMS budget
  trainers fit their case-level stage with (`LSMSv2_benchmark --case_level_settings FILE`: the same for every
  variant, e.g. a short fit for a smoke run).
- `LSMSTrainer_budget_<ablation>`: one per entry of `ABLATIONS` (network/config.py), generated; and the
  constant-text control.
"""
import json
import os
import random

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lsms_nnunet.network.config import ABLATIONS
from lsms_nnunet.preprocessing.prompts import context_labels
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.training.lsms_trainer import LSMSTrainer

BUDGET_EPOCHS_ENV, BUDGET_ITERATIONS_ENV, BUDGET_SEED_ENV, BUDGET_CASE_LEVEL_ENV = \
    "LSMS_BUDGET_EPOCHS", "LSMS_BUDGET_ITERATIONS", "LSMS_BUDGET_SEED", "LSMS_BUDGET_CASE_LEVEL_SETTINGS"


QUICK_SEED = 0  # LSMSTrainer_quick's seed when LSMS_BUDGET_SEED is not set


def seed_everything(seed: int) -> None:
    """One seed for every generator a training draws from (nnU-Net itself seeds none)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _TestBudget:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 2


class _QuickBudget:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed_everything(int(os.environ.get(BUDGET_SEED_ENV) or QUICK_SEED))
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 10, 50, 10
        self.save_every = 5


class _EnvironmentBudget:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if os.environ.get(BUDGET_SEED_ENV):
            seed_everything(int(os.environ[BUDGET_SEED_ENV]))
        super().__init__(plans, configuration, fold, dataset_json, device)
        missing = [v for v in (BUDGET_EPOCHS_ENV, BUDGET_ITERATIONS_ENV) if v not in os.environ]
        if missing:
            raise RuntimeError(f"{type(self).__name__} takes its budget from {missing}; they are set by "
                               f"LSMSv2_benchmark. Fix: run the benchmark, or export them.")
        self.num_epochs = int(os.environ[BUDGET_EPOCHS_ENV])
        self.num_iterations_per_epoch = int(os.environ[BUDGET_ITERATIONS_ENV])
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 5)
        self.save_every = 1


class LSMSTrainer_test(_TestBudget, LSMSTrainer):
    # a smoke-test budget for the case-level stage too: every part of it runs, briefly
    case_level_settings = CaseLevelSettings(fit_steps=60, operations_first_steps=10, verdict_folds=2)


class nnUNetTrainer_test(_TestBudget, nnUNetTrainer):
    pass


class LSMSTrainer_quick(_QuickBudget, LSMSTrainer):
    pass


class nnUNetTrainer_quick(_QuickBudget, nnUNetTrainer):
    pass


class LSMSTrainer_budget(_EnvironmentBudget, LSMSTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if os.environ.get(BUDGET_CASE_LEVEL_ENV):
            self.case_level_settings = CaseLevelSettings.from_dict(json.loads(os.environ[BUDGET_CASE_LEVEL_ENV]),
                                                                   BUDGET_CASE_LEVEL_ENV)


class nnUNetTrainer_budget(_EnvironmentBudget, nnUNetTrainer):
    pass


class LSMSTrainer_budget_constant_text(LSMSTrainer_budget):
    use_constant_text = True


FULL_ABLATION = "full"  # ABLATIONS' reference entry: LSMS itself, trained by LSMSTrainer_budget


def ablation_trainer_name(ablation: str) -> str:
    """The name of the benchmark-budget trainer of one of ABLATIONS (what `-tr` and the benchmark ask for)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown LSMS ablation {ablation!r}; choose one of {sorted(ABLATIONS)}.")
    base = LSMSTrainer_budget.__name__
    return base if ablation == FULL_ABLATION else f"{base}_{ablation}"


def _ablation_trainer(ablation: str) -> type[LSMSTrainer_budget]:
    """LSMSTrainer_budget with the ablation's LSMSConfig overrides (each switches off one LSMS component)."""
    return type(ablation_trainer_name(ablation), (LSMSTrainer_budget,), {
        "__module__": __name__,
        "__doc__": f"LSMS ablation {ablation!r} ({ABLATIONS[ablation]}) at the benchmark budget.",
        "lsms_config_overrides": dict(ABLATIONS[ablation]),
    })


# One trainer per entry of the ablation table, derived rather than written out, so a new ablation needs no code
# here. nnU-Net finds a trainer by class name among a module's attributes (recursive_find_python_class), so each is
# bound to its stable name at module level, e.g. LSMSTrainer_budget_no_visual.
ABLATION_TRAINERS: dict[str, type[LSMSTrainer_budget]] = {
    ablation: _ablation_trainer(ablation) for ablation in ABLATIONS if ablation != FULL_ABLATION}
globals().update({trainer.__name__: trainer for trainer in ABLATION_TRAINERS.values()})


def merged_lesion_labels(dataset_json: dict) -> dict:
    """The plain view of a region map: every lesion id is one "lesion" (nnU-Net region-based labels); context
    regions (anatomy, preprocessing/prompts.py) count as background.

    This is the best a text-blind nnU-Net can do on a referring dataset: segment all lesions, whatever is asked.
    nnU-Net only treats a label as a region when it lists more than one id, so a single-region dataset keeps a plain
    binary label.
    """
    context = context_labels(dataset_json)  # anatomy, not lesions: background to the merged label
    foreground = sorted({int(v) for name, v in dataset_json["labels"].items()
                         if name not in ("background", "ignore", *context) and not isinstance(v, (list, tuple))})
    if not foreground:
        raise ValueError("dataset.json declares no integer foreground label to merge into one lesion label. Fix: "
                         "declare the regions as {\"region_1\": 1, ...}.")
    labels = {"background": 0, "lesion": foreground if len(foreground) > 1 else foreground[0]}
    if "ignore" in dataset_json["labels"]:
        labels["ignore"] = dataset_json["labels"]["ignore"]
    merged = {**dataset_json, "labels": labels}
    if len(foreground) > 1:
        merged["regions_class_order"] = [1]
    else:
        merged.pop("regions_class_order", None)
    return merged


class _MergedLesionLabels:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, merged_lesion_labels(dataset_json), device)


class nnUNetTrainer_budget_merged(_EnvironmentBudget, _MergedLesionLabels, nnUNetTrainer):
    """Vanilla nnU-Net on the plain view of a referring dataset (all regions = one lesion), benchmark budget."""

