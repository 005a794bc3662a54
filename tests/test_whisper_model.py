import urllib.error

import pytest
import torch
import whisper

from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    ModelUnavailableError,
    checkpoint_path,
    expected_n_mels,
    load_whisper,
    model_identity,
    random_whisper,
    save_whisper_checkpoint,
    validate_model_spec,
)


def test_unknown_model_fails_naming_it():
    with pytest.raises(ValueError, match="model: 'tinyy'"):
        validate_model_spec("tinyy")


def test_uncached_name_without_network_says_to_set_a_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(whisper, "_download", offline)
    assert checkpoint_path("tiny") is None
    with pytest.raises(ModelUnavailableError, match="checkpoint path"):
        load_whisper("tiny")


def test_checkpoint_round_trip_and_identity(tmp_path):
    model = random_whisper(TINY_TEST_DIMS, seed=3)
    path = tmp_path / "m.pt"
    save_whisper_checkpoint(model, path, half=False)
    loaded = load_whisper(str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  loaded.state_dict().values(), strict=True))
    ident = model_identity(str(path), loaded)
    assert ident["dims"]["n_audio_state"] == 64 and len(ident["sha256"]) == 64


def test_random_whisper_encoder_depends_on_input():
    model = random_whisper(TINY_TEST_DIMS)
    with torch.no_grad():
        a = model.encoder(torch.randn(1, 80, 3000))
        b = model.encoder(torch.randn(1, 80, 3000))
    assert (a - b).abs().mean() > 0.1 * a.abs().mean()


def test_expected_n_mels_without_loading_weights(tmp_path):
    assert expected_n_mels("tiny.en") == 80 and expected_n_mels("base") == 80
    assert expected_n_mels("large-v3") == 128 and expected_n_mels("turbo") == 128
    dims = TINY_TEST_DIMS.__class__(**{**TINY_TEST_DIMS.__dict__, "n_mels": 128})
    save_whisper_checkpoint(random_whisper(dims), tmp_path / "m128.pt")
    assert expected_n_mels(str(tmp_path / "m128.pt")) == 128
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert expected_n_mels(str(tmp_path / "junk.pt")) is None
    assert expected_n_mels("tinyy") is None


def test_expected_n_mels_of_the_real_checkpoint_file(tiny_en_path):
    assert expected_n_mels(str(tiny_en_path)) == 80
