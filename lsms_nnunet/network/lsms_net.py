"""LSMS network: the planned nnU-Net encoder with SVLA blocks, a full-scale (or U-Net) decoder with text-conditioned
output heads, and contrastive projection heads."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from lsms_nnunet.network.config import LSMSConfig
from lsms_nnunet.network.full_scale_decoder import FullScaleDecoder
from lsms_nnunet.network.prompt_decoder import PromptDecoder, num_coordinate_features
from lsms_nnunet.network.svla import SVLABlock
from lsms_nnunet.network.text_head import TextConditionedHead

SUPPORTED_ARCHITECTURES = (PlainConvUNet, ResidualEncoderUNet)
INITIAL_TEMPERATURE = 0.07  # CLIP's starting temperature
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: keeps the contrastive logits from exploding


class LSMSNet(nn.Module):
    """Text-conditioned segmentation network built around a planned nnU-Net encoder.

    The encoder's stages are run here (not through encoder.forward) so an SVLA block can modulate a stage's output
    before the next stage sees it. `decoder` is a real decoder module with a `deep_supervision` attribute, so
    nnU-Net's trainer and predictor toggle it as usual. Frozen text-encoder tokens come in; a trainable adapter maps
    them to the attention width.
    """

    def __init__(self, encoder: PlainConvEncoder | ResidualEncoder, num_classes: int,
                 n_conv_per_stage_decoder: int | Sequence[int], deep_supervision: bool, config: LSMSConfig):
        super().__init__()
        if not isinstance(encoder, (PlainConvEncoder, ResidualEncoder)):
            raise TypeError(f"LSMSNet needs a PlainConvEncoder or ResidualEncoder, got {type(encoder).__name__}.")
        self.config = config
        self.encoder = encoder
        conv_op = encoder.conv_op
        self.svla = nn.ModuleDict({
            str(stage): SVLABlock(encoder.output_channels[stage], conv_op, config.attention_dim,
                                  config.attention_dim, config.num_heads, config.strip_kernel_sizes,
                                  config.visual_branch, config.language_branch, config.language_gate_init)
            for stage in config.svla_stage_indices(len(encoder.output_channels))
        })
        self.text_adapter = nn.Sequential(nn.Linear(config.text_dim, config.attention_dim),
                                          nn.LayerNorm(config.attention_dim))
        if config.decoder == "fsd":
            self.decoder = FullScaleDecoder(encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                            config.fsd_channels_per_scale, config.fsd_projection)
        else:
            self.decoder = UNetDecoder(encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)
        dim = convert_conv_op_to_dim(conv_op)
        if config.prompt_decoder:
            scales = min(config.prompt_decoder_scales, len(encoder.output_channels))
            self.prompt_decoder = PromptDecoder(encoder.output_channels[-scales:], dim, config.attention_dim,
                                                config.num_heads, config.prompt_decoder_layers, config.existence_head)
        if config.text_conditioned_head:  # every deep-supervision head, so each output level answers the text
            position_channels = num_coordinate_features(dim) if config.head_position else 0
            self.decoder.seg_layers = nn.ModuleList(TextConditionedHead(layer, config.attention_dim,
                                                                        position_channels)
                                                    for layer in self.decoder.seg_layers)
        self._side_logits: dict[str, list[torch.Tensor]] = {}
        if config.finding_head:  # text-free all-lesion output beside every deep-supervision head
            self.finding_heads = self._side_heads("finding_logits", 2, conv_op)
        if config.anatomy_regions:  # text-free context regions (anatomy) beside every deep-supervision head
            self.anatomy_heads = self._side_heads("anatomy_logits", 1 + config.anatomy_regions, conv_op)
        if config.contrastive:
            self.voxel_projection = conv_op(encoder.output_channels[0], config.contrastive_dim, 1)
            self.sentence_projection = nn.Linear(config.attention_dim, config.contrastive_dim)
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
            # Both decoders compute their highest-resolution features in stages[-1]; keep them for the projection.
            self._decoder_features: dict[str, torch.Tensor] = {}
            self.decoder.stages[-1].register_forward_hook(self._keep_highest_resolution_features)
        self._initialize_new_modules()

    def _initialize_new_modules(self) -> None:
        """nnU-Net's He init for every convolution LSMS adds; the encoder keeps the init its architecture gave it."""
        encoder_modules = {id(module) for module in self.encoder.modules()}
        initialize = InitWeights_He(1e-2)
        for module in self.modules():
            if id(module) not in encoder_modules:
                initialize(module)

    def _side_heads(self, name: str, classes: int, conv_op) -> nn.ModuleList:
        """Text-free 1x1 heads reading what each decoder output head reads; their logits are kept under `name`."""
        heads = nn.ModuleList(conv_op(getattr(layer, "static", layer).in_channels, classes, 1)
                              for layer in self.decoder.seg_layers)
        self._side_logits[name] = []
        for head, layer in zip(heads, self.decoder.seg_layers):
            layer.register_forward_hook(self._side_hook(name, head))
        return heads

    def _side_hook(self, name: str, head: nn.Module):
        def keep_side_logits(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._side_logits[name].append(head(inputs[0]))
        return keep_side_logits

    def _keep_highest_resolution_features(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._decoder_features["highest_resolution"] = output

    def forward(self, x: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, return_aux: bool = False,
                contrastive_aux: bool = True
                ) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor | list[torch.Tensor], dict]:
        """Segment what the text refers to.

        x [B, C, *spatial]; text_tokens [B or 1, L, text_dim]; text_mask [B or 1, L] bool, True = real token.
        Returns the decoder's logits (a list, highest resolution first, under deep supervision) and, with
        return_aux, also a dict with what the losses and the predictor read: "existence_logit" [B] (existence
        head), "finding_logits" (finding head: 2-class all-lesion logits, a list like the decoder's),
        "anatomy_logits" (anatomy head: 1 + K context-region logits, a list like the decoder's),
        "voxel_embedding" (at the resolution of deep-supervision level config.contrastive_level),
        "sentence_embedding", "logit_scale" (contrastive projection heads; skipped with contrastive_aux=False, as
        prediction does: they serve the training loss only).
        """
        text_tokens, text_mask, prompts_per_image = self._match_text_to_images(x, text_tokens, text_mask)
        tokens = self.text_adapter(text_tokens)
        stem = getattr(self.encoder, "stem", None)  # ResidualEncoder runs a stem before its stages
        if stem is not None:
            x = stem(x)
        skips = []
        for index, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if str(index) in self.svla:
                if prompts_per_image > 1:  # the text-free stages so far ran once per image, shared by its prompts
                    x, skips = self._repeat_for_prompts(x, skips, prompts_per_image)
                    prompts_per_image = 1
                x = self.svla[str(index)](x, tokens, text_mask)
            skips.append(x)
        if prompts_per_image > 1:
            _, skips = self._repeat_for_prompts(x, skips, prompts_per_image)
        real = text_mask.unsqueeze(-1).to(tokens.dtype)
        sentence = (tokens * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        aux = {}
        prompt = sentence
        if self.config.prompt_decoder:
            prompt, existence = self.prompt_decoder(skips[-self.config.prompt_decoder_scales:], tokens, text_mask)
            if existence is not None:
                aux["existence_logit"] = existence
        logits = self._decode(skips, prompt)
        for name, kept in self._side_logits.items():
            side, self._side_logits[name] = kept[::-1], []  # highest resolution first, as the decoder
            aux[name] = side if isinstance(logits, (list, tuple)) else side[0]
        if self.config.contrastive:
            features = self._decoder_features.pop("highest_resolution")
            if return_aux and contrastive_aux:
                features = self._pooled_to_contrastive_level(features, logits)
                aux.update({
                    "voxel_embedding": F.normalize(self.voxel_projection(features), dim=1),
                    "sentence_embedding": F.normalize(self.sentence_projection(sentence), dim=1),
                    "logit_scale": self.log_logit_scale.clamp(0, math.log(MAX_LOGIT_SCALE)).exp(),
                })
        return (logits, aux) if return_aux else logits

    def _pooled_to_contrastive_level(self, features: torch.Tensor, logits) -> torch.Tensor:
        """The highest-resolution decoder features averaged to the resolution of deep-supervision level
        config.contrastive_level (the deepest there is; full resolution without deep supervision)."""
        if not isinstance(logits, (list, tuple)) or self.config.contrastive_level == 0:
            return features
        size = logits[min(self.config.contrastive_level, len(logits) - 1)].shape[2:]
        pool = F.adaptive_avg_pool2d if features.ndim == 4 else F.adaptive_avg_pool3d
        return pool(features, size) if size != features.shape[2:] else features

    def _decode(self, skips: list[torch.Tensor], prompt: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The decoder, with the prompt embedding bound to the text-conditioned heads for this pass only."""
        heads = [head for head in self.decoder.seg_layers if isinstance(head, TextConditionedHead)]
        for head in heads:
            head.sentence = prompt
        try:
            return self.decoder(skips)
        finally:
            for head in heads:
                head.sentence = None

    def _match_text_to_images(self, x: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        if text_tokens.ndim != 3 or text_tokens.shape[-1] != self.config.text_dim:
            raise ValueError(f"text_tokens must be [B, L, {self.config.text_dim}] (the text encoder's width in "
                             f"LSMSConfig.text_dim), got {list(text_tokens.shape)}.")
        if text_mask.dtype != torch.bool or text_mask.shape != text_tokens.shape[:2]:
            raise ValueError(f"text_mask must be a bool tensor of shape {list(text_tokens.shape[:2])} "
                             f"(True = real token), got {text_mask.dtype} {list(text_mask.shape)}.")
        batch, texts = x.shape[0], text_tokens.shape[0]
        if texts == 1:
            return text_tokens.expand(batch, -1, -1), text_mask.expand(batch, -1), 1
        if texts % batch == 0:
            return text_tokens, text_mask, texts // batch
        raise ValueError(f"Got {texts} texts for {batch} images; pass one text per image, a single text for all, "
                         f"or k texts per image (image i, prompt j at row i * k + j).")

    @staticmethod
    def _repeat_for_prompts(x: torch.Tensor, skips: list[torch.Tensor], prompts_per_image: int
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return (x.repeat_interleave(prompts_per_image, dim=0),
                [skip.repeat_interleave(prompts_per_image, dim=0) for skip in skips])

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Stored feature-map elements for one sample, like dynamic_network_architectures' estimate (for planning).

        Counts the encoder, the decoder, every SVLA block (including voxels x tokens x heads attention maps at
        config.max_tokens) and the full-resolution contrastive embedding.
        """
        if len(input_size) != convert_conv_op_to_dim(self.encoder.conv_op):
            raise ValueError(f"input_size must be the spatial patch size only (x, y[, z]), got {list(input_size)}.")
        output = self.encoder.compute_conv_feature_map_size(input_size)
        output += self.decoder.compute_conv_feature_map_size(input_size)
        size, sizes = list(input_size), []
        for index, stride in enumerate(self.encoder.strides):
            size = [i // s for i, s in zip(size, stride)]
            if str(index) in self.svla:
                output += self.svla[str(index)].compute_conv_feature_map_size(size, self.config.max_tokens)
            if index == min(self.config.contrastive_level, len(self.encoder.strides) - 2) and self.config.contrastive:
                # pooled features, their projection and its normalised copy
                output += (self.encoder.output_channels[0] + 2 * self.config.contrastive_dim) * math.prod(size)
            sizes.append(size)
        if self.config.prompt_decoder:
            output += self.prompt_decoder.compute_conv_feature_map_size(sizes[-self.config.prompt_decoder_scales:],
                                                                         self.config.max_tokens)
        return np.int64(output)


def build_lsms_network(architecture_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: list | tuple,
                       input_channels: int, num_classes: int, deep_supervision: bool, config: LSMSConfig,
                       network_class: type[LSMSNet] = LSMSNet) -> LSMSNet:
    """Build LSMS from a plans 'architecture' block: nnU-Net builds (and initialises) its network, LSMS takes its
    encoder."""
    base = get_network_from_plans(architecture_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                  num_classes, allow_init=True, deep_supervision=deep_supervision)
    if not isinstance(base, SUPPORTED_ARCHITECTURES):
        raise ValueError(f"LSMS builds on {[cls.__name__ for cls in SUPPORTED_ARCHITECTURES]}, but the plans name "
                         f"{architecture_class_name}; plan with the default nnU-Net planner or a ResEnc planner.")
    return network_class(base.encoder, num_classes, arch_kwargs["n_conv_per_stage_decoder"], deep_supervision, config)
