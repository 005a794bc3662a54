"""A NeMo-style JSONL manifest as a source: spans of longer files, relative paths, bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.audio import stream_audio
from bestrq.segment import SPLITS, SegmentConfig, segment_corpus
from bestrq.sources import SourceConfig, acquire, source_kind


def _ramp(seconds: float) -> np.ndarray:
    """A signal whose every sample says where it is: sample i is (i mod 20000) / 40000."""
    return ((np.arange(int(seconds * SAMPLE_RATE)) % 20000) / 40000).astype(np.float32)


def _write(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    for speaker in ("a", "b", "c"):
        (corpus / "audio" / speaker).mkdir(parents=True)
        sf.write(corpus / "audio" / speaker / "talk.wav", _ramp(12.0), SAMPLE_RATE,
                 subtype="PCM_16")
    lines = [
        # Spans of one recording, paths relative to the manifest's folder.
        {"audio_filepath": "audio/a/talk.wav", "offset": 2.0, "duration": 1.5, "text": "two"},
        {"audio_filepath": "audio/a/talk.wav", "offset": 5.25, "duration": 2.0, "text": "five"},
        {"audio_filepath": "audio/b/talk.wav", "duration": 12.0, "text": "all of b",
         "speaker": "bee"},
        {"audio_filepath": str(corpus / "audio" / "c" / "talk.wav"), "offset": 1.0,
         "duration": 3.0, "text": "absolute c"},
        {"audio_filepath": "audio/c/talk.wav", "offset": 6.0, "duration": 4.0},  # no text
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    text += '{"audio_filepath": "audio/a/talk.wav", "duration": \n'  # line 6: does not parse
    text += json.dumps({"audio_filepath": "audio/gone.wav", "duration": 1.0}) + "\n"  # 7
    text += json.dumps({"audio_filepath": "audio/a/talk.wav", "duration": -1}) + "\n"  # 8
    manifest = corpus / "train_manifest.json"
    manifest.write_text(text)
    return manifest


def test_a_nemo_manifest_reads_the_spans_it_names(tmp_path: Path) -> None:
    manifest = _write(tmp_path)
    assert source_kind(str(manifest)) == "manifest"
    raw = tmp_path / "raw"
    stats = acquire(SourceConfig(source=str(manifest)), raw)
    assert (stats["num_files"], stats["num_with_transcript"], stats["num_skipped"]) == (5, 4, 3)
    entries = {e["id"]: e for e in map(json.loads, (raw / "manifest.jsonl").open())}
    assert set(entries) == {"talk_000002000ms", "talk_000005250ms", "talk",
                            "talk_000001000ms", "talk_000006000ms"}
    # The group: the speaker field, else the file's folder under the manifest's.
    assert entries["talk"]["group"] == "bee"
    assert entries["talk_000002000ms"]["group"] == "audio/a"
    assert entries["talk_000006000ms"]["transcript"] is None
    skipped = [json.loads(line) for line in (raw / "skipped.jsonl").open()]
    assert [s["line"] for s in skipped] == [6, 7, 8]
    assert skipped[0]["reason"].startswith(f"{manifest}:6: not a usable manifest line")
    assert "audio_filepath is not a file" in skipped[1]["reason"]
    assert "duration must be a number > 0, got -1" in skipped[2]["reason"]

    out = tmp_path / "seg"
    segment_corpus(raw / "manifest.jsonl", out, SegmentConfig(pack=False, min_seconds=0.0))
    windows = {w["id"]: w for name in SPLITS
               for w in map(json.loads, (out / f"{name}.jsonl").open())}
    whole = _ramp(12.0)
    for utt, start, seconds in (("talk_000002000ms", 2.0, 1.5), ("talk_000005250ms", 5.25, 2.0),
                                ("talk_000001000ms", 1.0, 3.0), ("talk", 0.0, 12.0)):
        audio, rate = sf.read(out / windows[utt]["path"], dtype="float32")
        first = round(start * SAMPLE_RATE)
        assert rate == SAMPLE_RATE and len(audio) == round(seconds * SAMPLE_RATE)
        np.testing.assert_allclose(audio, whole[first:first + len(audio)], atol=2 / 32768)
    assert windows["talk_000002000ms"]["transcript"] == "two"


def test_a_span_is_decoded_alone_and_an_offset_past_the_end_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.flac"
    sf.write(path, _ramp(9.0), 48000)  # 3 s at 48 kHz, resampled to 16 kHz as it is decoded
    span = np.concatenate(list(stream_audio(path, offset=1.0, duration=0.5)))
    whole = np.concatenate(list(stream_audio(path)))
    assert len(span) == SAMPLE_RATE // 2
    # Resampled with the span's own edges: the same samples away from them.
    np.testing.assert_allclose(span[200:-200], whole[SAMPLE_RATE + 200:SAMPLE_RATE * 3 // 2 - 200],
                               atol=1e-3)
    with pytest.raises(Exception, match=r"offset 3\.5 s is past its end \(3\.000 s\)"):
        list(stream_audio(path, offset=3.5))


def test_an_unreadable_audio_file_is_listed_not_fatal(tmp_path: Path, monkeypatch) -> None:
    from bestrq.folder_source import DigestCache
    from bestrq.nemo_manifest import read_nemo_manifest

    manifest = _write(tmp_path)
    real = DigestCache.digest

    def digest(self, path):
        if path.parent.name == "b":
            raise PermissionError(13, "Permission denied")
        return real(self, path)

    monkeypatch.setattr(DigestCache, "digest", digest)
    entries, skipped = read_nemo_manifest(manifest, DigestCache(tmp_path / "digests.json"))
    assert len(entries) == 4 and all(e["sha256"] for e in entries)
    assert [s["line"] for s in skipped] == [3, 6, 7, 8]
    assert skipped[0]["reason"].startswith(f"{manifest}:3: cannot read ") and \
        "Permission denied" in skipped[0]["reason"]
