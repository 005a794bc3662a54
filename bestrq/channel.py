"""Acoustic conditions (channels) a synthetic recording is passed through: `clean` (as spoken),
`telephone` (8 kHz, 300-3,400 Hz, G.711 mu-law), `noisy` (white noise at an SNR drawn from a
range) and `reverb` (a synthetic room of an RT60 drawn from a range).

Each utterance's draw comes from the corpus seed and the utterance's key alone, so a corpus is
the same bytes whatever order it is made in. The DSP is torchaudio's functional ops
(resample, biquads, mu-law, add_noise, fftconvolve); the random numbers are numpy's PCG64 and
its ziggurat normals, integer-exact on every CPU.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torchaudio.functional as AF
from torchaudio.transforms import Resample

from bestrq.knobs import knob

__all__ = ["CHANNELS", "Channel", "ChannelConfig", "apply_channel", "room_impulse",
           "validate_channel"]

Channel = Literal["clean", "telephone", "noisy", "reverb"]
CHANNELS: tuple[str, ...] = ("clean", "telephone", "noisy", "reverb")

# Telephone: the narrow band of the PSTN (ITU-T G.712's 300-3,400 Hz) at G.711's 8 kHz and
# 256 mu-law levels.
PHONE_RATE = 8000
PHONE_LOW_HZ = 300.0
PHONE_HIGH_HZ = 3400.0
MU_LAW_LEVELS = 256
# Kaiser-windowed sinc, 64 zero crossings (librosa's "kaiser_best", as torchaudio's resampling
# tutorial gives it): white noise through the line at 22.05 kHz keeps -65 dB of its energy
# above 4.1 kHz, where torchaudio's default kernel leaves -23 dB.
_BEST = dict(lowpass_filter_width=64, rolloff=0.9475, resampling_method="sinc_interp_kaiser",
             beta=14.769656459379492)
# An RT60 is the time the reverberant energy takes to fall 60 dB: amplitude exp(-t * 3 ln 10 / T).
_DECAY_60DB = 3 * math.log(10)


@dataclass
class ChannelConfig:
    """The acoustic condition of the synthetic source (the download stage's channel knobs)."""

    channel: Annotated[Channel, knob(
        "synthetic: the acoustic condition of BEST-RQ's pool and the held-out sets: clean | "
        "telephone (8 kHz, 300-3400 Hz, mu-law) | noisy (white noise, snr_db_*) | reverb "
        "(a synthetic room, rt60_*)")] = "clean"
    labelled_channel: Annotated[Channel | None, knob(
        "synthetic: the condition of the fine-tune's labelled windows (segment's draw); "
        "null: as channel. clean with a shifted channel is Hsu et al.'s mismatch")] = None
    snr_db_min: Annotated[float, knob(
        "noisy: each utterance's SNR is drawn uniformly from [snr_db_min, snr_db_max] dB",
        ge=-20, le=60)] = 5.0
    snr_db_max: Annotated[float, knob("noisy: see snr_db_min", ge=-20, le=60)] = 15.0
    rt60_min: Annotated[float, knob(
        "reverb: each utterance's RT60 is drawn uniformly from [rt60_min, rt60_max] seconds",
        ge=0.05, le=5)] = 0.3
    rt60_max: Annotated[float, knob("reverb: see rt60_min", ge=0.05, le=5)] = 0.9


def validate_channel(cfg: ChannelConfig, prefix: str = "download.") -> None:
    """ValueError naming the knob when a range is upside down (types and bounds: knobs.check)."""
    for low, high in (("snr_db_min", "snr_db_max"), ("rt60_min", "rt60_max")):
        if getattr(cfg, low) > getattr(cfg, high):
            raise ValueError(f"{prefix}{low}: must be <= {high} ({getattr(cfg, high)}), got "
                             f"{getattr(cfg, low)}")


def _rng(seed: int, key: str, channel: str) -> np.random.Generator:
    """The utterance's own random stream: from the corpus seed, its key and the channel."""
    digest = hashlib.sha256(f"channel\x1f{seed}\x1f{channel}\x1f{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def room_impulse(rt60: float, rate: int, rng: np.random.Generator) -> torch.Tensor:
    """A synthetic room impulse response: the direct sound, then a diffuse tail of Gaussian
    noise whose energy falls 60 dB in `rt60` seconds (Polack's statistical model, the usual
    stand-in for a measured RIR), `rt60` long, scaled to unit energy. Shape (samples,)."""
    n = max(2, int(round(rt60 * rate)))
    t = np.arange(n) / rate
    # The energy envelope exp(-2at) falls 60 dB in rt60 when the amplitude's is exp(-at).
    rir = rng.standard_normal(n) * np.exp(-_DECAY_60DB / rt60 * t)  # (samples,)
    # Direct sound as strong as the whole tail (a direct-to-reverberant ratio of 0 dB), so the
    # speech keeps its onsets while the tail smears each syllable into the next.
    rir[0] = np.sqrt((rir[1:] ** 2).sum())
    rir /= np.sqrt((rir**2).sum())
    return torch.from_numpy(rir.astype(np.float32))


@functools.cache
def _resampler(orig: int, new: int) -> Resample:
    """torchaudio's resampler with its kernel made once (making it costs more than using it)."""
    return Resample(orig, new, **_BEST)  # type: ignore[arg-type]


def _telephone(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """(samples,) at `rate` -> the same length at `rate`, passed through an 8 kHz mu-law line."""
    narrow = _resampler(rate, PHONE_RATE)(wave)  # (samples * 8000 / rate,)
    narrow = AF.highpass_biquad(narrow, PHONE_RATE, PHONE_LOW_HZ)
    narrow = AF.lowpass_biquad(narrow, PHONE_RATE, PHONE_HIGH_HZ)
    codes = AF.mu_law_encoding(narrow.clamp(-1.0, 1.0), MU_LAW_LEVELS)
    narrow = AF.mu_law_decoding(codes, MU_LAW_LEVELS)
    back = _resampler(PHONE_RATE, rate)(narrow)  # (~samples,)
    return torch.nn.functional.pad(back, (0, max(0, len(wave) - len(back))))[: len(wave)]


def apply_channel(audio: np.ndarray, rate: int, channel: str, cfg: ChannelConfig, seed: int,
                  key: str) -> tuple[np.ndarray, dict[str, float | str]]:
    """`audio` (float32 (samples,) at `rate`) through `channel`, drawn for utterance `key` of
    the corpus of `seed`: the same length and rate, float32, peak at most 1 (a quieter copy,
    never a clipped one). Also what was drawn: {"channel", and "snr_db" or "rt60"}."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; choose one of {', '.join(CHANNELS)}")
    drawn: dict[str, float | str] = {"channel": channel}
    if channel == "clean" or len(audio) == 0:
        return np.asarray(audio, dtype=np.float32), drawn
    rng = _rng(seed, key, channel)
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))  # (samples,)
    if channel == "telephone":
        out = _telephone(wave, rate)
    elif channel == "noisy":
        snr = round(float(rng.uniform(cfg.snr_db_min, cfg.snr_db_max)), 4)
        noise = torch.from_numpy(rng.standard_normal(len(audio)).astype(np.float32))
        # add_noise scales the noise to the SNR over the whole clip (signal and noise energy).
        out = AF.add_noise(wave[None], noise[None], torch.tensor([snr]))[0]
        drawn["snr_db"] = snr
    else:
        rt60 = round(float(rng.uniform(cfg.rt60_min, cfg.rt60_max)), 4)
        rir = room_impulse(rt60, rate, rng)
        # The tail beyond the clip's end is cut: the utterance keeps its length (and windows
        # rebuilt from another rendition theirs).
        out = AF.fftconvolve(wave, rir)[: len(audio)]
        drawn["rt60"] = rt60
    peak = float(out.abs().max())
    if peak > 1.0:
        out = out / peak
    return out.numpy().astype(np.float32, copy=False), drawn
