"""Whole-case position as input channels: where each voxel lies in the case, not in the patch.

A 3d_fullres patch of a large scan shows part of the liver, yet "the lesion in the left lobe" is a statement about
the whole case. With `LSMSConfig.case_position` the network reads, beside the image, CASE_POSITION_CHANNELS channels
holding each voxel's normalised coordinate along every array axis of the preprocessed case, in the canonical
orientation referring images are trained and predicted in: -1 at the first voxel, 1 at the last (0 along an axis of
one voxel, e.g. the z axis of a 2D image). They are appended to the case before the loader crops it, so the patch
carries them through rotation, scaling and cropping with the image (intensity augmentation leaves them alone:
training/dataloading.py), and to the whole case before the sliding window, so each window carries its own.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

#: nnU-Net stores every case as [C, Z, Y, X] (2D images with Z = 1), so a position has three coordinates.
CASE_POSITION_CHANNELS = 3


def network_input_channels(image_channels: int, case_position: bool) -> int:
    """Channels the network's first convolution reads: the image's, plus the position channels when it uses them."""
    return image_channels + (CASE_POSITION_CHANNELS if case_position else 0)


def case_position(shape: Sequence[int], region: Sequence[slice] | None = None) -> np.ndarray:
    """[3, *region] float32 normalised coordinates of the voxels in `region` (slices, default everything) of a case
    of spatial `shape`."""
    if len(shape) != CASE_POSITION_CHANNELS:
        raise ValueError(f"Case position needs a case of {CASE_POSITION_CHANNELS} spatial axes (nnU-Net's "
                         f"[C, Z, Y, X]), got spatial shape {tuple(shape)}.")
    region = tuple(region) if region is not None else (slice(None),) * len(shape)
    axes = [(np.linspace(-1.0, 1.0, size, dtype=np.float32) if size > 1 else np.zeros(1, np.float32))[part]
            for size, part in zip(shape, region)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def with_case_position(data: torch.Tensor) -> torch.Tensor:
    """A preprocessed case [C, Z, Y, X] with its position channels appended: [C + 3, Z, Y, X]."""
    position = torch.from_numpy(case_position(data.shape[1:])).to(device=data.device, dtype=data.dtype)
    return torch.cat((data, position))
