"""The synthetic corpus end to end (download's synthetic source, then segment): voices recorded
and kept apart by the split, channels applied and recorded, the labelled windows' own channel
(issue 37 items 1 and 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.segment import SPLITS, SegmentConfig, segment_corpus
from bestrq.sources import SourceConfig, acquire
from bestrq.synth import available_voices, make_speakers, voice_sharing


def _manifest(raw: Path) -> list[dict]:
    return [json.loads(x) for x in (raw / "manifest.jsonl").read_text().splitlines()]


def _windows(out: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()]
            for s in SPLITS}


def _share_above_db(audio: np.ndarray, hz: float, rate: int) -> float:
    power = np.abs(np.fft.rfft(audio.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / rate)
    return float(10 * np.log10(power[freqs > hz].sum() / power.sum()))


def test_speakers_beyond_the_voices_share_them_and_say_so() -> None:
    n_voices = len(available_voices())
    assert voice_sharing(make_speakers(n_voices, 0)) is None
    speakers = make_speakers(n_voices + 6, 0)
    assert len({s.voice for s in speakers}) == n_voices
    # Speaker i + n_voices speaks with speaker i's voice (another rate and pitch).
    assert all(speakers[i].voice == speakers[i + n_voices].voice for i in range(6))
    line = voice_sharing(speakers)
    assert line is not None and line.startswith(
        f"{n_voices + 6} speakers, {n_voices} espeak voices: 6 voices speak for 12 speakers")
    assert f"{speakers[0].voice}: spk000, spk{n_voices:03d}" in line


def test_a_corpus_of_more_speakers_than_voices_is_split_by_voice(tmp_path: Path, capsys) -> None:
    n_voices = len(available_voices())
    speakers = n_voices + 6
    cfg = SourceConfig(num_utterances=speakers, num_speakers=speakers, seed=0)
    acquire(cfg, tmp_path / "raw")
    assert f"download: {speakers} speakers, {n_voices} espeak voices: 6 voices speak for 12 " \
        "speakers" in capsys.readouterr().err
    entries = _manifest(tmp_path / "raw")
    spoken = json.loads((tmp_path / "raw" / "synthetic" / "speakers.json").read_text())
    assert {e["group"]: e["voice"] for e in entries} == {s["name"]: s["voice"] for s in spoken}

    stats = segment_corpus(tmp_path / "raw" / "manifest.jsonl", tmp_path / "seg",
                           SegmentConfig(pack=False, dev_fraction=0.15, test_fraction=0.35))
    assert f"segment: plan: {speakers} speakers speak with {n_voices} voices (6 of them for 12 " \
        "speakers); the speakers of one voice go to one split, so no voice is in two" \
        in capsys.readouterr().err
    voice = {e["group"]: e["voice"] for e in entries}
    splits = {s: {voice[w["group"]] for w in ws} for s, ws in _windows(tmp_path / "seg").items()}
    assert all(splits.values())
    assert not splits["train"] & splits["dev"] and not splits["train"] & splits["test"] \
        and not splits["dev"] & splits["test"]
    assert sum(stats[f"num_{s}"] for s in SPLITS) == speakers


def test_a_clean_corpus_records_the_voice_and_nothing_of_a_channel(tmp_path: Path) -> None:
    acquire(SourceConfig(num_utterances=4, num_speakers=2, seed=1), tmp_path / "raw")
    for entry in _manifest(tmp_path / "raw"):
        assert set(entry) == {"id", "path", "transcript", "group", "voice"}
    assert sorted(p.name for p in (tmp_path / "raw" / "synthetic").iterdir()) == \
        ["speakers.json", "spk000", "spk001"]


def test_noisy_corpus_is_deterministic_and_has_the_recorded_snr(tmp_path: Path) -> None:
    clean_cfg = SourceConfig(num_utterances=6, num_speakers=3, seed=2)
    noisy_cfg = SourceConfig(num_utterances=6, num_speakers=3, seed=2, channel="noisy",
                             snr_db_min=5.0, snr_db_max=15.0)
    acquire(clean_cfg, tmp_path / "clean")
    acquire(noisy_cfg, tmp_path / "a")
    acquire(noisy_cfg, tmp_path / "b")
    snrs = []
    for entry in _manifest(tmp_path / "a"):
        assert entry["channel"] == "noisy" and 5.0 <= entry["snr_db"] <= 15.0
        a = (tmp_path / "a" / entry["path"]).read_bytes()
        assert a == (tmp_path / "b" / entry["path"]).read_bytes()  # same seed, same bytes
        clean, rate = sf.read(tmp_path / "clean" / entry["path"], dtype="float64")
        noisy, _ = sf.read(tmp_path / "a" / entry["path"], dtype="float64")
        assert rate == 22050 and noisy.shape == clean.shape
        # Measured from the two files (16-bit FLAC both): the SNR recorded, within 0.5 dB.
        measured = 10 * np.log10((clean**2).sum() / ((noisy - clean) ** 2).sum())
        assert abs(measured - entry["snr_db"]) < 0.5
        snrs.append(entry["snr_db"])
    assert len(set(snrs)) == len(snrs)
    acquire(SourceConfig(num_utterances=6, num_speakers=3, seed=3, channel="noisy"),
            tmp_path / "c")
    other = {e["transcript"]: e["snr_db"] for e in _manifest(tmp_path / "c")}
    assert set(other.values()) != set(snrs)  # another seed, other draws


def test_labelled_windows_take_the_labelled_channel(tmp_path: Path, capsys) -> None:
    # Hsu et al.'s mismatch: BEST-RQ's pool, dev and test over the telephone, the fine-tune's
    # labelled windows clean. Which windows those are only segment knows; download gives each
    # utterance both renditions and segment uses the labelled one for them.
    base = dict(num_utterances=24, num_speakers=6, seed=4)
    seg = SegmentConfig(pack=False, transcribed_share=0.5, dev_fraction=0.15,
                        test_fraction=0.35, num_workers=1)
    acquire(SourceConfig(**base), tmp_path / "clean")
    acquire(SourceConfig(**base, channel="telephone", labelled_channel="clean"), tmp_path / "mix")
    entries = _manifest(tmp_path / "mix")
    for entry in entries:
        assert (entry["channel"], entry["labelled_channel"]) == ("telephone", "clean")
        # The clean rendition is the clean corpus's file, byte for byte.
        assert (tmp_path / "mix" / entry["labelled_path"]).read_bytes() == \
            (tmp_path / "clean" / entry["path"]).read_bytes()
    clean_stats = segment_corpus(tmp_path / "clean" / "manifest.jsonl", tmp_path / "seg_clean",
                                 seg)
    stats = segment_corpus(tmp_path / "mix" / "manifest.jsonl", tmp_path / "seg_mix", seg)
    labelled = [w for w in _windows(tmp_path / "seg_mix")["train"] if w["transcript"]]
    assert stats["num_labelled_renditions"] == len(labelled) >= 2
    assert "num_labelled_renditions" not in clean_stats
    assert f"segment: {len(labelled)} labelled train windows rebuilt" in capsys.readouterr().err
    # The same split and windows either way (a channel keeps each utterance's length).
    assert _windows(tmp_path / "seg_mix") == _windows(tmp_path / "seg_clean")
    for split, windows in _windows(tmp_path / "seg_mix").items():
        for w in windows:
            mixed = (tmp_path / "seg_mix" / w["path"]).read_bytes()
            clean = (tmp_path / "seg_clean" / w["path"]).read_bytes()
            audio, rate = sf.read(tmp_path / "seg_mix" / w["path"])
            assert rate == SAMPLE_RATE
            if split == "train" and w["transcript"] is not None:
                assert mixed == clean  # the labelled windows: clean, as the clean corpus's
                assert _share_above_db(audio, 4100, rate) > -40
            else:  # the pool's other windows, dev and test: over the telephone
                assert mixed != clean
                assert _share_above_db(audio, 4100, rate) < -40


def test_without_a_labelled_channel_of_its_own_there_is_one_rendition(tmp_path: Path) -> None:
    for labelled in (None, "reverb"):
        raw = tmp_path / str(labelled)
        acquire(SourceConfig(num_utterances=3, num_speakers=3, channel="reverb",
                             labelled_channel=labelled), raw)
        assert all("labelled_path" not in e and 0.3 <= e["rt60"] <= 0.9
                   for e in _manifest(raw))
        assert not (raw / "synthetic" / "labelled").exists()


@pytest.mark.parametrize("channel", ["telephone", "reverb"])
def test_a_shifted_corpus_is_the_same_bytes_twice(tmp_path: Path, channel: str) -> None:
    cfg = SourceConfig(num_utterances=4, num_speakers=2, seed=5, channel=channel,
                       labelled_channel="noisy")
    acquire(cfg, tmp_path / "a")
    acquire(cfg, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len([f for f in files if f.suffix == ".flac"]) == 8  # both renditions
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
