"""Scale-aware Vision-Language Attention (SVLA): the text-conditioned modulation applied after encoder stages.

Reconstruction from the LSMS abstract and the closest public designs: SegNeXt-style multi-kernel strip attention
for the visual branch and LAVT-style gated pixel-to-word attention for the language branch.
"""
from __future__ import annotations

import math
from typing import Sequence, Type

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn.modules.conv import _ConvNd


class DepthwiseStripConv(nn.Module):
    """Depthwise convolution along one spatial axis with 'same' zero padding, computed as a banded matrix product.

    Along an axis of n voxels, a k-tap strip is multiplication by an n x n band matrix per channel (entry [j, i] =
    tap j - i + k // 2, zero off the band, which is exactly the zero padding and clips taps longer than the map).
    On CPU, PyTorch's depthwise convolution along the contiguous axis is slow, its backward slower still: as a
    matrix product a strip and its backward take a fraction of the convolution's time, and as convolutions the
    strips were a large share of a training step (lsms_nnunet/benchmark/step_profile.py; docs/decisions.md). On
    long axes, where the band is sparse (n > BAND_MAX_RATIO * k), the convolution does less work and is used
    instead. Both read the same `conv` parameters, so checkpoints do not depend on the choice.
    """

    #: Axis length (in taps) beyond which the band matrix would hold mostly zeros.
    BAND_MAX_RATIO = 4

    def __init__(self, conv_op: Type[_ConvNd], channels: int, length: int, axis: int):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        if length % 2 == 0:
            raise ValueError(f"Strip length must be odd so the strip is centred on its voxel, got {length}.")
        kernel = [1] * dim
        kernel[axis] = length
        self.conv = conv_op(channels, channels, kernel, padding=[k // 2 for k in kernel], groups=channels)
        self.axis = axis
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_dim = 2 + self.axis
        size = x.shape[spatial_dim]
        if size > self.BAND_MAX_RATIO * self.length:
            return self.conv(x)
        band = self._band(size).to(x.dtype)  # [C, n, n]: out[..., i] = sum_j x[..., j] * band[c, j, i]
        band = band.view(band.shape[0], *([1] * (x.ndim - 4)), size, size)
        if spatial_dim == x.ndim - 1:
            out = torch.matmul(x, band)
        else:
            out = torch.matmul(band.transpose(-1, -2), x.movedim(spatial_dim, -2)).movedim(-2, spatial_dim)
        return out + self.conv.bias.view(-1, *([1] * (x.ndim - 2))).to(x.dtype)

    def _band(self, size: int) -> torch.Tensor:
        taps = self.conv.weight.reshape(self.conv.out_channels, self.length)
        positions = torch.arange(size, device=taps.device)
        offset = positions[:, None] - positions[None, :] + self.length // 2  # [j, i]: tap j - i + k // 2
        on_band = (offset >= 0) & (offset < self.length)
        return taps[:, offset.clamp(0, self.length - 1)] * on_band


class ScaleAwareVisualAttention(nn.Module):
    """Multi-scale context from cheap depthwise convolutions: a 5-wide local kernel plus long strips.

    Each strip length k gets a chain of strips, one per spatial axis (1xk then kx1 in 2D; kx1x1, 1xkx1, 1x1xk in
    3D), i.e. a separable k-wide receptive field, so lesions of very different sizes find a matching scale.
    """

    def __init__(self, channels: int, conv_op: Type[_ConvNd], strip_kernel_sizes: Sequence[int] = (7, 11, 21)):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        if dim not in (2, 3):
            raise ValueError(f"SVLA supports 2D and 3D convolutions, got {conv_op.__name__}.")
        self.local = conv_op(channels, channels, 5, padding=2, groups=channels)
        self.strips = nn.ModuleList(
            nn.Sequential(*(DepthwiseStripConv(conv_op, channels, length, axis) for axis in reversed(range(dim))))
            for length in strip_kernel_sizes
        )
        self.mix = conv_op(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local(x)
        multi_scale = local
        for strip in self.strips:
            multi_scale = multi_scale + strip(local)
        return self.mix(multi_scale)

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """Stored elements for one sample: local map, every strip output and running sum, and the mix."""
        maps_per_length = len(size) + 1  # one strip per axis, then the running sum
        return self.local.out_channels * math.prod(size) * (2 + len(self.strips) * maps_per_length)


class VisionLanguageAttention(nn.Module):
    """Voxel-to-word cross-attention (voxels query the expression's tokens), scaled by a per-channel tanh gate.

    text_dim is the width of the tokens this module receives (the network's adapted tokens). The gate starts at
    tanh(gate_init) (LSMSConfig.language_gate_init): non-zero, so the attention weights get gradients from the first
    step, and large enough that the text path is used early (the encoder trains from scratch, there is no pretrained
    path to protect). Rows with no real token attend to nothing: their output is zero.
    """

    def __init__(self, channels: int, text_dim: int, attention_dim: int, num_heads: int, gate_init: float = 1.0):
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim ({attention_dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.query = nn.Linear(channels, attention_dim)
        self.key = nn.Linear(text_dim, attention_dim, bias=False)  # a key bias cannot change a softmax
        self.value = nn.Linear(text_dim, attention_dim)
        self.output = nn.Linear(attention_dim, channels)
        self.gate = nn.Parameter(torch.full((channels,), gate_init))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        voxels = x.flatten(2).transpose(1, 2)
        query = self._split_heads(self.query(voxels))
        key = self._split_heads(self.key(tokens))
        value = self._split_heads(self.value(tokens))
        has_text = text_mask.any(dim=1)
        # An all-padding row would softmax over nothing (NaN); let it attend anywhere and zero its output instead.
        attend = (text_mask | ~has_text[:, None])[:, None, None, :]
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attend)
        attended = attended.transpose(1, 2).flatten(2)
        out = self.output(attended) * has_text[:, None, None].to(attended.dtype) * torch.tanh(self.gate)
        return out.transpose(1, 2).reshape(batch, channels, *x.shape[2:])

    def compute_conv_feature_map_size(self, size: Sequence[int], num_tokens: int) -> int:
        """Stored elements for one sample: queries, attention maps (voxels x tokens x heads), output, gated output."""
        voxels = math.prod(size)
        attention_dim, channels = self.query.out_features, self.query.in_features
        return voxels * (2 * attention_dim + self.num_heads * num_tokens + 2 * channels)

    def _split_heads(self, sequence: torch.Tensor) -> torch.Tensor:
        batch, length, width = sequence.shape
        return sequence.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)


class SVLABlock(nn.Module):
    """out = x + x * conv1x1(visual(x) + language(x, tokens)): attention as modulation, added back to the stage."""

    def __init__(self, channels: int, conv_op: Type[_ConvNd], text_dim: int, attention_dim: int, num_heads: int,
                 strip_kernel_sizes: Sequence[int] = (7, 11, 21), visual_branch: bool = True,
                 language_branch: bool = True, language_gate_init: float = 1.0):
        super().__init__()
        if not (visual_branch or language_branch):
            raise ValueError("An SVLA block needs the visual or the language branch; to drop SVLA entirely build "
                             "no block (LSMSConfig.svla_stages=()).")
        self.visual = ScaleAwareVisualAttention(channels, conv_op, strip_kernel_sizes) if visual_branch else None
        self.language = (VisionLanguageAttention(channels, text_dim, attention_dim, num_heads, language_gate_init)
                         if language_branch else None)
        self.modulation = conv_op(channels, channels, 1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if self.visual is not None and self.language is not None:
            attention = self.visual(x) + self.language(x, tokens, text_mask)
        elif self.visual is not None:
            attention = self.visual(x)
        else:
            attention = self.language(x, tokens, text_mask)
        return x + x * self.modulation(attention)

    def compute_conv_feature_map_size(self, size: Sequence[int], num_tokens: int) -> int:
        """Stored elements for one sample: both branches plus branch sum, modulation, product and output."""
        output = 4 * self.modulation.out_channels * math.prod(size)
        if self.visual is not None:
            output += self.visual.compute_conv_feature_map_size(size)
        if self.language is not None:
            output += self.language.compute_conv_feature_map_size(size, num_tokens)
        return output
