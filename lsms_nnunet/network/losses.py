"""The loss terms LSMS adds to nnU-Net's Dice+CE.

Vision-language contrastive loss (weighted by LSMSConfig.contrastive_weight): pull the referred voxels towards their
sentence, push the rest away. Two terms, after CRIS and CLIP: text-to-voxel contrast inside each image and
region-to-sentence InfoNCE across the batch. Lesion-wise Dice (LSMSConfig.finding_lesion_weight) on the finding head:
every lesion counts once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from lsms_nnunet.network.config import LSMSConfig


class VisionLanguageContrastiveLoss(nn.Module):
    """Weighted sum of a class-balanced text-to-voxel BCE and a region-to-sentence InfoNCE; always finite.

    Every voxel takes part in the text-to-voxel term: its cost is one dot product per voxel, less than producing
    the embedding it reads, so subsampling would save no memory (the gradient w.r.t. the embedding is dense anyway)
    and would only add noise. Computed in float32 so mixed-precision training does not overflow the logits.
    """

    def __init__(self, config: LSMSConfig):
        super().__init__()
        if not config.contrastive:
            raise ValueError("LSMSConfig.contrastive is False, so the network has no projection heads; do not "
                             "build the contrastive loss for this configuration.")
        self.weight = config.contrastive_weight

    def forward(self, voxel_embedding: torch.Tensor, sentence_embedding: torch.Tensor, target: torch.Tensor,
                logit_scale: torch.Tensor, text_keys: Sequence[str] | None = None) -> torch.Tensor:
        """voxel_embedding [B, D, *spatial] and sentence_embedding [B, D] (both L2-normalised), target [B, 1,
        *spatial] (> 0 = referred voxel), logit_scale a scalar, text_keys one key per sample (samples with equal
        keys say the same thing, so they are not negatives for each other)."""
        batch, dim = voxel_embedding.shape[:2]
        if sentence_embedding.shape != (batch, dim):
            raise ValueError(f"sentence_embedding must be [{batch}, {dim}] to match voxel_embedding "
                             f"{list(voxel_embedding.shape)}, got {list(sentence_embedding.shape)}.")
        if target.shape != (batch, 1, *voxel_embedding.shape[2:]):
            raise ValueError(f"target must be [{batch}, 1, {', '.join(map(str, voxel_embedding.shape[2:]))}] "
                             f"(the target at the embedding's resolution), got {list(target.shape)}.")
        if text_keys is not None and len(text_keys) != batch:
            raise ValueError(f"text_keys needs one key per sample ({batch}), got {len(text_keys)}.")
        voxels = voxel_embedding.float().flatten(2)
        sentences = sentence_embedding.float()
        referred = (target > 0).flatten(1)
        scale = logit_scale.float()
        voxel_logits = scale * torch.einsum("bdn,bd->bn", voxels, sentences)
        text_to_voxel = _class_balanced_bce(voxel_logits, referred)
        region_to_sentence = _region_to_sentence_infonce(voxels, sentences, referred, scale, text_keys)
        if region_to_sentence is None:
            return self.weight * text_to_voxel
        return self.weight * (text_to_voxel + region_to_sentence)


def _class_balanced_bce(logits: torch.Tensor, referred: torch.Tensor) -> torch.Tensor:
    """Mean BCE over referred voxels and over the other voxels, averaged, so tiny lesions weigh as much as
    background; an image with no referred voxel contributes its negative term only."""
    bce = F.binary_cross_entropy_with_logits(logits, referred.float(), reduction="none")
    positives = referred.sum(dim=1)
    negatives = (~referred).sum(dim=1)
    positive_loss = (bce * referred).sum(dim=1) / positives.clamp(min=1)
    negative_loss = (bce * ~referred).sum(dim=1) / negatives.clamp(min=1)
    present_terms = (positives > 0).float() + (negatives > 0).float()
    return ((positive_loss + negative_loss) / present_terms.clamp(min=1)).mean()


def _region_to_sentence_infonce(voxels: torch.Tensor, sentences: torch.Tensor, referred: torch.Tensor,
                                scale: torch.Tensor, text_keys: Sequence[str] | None) -> torch.Tensor | None:
    """Each non-empty referred region picks its own sentence among the batch's sentences; None when fewer than
    two samples have a referred region (no contrast to learn from)."""
    has_region = referred.any(dim=1)
    rows = has_region.nonzero().squeeze(1)
    if rows.numel() < 2:
        return None
    region_mask = referred[rows].unsqueeze(1).float()
    regions = (voxels[rows] * region_mask).sum(dim=2) / region_mask.sum(dim=2)
    logits = scale * F.normalize(regions, dim=1) @ sentences.T
    if text_keys is not None:
        row_keys = [text_keys[i] for i in rows.tolist()]
        same_text = torch.tensor([[row_key == key for key in text_keys] for row_key in row_keys],
                                 device=logits.device)
        own_sentence = F.one_hot(rows, num_classes=sentences.shape[0]).bool()
        logits = logits.masked_fill(same_text & ~own_sentence, float("-inf"))
    return F.cross_entropy(logits, rows)


def lesion_wise_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's lesions (connected components of `target`) of 1 - each lesion's own soft Dice.

    After blob loss (Kofler et al., 2023): a Dice pooled over the batch lets one large lesion outweigh many small
    ones, so small lesions stay missed or outlined twice their size. Here every lesion counts once: lesion k's Dice
    compares the foreground probability on k and on its sample's background, the other lesions masked out (finding
    them is no false positive for k). logits [B, 2, *spatial] (background, lesion), target [B, 1, *spatial] (> 0
    lesion, 0 background, < 0 ignored). Zero, with a gradient of zeros, when the batch holds no lesion.
    """
    components, sample_of = _lesion_components(target[:, 0])
    if not len(sample_of):
        return logits.sum() * 0.0
    foreground = torch.softmax(logits.float(), dim=1)[:, 1]
    flat = components.flatten()
    on_lesion = torch.zeros(len(sample_of) + 1, device=logits.device).index_add_(0, flat, foreground.flatten())[1:]
    voxels = torch.bincount(flat, minlength=len(sample_of) + 1)[1:].float()
    background = (foreground * ((components == 0) & (target[:, 0] >= 0))).flatten(1).sum(dim=1)
    dice = 2 * on_lesion / (on_lesion + voxels + background[sample_of]).clamp_min(1e-8)
    return (1 - dice).mean()


def _lesion_components(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Face-connected components of target > 0 ([B, *spatial]), numbered 1..K across the batch (0 elsewhere), and
    the sample each component lies in ([K])."""
    lesions = (target > 0).cpu().numpy()
    components = np.zeros(lesions.shape, dtype=np.int64)
    sample_of: list[int] = []
    for sample, mask in enumerate(lesions):
        labelled, count = ndimage.label(mask)
        components[sample] = np.where(labelled > 0, labelled + len(sample_of), 0)
        sample_of += [sample] * count
    return (torch.from_numpy(components).to(target.device),
            torch.tensor(sample_of, dtype=torch.long, device=target.device))
