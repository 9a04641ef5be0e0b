"""LSMS-aware experiment planning: nnU-Net's planner, with patch and batch sized for the LSMS network.

nnU-Net shrinks the patch until its memory estimate fits the GPU target, then spends the remaining headroom on the
batch. The estimate is the feature-map count of the instantiated network (`compute_conv_feature_map_size`),
compared with a *reference* count that nnU-Net calibrated against real training runs. Planning LSMS with the plain
U-Net's count would plan patches that do not fit: SVLA (strip convolutions, voxel-to-word attention), the full-scale
decoder and the contrastive embedding all store feature maps a U-Net does not have. These planners count the LSMS
network itself (`LSMSNet.compute_conv_feature_map_size`) and compare it with an LSMS reference (see
`LSMS_COUNT_SCALE`), so for the same GPU target LSMS gets a smaller patch or batch wherever it costs more.

nnU-Net's `-pl` only searches inside nnunetv2, so `plan_lsms_experiment` calls nnU-Net's
`plan_experiment_dataset` with these classes; `LSMSv2_plan_experiment` is its command line.
"""
from __future__ import annotations

import argparse
import json
import os
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.resencUNet_planner import ResEncUNetPlanner
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.profiler import ProfilerActivity, profile

from lsms_nnunet.network import LSMSConfig, LSMSNet, build_lsms_network
from plans.presets import PLAIN_UNET_REFERENCE, PRESETS, RESENC_UNET_REFERENCE, LSMSPreset, VRAMReference
from lsms_nnunet.cli import console_entry

DEFAULT_PLANS_NAME = "nnUNetLSMSPlans"
NNUNET_PLANS_NAME = "nnUNetPlans"
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
LSMS_OUTPUT_CLASSES = 2  # LSMS always predicts background vs. the referred target, whatever dataset.json lists
PLANNED_LSMS_SETTINGS = ("text_dim", "max_tokens", "svla_stages", "fsd_channels_per_scale", "attention_dim")

# LSMSNet counts every tensor its SVLA blocks and full-scale decoder keep, while nnU-Net counts one map per conv
# block (the norm and nonlinearity outputs it also keeps are absorbed into nnU-Net's reference). So one LSMS-counted
# element costs less memory than one U-Net-counted element, and the reference is scaled by how many LSMS-counted
# elements take the memory of one element of the base network's count. Calibrated on CPU (float32, batch 1-2, one
# forward+backward, measure_training_step_peak_bytes) on nnU-Net-planned architectures with default features and
# LSMSConfig defaults; value = (peak bytes / count) of the base U-Net divided by the same for LSMS:
#   PlainConvUNet 2D 256x256: 2.15, 320x256: 2.15, 512x512: 2.21 (128x128: 2.76)            -> 2.2
#   PlainConvUNet 3D 32x64x64: 2.00, 32x96x96: 2.00, 40x112x112: 2.03, 64x64x64: 1.88, 64x96x96: 1.90 -> 1.95
#   ResidualEncoderUNet 2D 512x512: 1.85 (256x256: 2.59) -> 1.85; 3D 64x64x64: 1.75, 64x96x96: 1.77 -> 1.75
# The values fit the patch sizes real plans reach (small 2D patches, in brackets, deviate most). On a GPU (AMP,
# flash attention) the ratio may differ; it has not been measured there.
LSMS_COUNT_SCALE: dict[str, dict[int, float]] = {
    "PlainConvUNet": {2: 2.2, 3: 1.95},
    "ResidualEncoderUNet": {2: 1.85, 3: 1.75},
}


class LSMSPlanningError(RuntimeError):
    """Planning cannot start: a missing environment variable, dataset or fingerprint."""


def lsms_reference(base: VRAMReference, architecture: str) -> VRAMReference:
    """The LSMS twin of nnU-Net's reference for `architecture`: same memory and batch, counted in LSMS elements."""
    scale = LSMS_COUNT_SCALE[architecture]
    return VRAMReference(round(base.elements_2d * scale[2]), round(base.elements_3d * scale[3]), base.batch_size_2d,
                         base.batch_size_3d, base.gpu_memory_gb)


def planned_lsms_settings(config: LSMSConfig, n_stages: int) -> dict:
    """The LSMSConfig fields the planner decides for an encoder of n_stages, as stored in a configuration's 'lsms'."""
    settings = {name: config.to_dict()[name] for name in PLANNED_LSMS_SETTINGS}
    settings["svla_stages"] = list(config.svla_stage_indices(n_stages))
    return settings


def build_planned_lsms_network(architecture: Mapping, num_input_channels: int, settings: Mapping,
                               deep_supervision: bool = True) -> LSMSNet:
    """The LSMS network a configuration describes: its 'architecture' block plus its 'lsms' settings."""
    return build_lsms_network(architecture["network_class_name"], architecture["arch_kwargs"],
                              architecture["_kw_requires_import"], num_input_channels, LSMS_OUTPUT_CLASSES,
                              deep_supervision, LSMSConfig.from_dict(settings))


class LSMSPlanningMixin:
    """What turns an nnU-Net planner into an LSMS planner: the memory estimate, the 'lsms' block, data reuse.

    Mixed in front of ExperimentPlanner or ResEncUNetPlanner, so everything else (spacing, topology, the patch
    shrinking loop, the batch size rule, 3d_lowres) stays nnU-Net's.
    """

    lsms_config = LSMSConfig()
    base_reference: VRAMReference  # nnU-Net's reference for the base architecture; its memory is the default target
    architecture_name: str

    @classmethod
    def planning_reference(cls) -> VRAMReference:
        """The reference the LSMS count is compared with: nnU-Net's, rescaled to LSMS-counted elements."""
        return lsms_reference(cls.base_reference, cls.architecture_name)

    def _use_lsms_reference(self) -> None:
        """Replace nnU-Net's reference values (set in its __init__) by the LSMS ones for the same GPU memory."""
        reference = self.planning_reference()
        self.UNet_reference_val_2d, self.UNet_reference_val_3d = reference.elements_2d, reference.elements_3d
        self.UNet_reference_val_corresp_bs_2d = reference.batch_size_2d
        self.UNet_reference_val_corresp_bs_3d = reference.batch_size_3d
        self.UNet_reference_val_corresp_GB = reference.gpu_memory_gb

    def static_estimate_VRAM_usage(self, patch_size: Sequence[int], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict,
                                   arch_kwargs_req_import: Sequence[str]) -> np.int64:
        """Feature-map count of the LSMS network for one sample (nnU-Net calls this while shrinking the patch).

        output_channels is ignored: LSMS always has a 2-class head. Unlike nnU-Net's version this leaves torch's
        thread count alone (nnU-Net's sets it to nnUNet_n_proc_DA, which crashes planning when that is 0).
        """
        network = build_lsms_network(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                     LSMS_OUTPUT_CLASSES, True, self.lsms_config)
        return network.compute_conv_feature_map_size(patch_size)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        plan["lsms"] = planned_lsms_settings(self.lsms_config, plan["architecture"]["arch_kwargs"]["n_stages"])
        return plan

    def generate_data_identifier(self, configuration_name: str) -> str:
        """Own data by default (nnU-Net's ResEnc planner shares unconditionally); save_plans decides what to share."""
        return f"{self.plans_identifier}_{configuration_name}"

    def save_plans(self, plans: dict) -> None:
        recursive_fix_for_json_export(plans)
        nnunet_plans_file = Path(os.environ["nnUNet_preprocessed"]) / self.dataset_name / f"{NNUNET_PLANS_NAME}.json"
        if nnunet_plans_file.is_file():
            share_preprocessed_data(plans, json.loads(nnunet_plans_file.read_text(encoding="utf-8")))
        super().save_plans(plans)


class LSMSExperimentPlanner(LSMSPlanningMixin, ExperimentPlanner):
    """nnU-Net's default planner (PlainConvUNet, 8 GB), sized for LSMS; plans name nnUNetLSMSPlans."""

    base_reference = PLAIN_UNET_REFERENCE
    architecture_name = "PlainConvUNet"

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = DEFAULT_PLANS_NAME,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self._use_lsms_reference()


class LSMSResEncPlanner(LSMSPlanningMixin, ResEncUNetPlanner):
    """nnU-Net's ResEnc planner (residual encoder, 8 GB), sized for LSMS; base of the M/L/XL presets."""

    base_reference = RESENC_UNET_REFERENCE
    architecture_name = "ResidualEncoderUNet"
    default_plans_name = f"{DEFAULT_PLANS_NAME}_ResEnc"
    preset: LSMSPreset | None = None

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float | None = None,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb or self.base_reference.gpu_memory_gb,
                         preprocessor_name, plans_name or self.default_plans_name, overwrite_target_spacing,
                         suppress_transpose)
        if self.preset is not None:
            self.max_dataset_covered = self.preset.max_dataset_covered
        self._use_lsms_reference()


class LSMSPlannerResEncM(LSMSResEncPlanner):
    """~8 GB GPUs, like nnUNetPlannerResEncM; plans name nnUNetLSMSPlans_M."""

    preset = PRESETS["M"]
    base_reference = preset.reference
    default_plans_name = preset.plans_name


class LSMSPlannerResEncL(LSMSResEncPlanner):
    """~24 GB GPUs, like nnUNetPlannerResEncL; plans name nnUNetLSMSPlans_L."""

    preset = PRESETS["L"]
    base_reference = preset.reference
    default_plans_name = preset.plans_name


class LSMSPlannerResEncXL(LSMSResEncPlanner):
    """~40 GB GPUs, like nnUNetPlannerResEncXL; plans name nnUNetLSMSPlans_XL."""

    preset = PRESETS["XL"]
    base_reference = preset.reference
    default_plans_name = preset.plans_name


PRESET_PLANNERS: dict[str, type[LSMSResEncPlanner]] = {
    planner.preset.name: planner for planner in (LSMSPlannerResEncM, LSMSPlannerResEncL, LSMSPlannerResEncXL)
}

# What decides the content of a configuration's preprocessed data (DefaultPreprocessor reads exactly these), at the
# level of the plans and of the configuration.
PLANS_PREPROCESSING_KEYS = ("transpose_forward", "image_reader_writer", "foreground_intensity_properties_per_channel")
CONFIGURATION_PREPROCESSING_KEYS = ("preprocessor_name", "normalization_schemes", "use_mask_for_norm",
                                    "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                                    "resampling_fn_seg_kwargs")


def share_preprocessed_data(plans: dict, nnunet_plans: dict) -> dict[str, str]:
    """Point LSMS configurations at nnU-Net's preprocessed data wherever preprocessing would produce the same data.

    nnU-Net names a configuration's data folder `<plans_name>_<configuration>` (its data_identifier), so LSMS plans
    would otherwise preprocess the whole dataset a second time. Memory-aware planning changes patch, batch and
    network, never spacing, normalization or resampling, so 2d and 3d_fullres (whose spacing comes from the
    fingerprint alone) always match nnU-Net's; 3d_lowres matches only if its spacing came out the same. A
    configuration is shared only when every preprocessing input is equal to that of an nnUNetPlans configuration
    (same spacing, normalization, resampling, preprocessor, transpose, reader and intensity statistics), so the
    shared data are exactly what preprocessing these plans would write. (nnU-Net's blosc2 chunking is tuned to the
    patch of the plans that wrote the data; another patch size reads the same arrays, only the chunk fit differs,
    as with nnU-Net's own ResEnc presets, which share data the same way.)

    Both plans must be JSON-like (lists, not numpy arrays). Returns {configuration: data_identifier now shared}.
    """
    if any(plans.get(key) != nnunet_plans.get(key) for key in PLANS_PREPROCESSING_KEYS):
        return {}
    candidates = [resolved_configuration(nnunet_plans, name) for name in nnunet_plans["configurations"]]
    shared = {}
    for name, configuration in plans["configurations"].items():
        if "inherits_from" in configuration:  # follows its parent's data
            continue
        match = next((candidate for candidate in candidates if _same_preprocessing(configuration, candidate)), None)
        if match is not None:
            configuration["data_identifier"] = match["data_identifier"]
            shared[name] = match["data_identifier"]
    return shared


def _same_preprocessing(configuration: Mapping, other: Mapping) -> bool:
    spacing, other_spacing = configuration.get("spacing"), other.get("spacing")
    if spacing is None or other_spacing is None or len(spacing) != len(other_spacing):
        return False
    return (np.allclose(spacing, other_spacing, rtol=1e-6, atol=0)
            and all(configuration.get(key) == other.get(key) for key in CONFIGURATION_PREPROCESSING_KEYS))


def resolved_configuration(plans: Mapping, configuration: str) -> dict:
    """A configuration with what it inherits ('inherits_from') filled in, the way nnU-Net's PlansManager does."""
    configurations = plans["configurations"]
    if configuration not in configurations:
        raise ValueError(f"Configuration {configuration!r} is not in plans {plans.get('plans_name')!r} (available: "
                         f"{sorted(configurations)}); pick one of those or re-run LSMSv2_plan_experiment.")
    chain = [configuration]
    while "inherits_from" in configurations[chain[-1]]:
        parent = configurations[chain[-1]]["inherits_from"]
        if parent in chain or parent not in configurations:
            raise ValueError(f"Plans {plans.get('plans_name')!r}: configuration {chain[-1]!r} inherits from "
                             f"{parent!r}, which is {'circular' if parent in chain else 'missing'}; fix "
                             f"'inherits_from' or re-plan.")
        chain.append(parent)
    resolved: dict = {}
    for name in reversed(chain):
        resolved.update(deepcopy(configurations[name]))
    resolved.pop("inherits_from", None)
    return resolved


def lsms_settings_from_plans(plans: Mapping, configuration: str) -> dict:
    """LSMSConfig overrides stored in a configuration's 'lsms' block ({} for plans without one, e.g. nnUNetPlans).

    Inherited configurations (3d_cascade_fullres) resolve as nnU-Net resolves them. Values are validated and
    returned LSMSConfig-ready (tuples, not JSON lists).
    """
    block = resolved_configuration(plans, configuration).get("lsms", {})
    try:
        config = LSMSConfig.from_dict(block)
    except ValueError as error:
        raise ValueError(f"Plans {plans.get('plans_name')!r}, configuration {configuration!r}: invalid 'lsms' "
                         f"block {block}: {error}") from error
    return {name: getattr(config, name) for name in block}


def estimate_training_memory_gb(plans: Mapping, configuration: str, num_input_channels: int,
                                reference: VRAMReference) -> float:
    """GPU memory (GiB) of the planned LSMS training step by the planner's estimate: LSMS count x batch x bytes per
    counted element of `reference` (the planning_reference() of the planner that made the plans)."""
    resolved = resolved_configuration(plans, configuration)
    network = build_planned_lsms_network(resolved["architecture"], num_input_channels, resolved.get("lsms", {}))
    patch_size = resolved["patch_size"]
    elements = float(network.compute_conv_feature_map_size(patch_size)) * resolved["batch_size"]
    return elements * reference.bytes_per_element(len(patch_size)) / 2 ** 30


def measure_training_step_peak_bytes(network: nn.Module, patch_size: Sequence[int], batch_size: int) -> int:
    """Peak CPU memory (bytes) allocated by one forward + backward pass on random data, above what was allocated
    before (parameters are not counted; their gradients, the batch and every activation are).

    torch's CPU allocations bypass Python's allocator (tracemalloc sees none of them), so this records every
    allocation and free with torch.profiler (profile_memory=True) and replays them in time order. LSMS networks get
    random text at their configured max_tokens; the loss is the mean of every output (and, with the contrastive
    heads, of the embeddings), so every output takes part in the backward pass.
    """
    from torch._C._profiler import _EventType  # the profiler's raw event tree; its public tables aggregate per op

    if batch_size < 1 or any(size < 1 for size in patch_size):
        raise ValueError(f"batch_size and patch_size must be positive, got {batch_size} and {list(patch_size)}.")
    first_conv = next((module for module in network.modules() if isinstance(module, _ConvNd)), None)
    if first_conv is None:
        raise ValueError(f"{type(network).__name__} has no convolution; cannot infer its input channels.")
    network.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        _forward_backward(network, torch.randn(batch_size, first_conv.in_channels, *patch_size))
    network.zero_grad(set_to_none=True)

    allocations = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    allocated = peak = 0
    for _, size in sorted(allocations):
        allocated += size
        peak = max(peak, allocated)
    return peak


def _forward_backward(network: nn.Module, batch: torch.Tensor) -> None:
    if isinstance(network, LSMSNet):
        config = network.config
        tokens = torch.randn(batch.shape[0], config.max_tokens, config.text_dim)
        mask = torch.ones(batch.shape[0], config.max_tokens, dtype=torch.bool)
        if config.contrastive:
            output, aux = network(batch, tokens, mask, return_aux=True)
            extra = aux["voxel_embedding"].mean() + aux["sentence_embedding"].mean()
        else:
            output, extra = network(batch, tokens, mask), 0
    else:
        output, extra = network(batch), 0
    outputs = output if isinstance(output, (list, tuple)) else [output]
    loss = sum(item.float().mean() for item in outputs) + extra
    loss.backward()


def preprocessed_configurations(dataset_name: str, plans: Mapping, case_identifiers: Sequence[str]) -> set[str]:
    """Configurations whose data folder already holds every training case (data, segmentation and properties)."""
    root = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    done = set()
    for name in plans["configurations"]:
        folder = root / resolved_configuration(plans, name)["data_identifier"]
        if all((folder / f"{case}{suffix}").is_file()
               for case in case_identifiers for suffix in (".b2nd", "_seg.b2nd", ".pkl")):
            done.add(name)
    return done


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
