"""Plan a dataset with an LSMS planner and preprocess what is missing; `LSMSv2_plan_experiment` is its command line.

nnU-Net's `-pl` only searches inside nnunetv2, so this calls nnU-Net's `plan_experiment_dataset` with the LSMS
planner classes.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from lsms_nnunet.planning.data_sharing import preprocessed_configurations
from lsms_nnunet.planning.lsms_block import build_planned_lsms_network, resolved_configuration
from lsms_nnunet.planning.planners import (DEFAULT_PLANS_NAME, PRESET_PLANNERS, LSMSExperimentPlanner,
                                           LSMSPlanningMixin)
from lsms_nnunet.planning.presets import PRESETS, VRAMReference
from lsms_nnunet.cli import console_entry

DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


class LSMSPlanningError(RuntimeError):
    """Planning cannot start: a missing environment variable, dataset or fingerprint."""


def estimate_training_memory_gb(plans: Mapping, configuration: str, num_input_channels: int,
                                reference: VRAMReference) -> float:
    """GPU memory (GiB) of the planned LSMS training step by the planner's estimate: LSMS count x batch x bytes per
    counted element of `reference` (the planning_reference() of the planner that made the plans)."""
    resolved = resolved_configuration(plans, configuration)
    network = build_planned_lsms_network(resolved["architecture"], num_input_channels, resolved.get("lsms", {}))
    patch_size = resolved["patch_size"]
    elements = float(network.compute_conv_feature_map_size(patch_size)) * resolved["batch_size"]
    return elements * reference.bytes_per_element(len(patch_size)) / 2 ** 30


@dataclass
class LSMSPlanningResult:
    """What plan_lsms_experiment did for one dataset."""

    plans: dict
    plans_name: str
    preprocessed_now: list[str]  # configurations preprocessed by this run
    already_preprocessed: list[str]  # configurations whose (possibly shared) data were already on disk


def plan_lsms_experiment(dataset_id: int, planner_class: type[LSMSPlanningMixin] = LSMSExperimentPlanner,
                         gpu_memory_target_in_gb: float | None = None, plans_name: str | None = None,
                         preprocess_configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
                         num_processes: int | None = None) -> LSMSPlanningResult:
    """Plan dataset_id with an LSMS planner, then preprocess the requested configurations whose data are not on
    disk yet; shared nnUNetPlans data that are already preprocessed are used as they are."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(variable):
            raise LSMSPlanningError(f"${variable} is not set. Fix: export {variable}=<folder>, as for nnU-Net.")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_id)
    except RuntimeError as error:
        raise LSMSPlanningError(f"Dataset {dataset_id} is in neither $nnUNet_raw nor $nnUNet_preprocessed. Fix: "
                                f"check -d, or create the dataset first ({error})") from error
    fingerprint = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / "dataset_fingerprint.json"
    if not fingerprint.is_file():
        raise LSMSPlanningError(f"{fingerprint} is missing: planning needs nnU-Net's dataset fingerprint. Fix: run "
                                f"nnUNetv2_extract_fingerprint -d {dataset_id} (or nnUNetv2_plan_and_preprocess -d "
                                f"{dataset_id}) first.")
    _, plans_name = plan_experiment_dataset(dataset_id, planner_class, gpu_memory_target_in_gb,
                                            overwrite_plans_name=plans_name)
    plans = json.loads((fingerprint.parent / f"{plans_name}.json").read_text(encoding="utf-8"))  # as saved, older entries merged
    raw_folder = Path(os.environ["nnUNet_raw"]) / dataset_name
    cases = list(get_filenames_of_train_images_and_targets(str(raw_folder),
                                                           json.loads((raw_folder / "dataset.json").read_text(encoding="utf-8"))))
    done = preprocessed_configurations(dataset_name, plans, cases)
    todo = [name for name in preprocess_configurations if name in plans["configurations"] and name not in done]
    if todo:
        processes = num_processes or default_num_processes
        preprocess_dataset(dataset_id, plans_name, todo, [processes] * len(todo))
    return LSMSPlanningResult(plans, plans_name, todo, [name for name in plans["configurations"] if name in done])


def _summary(result: LSMSPlanningResult, reference: VRAMReference, num_input_channels: int,
             gpu_memory_target_gb: float) -> str:
    """What was planned per configuration: patch, batch, estimated memory, and where its data come from."""
    lines = [f"{result.plans_name} for {result.plans['dataset_name']} "
             f"(estimates for a {gpu_memory_target_gb:g} GB target):"]
    for name, configuration in result.plans["configurations"].items():
        if "inherits_from" in configuration:
            continue
        memory = estimate_training_memory_gb(result.plans, name, num_input_channels, reference)
        state = ("preprocessed now" if name in result.preprocessed_now
                 else "already preprocessed" if name in result.already_preprocessed else "not preprocessed")
        lines.append(f"  {name}: patch {configuration['patch_size']}, batch {configuration['batch_size']}, "
                     f"~{memory:.1f} GB, data {configuration['data_identifier']} ({state})")
    return "\n".join(lines)


@console_entry
def plan_experiment_entry() -> None:
    """LSMSv2_plan_experiment: nnUNetv2_plan_experiment with an LSMS planner, then the missing preprocessing."""
    parser = argparse.ArgumentParser(
        prog="LSMSv2_plan_experiment",
        description="Plan patch and batch for the LSMS network (not a plain U-Net) from nnU-Net's dataset "
                    "fingerprint, write <plans name>.json next to nnUNetPlans.json, and preprocess the requested "
                    "configurations whose data are not there yet (configurations that preprocess exactly like an "
                    "nnUNetPlans one use its data).")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset id(s)")
    presets = "; ".join(f"{name}: {preset.gpu_memory_target_gb:g} GB target for {preset.hardware}, plans "
                        f"{preset.plans_name}" for name, preset in PRESETS.items())
    parser.add_argument("-preset", choices=list(PRESET_PLANNERS), default=None,
                        help=f"ResEnc-based preset, like nnU-Net's. {presets}. Default: nnU-Net's default planner "
                             f"(PlainConvUNet, 8 GB), plans {DEFAULT_PLANS_NAME}")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="GPU memory target in GB (default 8, or the preset's)")
    parser.add_argument("-overwrite_plans_name", default=None, help="plans name to write instead of the default")
    parser.add_argument("-c", nargs="+", default=list(DEFAULT_CONFIGURATIONS),
                        help="configurations to preprocess (default: 2d 3d_fullres 3d_lowres; ones the plans do not "
                             "have are skipped)")
    parser.add_argument("-np", type=int, default=None,
                        help="processes for preprocessing (default: $nnUNet_def_n_proc, else 8)")
    parser.add_argument("--no_pp", action="store_true", help="plan only, preprocess nothing")
    args = parser.parse_args()
    if args.gpu_memory_target is not None and args.gpu_memory_target <= 0:
        parser.error(f"-gpu_memory_target must be > 0 GB, got {args.gpu_memory_target}.")
    if args.np is not None and args.np < 1:
        parser.error(f"-np must be >= 1, got {args.np}.")
    planner_class = PRESET_PLANNERS[args.preset] if args.preset else LSMSExperimentPlanner
    gpu_memory_target_gb = args.gpu_memory_target or planner_class.base_reference.gpu_memory_gb
    for dataset_id in args.d:
        result = plan_lsms_experiment(dataset_id, planner_class, args.gpu_memory_target,
                                      args.overwrite_plans_name, () if args.no_pp else args.c, args.np)
        dataset_json = json.loads((Path(os.environ["nnUNet_preprocessed"]) / result.plans["dataset_name"] /
                                   "dataset.json").read_text(encoding="utf-8"))
        print(_summary(result, planner_class.planning_reference(), len(dataset_json["channel_names"]),
                       gpu_memory_target_gb))
