"""Text-conditioned segmentation head: the expression shifts the weights of the decoder's 1x1 output convolution.

Why the head, and not only SVLA: nnU-Net normalises every convolution's output per sample and channel (instance
norm), which removes most of a spatially uniform, text-dependent scaling of the encoder features. On the synthetic
referring dataset the SVLA word-attention output varied little across voxels (its attention starts near uniform), and
a trained network with static heads barely changed its logits when its texts were swapped: it ignored the text. A
head whose weights depend on the text makes the answer bilinear in voxel features and sentence, with no
normalisation after it (as the text-driven heads of CLIP-Driven Universal Model and CRIS do).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lsms_nnunet.network.prompt_decoder import coordinate_features


class TextConditionedHead(nn.Module):
    """logits = static(features) + W(s) features + V(s) position + b(s), [W, V, b] a linear function of the prompt s.

    s is the sentence, or the prompt decoder's embedding of the sentence read against the image. With
    position_channels > 0 the head also weighs the voxel's position features (prompt_decoder.coordinate_features),
    so a prompt can prefer a side or a region of the patch ("in the left lobe") directly.

    The controller starts at zero, so the head starts as nnU-Net's static head; its gradient does not vanish there
    (it is the product of the logits' gradient, the features and the sentence). The sentence is bound for one
    forward by the network (`bind_sentence`), like the rest of LSMS's text.
    """

    def __init__(self, static: _ConvNd, sentence_dim: int, position_channels: int = 0):
        super().__init__()
        if static.kernel_size != (1,) * len(static.kernel_size):
            raise ValueError(f"TextConditionedHead wraps a 1x1 segmentation convolution, got kernel "
                             f"{static.kernel_size}.")
        self.static = static
        self.position_channels = position_channels
        self.controller = nn.Linear(sentence_dim, static.out_channels * (static.in_channels + position_channels + 1))
        nn.init.zeros_(self.controller.weight)
        nn.init.zeros_(self.controller.bias)
        self.sentence: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.sentence is None:
            raise RuntimeError("TextConditionedHead has no sentence bound; LSMSNet.forward binds it for each pass.")
        batch, channels = features.shape[:2]
        if self.sentence.shape[0] != batch:
            raise ValueError(f"Bound sentences ({self.sentence.shape[0]}) do not match the batch ({batch}).")
        params = self.controller(self.sentence).view(batch, self.static.out_channels,
                                                     channels + self.position_channels + 1)
        weight, position_weight, bias = params[..., :channels], params[..., channels:-1], params[..., -1]
        dynamic = torch.einsum("bc...,bkc->bk...", features, weight)
        if self.position_channels:
            position = coordinate_features(features.shape[2:], features.device, features.dtype)
            dynamic = dynamic + torch.einsum("p...,bkp->bk...", position, position_weight)
        return self.static(features) + dynamic + bias.view(*bias.shape, *([1] * (features.ndim - 2)))
