import urllib.error

import pytest
import torch
import whisper

from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    ModelUnavailableError,
    checkpoint_path,
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
