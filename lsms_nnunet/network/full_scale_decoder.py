"""Full-Scale Decoder (FSD): every decoder level sees every encoder scale and every deeper decoder level.

UNet 3+ style full-scale skips: lesions from a few voxels to half the image need both fine boundaries and coarse
context at each level. Each source is resampled to the level's resolution and squeezed to a few channels, so the
fusion stays cheap. Output semantics equal dynamic_network_architectures' UNetDecoder, so nnU-Net's deep
supervision, loss weights and predictor work unchanged.
"""
from __future__ import annotations

from typing import Sequence, Type

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lsms_nnunet.network.config import FSD_PROJECTIONS

DOWN, SAME, UP = "down", "same", "up"


class ResampleProject(nn.Module):
    """Bring one source map to a decoder level: project it, then interpolate it up if it is coarser.

    Finer sources arrive max-pooled to the level already (`FullScaleDecoder.pooled_sources`); projecting on the
    coarser side of the resampling keeps the convolution on the smaller map. Interpolation targets the actual skip
    shape, so it stays exact whatever rounding the encoder's strided convolutions did.
    """

    def __init__(self, direction: str, projection: ConvDropoutNormReLU, conv_op: Type[_ConvNd]):
        super().__init__()
        self.direction = direction
        self.projection = projection
        dim = convert_conv_op_to_dim(conv_op)
        self._interpolation = "bilinear" if dim == 2 else "trilinear"

    def forward(self, x: torch.Tensor, target_size: Sequence[int]) -> torch.Tensor:
        projected = self.projection(x)
        if self.direction == UP:
            return F.interpolate(projected, size=list(target_size), mode=self._interpolation, align_corners=False)
        return projected


class FullScaleDecoder(nn.Module):
    """Decoder whose level d fuses all encoder skips and all decoder outputs deeper than d.

    Levels are computed deepest first; `stages[-1]` produces the highest-resolution features (as in UNetDecoder).
    `projection` (config.FSD_PROJECTIONS) is how each source is squeezed to channels_per_scale: a 1x1 convolution
    ("pointwise"; the fusion convolution after the concatenation has the planned kernel) or one with the planned
    kernel of its scale ("planned", UNet 3+'s 3x3, 15% of the decoder's training time on the CPU benchmark's shapes).
    Each level has as many output channels as the encoder stage of the same resolution, so capacity follows the
    nnU-Net plan. A segmentation head exists per level whether or not deep supervision is on, so checkpoints load
    either way.
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

        def conv_norm_nonlin(input_channels: int, output_channels: int, kernel_size) -> ConvDropoutNormReLU:
            if projection == "pointwise":
                kernel_size = [1] * len(kernel_size)
            return ConvDropoutNormReLU(encoder.conv_op, input_channels, output_channels, kernel_size, 1,
                                       encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                                       encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs)

        encoder_projections, decoder_projections, stages, seg_layers = [], [], [], []
        for step, level in enumerate(self.levels):
            from_encoder = []
            for source, source_channels in enumerate(self.encoder_channels):
                direction = DOWN if source < level else SAME if source == level else UP
                kernel_level = level if source <= level else source
                from_encoder.append(ResampleProject(
                    direction, conv_norm_nonlin(source_channels, channels_per_scale,
                                                encoder.kernel_sizes[kernel_level]), encoder.conv_op))
            from_decoder = [
                ResampleProject(UP, conv_norm_nonlin(self.encoder_channels[deeper], channels_per_scale,
                                                     encoder.kernel_sizes[deeper]), encoder.conv_op)
                for deeper in self.levels[:step]
            ]
            fused_channels = channels_per_scale * (n_stages + step)
            stages.append(StackedConvBlocks(
                n_conv_per_stage[step], encoder.conv_op, fused_channels, self.encoder_channels[level],
                encoder.kernel_sizes[level], 1, encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs,
                encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs))
            seg_layers.append(encoder.conv_op(self.encoder_channels[level], num_classes, 1, 1, 0, bias=True))
            encoder_projections.append(nn.ModuleList(from_encoder))
            decoder_projections.append(nn.ModuleList(from_decoder))
        self.encoder_projections = nn.ModuleList(encoder_projections)
        self.decoder_projections = nn.ModuleList(decoder_projections)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    @property
    def levels(self) -> list[int]:
        """Resolution index (encoder stage) of each decoder step, deepest first."""
        return list(range(len(self.encoder_channels) - 2, -1, -1))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """skips in encoder order (bottleneck last) -> logits, or a list of logits highest resolution first."""
        pooled = self.pooled_sources(skips)
        decoded: list[torch.Tensor] = []
        seg_outputs = []
        for step, level in enumerate(self.levels):
            target_size = skips[level].shape[2:]
            sources = [project(pooled[source][level] if source < level else skip, target_size)
                       for source, (project, skip) in enumerate(zip(self.encoder_projections[step], skips))]
            sources += [project(deeper, target_size)
                        for project, deeper in zip(self.decoder_projections[step], decoded)]
            features = self.stages[step](torch.cat(sources, dim=1))
            decoded.append(features)
            if self.deep_supervision or step == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[step](features))
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    @staticmethod
    def pooled_sources(skips: Sequence[torch.Tensor]) -> dict[int, dict[int, torch.Tensor]]:
        """pooled[source][level]: each skip max-pooled to every coarser decoder level's size. Each level pools the
        previous level's map where the sizes divide (the same maximum over nested windows, at a fraction of the
        work; as a plain max pool with the size ratio as window, which on the CPU takes about half the time of
        adaptive pooling for the same result), else the skip itself with adaptive pooling."""
        max_pool, adaptive_pool = (F.max_pool2d, F.adaptive_max_pool2d) if skips[0].ndim == 4 else \
            (F.max_pool3d, F.adaptive_max_pool3d)
        pooled: dict[int, dict[int, torch.Tensor]] = {}
        for source, skip in enumerate(skips[:-2]):  # the bottleneck has no decoder level, the last level no coarser
            pooled[source] = {}
            finer = skip
            for level in range(source + 1, len(skips) - 1):
                size = skips[level].shape[2:]
                if all(have % want == 0 for have, want in zip(finer.shape[2:], size)):
                    window = [have // want for have, want in zip(finer.shape[2:], size)]
                    finer = max_pool(finer, window, window)
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
