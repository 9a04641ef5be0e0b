"""LSMS planners: nnU-Net's planners with patch and batch sized for the LSMS network, not a plain U-Net.

Shaped like nnU-Net's residual_encoder_unet_planners.py: one class per preset, each only setting the GPU target,
the memory reference and the plans name. nnU-Net shrinks the patch until its memory estimate fits the GPU target,
then spends the remaining headroom on the batch. The estimate is the feature-map count of the instantiated network
(`compute_conv_feature_map_size`), compared with a *reference* count that nnU-Net calibrated against real training
runs. Planning LSMS with the plain U-Net's count would plan patches that do not fit: SVLA (strip convolutions,
voxel-to-word attention), the full-scale decoder and the contrastive embedding all store feature maps a U-Net does
not have. These planners count the LSMS network itself (`LSMSNet.compute_conv_feature_map_size`) and compare it with
an LSMS reference (see `LSMS_COUNT_SCALE`), so for the same GPU target LSMS gets a smaller patch or batch wherever it
costs more.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.resencUNet_planner import ResEncUNetPlanner
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from lsms_nnunet.network import LSMSConfig, build_lsms_network
from lsms_nnunet.planning.data_sharing import share_preprocessed_data
from lsms_nnunet.planning.lsms_block import LSMS_OUTPUT_CLASSES, planned_lsms_settings
from lsms_nnunet.planning.presets import PLAIN_UNET_REFERENCE, PRESETS, RESENC_UNET_REFERENCE, LSMSPreset, VRAMReference

DEFAULT_PLANS_NAME = "nnUNetLSMSPlans"
NNUNET_PLANS_NAME = "nnUNetPlans"

# LSMSNet counts every tensor its SVLA blocks and full-scale decoder keep, while nnU-Net counts one map per conv
# block (the norm and nonlinearity outputs it also keeps are absorbed into nnU-Net's reference). So one LSMS-counted
# element costs less memory than one U-Net-counted element, and the reference is scaled by how many LSMS-counted
# elements take the memory of one element of the base network's count. Calibrated on CPU (float32, batch 1-2, one
# forward+backward, memory_profile.measure_training_step_peak_bytes) on nnU-Net-planned architectures with default
# features and LSMSConfig defaults; value = (peak bytes / count) of the base U-Net divided by the same for LSMS, per
# architecture and dimension, rounded to fit the patch sizes real plans reach (small 2D patches deviate most). The
# measured ratios and the network they were measured with are in docs/decisions.md. On a GPU (AMP, flash attention)
# the ratio may differ; it has not been measured there.
LSMS_COUNT_SCALE: dict[str, dict[int, float]] = {
    "PlainConvUNet": {2: 2.2, 3: 1.95},
    "ResidualEncoderUNet": {2: 1.85, 3: 1.75},
}


def lsms_reference(base: VRAMReference, architecture: str) -> VRAMReference:
    """The LSMS twin of nnU-Net's reference for `architecture`: same memory and batch, counted in LSMS elements."""
    scale = LSMS_COUNT_SCALE[architecture]
    return VRAMReference(round(base.elements_2d * scale[2]), round(base.elements_3d * scale[3]), base.batch_size_2d,
                         base.batch_size_3d, base.gpu_memory_gb)


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
        """nnU-Net's configuration plus its 'lsms' block, so the network trained is the network that was sized."""
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        plan["lsms"] = planned_lsms_settings(self.lsms_config, plan["architecture"]["arch_kwargs"]["n_stages"])
        return plan

    def generate_data_identifier(self, configuration_name: str) -> str:
        """Own data by default (nnU-Net's ResEnc planner shares unconditionally); save_plans decides what to share."""
        return f"{self.plans_identifier}_{configuration_name}"

    def save_plans(self, plans: dict) -> None:
        """Point configurations at nnUNetPlans' data where it is identical, so nothing is preprocessed twice."""
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
