"""Trainer variants, selectable with `-tr NAME` like nnU-Net's own `nnUNetTrainer_5epochs` family.

- `LSMSTrainer_test` / `nnUNetTrainer_test`: 1 epoch x 2 iterations, for tests and smoke runs.
- `LSMSTrainer_quick`: a short demo run that still learns on the synthetic dataset (CPU: minutes).
- `*_budget`: the benchmark's equal-budget runs; epochs and iterations come from LSMS_BUDGET_EPOCHS and
  LSMS_BUDGET_ITERATIONS (set by `LSMSv2_benchmark`), so LSMS and vanilla nnU-Net get exactly the same budget.
- Ablations of DESIGN.md section 5 and the constant-text control.
"""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lsms_nnunet.training.lsms_trainer import LSMSTrainer

BUDGET_EPOCHS_ENV, BUDGET_ITERATIONS_ENV = "LSMS_BUDGET_EPOCHS", "LSMS_BUDGET_ITERATIONS"


class _TestBudget:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 2


class _QuickBudget:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 10, 50, 10
        self.save_every = 5


class _EnvironmentBudget:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
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
    pass


class nnUNetTrainer_test(_TestBudget, nnUNetTrainer):
    pass


class LSMSTrainer_quick(_QuickBudget, LSMSTrainer):
    pass


class nnUNetTrainer_quick(_QuickBudget, nnUNetTrainer):
    pass


class LSMSTrainer_budget(_EnvironmentBudget, LSMSTrainer):
    pass


class nnUNetTrainer_budget(_EnvironmentBudget, nnUNetTrainer):
    pass


class LSMSTrainer_budget_no_visual(LSMSTrainer_budget):
    lsms_config_overrides = {"visual_branch": False}


class LSMSTrainer_budget_no_language(LSMSTrainer_budget):
    lsms_config_overrides = {"language_branch": False}


class LSMSTrainer_budget_unet_decoder(LSMSTrainer_budget):
    lsms_config_overrides = {"decoder": "unet"}


class LSMSTrainer_budget_no_contrastive(LSMSTrainer_budget):
    lsms_config_overrides = {"contrastive": False}


class LSMSTrainer_budget_static_head(LSMSTrainer_budget):
    lsms_config_overrides = {"text_conditioned_head": False}


class LSMSTrainer_budget_constant_text(LSMSTrainer_budget):
    use_constant_text = True


def merged_lesion_labels(dataset_json: dict) -> dict:
    """The plain view of a region map: every foreground id is one "lesion" (nnU-Net region-based labels).

    This is the best a text-blind nnU-Net can do on a referring dataset: segment all lesions, whatever is asked.
    nnU-Net only treats a label as a region when it lists more than one id, so a single-region dataset keeps a plain
    binary label.
    """
    foreground = sorted({int(v) for name, v in dataset_json["labels"].items()
                         if name not in ("background", "ignore") and not isinstance(v, (list, tuple))})
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

