"""The texts a trained model is asked, embedded with the model's own encoder and cached per user.

A model's checkpoint records the identity of its text encoder (weights sha256, width, token limit). At inference,
new texts are encoded once and kept in a user-level cache (`LSMS_TEXT_CACHE`, default ~/.cache/lsms_nnunet/text),
keyed by that identity; an encoder the user points at (`--text_encoder`, or `LSMS_TEXT_ENCODER` for the stock
nnUNetv2_predict) must be the model's own, or prediction stops with the fix.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from text_conditioning.cache import TextEmbeddingCache
from text_conditioning.encoders import EncodedTexts, EncoderIdentity, TextEncoder, encoder_identity

TEXT_ENCODER_ENV = "LSMS_TEXT_ENCODER"  # for the stock nnUNetv2_predict, which has no --text_encoder
TEXT_CACHE_ENV = "LSMS_TEXT_CACHE"


class TextEncoderMismatchError(RuntimeError):
    """Weights were trained with other text embeddings than the ones this model is being fed."""


def user_text_cache_folder(identity: EncoderIdentity) -> Path:
    root = os.environ.get(TEXT_CACHE_ENV) or Path.home() / ".cache" / "lsms_nnunet" / "text"
    return Path(root) / identity.slug


def encode_texts(texts: Sequence[str], identity: EncoderIdentity, cache_folder: Path | None = None,
                 encoder_source: str | None = None) -> EncodedTexts:
    """Embeddings of `texts` with the model's own encoder; only texts never seen before are encoded.

    An encoder named by the user (argument or LSMS_TEXT_ENCODER) is always checked against the model's identity.
    Texts read once stay in memory for the process (an image's expressions and the finding prompt are asked again for
    every image; reading them back from the compressed cache each time was a large share of a small image's answer).
    """
    unique = list(dict.fromkeys(texts))
    requested_source = encoder_source or os.environ.get(TEXT_ENCODER_ENV)
    missing = [text for text in unique if (identity.sha256, identity.max_tokens, text) not in _REMEMBERED]
    read = {}
    if missing or requested_source:
        cache = TextEmbeddingCache(cache_folder or user_text_cache_folder(identity), identity)
        if requested_source or cache.missing(missing):
            source = requested_source or identity.name
            _check_same_model(source, identity)
            if cache.missing(missing):
                cache.update(missing, _loaded_text_encoder(source, identity.max_tokens))
        if missing:
            encoded = cache.load(missing)
            read = {text: (encoded.tokens[i], encoded.mask[i], encoded.pooled[i]) for i, text in enumerate(missing)}
            _remember(identity, missing, encoded)  # keeps the latest REMEMBERED_TEXTS only
    rows = [read[text] if text in read else _REMEMBERED[(identity.sha256, identity.max_tokens, text)]
            for text in texts]
    return EncodedTexts(tokens=np.stack([row[0] for row in rows]), mask=np.stack([row[1] for row in rows]),
                        pooled=np.stack([row[2] for row in rows]))


#: Embeddings read in this process, per (encoder sha256, token limit, text); the oldest are dropped beyond the limit.
_REMEMBERED: OrderedDict[tuple[str, int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
REMEMBERED_TEXTS = 2048  # ~50 kB each at 32 tokens x 384


def _remember(identity: EncoderIdentity, texts: Sequence[str], encoded: EncodedTexts) -> None:
    for text, tokens, mask, pooled in zip(texts, encoded.tokens, encoded.mask, encoded.pooled):
        _REMEMBERED[(identity.sha256, identity.max_tokens, text)] = (tokens, mask, pooled)
    while len(_REMEMBERED) > REMEMBERED_TEXTS:
        _REMEMBERED.popitem(last=False)


@lru_cache(maxsize=8)
def _check_same_model(source: str, identity: EncoderIdentity) -> None:
    """Refuse an encoder other than the model's; a passed check is remembered (hashing the weights takes a while and
    would otherwise run for every image when the user names the encoder)."""
    requested = encoder_identity(source, identity.max_tokens)
    if not requested.same_model(identity):
        raise TextEncoderMismatchError(
            f"The model was trained with text encoder '{identity.name}' (sha256 {identity.sha256[:12]}..., dim "
            f"{identity.dim}), but '{source}' is a different model (sha256 {requested.sha256[:12]}..., dim "
            f"{requested.dim}). Fix: pass the folder of the original encoder with --text_encoder (or "
            f"{TEXT_ENCODER_ENV}).")


def embed_texts(texts: Sequence[str], identity: EncoderIdentity, cache_folder: Path | None = None,
                encoder_source: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings and attention mask of `texts` (see encode_texts), as the network takes them."""
    encoded = encode_texts(texts, identity, cache_folder, encoder_source)
    return torch.from_numpy(encoded.tokens), torch.from_numpy(encoded.mask)


@lru_cache(maxsize=2)
def _loaded_text_encoder(source: str, max_tokens: int) -> TextEncoder:
    """Load the encoder once per process, not once per image with new expressions."""
    return TextEncoder(source, max_tokens=max_tokens)
