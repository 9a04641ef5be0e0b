"""GPU memory references and the LSMS plan presets (the LSMS twins of nnU-Net's ResEnc M/L/XL presets).

nnU-Net sizes patch and batch against a *reference*: the feature-map count (`compute_conv_feature_map_size`) of a
network known to train at a given batch size in a given amount of GPU memory. The values below are nnU-Net 2.8.1's
(ExperimentPlanner and nnUNetPlannerResEncM/L/XL), so an LSMS plan and the nnU-Net plan it is compared with use the
same yardstick; only the network being measured differs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VRAMReference:
    """A network counting `elements_2d`/`elements_3d` feature-map elements per sample trains at `batch_size_2d`/
    `batch_size_3d` in `gpu_memory_gb` GB (nnU-Net's calibration of its count to real memory)."""

    elements_2d: int
    elements_3d: int
    batch_size_2d: int
    batch_size_3d: int
    gpu_memory_gb: float

    def bytes_per_element(self, dim: int) -> float:
        """GPU bytes that one counted element stands for (activations, gradients and overhead under AMP)."""
        elements, batch_size = self.for_dim(dim)
        return self.gpu_memory_gb * 2 ** 30 / (elements * batch_size)

    def for_dim(self, dim: int) -> tuple[int, int]:
        """(reference elements, reference batch size) for 2D or 3D networks."""
        if dim not in (2, 3):
            raise ValueError(f"nnU-Net plans 2D or 3D networks, got dim={dim}.")
        return (self.elements_2d, self.batch_size_2d) if dim == 2 else (self.elements_3d, self.batch_size_3d)


# nnU-Net's default planner (PlainConvUNet): batch 12 (2D) / 2 (3D) in 8 GB.
PLAIN_UNET_REFERENCE = VRAMReference(85_000_000, 560_000_000, 12, 2, 8)
# nnU-Net's ResEnc planners count residual blocks differently, hence their own references.
RESENC_UNET_REFERENCE = VRAMReference(135_000_000, 680_000_000, 12, 2, 8)


@dataclass(frozen=True)
class LSMSPreset:
    """A GPU class to plan for: target memory, the matching nnU-Net ResEnc reference, and the plans name."""

    name: str
    gpu_memory_target_gb: float
    plans_name: str
    reference: VRAMReference
    hardware: str
    # nnU-Net's presets drop the default planner's cap of 5% of the dataset per batch; so do these.
    max_dataset_covered: float = 1.0


PRESETS: dict[str, LSMSPreset] = {
    "M": LSMSPreset("M", 8, "nnUNetLSMSPlans_M", RESENC_UNET_REFERENCE,
                    "9-11 GB GPUs: RTX 2080 Ti, RTX 3080, older Titan"),
    "L": LSMSPreset("L", 24, "nnUNetLSMSPlans_L", VRAMReference(380_000_000, 2_100_000_000, 12, 2, 24),
                    "24 GB GPUs: RTX 3090/4090, Titan RTX, Quadro 6000"),
    "XL": LSMSPreset("XL", 40, "nnUNetLSMSPlans_XL", VRAMReference(560_000_000, 3_600_000_000, 12, 2, 40),
                     "40 GB GPUs: A100 40GB, RTX 6000 Ada"),
}
