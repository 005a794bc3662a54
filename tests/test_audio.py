"""Tests for bestrq.audio: decoding, resampling, writing and silence-aware cutting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.audio import (
    AudioDecodeError,
    effective_rate,
    is_audio_file,
    load_audio,
    resample,
    split_long,
    split_stream,
    stream_audio,
    write_audio,
)


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


@pytest.mark.parametrize("rate", [44100, 22050, 48000, 8000, 44101, 16000])
def test_stream_audio_equals_resampling_the_whole_file(tmp_path: Path, rate: int) -> None:
    # 44101 Hz shares no factor with 16 kHz: the block grid is then one second.
    stereo = np.stack([_noise(23.3, rate, seed=1), _noise(23.3, rate, seed=2)], axis=1)
    path = tmp_path / f"x{rate}.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    whole = resample(stereo.astype(np.float32).mean(axis=1), rate, SAMPLE_RATE)
    blocks = list(stream_audio(path, SAMPLE_RATE, block_seconds=2.5))
    assert len(blocks) >= 9  # really block by block
    streamed = np.concatenate(blocks)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=2e-6)
    used = effective_rate(rate, SAMPLE_RATE)
    assert len(streamed) == -(-len(stereo) * SAMPLE_RATE // used)  # ceil, as torchaudio


def test_odd_rates_are_snapped_to_a_tractable_kernel() -> None:
    assert effective_rate(44100, SAMPLE_RATE) == 44100
    assert effective_rate(11025, SAMPLE_RATE) == 11025
    assert effective_rate(44101, SAMPLE_RATE) == 44100  # kernel 16000 x 44101 taps otherwise
    assert effective_rate(47999, SAMPLE_RATE) == 48000
    tone = np.sin(2 * np.pi * 1000 * np.arange(44101) / 44101).astype(np.float32)  # 1 s
    out = resample(tone, 44101, SAMPLE_RATE)
    peak = np.argmax(np.abs(np.fft.rfft(out))) * SAMPLE_RATE / len(out)
    # Read as 44100 Hz: ceil(44101 * 160 / 441) samples, the tone 23 ppm off 1 kHz.
    assert len(out) == 16001 and abs(peak - 1000) < 2


def test_split_stream_gives_split_long_pieces_whatever_the_blocks() -> None:
    audio = _noise(95, seed=3)
    audio[int(52.0 * SAMPLE_RATE):int(52.3 * SAMPLE_RATE)] *= 0.01  # one quiet stretch
    expected = split_long(audio, SAMPLE_RATE, 30.0)
    assert len(expected) == 4
    for block_seconds in (0.7, 7.0, 31.0, 200.0):
        n = int(block_seconds * SAMPLE_RATE)
        blocks = (audio[i:i + n] for i in range(0, len(audio), n))
        pieces = list(split_stream(blocks, SAMPLE_RATE, 30.0))
        assert [len(p) for p in pieces] == [len(p) for p in expected], block_seconds
        np.testing.assert_array_equal(np.concatenate(pieces), audio)


def test_stream_audio_reports_how_far_a_broken_file_decoded(tmp_path: Path) -> None:
    path = tmp_path / "long.flac"
    sf.write(path, _noise(40, 44100, seed=4), 44100)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the second half of the frames is gone
    decoded = []
    with pytest.raises(AudioDecodeError, match=r"long\.flac after \d+\.\d s") as err:
        for block in stream_audio(path, SAMPLE_RATE, block_seconds=5.0):
            decoded.append(block)
    seconds = sum(len(b) for b in decoded) / SAMPLE_RATE
    assert 10.0 <= seconds <= 25.0  # the intact first half came out before the error
    reported = float(str(err.value).split(" after ")[1].split(" s")[0])
    assert seconds <= reported <= seconds + 10.0


def _wav_header_only(path: Path, rate: int, samples: int = 64) -> None:
    """A 16-bit mono WAV whose header claims `rate`, written by hand: libsndfile would refuse
    to write some of these rates."""
    import struct

    body = b"\0" * (2 * samples)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (2 * rate) & 0xFFFFFFFF, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt "
                     + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body))
                     + body)


@pytest.mark.parametrize("rate", [999, 384_001, 2_000_000_000])
def test_sample_rates_outside_1k_to_384k_are_decode_errors(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"r{rate}.wav"
    _wav_header_only(path, rate)
    with pytest.raises(AudioDecodeError, match=rf"r{rate}\.wav: its header gives a sample rate "
                                               rf"of {rate} Hz, outside 1000 to 384000 Hz"):
        load_audio(path)


@pytest.mark.parametrize("rate", [1000, 384_000])
def test_sample_rates_at_the_bounds_decode(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "edge.wav"
    _wav_header_only(path, rate, samples=rate // 10)
    audio = load_audio(path)
    assert len(audio) == pytest.approx(SAMPLE_RATE // 10, abs=1) and not audio.any()


def test_many_channels_are_averaged(tmp_path: Path) -> None:
    path = tmp_path / "array.wav"
    channels = np.stack([_noise(0.5, seed=c) for c in range(16)], axis=1)  # (samples, 16)
    sf.write(path, channels, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), channels.mean(axis=1), atol=1e-6)
