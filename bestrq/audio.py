"""Audio I/O (soundfile), resampling (torchaudio) and silence-aware cutting of long recordings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from whisper.audio import SAMPLE_RATE

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioDecodeError",
    "frame_energies",
    "is_audio_file",
    "load_audio",
    "resample",
    "split_long",
    "write_audio",
]

# Extensions soundfile (libsndfile >= 1.1) can decode; matched case-insensitively.
AUDIO_EXTENSIONS: frozenset[str] = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff"})

# Cut-point search works on 100 ms frames so a cut lands in a pause, not inside a phone.
_FRAME_SECONDS = 0.1


class AudioDecodeError(Exception):
    """An audio file could not be decoded; the message names the file."""


def is_audio_file(path: str | Path) -> bool:
    """True when the file's extension is one soundfile can decode."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono float signal with torchaudio's band-limited sinc interpolation."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return np.asarray(audio, dtype=np.float32)
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))  # (samples,)
    out = AF.resample(wave, orig_freq=orig_rate, new_freq=new_rate)  # (samples * new / orig,)
    return out.numpy().astype(np.float32, copy=False)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode `path` to float32 mono at `sample_rate` (channels averaged, resampled if needed).

    Raises AudioDecodeError naming the file for anything soundfile cannot read.
    """
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(f"cannot decode audio file {path}: {exc}") from exc
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioDecodeError(f"cannot decode audio file {path}: it holds no samples")
    mono = data.mean(axis=1)  # (samples,)
    if not np.all(np.isfinite(mono)):
        raise AudioDecodeError(f"cannot decode audio file {path}: non-finite samples")
    return resample(mono, int(rate), sample_rate)


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio; the format (FLAC, WAV, ...) follows the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"write_audio expects mono (samples,), got shape {audio.shape} for {path}")
    # FLAC stores integers: clip so float overshoot does not wrap around.
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate)


def frame_energies(audio: np.ndarray, frame_length: int) -> np.ndarray:
    """Mean squared amplitude of consecutive non-overlapping frames (last partial frame dropped)."""
    n_frames = len(audio) // frame_length
    frames = np.asarray(audio[: n_frames * frame_length], dtype=np.float64)
    frames = frames.reshape(n_frames, frame_length)  # (frames, frame_length)
    return (frames**2).mean(axis=1)  # (frames,)


def _cut_point(window: np.ndarray, frame_length: int) -> int:
    """Sample index in `window` to cut at: middle of the quietest frame in its last third."""
    n = len(window)
    start = (2 * n) // 3
    energies = frame_energies(window[start:], frame_length)  # (frames,)
    if len(energies) == 0:
        return n
    best = int(np.argmin(energies))
    return start + best * frame_length + frame_length // 2


def split_long(audio: np.ndarray, sample_rate: int, max_seconds: float) -> list[np.ndarray]:
    """Cut `audio` into pieces of at most `max_seconds`, each cut at a low-energy 100 ms frame.

    The cut is searched in the last third of each window so pieces stay long; concatenating
    the pieces gives back `audio` exactly.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    max_len = int(max_seconds * sample_rate)
    if max_len < 1:
        raise ValueError(f"max_seconds={max_seconds} is under one sample at {sample_rate} Hz")
    frame_length = max(1, int(round(_FRAME_SECONDS * sample_rate)))
    pieces: list[np.ndarray] = []
    pos = 0
    total = len(audio)
    while total - pos > max_len:
        cut = _cut_point(audio[pos : pos + max_len], frame_length)
        cut = min(max(cut, 1), max_len)
        pieces.append(audio[pos : pos + cut])
        pos += cut
    pieces.append(audio[pos:])
    return pieces
