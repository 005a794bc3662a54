"""Tests for bestrq.audio: decoding, resampling, writing and silence-aware cutting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.audio import AudioDecodeError, is_audio_file, load_audio, split_long, write_audio


def _noise(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(int(seconds * rate))).astype(np.float32)  # (samples,)


def test_load_audio_averages_channels(tmp_path: Path) -> None:
    n = 1600
    stereo = np.stack([np.full(n, 0.4), np.full(n, 0.2)], axis=1)  # (samples, 2)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == np.float32
    assert audio.shape == (n,)
    np.testing.assert_allclose(audio, 0.3, atol=1e-6)


def test_load_audio_resamples_to_16k(tmp_path: Path) -> None:
    rate = 22050
    t = np.arange(2 * rate) / rate
    path = tmp_path / "tone.flac"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), rate)
    audio = load_audio(path)
    assert audio.shape == (2 * SAMPLE_RATE,)
    # A 440 Hz tone stays a 440 Hz tone after resampling.
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(audio)
    assert abs(peak_hz - 440) < 1.0
    assert load_audio(path, sample_rate=8000).shape == (16000,)


def test_write_audio_roundtrip_flac(tmp_path: Path) -> None:
    audio = _noise(0.5)
    path = tmp_path / "sub" / "x.flac"
    write_audio(path, audio)
    info = sf.info(path)
    assert info.format == "FLAC"
    assert info.samplerate == SAMPLE_RATE
    back = load_audio(path)
    np.testing.assert_allclose(back, np.clip(audio, -1, 1), atol=1 / 32768 + 1e-7)


def test_write_audio_rejects_multichannel(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mono"):
        write_audio(tmp_path / "x.flac", np.zeros((10, 2), dtype=np.float32))


@pytest.mark.parametrize(
    "name, payload",
    [
        ("empty.wav", b""),
        ("garbage.flac", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))),
        ("truncated.wav", b"RIFF\x24\x00\x00\x00WAVEfmt "),
    ],
)
def test_load_audio_raises_decode_error_naming_file(
    tmp_path: Path, name: str, payload: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(AudioDecodeError, match=name):
        load_audio(path)


def test_load_audio_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="nope.flac"):
        load_audio(tmp_path / "nope.flac")


def test_is_audio_file_case_insensitive() -> None:
    assert is_audio_file("a/B.WAV") and is_audio_file("x.Flac") and is_audio_file("y.opus")
    assert not is_audio_file("notes.txt") and not is_audio_file("a.trans.txt")


def test_split_long_short_audio_is_one_piece() -> None:
    audio = _noise(10)
    pieces = split_long(audio, SAMPLE_RATE, 30.0)
    assert len(pieces) == 1
    np.testing.assert_array_equal(pieces[0], audio)


def test_split_long_cuts_in_silence_and_is_lossless() -> None:
    audio = _noise(70)
    # A pause at 25.0-25.5 s lies in the last third (20-30 s) of the first window.
    audio[int(25.0 * SAMPLE_RATE) : int(25.5 * SAMPLE_RATE)] = 0.0
    pieces = split_long(audio, SAMPLE_RATE, 30.0)
    assert all(len(p) <= 30 * SAMPLE_RATE for p in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), audio)
    first_cut = len(pieces[0]) / SAMPLE_RATE
    assert 25.0 <= first_cut <= 25.5
    # Every cut lands in the last third of its window.
    assert all(len(p) >= 20 * SAMPLE_RATE for p in pieces[:-1])
    assert len(pieces) == 3


def test_split_long_validates_max_seconds() -> None:
    with pytest.raises(ValueError, match="max_seconds"):
        split_long(_noise(1), SAMPLE_RATE, 0)
