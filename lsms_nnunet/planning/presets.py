"""GPU memory references and the LSMS plan presets, read from plans/presets.json (see its "about").

nnU-Net sizes patch and batch against a *reference*: the feature-map count (`compute_conv_feature_map_size`) of a
network known to train at a given batch size in a given amount of GPU memory. The numbers are data, kept in one file
in plans/, so the presets a user can pick (`LSMSv2_plan_experiment -preset`) are readable without reading code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: plans/presets.json; a link to it ships inside the package, so an installed copy reads the same file.
PRESETS_FILE = Path(__file__).with_name("presets.json")


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


@dataclass(frozen=True)
class LSMSPreset:
    """A GPU class to plan for: target memory, the matching nnU-Net ResEnc reference, and the plans name."""

    name: str
    gpu_memory_target_gb: float
    plans_name: str
    reference: VRAMReference
    hardware: str
    max_dataset_covered: float = 1.0


def _load_presets(path: Path = PRESETS_FILE) -> tuple[dict[str, VRAMReference], dict[str, LSMSPreset]]:
    """The references and presets of plans/presets.json; a preset names its reference."""
    document = json.loads(path.read_text(encoding="utf-8"))
    references = {name: VRAMReference(**values) for name, values in document["references"].items()}
    presets = {name: LSMSPreset(name=name, **{**values, "reference": references[values["reference"]]})
               for name, values in document["presets"].items()}
    return references, presets


REFERENCES, PRESETS = _load_presets()
# nnU-Net's default planner (PlainConvUNet): batch 12 (2D) / 2 (3D) in 8 GB.
PLAIN_UNET_REFERENCE = REFERENCES["PlainConvUNet"]
# nnU-Net's ResEnc planners count residual blocks differently, hence their own reference.
RESENC_UNET_REFERENCE = REFERENCES["ResidualEncoderUNet"]
