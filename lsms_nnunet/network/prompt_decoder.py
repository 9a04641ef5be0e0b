"""Prompt decoder: the expression is read *against the image* before it chooses voxels.

A sentence-only head (`W(s)·f + b(s)`) can pick a kind of lesion by its look, but never compare lesions ("the
largest") or place them ("in the left lobe"): the sentence never sees the image. Here a sentence query and the word
tokens attend to the coarse encoder scales, each voxel token carrying its position, then to each other (the pattern
of MaskFormer's mask embeddings and VoxTell's prompt decoder). The resulting prompt embedding drives every
deep-supervision head (network/text_head.py) and a per-prompt existence output ("the referred object is in this
image", ReLA's no-target head).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POSITION_FREQUENCIES = (1.0, 2.0, 4.0)


def coordinate_features(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[P, *shape] position features of a patch: each axis' normalised coordinate in [-1, 1] and its sin/cos at a
    few frequencies, so a linear read-out can express "left half", "upper third" or "near the centre"."""
    axes = [torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype) if size > 1
            else torch.zeros(1, device=device, dtype=dtype) for size in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    features = []
    for grid in grids:
        features.append(grid)
        for frequency in POSITION_FREQUENCIES:
            features += [torch.sin(math.pi * frequency * grid), torch.cos(math.pi * frequency * grid)]
    return torch.stack(features)


def num_coordinate_features(dim: int) -> int:
    return dim * (1 + 2 * len(POSITION_FREQUENCIES))


class PromptDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: queries attend to voxel tokens, then to each other, then an MLP."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.cross_norm = nn.LayerNorm(width)
        self.cross_attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.self_norm = nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, queries: torch.Tensor, query_padding: torch.Tensor, voxels: torch.Tensor,
                voxel_positions: torch.Tensor) -> torch.Tensor:
        normed = self.cross_norm(queries)
        queries = queries + self.cross_attention(normed, voxels + voxel_positions, voxels, need_weights=False)[0]
        normed = self.self_norm(queries)
        queries = queries + self.self_attention(normed, normed, normed, key_padding_mask=query_padding,
                                                need_weights=False)[0]
        return queries + self.mlp(self.mlp_norm(queries))


class PromptDecoder(nn.Module):
    """(adapted word tokens, multi-scale features) -> prompt embedding [B, width] and existence logit [B].

    feature_channels: channels of the encoder scales the prompt reads, coarsest last. Each scale is projected to the
    prompt width and tagged with a learned scale embedding; positions are the patch's normalised coordinates.
    """

    def __init__(self, feature_channels: Sequence[int], dim: int, width: int, num_heads: int, num_layers: int,
                 existence: bool):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(channels, width) for channels in feature_channels)
        self.scale_embedding = nn.Parameter(torch.zeros(len(feature_channels), width))
        self.position = nn.Linear(num_coordinate_features(dim), width)
        self.sentence_query = nn.Linear(width, width)
        self.layers = nn.ModuleList(PromptDecoderLayer(width, num_heads) for _ in range(num_layers))
        self.output_norm = nn.LayerNorm(width)
        self.existence = nn.Linear(width, 1) if existence else None

    def forward(self, features: Sequence[torch.Tensor], tokens: torch.Tensor, text_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        voxels, positions = self._voxel_tokens(features)
        real = text_mask.unsqueeze(-1).to(tokens.dtype)
        sentence = (tokens * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        queries = torch.cat((self.sentence_query(sentence).unsqueeze(1), tokens), dim=1)
        # The sentence query is never padding, so no row of the self-attention is empty.
        padding = torch.cat((torch.zeros_like(text_mask[:, :1]), ~text_mask), dim=1)
        for layer in self.layers:
            queries = layer(queries, padding, voxels, positions)
        prompt = self.output_norm(queries[:, 0])
        existence = self.existence(prompt).squeeze(1) if self.existence is not None else None
        return prompt, existence

    def _voxel_tokens(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        voxels, positions = [], []
        for scale, (feature, projection) in enumerate(zip(features, self.projections)):
            flat = feature.flatten(2).transpose(1, 2)
            voxels.append(projection(flat) + self.scale_embedding[scale])
            coordinates = coordinate_features(feature.shape[2:], feature.device, feature.dtype)
            positions.append(self.position(coordinates.flatten(1).T).unsqueeze(0).expand(feature.shape[0], -1, -1))
        return torch.cat(voxels, dim=1), torch.cat(positions, dim=1)

    def compute_conv_feature_map_size(self, sizes: Sequence[Sequence[int]], num_tokens: int) -> int:
        """Stored elements for one sample: voxel tokens and positions, attention maps, query activations."""
        width = self.sentence_query.out_features
        voxels = sum(math.prod(size) for size in sizes)
        per_layer = voxels * (num_tokens + 1) + 8 * (num_tokens + 1) * width
        return 3 * voxels * width + len(self.layers) * per_layer


def existence_loss(existence_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of "the referred object is in this patch" against the full-resolution target (> 0 = referred voxel)."""
    present = (target > 0).flatten(1).any(dim=1).to(existence_logits.dtype)
    return F.binary_cross_entropy_with_logits(existence_logits.float(), present.float())
