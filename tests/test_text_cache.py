"""Text embedding cache: idempotent updates, invalidation on a new encoder, pruning, and sharing between processes."""
import hashlib
import json
import logging
import multiprocessing
import os

import numpy as np
import pytest

from text_conditioning.cache import (
    MissingEmbeddingError,
    TextCacheError,
    TextEmbeddingCache,
    text_key,
)
from text_conditioning.encoders import TextEncoder, TextEncoderError
from tiny_text_encoder import make_tiny_text_encoder

MAX_TOKENS = 8
TEXTS = ["the largest cyst", "all lesions in the right lobe", "the lesion in the left lobe"]


class CountingEncoder:
    """Wraps a TextEncoder and records every batch of texts it is asked to encode."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.identity = encoder.identity
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=64, progress=True, warn_truncation=True):
        self.calls.append(list(texts))
        return self.encoder.encode(texts, batch_size=batch_size, progress=progress, warn_truncation=warn_truncation)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_encoders")
    return make_tiny_text_encoder(root / "seed0"), make_tiny_text_encoder(root / "seed1", seed=1)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_folders):
    return TextEncoder(tiny_folders[0], max_tokens=MAX_TOKENS)


@pytest.fixture
def counting_encoder(tiny_encoder):
    return CountingEncoder(tiny_encoder)


def test_text_key_is_short_sha256_of_utf8():
    assert text_key("lésion") == hashlib.sha256("lésion".encode("utf-8")).hexdigest()[:20]
    assert len(text_key("a")) == 20 and text_key("a") != text_key("b")


def test_update_then_load_matches_direct_encoding(tmp_path, counting_encoder, tiny_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", tiny_encoder.identity)
    assert cache.update(TEXTS, counting_encoder, progress=False) == 3
    direct = tiny_encoder.encode(TEXTS)
    loaded = cache.load([TEXTS[2], TEXTS[0], TEXTS[2]])
    assert loaded.tokens.dtype == np.float32 and loaded.tokens.shape == (3, MAX_TOKENS, 32)
    np.testing.assert_allclose(loaded.tokens, direct.tokens[[2, 0, 2]], atol=2e-3)  # stored as float16
    np.testing.assert_array_equal(loaded.mask, direct.mask[[2, 0, 2]])
    np.testing.assert_array_equal(loaded.pooled, direct.pooled[[2, 0, 2]])
    assert sorted(os.listdir(tmp_path / "cache")) == [".lock", "identity.json", "index.json", "shard_0000.npz"]
    with np.load(tmp_path / "cache" / "shard_0000.npz") as shard:
        assert shard["tokens"].dtype == np.float16 and shard["pooled"].dtype == np.float32
    identity_record = json.loads((tmp_path / "cache" / "identity.json").read_text(encoding="utf-8"))
    assert identity_record == tiny_encoder.identity.to_dict()


def test_update_is_idempotent_and_encodes_only_new_texts(tmp_path, counting_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    assert cache.update(TEXTS + [TEXTS[0]], counting_encoder) == 3
    assert cache.update(TEXTS, counting_encoder) == 0
    assert counting_encoder.calls == [TEXTS]
    assert cache.update(["a new cyst", TEXTS[1], "a new cyst"], counting_encoder) == 1
    assert counting_encoder.calls[-1] == ["a new cyst"]
    reopened = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    assert reopened.update(TEXTS + ["a new cyst"], counting_encoder) == 0
    assert len(counting_encoder.calls) == 2


class InterruptedEncoder(CountingEncoder):
    """Stands for a run killed mid-way: the ``interrupt_at``-th call to encode raises KeyboardInterrupt."""

    def __init__(self, encoder: TextEncoder, interrupt_at: int) -> None:
        super().__init__(encoder)
        self.interrupt_at = interrupt_at

    def encode(self, texts, batch_size=64, progress=True, warn_truncation=True):
        if len(self.calls) + 1 == self.interrupt_at:
            raise KeyboardInterrupt("killed mid-way")
        return super().encode(texts, batch_size=batch_size, progress=progress, warn_truncation=warn_truncation)


def test_interrupted_update_keeps_finished_shards_and_a_rerun_encodes_only_the_rest(tmp_path, tiny_encoder):
    texts = [f"lesion {index} in the left lobe" for index in range(10)]
    resumed = TextEmbeddingCache(tmp_path / "resumed", tiny_encoder.identity)
    with pytest.raises(KeyboardInterrupt):
        resumed.update(texts, InterruptedEncoder(tiny_encoder, interrupt_at=3), progress=False, shard_size=3)
    assert resumed.missing(texts) == texts[6:]  # the two finished shards survived the interruption
    rerun = CountingEncoder(tiny_encoder)
    assert resumed.update(texts, rerun, progress=False, shard_size=3) == 4
    assert rerun.calls == [texts[6:9], texts[9:]]
    clean = TextEmbeddingCache(tmp_path / "clean", tiny_encoder.identity)
    clean.update(texts, tiny_encoder, progress=False, shard_size=3)
    for name in ("tokens", "mask", "pooled"):
        np.testing.assert_array_equal(getattr(resumed.load(texts), name), getattr(clean.load(texts), name))
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(os.listdir(tmp_path / "clean"))


def test_missing_is_deduplicated_in_first_seen_order(tmp_path, counting_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    cache.update([TEXTS[1]], counting_encoder)
    assert cache.missing([TEXTS[2], TEXTS[1], TEXTS[0], TEXTS[2]]) == [TEXTS[2], TEXTS[0]]


def test_load_of_missing_text_names_it_and_the_fix(tmp_path, counting_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    cache.update([TEXTS[0]], counting_encoder)
    with pytest.raises(KeyError) as caught:
        cache.load([TEXTS[0], "never encoded"])
    assert isinstance(caught.value, MissingEmbeddingError)
    message = str(caught.value)
    assert "'never encoded'" in message and str(tmp_path / "cache") in message and "LSMSv2_encode_text" in message
    custom = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity, missing_fix="run my command")
    many = [f"text {index}" for index in range(8)]
    with pytest.raises(MissingEmbeddingError, match=r"8 text\(s\): 'text 0'.* and 3 more\. Fix: run my command\."):
        custom.load(many)


def test_load_all_returns_every_text(tmp_path, counting_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    assert cache.load_all() == {}
    cache.update(TEXTS[:2], counting_encoder)
    cache.update(TEXTS[2:], counting_encoder)
    everything = cache.load_all()
    assert sorted(everything) == sorted(TEXTS)
    loaded = cache.load(TEXTS)
    for row, text in enumerate(TEXTS):
        tokens, mask, pooled = everything[text]
        np.testing.assert_array_equal(tokens, loaded.tokens[row])
        np.testing.assert_array_equal(mask, loaded.mask[row])
        np.testing.assert_array_equal(pooled, loaded.pooled[row])


def test_changed_encoder_invalidates_old_embeddings(tmp_path, tiny_folders, counting_encoder, caplog):
    folder = tmp_path / "cache"
    old_cache = TextEmbeddingCache(folder, counting_encoder.identity)
    old_cache.update(TEXTS, counting_encoder)
    other_encoder = CountingEncoder(TextEncoder(tiny_folders[1], max_tokens=MAX_TOKENS))
    with caplog.at_level(logging.WARNING, logger="text_conditioning.cache"):
        new_cache = TextEmbeddingCache(folder, other_encoder.identity)
    assert "removing its embeddings" in caplog.text and str(folder) in caplog.text
    assert sorted(os.listdir(folder)) == [".lock", "identity.json"]
    assert new_cache.missing(TEXTS) == TEXTS
    assert new_cache.update(TEXTS, other_encoder) == 3
    np.testing.assert_array_equal(new_cache.load(TEXTS).pooled, other_encoder.encoder.encode(TEXTS).pooled)
    with pytest.raises(MissingEmbeddingError):  # a reader still using the old model never gets the new one's vectors
        old_cache.load(TEXTS)


def test_changed_max_tokens_invalidates(tmp_path, tiny_folders, counting_encoder, caplog):
    folder = tmp_path / "cache"
    TextEmbeddingCache(folder, counting_encoder.identity).update(TEXTS, counting_encoder)
    longer = TextEncoder(tiny_folders[0], max_tokens=12)
    with caplog.at_level(logging.WARNING, logger="text_conditioning.cache"):
        cache = TextEmbeddingCache(folder, longer.identity)
    assert "max_tokens 8" in caplog.text and "max_tokens 12" in caplog.text
    assert cache.missing(TEXTS) == TEXTS


def test_unreadable_identity_file_invalidates(tmp_path, counting_encoder, caplog):
    folder = tmp_path / "cache"
    TextEmbeddingCache(folder, counting_encoder.identity).update(TEXTS, counting_encoder)
    (folder / "identity.json").write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="text_conditioning.cache"):
        cache = TextEmbeddingCache(folder, counting_encoder.identity)
    assert "unreadable identity.json" in caplog.text and "an unknown encoder" in caplog.text
    assert cache.missing(TEXTS) == TEXTS


def test_update_refuses_an_encoder_of_another_model(tmp_path, tiny_folders, counting_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    other = TextEncoder(tiny_folders[1], max_tokens=MAX_TOKENS)
    with pytest.raises(TextEncoderError, match="holds embeddings of .* but the encoder given is .*seed1"):
        cache.update(TEXTS, other)


def test_prune_drops_unused_texts_and_keeps_the_rest(tmp_path, counting_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    cache.update(TEXTS[:2], counting_encoder)
    cache.update(TEXTS[2:], counting_encoder)
    before = cache.load([TEXTS[0], TEXTS[2]])
    assert cache.prune([TEXTS[0], TEXTS[2], "never cached"]) == 1
    assert cache.prune([TEXTS[0], TEXTS[2]]) == 0
    assert cache.missing(TEXTS) == [TEXTS[1]]
    after = cache.load([TEXTS[0], TEXTS[2]])
    np.testing.assert_array_equal(after.tokens, before.tokens)
    np.testing.assert_array_equal(after.pooled, before.pooled)
    assert sorted(name for name in os.listdir(tmp_path / "cache") if name.startswith("shard")) == ["shard_0002.npz"]
    assert cache.prune([]) == 2
    assert cache.load_all() == {}
    assert not any(name.startswith("shard") for name in os.listdir(tmp_path / "cache"))


def test_reader_with_a_stale_index_rereads_it(tmp_path, counting_encoder, monkeypatch):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    cache.update([TEXTS[0]], counting_encoder)
    cache.update([TEXTS[1]], counting_encoder)
    stale_index = cache._read_index()
    cache.prune([TEXTS[0]])  # rewrites TEXTS[0] into a new shard and deletes the old ones

    reader = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    real_read_index = reader._read_index
    answers = [stale_index]
    monkeypatch.setattr(reader, "_read_index", lambda: answers.pop() if answers else real_read_index())
    np.testing.assert_array_equal(reader.load([TEXTS[0]]).pooled, cache.load([TEXTS[0]]).pooled)


def test_reader_never_takes_rows_from_a_reused_shard_name(tmp_path, counting_encoder, monkeypatch):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    cache.update([TEXTS[0]], counting_encoder)
    stale_index = cache._read_index()
    cache.prune([])
    cache.update([TEXTS[1]], counting_encoder)  # shard_0000.npz again, now holding another text
    answers = [stale_index]
    real_read_index = cache._read_index
    monkeypatch.setattr(cache, "_read_index", lambda: answers.pop() if answers else real_read_index())
    with pytest.raises(MissingEmbeddingError, match="the largest cyst"):
        cache.load([TEXTS[0]])


def test_cache_that_keeps_changing_under_a_reader_gives_up_clearly(tmp_path, counting_encoder, monkeypatch):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    cache.update([TEXTS[0]], counting_encoder)
    stale_index = cache._read_index()
    cache.prune([])
    cache.update([TEXTS[1]], counting_encoder)
    monkeypatch.setattr(cache, "_read_index", lambda: stale_index)
    with pytest.raises(TextCacheError, match="kept changing while being read"):
        cache.load([TEXTS[0]])


def test_damaged_index_is_a_clear_error(tmp_path, counting_encoder):
    cache = TextEmbeddingCache(tmp_path / "cache", counting_encoder.identity)
    cache.update(TEXTS, counting_encoder)
    (tmp_path / "cache" / "index.json").write_text('{"entries": {}}', encoding="utf-8")
    with pytest.raises(TextCacheError, match="index.json is damaged .* Fix: delete the folder"):
        cache.load(TEXTS)


def _update_in_another_process(folder: str, encoder_folder: str, texts: list[str], results) -> None:
    encoder = TextEncoder(encoder_folder, max_tokens=MAX_TOKENS)
    cache = TextEmbeddingCache(folder, encoder.identity)
    results.put(sum(cache.update(texts[start:start + 3], encoder, progress=False)
                    for start in range(0, len(texts), 3)))


def test_concurrent_updates_from_two_processes_give_a_consistent_cache(tmp_path, tiny_folders, tiny_encoder):
    folder = str(tmp_path / "cache")
    first = [f"lesion {index} in the left lobe" for index in range(9)]
    second = [f"lesion {index} in the left lobe" for index in range(5, 14)]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_update_in_another_process, args=(folder, tiny_folders[0], texts, results))
               for texts in (first, second)]
    for worker in workers:
        worker.start()
    encoded_counts = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    union = list(dict.fromkeys(first + second))
    assert sum(encoded_counts) == len(union)  # no text was encoded twice
    cache = TextEmbeddingCache(folder, tiny_encoder.identity)
    everything = cache.load_all()
    assert sorted(everything) == sorted(union)
    direct = tiny_encoder.encode(union)
    for row, text in enumerate(union):
        np.testing.assert_allclose(everything[text][2], direct.pooled[row], atol=1e-5)
    index = json.loads((tmp_path / "cache" / "index.json").read_text(encoding="utf-8"))["entries"]
    assert all((tmp_path / "cache" / entry["shard"]).is_file() for entry in index.values())
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_truncation_over_several_shards_is_warned_once(tmp_path, tiny_encoder):
    texts = [" ".join(["lesion"] * 20) + f" {index}" for index in range(5)] + ["the cyst"]
    cache = TextEmbeddingCache(tmp_path / "cache", tiny_encoder.identity)
    with pytest.warns(UserWarning, match=r"5 of 6 text\(s\) are longer than") as caught:
        cache.update(texts, tiny_encoder, progress=False, shard_size=2)
    assert len([w for w in caught if "longer than" in str(w.message)]) == 1


def test_a_model_asked_more_texts_than_it_remembers_gets_every_one(tmp_path, tiny_folders, tiny_encoder, monkeypatch):
    """encode_texts keeps the latest REMEMBERED_TEXTS in memory; a call asking more still returns each text's own
    embedding (it used to look the evicted ones up again and fail)."""
    from text_conditioning import model_texts

    monkeypatch.setattr(model_texts, "REMEMBERED_TEXTS", 2)
    monkeypatch.setattr(model_texts, "_REMEMBERED", model_texts.OrderedDict())
    texts = [*TEXTS, TEXTS[0]]
    encoded = model_texts.encode_texts(texts, tiny_encoder.identity, tmp_path / "cache", str(tiny_folders[0]))
    direct = tiny_encoder.encode(texts, progress=False)
    stored = direct.tokens.astype(np.float16).astype(np.float32)  # the cache keeps tokens as float16
    assert np.array_equal(encoded.tokens, stored) and len(model_texts._REMEMBERED) == 2
