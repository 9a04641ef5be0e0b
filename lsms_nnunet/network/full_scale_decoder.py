"""Full-Scale Decoder (FSD): every decoder level sees every encoder scale and every deeper decoder level.

UNet 3+ style full-scale skips: lesions from a few voxels to half the image need both fine boundaries and coarse
context at each level. Each source is resampled to the level's resolution and squeezed to a few channels, so the
fusion stays cheap. Output semantics equal dynamic_network_architectures' UNetDecoder, so nnU-Net's deep
supervision, loss weights and predictor work unchanged.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn

from lsms_nnunet.network.config import FSD_PROJECTIONS


class SharedProjection(nn.Module):
    """One source squeezed, in one convolution, for every decoder level that reads it without pooling.

    The convolution has channels_per_scale outputs per consumer level and its output is split per level. Convolution,
    the norm (nnU-Net's blocks build it per channel: `norm_op(channels)`, instance or batch norm) and the
    nonlinearity act on each output channel alone, so this computes exactly what one projection per level would, with
    a fraction of the module calls, which shortens the network's forward pass on the CPU.
    """

    def __init__(self, projection: ConvDropoutNormReLU, consumer_levels: Sequence[int], channels_per_scale: int):
        super().__init__()
        self.projection = projection
        self.consumer_levels = list(consumer_levels)
        self.channels_per_scale = channels_per_scale

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """level -> this source's projection for that level, still at the source's resolution."""
        return dict(zip(self.consumer_levels, torch.split(self.projection(x), self.channels_per_scale, dim=1)))


class FullScaleDecoder(nn.Module):
    """Decoder whose level d fuses all encoder skips and all decoder outputs deeper than d.

    Levels are computed deepest first; `stages[-1]` produces the highest-resolution features (as in UNetDecoder).
    Each source is squeezed to channels_per_scale by a projection (config.FSD_PROJECTIONS): a 1x1 convolution
    ("pointwise"; the fusion convolution after the concatenation has the planned kernel) or one with the planned
    kernel of its scale ("planned", UNet 3+'s 3x3, which adds to the decoder's training time; docs/decisions.md).
    A finer skip is max-pooled to the level and projected there (`down_projections`); a skip at the level's
    resolution or coarser (`skip_projections`) and a deeper decoder output (`decoded_projections`) are projected
    once for all the levels that read them (`SharedProjection`) and interpolated up, so every convolution runs on the
    smaller map. Each level has as many output channels as the encoder stage of the same resolution, so capacity
    follows the nnU-Net plan. A segmentation head exists per level whether or not deep supervision is on, so
    checkpoints load either way.
    """

    def __init__(self, encoder: PlainConvEncoder | ResidualEncoder, num_classes: int,
                 n_conv_per_stage: int | Sequence[int], deep_supervision: bool, channels_per_scale: int = 8,
                 projection: str = "pointwise"):
        super().__init__()
        n_stages = len(encoder.output_channels)
        if n_stages < 2:
            raise ValueError(f"A decoder needs an encoder with at least 2 stages, got {n_stages}.")
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * (n_stages - 1)
        if projection not in FSD_PROJECTIONS:
            raise ValueError(f"projection must be one of {FSD_PROJECTIONS}, got {projection!r}.")
        if len(n_conv_per_stage) != n_stages - 1:
            raise ValueError(f"n_conv_per_stage needs one entry per decoder level ({n_stages - 1}), "
                             f"got {list(n_conv_per_stage)}.")
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        self.channels_per_scale = channels_per_scale
        self.encoder_channels = list(encoder.output_channels)
        self.encoder_strides = [list(s) for s in encoder.strides]
        self._interpolation = "bilinear" if convert_conv_op_to_dim(encoder.conv_op) == 2 else "trilinear"

        def conv_norm_nonlin(input_channels: int, consumers: int, kernel_size) -> ConvDropoutNormReLU:
            if projection == "pointwise":
                kernel_size = [1] * len(kernel_size)
            return ConvDropoutNormReLU(encoder.conv_op, input_channels, channels_per_scale * consumers, kernel_size,
                                       1, encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs,
                                       encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin,
                                       encoder.nonlin_kwargs)

        levels = self.levels
        self.down_projections = nn.ModuleList(
            nn.ModuleList(conv_norm_nonlin(self.encoder_channels[source], 1, encoder.kernel_sizes[level])
                          for source in range(level))
            for level in levels)
        self.skip_projections = nn.ModuleList()
        for source, source_channels in enumerate(self.encoder_channels):
            consumers = [level for level in levels if level <= source]
            self.skip_projections.append(SharedProjection(
                conv_norm_nonlin(source_channels, len(consumers), encoder.kernel_sizes[source]), consumers,
                channels_per_scale))
        self.decoded_projections = nn.ModuleList(
            SharedProjection(conv_norm_nonlin(self.encoder_channels[level], len(levels[step + 1:]),
                                              encoder.kernel_sizes[level]), levels[step + 1:], channels_per_scale)
            for step, level in enumerate(levels[:-1]))
        self.stages = nn.ModuleList(
            StackedConvBlocks(n_conv_per_stage[step], encoder.conv_op, channels_per_scale * (n_stages + step),
                              self.encoder_channels[level], encoder.kernel_sizes[level], 1, encoder.conv_bias,
                              encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op, encoder.dropout_op_kwargs,
                              encoder.nonlin, encoder.nonlin_kwargs)
            for step, level in enumerate(levels))
        self.seg_layers = nn.ModuleList(encoder.conv_op(self.encoder_channels[level], num_classes, 1, 1, 0, bias=True)
                                        for level in levels)

    @property
    def levels(self) -> list[int]:
        """Resolution index (encoder stage) of each decoder step, deepest first."""
        return list(range(len(self.encoder_channels) - 2, -1, -1))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """skips in encoder order (bottleneck last) -> logits, or a list of logits highest resolution first."""
        pooled = self.pooled_sources(skips)
        squeezed_skips = [project(skip) for project, skip in zip(self.skip_projections, skips)]
        squeezed_decoded: list[dict[int, torch.Tensor]] = []
        seg_outputs = []
        for step, level in enumerate(self.levels):
            size = skips[level].shape[2:]
            # The concatenation's channel order (encoder sources finest first, then decoder outputs deepest first)
            # is what the fusion stage's weights were trained with.
            sources = [project(pooled[source][level]) for source, project in enumerate(self.down_projections[step])]
            sources += [self._resampled(squeezed[level], size) for squeezed in squeezed_skips[level:]]
            sources += [self._resampled(squeezed[level], size) for squeezed in squeezed_decoded]
            features = self.stages[step](torch.cat(sources, dim=1))
            if step < len(self.decoded_projections):
                squeezed_decoded.append(self.decoded_projections[step](features))
            if self.deep_supervision or step == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[step](features))
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    def _resampled(self, projected: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """A coarser source's projection interpolated to the level (the exact skip shape, whatever rounding the
        encoder's strided convolutions did)."""
        if projected.shape[2:] == size:
            return projected
        return F.interpolate(projected, size=list(size), mode=self._interpolation, align_corners=False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """Checkpoints written before the shared projections (LSMS up to 2026-12-04) load unchanged in meaning."""
        if any(key.startswith(prefix + "encoder_projections.") for key in state_dict):
            self._merge_separate_projections(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _merge_separate_projections(self, state_dict: dict, prefix: str) -> None:
        """Rewrite, in place, the former layout (`encoder_projections[step][source]` and
        `decoder_projections[step][deeper step]`, one ResampleProject each) into this one: a shared projection's
        tensors are its consumers' tensors concatenated along the output channels, in consumer order."""
        step_of = {level: step for step, level in enumerate(self.levels)}

        def move(new: str, olds: list[str], module: nn.Module) -> None:
            for name in module.state_dict():
                tensors = [state_dict.pop(f"{prefix}{old}.projection.{name}") for old in olds]
                state_dict[f"{prefix}{new}.{name}"] = torch.cat(tensors) if tensors[0].ndim else tensors[0]

        for step, level in enumerate(self.levels):
            for source, project in enumerate(self.down_projections[step]):
                move(f"down_projections.{step}.{source}", [f"encoder_projections.{step}.{source}"], project)
        for source, shared in enumerate(self.skip_projections):
            move(f"skip_projections.{source}.projection",
                 [f"encoder_projections.{step_of[level]}.{source}" for level in shared.consumer_levels],
                 shared.projection)
        for step, shared in enumerate(self.decoded_projections):
            move(f"decoded_projections.{step}.projection",
                 [f"decoder_projections.{step_of[level]}.{step}" for level in shared.consumer_levels],
                 shared.projection)

    @staticmethod
    def pooled_sources(skips: Sequence[torch.Tensor]) -> dict[int, dict[int, torch.Tensor]]:
        """pooled[source][level]: each skip max-pooled to every coarser decoder level's size. Each level pools the
        previous level's map where the sizes divide (the same maximum over nested windows, at a fraction of the
        work, and on the CPU faster than adaptive pooling for the same result), else the skip itself with
        adaptive pooling."""
        adaptive_pool = F.adaptive_max_pool2d if skips[0].ndim == 4 else F.adaptive_max_pool3d
        pooled: dict[int, dict[int, torch.Tensor]] = {}
        for source, skip in enumerate(skips[:-2]):  # the bottleneck has no decoder level, the last level no coarser
            pooled[source] = {}
            finer = skip
            for level in range(source + 1, len(skips) - 1):
                size = skips[level].shape[2:]
                if all(have % want == 0 for have, want in zip(finer.shape[2:], size)):
                    finer = _window_max(finer, [have // want for have, want in zip(finer.shape[2:], size)])
                else:
                    finer = adaptive_pool(skip, list(size))
                pooled[source][level] = finer
        return pooled

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Stored feature-map elements for one sample (input_size = encoder input, no channels), as nnU-Net counts."""
        sizes = [list(input_size)]
        for stride in self.encoder_strides:
            sizes.append([i // s for i, s in zip(sizes[-1], stride)])
        sizes = sizes[1:]  # sizes[j] = resolution of encoder stage j
        cps = self.channels_per_scale
        output = np.int64(0)
        for step, level in enumerate(self.levels):
            level_voxels = np.prod(sizes[level], dtype=np.int64)
            for source, channels in enumerate(self.encoder_channels):
                if source < level:  # pooled copy of the source
                    output += channels * level_voxels
                if source > level:  # projection before interpolation
                    output += cps * np.prod(sizes[source], dtype=np.int64)
            for deeper in self.levels[:step]:
                output += cps * np.prod(sizes[deeper], dtype=np.int64)
            n_sources = len(self.encoder_channels) + step
            output += 2 * n_sources * cps * level_voxels  # resampled projections and their concatenation
            output += self.stages[step].compute_conv_feature_map_size(sizes[level])
            if self.deep_supervision or step == len(self.stages) - 1:
                output += self.num_classes * level_voxels
        return output


def _window_max(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Max pooling with kernel = stride = window. Without autograd, as the elementwise maximum of the window's
    strided views: on the CPU PyTorch's max pool over a channels-first map is slow, several times slower than the
    strided maxima; with autograd the max pool, whose backward is faster."""
    if torch.is_grad_enabled() and x.requires_grad:
        return (F.max_pool2d if x.ndim == 4 else F.max_pool3d)(x, list(window), list(window))
    views = [x[(..., *(slice(offset, None, step) for offset, step in zip(offsets, window)))]
             for offsets in itertools.product(*(range(step) for step in window))]
    return functools.reduce(torch.maximum, views)
