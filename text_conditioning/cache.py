"""On-disk cache of pre-computed text embeddings, shared by every fold that trains on one dataset.

nnU-Net may train its five folds at the same time; all of them read the same embeddings, and any of them (or the
text-encoding command) may add new ones. So the cache is append-only shards plus an index written last: a writer
holds a file lock, writes a new shard atomically and then the index atomically (every ``shard_size`` texts while
encoding, so an interrupted encoding keeps its finished shards), and a reader that sees an index
only ever finds shards that are complete. Each shard records the keys of its rows and the encoder's hash, so a
reader that raced a rewrite notices and reads again instead of mixing texts or models.

Layout of ``folder``: ``identity.json`` (the encoder), ``index.json`` (text key -> shard file and row) and
``shard_XXXX.npz`` (tokens float16 [n, L, D], mask bool [n, L], pooled float32 [n, D]).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from text_conditioning.encoders import (EncodedTexts, EncoderIdentity, TextEncoder, TextEncoderError,
                                        warn_truncated_texts)
from text_conditioning.io import write_bytes_atomically

logger = logging.getLogger(__name__)

IDENTITY_FILE_NAME = "identity.json"
INDEX_FILE_NAME = "index.json"
LOCK_FILE_NAME = ".lock"
SHARD_FILE_PATTERN = re.compile(r"^shard_(\d{4,})\.npz$")
DEFAULT_MISSING_FIX = ("encode them into this cache first (run the dataset's text-encoding step, e.g. "
                       "LSMSv2_encode_text -d DATASET_ID, or call TextEmbeddingCache.update)")
#: Texts per shard while encoding: what an interrupted encoding can lose, a short stretch of CPU encoding
#: (docs/decisions.md).
DEFAULT_SHARD_SIZE = 1024
_READ_ATTEMPTS = 5
_LISTED_MISSING_TEXTS = 5


def text_key(text: str) -> str:
    """Stable short key of a text: the first 20 hex digits of the sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class MissingEmbeddingError(KeyError):
    """Texts asked for that the cache does not hold; the message says how to add them."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TextCacheError(RuntimeError):
    """A cache folder that cannot be read (damaged outside this code, or rewritten under a reader too often)."""


class _StaleIndexError(Exception):
    """The index read points to shards that were rewritten since; read the index again."""


def _unique_texts(texts: Iterable[str]) -> list[str]:
    texts = list(texts)
    not_strings = [text for text in texts if not isinstance(text, str)]
    if not_strings:
        raise TypeError(f"Text embedding cache needs strings, got {not_strings[:3]!r}. Fix: pass texts as str.")
    return list(dict.fromkeys(texts))


class TextEmbeddingCache:
    """Embeddings of texts by one encoder, stored in ``folder`` and safe to share between processes."""

    def __init__(self, folder: str | os.PathLike, identity: EncoderIdentity,
                 missing_fix: str = DEFAULT_MISSING_FIX) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.missing_fix = missing_fix
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.folder / LOCK_FILE_NAME))
        with self._lock:
            self._ensure_identity()

    # ----- public API -----

    def missing(self, texts: Iterable[str]) -> list[str]:
        """The texts (deduplicated, in first-seen order) that have no embedding yet."""
        index = self._read_index()
        return [text for text in _unique_texts(texts) if text_key(text) not in index]

    def update(self, texts: Iterable[str], encoder: TextEncoder, progress: bool = True,
               shard_size: int = DEFAULT_SHARD_SIZE) -> int:
        """Encode and store the texts not cached yet; returns how many were encoded (0 when all were there).

        Every ``shard_size`` texts are stored (shard, then index) as soon as they are encoded, so an interrupted
        run keeps what it did and the next one encodes only the rest.
        """
        if not encoder.identity.same_model(self.identity):
            raise TextEncoderError(f"Text embedding cache {self.folder} holds embeddings of {self._describe()}, but "
                                   f"the encoder given is {encoder.identity.name} (sha256 "
                                   f"{encoder.identity.sha256[:12]}, dim {encoder.identity.dim}, max_tokens "
                                   f"{encoder.identity.max_tokens}). Fix: open the cache with the encoder's identity "
                                   "(TextEmbeddingCache(folder, encoder.identity)).")
        texts = _unique_texts(texts)
        if not self.missing(texts):
            return 0
        with self._lock:
            self._ensure_identity()
            index = self._read_index()
            missing = [text for text in texts if text_key(text) not in index]
            if not missing:
                return 0
            with tqdm(total=len(missing), desc=f"Encoding texts with {self.identity.slug}", unit="text",
                      disable=not progress) as bar:
                truncated = 0
                for start in range(0, len(missing), shard_size):
                    truncated += self._encode_into_shard(missing[start:start + shard_size], encoder, index)
                    bar.update(len(missing[start:start + shard_size]))
        if truncated:
            warn_truncated_texts(truncated, len(missing), encoder.identity)
        return len(missing)

    def load(self, texts: Sequence[str]) -> EncodedTexts:
        """Embeddings of ``texts`` in the given order (repeats allowed), as float32."""
        texts = list(texts)
        for _ in range(_READ_ATTEMPTS):
            index = self._read_index()
            missing = [text for text in _unique_texts(texts) if text_key(text) not in index]
            if missing:
                raise MissingEmbeddingError(self._missing_message(missing))
            try:
                return self._gather(texts, index)
            except _StaleIndexError:
                continue
        raise TextCacheError(f"Text embedding cache {self.folder} kept changing while being read "
                             f"({_READ_ATTEMPTS} attempts). Fix: wait for the running text encoding to finish.")

    def load_all(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every cached text -> (tokens [L, D], mask [L], pooled [D]), float32; what a trainer loads once."""
        texts = [entry["text"] for entry in self._read_index().values()]
        encoded = self.load(texts)
        return {text: (encoded.tokens[row], encoded.mask[row], encoded.pooled[row]) for row, text in enumerate(texts)}

    def prune(self, keep_texts: Iterable[str]) -> int:
        """Drop embeddings of texts not in ``keep_texts`` (e.g. after expressions.json changed); returns how many."""
        keep_keys = {text_key(text) for text in _unique_texts(keep_texts)}
        with self._lock:
            self._ensure_identity()
            index = self._read_index()
            dropped = [key for key in index if key not in keep_keys]
            if not dropped:
                return 0
            old_shards = self._shard_files()
            kept_texts = [entry["text"] for key, entry in index.items() if key in keep_keys]
            new_index: dict[str, dict[str, Any]] = {}
            if kept_texts:
                shard_name = self._write_shard(kept_texts, self._gather(kept_texts, index))
                new_index = {text_key(text): {"text": text, "shard": shard_name, "row": row}
                             for row, text in enumerate(kept_texts)}
            self._write_index(new_index)
            for shard in old_shards:
                shard.unlink()
        logger.info("Pruned %d unused text embedding(s) from %s.", len(dropped), self.folder)
        return len(dropped)

    # ----- internals -----

    def _encode_into_shard(self, texts: Sequence[str], encoder: TextEncoder,
                           index: dict[str, dict[str, Any]]) -> int:
        """Encode ``texts``, write them as one new shard and add them to ``index`` on disk; returns how many texts
        were cut at the token limit (the caller warns once for all shards). Needs the lock."""
        encoded = encoder.encode(texts, progress=False, warn_truncation=False)
        expected_shape = (len(texts), self.identity.max_tokens, self.identity.dim)
        if encoded.tokens.shape != expected_shape:
            raise TextEncoderError(f"Encoder {encoder.identity.name} returned tokens of shape "
                                   f"{encoded.tokens.shape}, expected {expected_shape}. Fix: use an encoder "
                                   "that pads/truncates to identity.max_tokens (TextEncoder does).")
        shard_name = self._write_shard(texts, encoded)
        for row, text in enumerate(texts):
            index[text_key(text)] = {"text": text, "shard": shard_name, "row": row}
        self._write_index(index)
        return encoded.truncated

    def _describe(self, identity: EncoderIdentity | None = None) -> str:
        identity = identity or self.identity
        return (f"{identity.name} (sha256 {identity.sha256[:12]}, dim {identity.dim}, "
                f"max_tokens {identity.max_tokens})")

    def _missing_message(self, missing: Sequence[str]) -> str:
        listed = ", ".join(repr(text) for text in missing[:_LISTED_MISSING_TEXTS])
        more = f" and {len(missing) - _LISTED_MISSING_TEXTS} more" if len(missing) > _LISTED_MISSING_TEXTS else ""
        return (f"Text embedding cache {self.folder} ({self._describe()}) has no embedding for {len(missing)} "
                f"text(s): {listed}{more}. Fix: {self.missing_fix}.")

    def _shard_files(self) -> list[Path]:
        return sorted(path for path in self.folder.iterdir() if SHARD_FILE_PATTERN.match(path.name))

    def _ensure_identity(self) -> None:
        """Make the folder belong to our encoder: other models' embeddings are removed, never mixed. Needs the lock."""
        identity_path = self.folder / IDENTITY_FILE_NAME
        stored: EncoderIdentity | None = None
        if identity_path.is_file():
            try:
                stored = EncoderIdentity.from_dict(json.loads(identity_path.read_text(encoding="utf-8")))
            except (ValueError, TypeError, AttributeError):
                logger.warning("Text embedding cache %s has an unreadable %s; treating it as another encoder's.",
                               self.folder, IDENTITY_FILE_NAME)
            if stored is not None and stored.same_model(self.identity):
                return
        index_path = self.folder / INDEX_FILE_NAME
        old_shards = self._shard_files()
        if index_path.exists() or old_shards:
            previous = self._describe(stored) if stored is not None else "an unknown encoder"
            logger.warning("Text embedding cache %s was made with %s; removing its embeddings because the encoder "
                           "is now %s. They will be re-encoded.", self.folder, previous, self._describe())
            index_path.unlink(missing_ok=True)
            for shard in old_shards:
                shard.unlink()
        write_bytes_atomically(identity_path, json.dumps(self.identity.to_dict(), indent=1).encode("utf-8"))

    def _read_index(self) -> dict[str, dict[str, Any]]:
        """Text key -> {"text", "shard", "row"}; empty when there is no index or it belongs to another encoder."""
        index_path = self.folder / INDEX_FILE_NAME
        try:
            document = json.loads(index_path.read_text(encoding="utf-8"))
            index_identity = EncoderIdentity.from_dict(document["encoder"])
            entries = document["entries"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as error:
            raise TextCacheError(f"Text embedding index {index_path} is damaged ({type(error).__name__}: {error}). "
                                 f"Fix: delete the folder {self.folder} and run the text encoding again.") from error
        return entries if index_identity.same_model(self.identity) else {}

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        document = {"encoder": self.identity.to_dict(), "entries": index}
        write_bytes_atomically(self.folder / INDEX_FILE_NAME,
                              json.dumps(document, ensure_ascii=False, indent=0).encode("utf-8"))

    def _write_shard(self, texts: Sequence[str], encoded: EncodedTexts) -> str:
        """Write one new shard atomically and return its file name. Needs the lock."""
        numbers = [int(SHARD_FILE_PATTERN.match(path.name).group(1)) for path in self._shard_files()]
        shard_name = f"shard_{max(numbers, default=-1) + 1:04d}.npz"
        buffer = io.BytesIO()
        np.savez_compressed(buffer, tokens=encoded.tokens.astype(np.float16), mask=encoded.mask.astype(bool),
                            pooled=encoded.pooled.astype(np.float32), keys=np.array([text_key(t) for t in texts]),
                            encoder_sha256=np.array(self.identity.sha256))
        write_bytes_atomically(self.folder / shard_name, buffer.getvalue())
        return shard_name

    def _gather(self, texts: Sequence[str], index: dict[str, dict[str, Any]]) -> EncodedTexts:
        """Read the rows of ``texts`` from their shards, checking each shard still holds what the index says."""
        length, dim = self.identity.max_tokens, self.identity.dim
        tokens = np.zeros((len(texts), length, dim), dtype=np.float32)
        mask = np.zeros((len(texts), length), dtype=bool)
        pooled = np.zeros((len(texts), dim), dtype=np.float32)
        positions_by_shard: dict[str, list[tuple[int, int, str]]] = {}
        for position, text in enumerate(texts):
            entry = index[text_key(text)]
            positions_by_shard.setdefault(entry["shard"], []).append((position, entry["row"], text_key(text)))
        for shard_name, positions in positions_by_shard.items():
            try:
                with np.load(self.folder / shard_name, allow_pickle=False) as shard:
                    shard_tokens, shard_mask, shard_pooled = shard["tokens"], shard["mask"], shard["pooled"]
                    shard_keys, shard_sha256 = shard["keys"], str(shard["encoder_sha256"])
            except FileNotFoundError as error:
                raise _StaleIndexError(shard_name) from error
            if shard_sha256 != self.identity.sha256 or shard_tokens.shape[1:] != (length, dim):
                raise _StaleIndexError(shard_name)
            for position, row, key in positions:
                if row >= len(shard_keys) or shard_keys[row] != key:
                    raise _StaleIndexError(shard_name)
                tokens[position] = shard_tokens[row]
                mask[position] = shard_mask[row]
                pooled[position] = shard_pooled[row]
        return EncodedTexts(tokens=tokens, mask=mask, pooled=pooled)
