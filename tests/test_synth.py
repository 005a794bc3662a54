"""Tests for bestrq.synth: espeak-ng synthesis and the seeded sentence grammar."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from bestrq.synth import (
    EspeakError,
    EspeakSynthesizer,
    available_voices,
    generate_sentences,
    make_speakers,
)


@pytest.fixture(scope="module")
def synth() -> EspeakSynthesizer:
    return EspeakSynthesizer()


def test_synthesize_is_non_silent_float(synth: EspeakSynthesizer) -> None:
    audio, rate = synth.synthesize("the quick brown fox jumps over the lazy dog.")
    assert rate == synth.sample_rate and 8000 <= rate <= 48000
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.abs(audio).max() <= 1.0
    rms = float(np.sqrt(np.mean(audio**2)))
    assert rms > 0.01
    assert 1.0 < len(audio) / rate < 6.0


def test_duration_grows_with_text(synth: EspeakSynthesizer) -> None:
    short, rate = synth.synthesize("hello there.")
    long, _ = synth.synthesize("hello there, the old farmer carried twelve baskets to the market.")
    assert len(long) > 2 * len(short)


def test_rate_and_voice_change_the_audio(synth: EspeakSynthesizer) -> None:
    text = "the small dog waited near the station."
    slow, _ = synth.synthesize(text, rate=120)
    fast, _ = synth.synthesize(text, rate=200)
    assert len(slow) > 1.3 * len(fast)
    a, rate = synth.synthesize(text, voice="en-us", pitch=50)
    b, _ = synth.synthesize(text, voice="en-gb-scotland+f3", pitch=50)
    # Another voice, not just other samples: the f3 variant's spectrum sits higher (spectral
    # centroid 2,466 Hz against en-us's 2,301 Hz with espeak-ng 1.52).
    assert _centroid(b, rate) > 1.04 * _centroid(a, rate)


def _centroid(audio: np.ndarray, rate: int) -> float:
    """The spectral centroid (Hz) of a clip."""
    magnitude = np.abs(np.fft.rfft(audio.astype(np.float64)))
    return float((magnitude * np.fft.rfftfreq(len(audio), 1 / rate)).sum() / magnitude.sum())


def test_synthesis_is_bit_exact_whatever_came_before(synth: EspeakSynthesizer) -> None:
    # espeak-ng carries state between utterances; the engine is reloaded before each one, so an
    # utterance is the same bytes first, after others, and in another order.
    lines = [("the small dog waited near the station.", "en-us+m3", 150, 40),
             ("yes, the pilot repaired a blue bicycle.", "en-gb-scotland+f4", 190, 65),
             ("where did the baker find the key?", "en+f1", 125, 50)]
    first = [synth.synthesize(*line)[0] for line in lines]
    again = [synth.synthesize(*line)[0] for line in reversed(lines)][::-1]
    for a, b in zip(first, again, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_synthesis_is_bit_exact_across_processes() -> None:
    # A fresh interpreter with torch imported (as the download stage has) gives the same bytes.
    script = (
        "import hashlib, torch\n"
        "from bestrq.synth import EspeakSynthesizer, available_voices\n"
        "s = EspeakSynthesizer()\n"
        "for v in available_voices():\n"
        "    a, _ = s.synthesize('the old farmer carried twelve baskets.', voice=v)\n"
        "    print(v, hashlib.sha256(a.tobytes()).hexdigest())\n")
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0].splitlines()) == len(available_voices()) > 30


def test_bad_voice_and_parameters(synth: EspeakSynthesizer) -> None:
    with pytest.raises(EspeakError, match="no-such-voice"):
        synth.synthesize("hello.", voice="no-such-voice")
    with pytest.raises(ValueError, match="rate"):
        synth.synthesize("hello.", rate=10)
    with pytest.raises(ValueError, match="pitch"):
        synth.synthesize("hello.", pitch=150)


def test_available_voices_are_english_and_bundled() -> None:
    voices = available_voices()
    assert {"en-us", "en", "en-gb-scotland", "en-us+f4", "en+m3"} <= set(voices)
    assert all(v.startswith("en") for v in voices)
    # f2 and f3 add breath noise, which espeak-ng draws differently in every process.
    assert not any(v.endswith(("+f2", "+f3")) for v in voices)


def test_make_speakers_ranges_and_determinism() -> None:
    speakers = make_speakers(8, seed=3)
    assert [s.name for s in speakers] == [f"spk{i:03d}" for i in range(8)]
    assert all(120 <= s.rate <= 200 and 30 <= s.pitch <= 70 for s in speakers)
    assert len({s.voice for s in speakers}) == 8
    assert speakers == make_speakers(8, seed=3)
    assert speakers != make_speakers(8, seed=4)
    with pytest.raises(ValueError):
        make_speakers(0, seed=0)


def test_generate_sentences_deterministic_and_varied() -> None:
    a = generate_sentences(200, seed=7)
    assert a == generate_sentences(200, seed=7)
    b = generate_sentences(200, seed=8)
    assert a != b
    assert len(a) == 200
    lengths = [len(s.split()) for s in a]
    assert min(lengths) >= 4 and max(lengths) <= 20
    assert max(lengths) - min(lengths) >= 10  # varied lengths
    assert len(set(a)) > 190
    for s in a:
        assert s == s.lower()
        assert s[-1] in ".?!"
        assert re.fullmatch(r"[a-z ,]+[.?!]", s), s
    vocabulary = {w.strip(",.?!") for s in a for w in s.split()}
    assert len(vocabulary) > 150
    assert generate_sentences(0, seed=0) == []
