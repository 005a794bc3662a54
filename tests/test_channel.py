"""Tests for bestrq.channel: each acoustic condition is deterministic for its seed and measurably
what it says (telephone: nothing above 4 kHz; noisy: the SNR drawn; reverb: the RT60 drawn)."""

from __future__ import annotations

import numpy as np
import pytest

from bestrq.channel import CHANNELS, ChannelConfig, apply_channel, validate_channel
from bestrq.sources import SourceConfig, validate
from bestrq.synth import EspeakSynthesizer

RATE = 22050  # espeak's, at which the synthetic source applies the channel


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    audio, rate = EspeakSynthesizer().synthesize(
        "the old farmer carried twelve baskets to the market in the morning.")
    assert rate == RATE
    return audio  # (samples,)


def _white(seconds: float, seed: int = 0, level: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def _share_above_db(audio: np.ndarray, hz: float, rate: int = RATE) -> float:
    """The energy above `hz` relative to all of it, in dB (from the power spectrum)."""
    power = np.abs(np.fft.rfft(audio.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / rate)
    return float(10 * np.log10(power[freqs > hz].sum() / power.sum()))


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean = clean.astype(np.float64)
    return float(10 * np.log10((clean**2).sum() / ((noisy - clean) ** 2).sum()))


def _rt60(response: np.ndarray, rate: int = RATE) -> float:
    """RT60 of an impulse response from Schroeder's backward integral: the -5 to -25 dB slope
    (T20), extrapolated to 60 dB."""
    energy = np.cumsum((response.astype(np.float64) ** 2)[::-1])[::-1]
    decay = 10 * np.log10(energy / energy[0])
    start, stop = np.argmax(decay <= -5), np.argmax(decay <= -25)
    t = np.arange(len(response)) / rate
    slope = np.polyfit(t[start:stop], decay[start:stop], 1)[0]  # dB per second
    return float(-60 / slope)


@pytest.mark.parametrize("channel", CHANNELS)
def test_each_channel_is_deterministic_and_keeps_length(channel: str, speech) -> None:
    cfg = ChannelConfig()
    a, drawn = apply_channel(speech, RATE, channel, cfg, seed=3, key="spk000-00001")
    b, _ = apply_channel(speech, RATE, channel, cfg, seed=3, key="spk000-00001")
    assert a.dtype == np.float32 and a.shape == speech.shape
    assert a.tobytes() == b.tobytes()
    assert drawn["channel"] == channel and np.abs(a).max() <= 1.0
    other, _ = apply_channel(speech, RATE, channel, cfg, seed=4, key="spk000-00001")
    key, _ = apply_channel(speech, RATE, channel, cfg, seed=3, key="spk000-00002")
    if channel in ("noisy", "reverb"):  # drawn per utterance: another seed or key, other bytes
        assert other.tobytes() != a.tobytes() and key.tobytes() != a.tobytes()
    else:  # clean is the input itself; telephone is one fixed line, nothing drawn
        assert other.tobytes() == a.tobytes() == key.tobytes()
    if channel == "clean":
        assert a.tobytes() == speech.tobytes()
    else:
        assert np.abs(a - speech).max() > 0.01  # measurably shifted


def test_telephone_leaves_no_energy_above_4_khz(speech) -> None:
    white = _white(3.0)
    assert _share_above_db(white, 4100) > -3  # white noise: most of its energy is up there
    assert _share_above_db(speech, 4100) > -25  # espeak's speech: some
    for audio in (white, speech):
        line, _ = apply_channel(audio, RATE, "telephone", ChannelConfig(), 0, "k")
        assert _share_above_db(line, 4100) < -40
    # The band itself passes: a 1 kHz tone keeps its level within 1 dB, 200 Hz and 6 kHz go.
    t = np.arange(2 * RATE) / RATE
    for hz, low, high in ((1000, -1, 1), (200, -30, -3), (6000, -200, -60)):
        tone = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        line, _ = apply_channel(tone, RATE, "telephone", ChannelConfig(), 0, "k")
        middle = slice(RATE // 2, -RATE // 2)  # away from the filters' start and end
        gain = 10 * np.log10(np.mean(line[middle] ** 2) / np.mean(tone[middle] ** 2))
        assert low < gain < high, (hz, gain)


def test_telephone_is_quantised_to_mu_law_levels() -> None:
    # 256 mu-law levels leave G.711's quantisation noise, about 38 dB below a loud tone: the
    # tone comes back (any phase the filters give it) with a residue far above a float's.
    t = np.arange(RATE) / RATE
    tone = (0.8 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    line, _ = apply_channel(tone, RATE, "telephone", ChannelConfig(), 0, "k")
    middle = slice(RATE // 4, -RATE // 4)
    basis = np.stack([np.sin(2 * np.pi * 500 * t), np.cos(2 * np.pi * 500 * t)], 1)[middle]
    fit, *_ = np.linalg.lstsq(basis, line[middle].astype(np.float64), rcond=None)
    residue = line[middle] - basis @ fit
    snr = 10 * np.log10(np.mean((basis @ fit) ** 2) / np.mean(residue**2))
    assert 30 < snr < 45, snr


@pytest.mark.parametrize("snr", [0.0, 7.5, 20.0])
def test_noisy_has_the_snr_asked_for(snr: float, speech) -> None:
    cfg = ChannelConfig(channel="noisy", snr_db_min=snr, snr_db_max=snr)
    noisy, drawn = apply_channel(speech, RATE, "noisy", cfg, 0, "k")
    assert drawn == {"channel": "noisy", "snr_db": snr}
    assert abs(_snr_db(speech, noisy) - snr) < 0.5


def test_noisy_draws_each_utterance_in_the_range_and_records_it(speech) -> None:
    cfg = ChannelConfig(channel="noisy", snr_db_min=5.0, snr_db_max=15.0)
    drawn = []
    for i in range(20):
        noisy, record = apply_channel(speech, RATE, "noisy", cfg, 0, f"utt{i}")
        assert 5.0 <= record["snr_db"] <= 15.0
        assert abs(_snr_db(speech, noisy) - record["snr_db"]) < 0.5
        drawn.append(record["snr_db"])
    assert len(set(drawn)) == 20 and max(drawn) - min(drawn) > 5  # spread over the range


def test_a_loud_noisy_clip_is_scaled_not_clipped(speech) -> None:
    loud = speech / np.abs(speech).max() * 0.99  # at 0 dB SNR the sum passes 1
    cfg = ChannelConfig(channel="noisy", snr_db_min=0.0, snr_db_max=0.0)
    noisy, _ = apply_channel(loud, RATE, "noisy", cfg, 0, "k")
    assert np.abs(noisy).max() == pytest.approx(1.0)
    # One gain for the whole clip: the speech is scaled with the noise, the SNR kept.
    gain = float(np.dot(noisy, loud) / np.dot(loud, loud))
    assert 0.3 < gain < 1.0 and abs(_snr_db(gain * loud, noisy)) < 0.5


@pytest.mark.parametrize("rt60", [0.2, 0.5, 1.0])
def test_reverb_decays_in_the_rt60_asked_for(rt60: float) -> None:
    # An impulse through the room gives the room's response: its decay is measured.
    click = np.zeros(int(2.5 * RATE), np.float32)
    click[100] = 0.5
    cfg = ChannelConfig(channel="reverb", rt60_min=rt60, rt60_max=rt60)
    for seed in range(3):
        response, drawn = apply_channel(click, RATE, "reverb", cfg, seed, "k")
        assert drawn == {"channel": "reverb", "rt60": rt60}
        assert np.abs(response[:100]).max() < 1e-6  # causal (FFT rounding aside)
        assert _rt60(response[100:]) == pytest.approx(rt60, rel=0.1)


def test_reverb_spreads_speech_energy_in_time(speech) -> None:
    # A room smears each syllable into the pauses: the quietest tenth of 10 ms frames gains
    # energy, and by more in a longer room.
    def quiet_floor(audio: np.ndarray) -> float:
        frames = audio[: len(audio) // 220 * 220].reshape(-1, 220)
        energy = (frames.astype(np.float64) ** 2).mean(axis=1)
        return float(np.quantile(energy, 0.1) / energy.mean())

    floors = [quiet_floor(speech)]
    for rt60 in (0.3, 1.0):
        cfg = ChannelConfig(channel="reverb", rt60_min=rt60, rt60_max=rt60)
        floors.append(quiet_floor(apply_channel(speech, RATE, "reverb", cfg, 0, "k")[0]))
    assert floors[0] < floors[1] < floors[2]
    assert floors[2] > 10 * floors[0]


def test_reverb_draws_rt60_in_the_range() -> None:
    cfg = ChannelConfig(channel="reverb", rt60_min=0.3, rt60_max=0.9)
    click = np.zeros(RATE, np.float32)
    click[0] = 1.0
    drawn = [apply_channel(click, RATE, "reverb", cfg, 0, f"u{i}")[1]["rt60"] for i in range(12)]
    assert all(0.3 <= r <= 0.9 for r in drawn) and len(set(drawn)) == 12


def test_bad_channel_knobs_are_named() -> None:
    with pytest.raises(ValueError, match=r"^download\.snr_db_min: must be <= snr_db_max"):
        validate_channel(ChannelConfig(snr_db_min=20.0, snr_db_max=10.0))
    with pytest.raises(ValueError, match=r"^download\.rt60_min: must be <= rt60_max"):
        validate(SourceConfig(rt60_min=1.0, rt60_max=0.5))
    with pytest.raises(ValueError, match=r"^download\.channel: must be one of clean, telephone"):
        validate(SourceConfig(channel="radio"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^download\.rt60_max: must be a number in"):
        validate(SourceConfig(rt60_max=10.0))
    with pytest.raises(ValueError, match="unknown channel 'radio'"):
        apply_channel(np.zeros(10, np.float32), RATE, "radio", ChannelConfig(), 0, "k")


def test_only_the_synthetic_source_takes_a_channel(tmp_path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"^download\.channel: is 'telephone', but only the "
                                         r"synthetic source"):
        validate(SourceConfig(source=str(folder), channel="telephone"))
    with pytest.raises(ValueError, match=r"^download\.labelled_channel: is 'noisy'"):
        validate(SourceConfig(source=str(folder), labelled_channel="noisy"))
    validate(SourceConfig(source=str(folder), labelled_channel="clean"))  # as the audio is
