"""Audio I/O (soundfile), resampling (torchaudio) and silence-aware cutting of long recordings.

Long recordings are decoded, resampled and cut block by block (`stream_audio`, `split_stream`),
so memory stays bounded by a block and a window whatever the file's length: a 10-hour 44.1 kHz
stereo recording would take 12.7 GB as one float32 array.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from whisper.audio import SAMPLE_RATE

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioDecodeError",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "effective_rate",
    "frame_energies",
    "is_audio_file",
    "load_audio",
    "resample",
    "split_long",
    "split_stream",
    "stream_audio",
    "write_audio",
]

# Extensions soundfile (libsndfile >= 1.1) can decode; matched case-insensitively.
AUDIO_EXTENSIONS: frozenset[str] = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff"})

# Cut-point search works on 100 ms frames so a cut lands in a pause, not inside a phone.
_FRAME_SECONDS = 0.1

# Decoding block: files up to this long are resampled in one piece.
BLOCK_SECONDS = 60.0

# torchaudio's resample defaults: the sinc kernel reaches this many zero crossings either side.
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99


# Rates outside these are a broken or hostile header, not audio: a 172-byte WAV claiming 2 GHz
# would make the resampler's kernel and blocks gigabytes.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000

# At most this many values (frames x channels) per read, whatever the channel count.
_MAX_READ_VALUES = 1 << 20


class AudioDecodeError(Exception):
    """An audio file could not be decoded; the message names the file."""


def is_audio_file(path: str | Path) -> bool:
    """True when the file's extension is one soundfile can decode."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


# torchaudio's sinc kernel holds step_out x step_in taps (rates reduced by their gcd): 16000 x
# 44101 for an odd rate of 44101 Hz, 2.8 GB and minutes per second of audio.
_MAX_KERNEL_TAPS = 1 << 20


def effective_rate(orig_rate: int, new_rate: int) -> int:
    """The rate a signal is resampled from: `orig_rate`, or, when that makes torchaudio's kernel
    huge, the nearest multiple of 100 Hz (44101 -> 44100: a 23 ppm change of speed, below the
    clock drift of recording devices)."""
    g = math.gcd(orig_rate, new_rate)
    if (orig_rate // g) * (new_rate // g) <= _MAX_KERNEL_TAPS:
        return orig_rate
    return max(100, 100 * round(orig_rate / 100))


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono float signal with torchaudio's band-limited sinc interpolation."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    orig_rate = effective_rate(orig_rate, new_rate)
    if orig_rate == new_rate:
        return np.asarray(audio, dtype=np.float32)
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))  # (samples,)
    out = AF.resample(wave, orig_freq=orig_rate, new_freq=new_rate)  # (samples * new / orig,)
    return out.numpy().astype(np.float32, copy=False)


def _resample_context(orig_rate: int, new_rate: int) -> tuple[int, int, int]:
    """(step_in, step_out, margin) for resampling a signal block by block.

    A block starting at a multiple of step_in input samples starts exactly on output sample
    (start / step_in) * step_out. `margin` (a multiple of step_in) is more than the sinc kernel's
    reach in input samples, so a block resampled with `margin` samples of real context on each
    side gives the samples the whole signal would.
    """
    g = math.gcd(orig_rate, new_rate)
    step_in, step_out = orig_rate // g, new_rate // g
    reach = math.ceil(_LOWPASS_FILTER_WIDTH * step_in / (min(step_in, step_out) * _ROLLOFF)) + 1
    return step_in, step_out, step_in * math.ceil(reach / step_in)


def _read_mono(f: sf.SoundFile, frames: int, path: Path, done: int
               ) -> tuple[np.ndarray, AudioDecodeError | None]:
    """Up to `frames` mono float32 samples (fewer only at the end of the file), and the error
    that stopped the reading early, if any, with the samples decoded before it."""
    parts: list[np.ndarray] = []
    wanted = frames
    error = None
    # A read that hits a broken frame returns nothing: one second at a time loses at most that.
    chunk = max(1, min(int(f.samplerate), _MAX_READ_VALUES // max(1, f.channels)))
    while wanted > 0:
        try:
            data = f.read(min(wanted, chunk), dtype="float32", always_2d=True)  # (n, channels)
        except Exception as exc:  # LibsndfileError on lost sync, truncation, ...
            at = (done + frames - wanted) / f.samplerate
            error = AudioDecodeError(f"cannot decode audio file {path} after {at:.1f} s: {exc}")
            break
        if len(data) == 0:
            break
        mono = data.mean(axis=1)  # (samples,)
        if not np.all(np.isfinite(mono)):
            error = AudioDecodeError(f"cannot decode audio file {path}: non-finite samples")
            break
        parts.append(mono)
        wanted -= len(data)
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), error


def stream_audio(path: str | Path, sample_rate: int = SAMPLE_RATE,
                 block_seconds: float = BLOCK_SECONDS, *, offset: float = 0.0,
                 duration: float | None = None) -> Iterator[np.ndarray]:
    """Decode `path` to float32 mono at `sample_rate`, block by block ((samples,) arrays).

    Channels are averaged. Each block is resampled with real context on both sides, so the
    concatenated blocks equal resampling the whole file (within float rounding) while memory
    holds about one block. Raises AudioDecodeError naming the file for anything soundfile
    cannot read, and for sample rates outside MIN_SAMPLE_RATE..MAX_SAMPLE_RATE (checked from
    the header, before anything is allocated); a file that breaks part-way first gives what
    decoded before the break (to within a second), then raises an error that says how far it
    got. `offset` and `duration` (seconds) decode only that span of the file, as a NeMo
    manifest line gives it; an offset past the end is an AudioDecodeError.
    """
    path = Path(path)
    if offset < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"{path}: offset must be >= 0 and duration > 0, got {offset}, "
                         f"{duration}")
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be > 0, got {block_seconds}")
    try:
        f = sf.SoundFile(os.fsencode(path))  # bytes: soundfile encodes a str strictly
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(f"cannot decode audio file {path}: {exc}") from exc
    with f:
        if f.channels <= 0:
            raise AudioDecodeError(f"cannot decode audio file {path}: it holds no samples")
        if not MIN_SAMPLE_RATE <= f.samplerate <= MAX_SAMPLE_RATE:
            raise AudioDecodeError(
                f"cannot decode audio file {path}: its header gives a sample rate of "
                f"{f.samplerate} Hz, outside {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz")
        start = round(offset * f.samplerate)
        if start:
            if start >= f.frames:
                raise AudioDecodeError(f"cannot decode audio file {path}: offset {offset:g} s "
                                       f"is past its end ({f.frames / f.samplerate:.3f} s)")
            f.seek(start)
        end = None if duration is None else round(duration * f.samplerate)

        def read(frames: int, done: int) -> tuple[np.ndarray, AudioDecodeError | None]:
            """Up to `frames` samples of the span, `done` of it read already."""
            frames = frames if end is None else min(frames, end - done)
            return _read_mono(f, frames, path, done) if frames > 0 \
                else (np.zeros(0, np.float32), None)

        rate = effective_rate(int(f.samplerate), sample_rate)
        step_in, step_out, margin = _resample_context(rate, sample_rate)
        if rate == sample_rate:
            margin = 0
        block = max(step_in * round(block_seconds * rate / step_in), margin, step_in)
        done = 0
        before = np.zeros(0, np.float32)  # up to `margin` samples preceding `current`
        current, error = read(block, done)
        if len(current) == 0:
            raise error or AudioDecodeError(f"cannot decode audio file {path}: it holds no "
                                            "samples")
        while len(current):
            following = np.zeros(0, np.float32)
            if error is None:  # after an error, what was read is the end of the file
                following, error = read(block, done + len(current))
            if margin == 0:
                yield current
            else:
                context = np.concatenate([before, current, following[:margin]])
                out = resample(context, rate, sample_rate)  # (len(context) * step_out/step_in,)
                skip = len(before) // step_in * step_out
                if len(following):  # a whole block: a whole number of output steps
                    keep = len(current) // step_in * step_out
                else:  # the last block: torchaudio's length for the whole file, minus the rest
                    keep = (math.ceil((done + len(current)) * step_out / step_in)
                            - done // step_in * step_out)
                yield out[skip:skip + keep]
                before = current[len(current) - margin:]
            done += len(current)
            current = following
        if error is not None:
            raise error


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode `path` to float32 mono at `sample_rate` (channels averaged, resampled if needed).

    Raises AudioDecodeError naming the file for anything soundfile cannot read or an
    implausible sample rate.
    """
    return np.concatenate(list(stream_audio(path, sample_rate)))


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio; the format (FLAC, WAV, ...) follows the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"write_audio expects mono (samples,), got shape {audio.shape} for {path}")
    # FLAC stores integers: clip so float overshoot does not wrap around.
    sf.write(os.fsencode(path), np.clip(audio, -1.0, 1.0), sample_rate)


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


def split_stream(blocks: Iterable[np.ndarray], sample_rate: int, max_seconds: float, *,
                 cut_point: Callable[[np.ndarray], int | None] | None = None
                 ) -> Iterator[np.ndarray]:
    """Cut a stream of audio blocks into pieces of at most `max_seconds`, each cut where
    `cut_point(window)` says (e.g. `bestrq.vad.vad_cut_point`: between utterances) or, where it
    gives None or is not given, at a low-energy 100 ms frame in the last third of its window,
    so pieces stay long.

    Concatenating the pieces gives back the stream exactly; a piece is yielded as soon as the
    next cut is known, so memory holds about one window plus one block.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    max_len = int(max_seconds * sample_rate)
    if max_len < 1:
        raise ValueError(f"max_seconds={max_seconds} is under one sample at {sample_rate} Hz")
    frame_length = max(1, int(round(_FRAME_SECONDS * sample_rate)))
    buffer = np.zeros(0, np.float32)
    for block in blocks:
        buffer = np.concatenate([buffer, block]) if len(buffer) else block
        # Cut only once more than a window is buffered: the cut then depends on the window
        # alone, never on where the blocks happen to end.
        while len(buffer) > max_len:
            window = buffer[:max_len]
            cut = cut_point(window) if cut_point is not None else None
            if cut is None:
                cut = _cut_point(window, frame_length)
            cut = min(max(cut, 1), max_len)
            yield buffer[:cut]
            buffer = buffer[cut:]
    yield buffer


def split_long(audio: np.ndarray, sample_rate: int, max_seconds: float) -> list[np.ndarray]:
    """`split_stream` of one array: pieces of at most `max_seconds` that concatenate to `audio`."""
    return list(split_stream([audio], sample_rate, max_seconds))
