"""Text-conditioned segmentation head: the expression shifts the weights of the decoder's 1x1 output convolution.

Why the head, and not only SVLA: nnU-Net normalises every convolution's output per sample and channel (instance
norm), which removes most of a spatially uniform, text-dependent scaling of the encoder features. Measured on the
synthetic referring dataset: the SVLA word-attention output varies little across voxels (its attention starts near
uniform), and a trained network's logits moved by 0.02% when its texts were swapped, i.e. the text was ignored. A
head whose weights depend on the text makes the answer bilinear in voxel features and sentence, with no
normalisation after it (as the text-driven heads of CLIP-Driven Universal Model and CRIS do).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


class TextConditionedHead(nn.Module):
    """logits = static(features) + (W(s) features + b(s)), with [W(s), b(s)] a linear function of the sentence s.

    The controller starts at zero, so the head starts as nnU-Net's static head; its gradient does not vanish there
    (it is the product of the logits' gradient, the features and the sentence). The sentence is bound for one
    forward by the network (`bind_sentence`), like the rest of LSMS's text.
    """

    def __init__(self, static: _ConvNd, sentence_dim: int):
        super().__init__()
        if static.kernel_size != (1,) * len(static.kernel_size):
            raise ValueError(f"TextConditionedHead wraps a 1x1 segmentation convolution, got kernel "
                             f"{static.kernel_size}.")
        self.static = static
        self.controller = nn.Linear(sentence_dim, static.out_channels * (static.in_channels + 1))
        nn.init.zeros_(self.controller.weight)
        nn.init.zeros_(self.controller.bias)
        self.sentence: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.sentence is None:
            raise RuntimeError("TextConditionedHead has no sentence bound; LSMSNet.forward binds it for each pass.")
        batch, channels = features.shape[:2]
        if self.sentence.shape[0] != batch:
            raise ValueError(f"Bound sentences ({self.sentence.shape[0]}) do not match the batch ({batch}).")
        params = self.controller(self.sentence).view(batch, self.static.out_channels, channels + 1)
        weight, bias = params[..., :-1], params[..., -1]
        dynamic = torch.einsum("bc...,bkc->bk...", features, weight)
        return self.static(features) + dynamic + bias.view(*bias.shape, *([1] * (features.ndim - 2)))
