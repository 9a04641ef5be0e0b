"""LSMSNet as nnU-Net calls it: `network(x)` with the text bound beforehand, and a model card in its state dict.

nnU-Net's trainer and predictor only ever call `self.network(x)`. Binding the text on the module keeps all of their
code paths (training step, deep supervision, sliding window, mirroring, fold averaging) unchanged:

- `bind_batch_text(tokens, mask)`: one text per sample (training and online validation); outputs 2-class logits,
  and the auxiliary outputs of the last training forward (contrastive embeddings, existence logits) are kept in
  `last_aux` for the loss.
- `bind_prompts(tokens, mask)`: E prompts for every input sample (inference); each patch is run once per prompt *in
  one batch* and the output is `[B, 1 + E, ...]`: channel 0 is a zero background logit, channel e the
  target-vs-background logit of prompt e. For a plain task (prompts = labels) that is an ordinary nnU-Net
  (K+1)-class logit map; for referring inference each channel thresholded at 0 is one expression's mask. With an
  existence output, the strongest "it is here" per prompt over the image's patches is kept in `case_existence`
  (reset by `start_case`) for the predictor's per-image decision.
- `bind_finding(tokens, mask)`: like `bind_prompts` with one prompt, but channel 1 is the text-free finding head's
  all-lesion logit (computed with that prompt bound; the predictor binds the finding prompt): the case selector's
  candidates; a network with an anatomy output appends its 1 + K context-region logits (channels 2..).

The model card (task mode, text-encoder identity, network settings, label prompts) travels in the state dict as
PyTorch "extra state", so every nnU-Net checkpoint carries it without changing nnU-Net's checkpoint code, and
loading weights from a model with a different text encoder fails loudly.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from text_conditioning.model_texts import TextEncoderMismatchError

from lsms_nnunet.network.case_position import network_input_channels
from lsms_nnunet.network.config import SETTINGS_ADDED_SINCE, LSMSConfig
from lsms_nnunet.network.lsms_net import LSMSNet, build_lsms_network

MODEL_CARD_FORMAT = "lsms-model-card"
#: Version 2 added the prompt decoder, the existence head and position-aware heads, version 3 case selection,
#: version 4 the finding head, version 5 SVLA from stride 4 and the contrastive term at a coarser level, version 6
#: the lesion-wise finding term (the settings of older cards are completed with config.SETTINGS_ADDED_SINCE, so
#: their checkpoints load unchanged).
MODEL_CARD_VERSION = 6
#: The card's key in the configuration of the plans that LSMSTrainer hands nnU-Net (copied to the model folder).
MODEL_CARD_PLANS_KEY = "lsms_model_card"
#: Where a fold's checkpoint carries its case selector, beside the card in the weights' extra state (written at
#: validation; the checkpoint is the one file nnUNetv2_export_model_to_zip is sure to pack).
CASE_SELECTOR_STATE_KEY = "case_selector"


class PromptableLSMSNet(LSMSNet):
    """LSMSNet whose text is bound before nnU-Net calls `forward(x)`."""

    model_card: dict

    def bind_batch_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        self._bound = ("batch", tokens, mask)

    def bind_prompts(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        self._bound = ("prompts", tokens, mask)

    def bind_finding(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        if not self.config.finding_head:
            raise RuntimeError("This network has no finding head (LSMSConfig.finding_head); ask the finding prompt.")
        self._bound = ("finding", tokens, mask)

    def forward(self, x: torch.Tensor, text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                return_aux: bool = False, contrastive_aux: bool = True):
        if text_tokens is not None:
            return super().forward(x, text_tokens, text_mask, return_aux=return_aux, contrastive_aux=contrastive_aux)
        kind, tokens, mask = getattr(self, "_bound", (None, None, None))
        if kind is None:
            raise RuntimeError("No text bound: call bind_batch_text or bind_prompts before network(x).")
        tokens, mask = tokens.to(x.device), mask.to(x.device)
        if kind == "batch":
            if self.training:
                output, self.last_aux = super().forward(x, tokens, mask, return_aux=True)
                return output
            return super().forward(x, tokens, mask)
        return self._forward_prompts(x, tokens, mask, finding=kind == "finding")

    def _forward_prompts(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, finding: bool = False
                         ) -> torch.Tensor:
        batch, prompts = x.shape[0], tokens.shape[0]
        logits, aux = super().forward(x, tokens.repeat(batch, 1, 1), mask.repeat(batch, 1), return_aux=True,
                                      contrastive_aux=False)
        if finding:
            logits = aux["finding_logits"]
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        if "existence_logit" in aux and not finding:
            self._record_existence(aux["existence_logit"].reshape(batch, prompts).amax(dim=0))
        target_vs_background = (logits[:, 1] - logits[:, 0]).reshape(batch, prompts, *logits.shape[2:])
        background = torch.zeros_like(target_vs_background[:, :1])
        anatomy = aux.get("anatomy_logits") if finding else None
        if anatomy is None:
            return torch.cat((background, target_vs_background), dim=1)
        anatomy = anatomy[0] if isinstance(anatomy, (list, tuple)) else anatomy
        return torch.cat((background, target_vs_background, anatomy.reshape(batch, -1, *anatomy.shape[2:])), dim=1)

    def start_case(self) -> None:
        """Forget the existence evidence of the previous image (the predictor calls this before each image)."""
        self.case_existence: torch.Tensor | None = None

    def _record_existence(self, existence: torch.Tensor) -> None:
        """Keep, per prompt, the strongest "it is here" over all patches of the image seen so far."""
        previous = getattr(self, "case_existence", None)
        self.case_existence = existence if previous is None else torch.maximum(previous, existence)

    # PyTorch extra state: saved in state_dict()['_extra_state'], checked on load_state_dict().
    def get_extra_state(self) -> dict:
        return self.model_card

    def set_extra_state(self, state: Any) -> None:
        check_same_text_encoder(state, self.model_card)
        self.model_card = {key: value for key, value in state.items() if key != CASE_SELECTOR_STATE_KEY}


def check_same_text_encoder(loaded_card: Mapping, expected_card: Mapping) -> None:
    loaded, expected = loaded_card["text_encoder"], expected_card["text_encoder"]
    if (loaded["sha256"], loaded["dim"]) != (expected["sha256"], expected["dim"]):
        raise TextEncoderMismatchError(
            f"These weights were trained with text encoder '{loaded['name']}' (sha256 {loaded['sha256'][:12]}..., "
            f"dim {loaded['dim']}), but the model is being set up for '{expected['name']}' "
            f"(sha256 {expected['sha256'][:12]}..., dim {expected['dim']}). Fix: use the encoder the model was "
            f"trained with (its folder via --text_encoder), or retrain.")


def make_model_card(mode: str, network_config: LSMSConfig, text_encoder: Mapping,
                    label_prompts: list | None = None, constant_text: str | None = None,
                    training_directions: list | None = None) -> dict:
    """The card saved with the weights; plain dicts, lists, strings and numbers only, so that checkpoints load with
    `torch.load(weights_only=True)`. `training_directions` lets prediction warn about differently oriented images."""
    return {"format": MODEL_CARD_FORMAT, "version": MODEL_CARD_VERSION, "mode": mode,
            "network": network_config.to_dict(), "text_encoder": dict(text_encoder),
            "label_prompts": label_prompts or [], "constant_text": constant_text,
            "training_directions": training_directions or []}


def network_config_of(model_card: Mapping) -> LSMSConfig:
    """The network settings of a model card of any known version."""
    version = model_card.get("version")
    if version != MODEL_CARD_VERSION and version not in SETTINGS_ADDED_SINCE:
        raise ValueError(f"Model card version {version!r} is not known to this lsms-nnunet (it reads versions 1 to "
                         f"{MODEL_CARD_VERSION}). Fix: install the lsms-nnunet release the model was trained with, "
                         f"or retrain.")
    settings = {**SETTINGS_ADDED_SINCE.get(version, {}), **model_card["network"]}
    return LSMSConfig.from_dict(settings)


def build_promptable_network(configuration_manager, num_input_channels: int, model_card: Mapping,
                             deep_supervision: bool) -> PromptableLSMSNet:
    """The planned nnU-Net encoder + LSMS parts, configured by the model card; `num_input_channels` counts the image
    channels (the case position's come on top when the card asks for them)."""
    config = network_config_of(model_card)
    network = build_lsms_network(configuration_manager.network_arch_class_name,
                                 configuration_manager.network_arch_init_kwargs,
                                 configuration_manager.network_arch_init_kwargs_req_import,
                                 network_input_channels(num_input_channels, config.case_position), 2,
                                 deep_supervision, config, network_class=PromptableLSMSNet)
    network.model_card = dict(model_card)
    return network
