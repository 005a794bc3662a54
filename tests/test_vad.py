"""silero-vad's cut points on long recordings with known utterance boundaries, against the
energy cutter, and segment using it by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.audio import split_stream
from bestrq.segment import SPLITS, SegmentConfig, segment_corpus
from bestrq.synth import long_talk
from bestrq.vad import speech_spans, vad_cut_point

TOLERANCE = int(0.02 * SAMPLE_RATE)


def _inside(cut: int, spans: list[tuple[int, int]]) -> bool:
    return any(a + TOLERANCE < cut < b - TOLERANCE for a, b in spans)


@pytest.fixture(scope="module")
def talks() -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    # 5 dB: bench/vad_cuts.py --snr 5 measures the same kind of recording at length.
    return [long_talk(100.0, seed, snr_db=5.0) for seed in range(3)]


def test_vad_cuts_between_utterances_where_the_quietest_frame_does_not(talks) -> None:
    inside = {"vad": 0, "energy": 0}
    for audio, spans in talks:
        for cutter in inside:
            pieces = list(split_stream([audio], SAMPLE_RATE, 30.0, cut_point=vad_cut_point
                                       if cutter == "vad" else None))
            assert np.array_equal(np.concatenate(pieces), audio)  # lossless either way
            assert all(len(p) <= 30 * SAMPLE_RATE for p in pieces)
            cuts = np.cumsum([len(p) for p in pieces])[:-1]
            assert len(cuts) >= 3
            inside[cutter] += sum(_inside(int(c), spans) for c in cuts)
    # bench/vad_cuts.py on 24 minutes: vad 0 of 61 cuts, energy 11 of 53 at this SNR.
    assert inside["vad"] == 0 and inside["energy"] >= 2


def test_vad_finds_the_utterances_and_says_so_for_silence_and_continuous_speech(talks) -> None:
    audio, spans = talks[0]
    window = audio[: 30 * SAMPLE_RATE]
    found = speech_spans(window)
    truth = [(a, b) for a, b in spans if b <= len(window)]
    # Every utterance overlaps a detected stretch, and most detected speech is speech.
    assert all(any(s < b and a < e for s, e in found) for a, b in truth)
    is_speech = np.zeros(len(window), bool)
    for a, b in truth:
        is_speech[a:b] = True
    detected = np.concatenate([np.arange(s, e) for s, e in found])
    assert is_speech[detected].mean() > 0.85
    # Noise alone: no speech, the whole window goes whole.
    noise = (0.1 * np.random.default_rng(0).standard_normal(len(window))).astype(np.float32)
    assert speech_spans(noise) == [] and vad_cut_point(noise) == len(noise)


def test_segment_cuts_long_recordings_with_the_vad_by_default(tmp_path: Path, talks,
                                                              monkeypatch) -> None:
    import bestrq.segment

    audio, spans = talks[1]
    raw = tmp_path / "raw"
    (raw / "r").mkdir(parents=True)
    sf.write(raw / "r" / "talk.flac", audio, SAMPLE_RATE, subtype="PCM_24")
    rows = [{"id": "talk", "path": "r/talk.flac", "group": "r", "transcript": None}]
    for g in ("a", "b", "c"):  # three transcribed voices, as any split needs
        sf.write(raw / f"{g}.flac", audio[:SAMPLE_RATE], SAMPLE_RATE)
        rows.append({"id": g, "path": f"{g}.flac", "group": g, "transcript": "x"})
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    monkeypatch.setattr(bestrq.segment, "vad_cut_point",
                        lambda w: calls.append(len(w)) or vad_cut_point(w))
    assert SegmentConfig().cutter == "vad"
    segment_corpus(raw / "manifest.jsonl", tmp_path / "seg",
                   SegmentConfig(min_seconds=0.0, pack=False))  # one window a piece
    windows = [json.loads(x) for s in SPLITS
               for x in (tmp_path / "seg" / f"{s}.jsonl").read_text().splitlines()]
    pieces = sorted((w for w in windows if w["sources"] == ["talk"]), key=lambda w: w["id"])
    cuts = np.cumsum([round(w["duration"] * SAMPLE_RATE) for w in pieces])[:-1]
    assert len(calls) == len(cuts) >= 3
    assert not any(_inside(int(c), spans) for c in cuts)
