"""Sources by role: an untranscribed pool, a labelled set, and dev and test sets of the user's
own, each keeping exactly its speakers; a speaker in two roles stops before any decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.roles import RoleOverlapError
from bestrq.segment import SPLITS, SegmentConfig, SplitError, segment_corpus
from bestrq.sources import SourceConfig, acquire, check_watch, validate


def _librispeech(root: Path, speakers: list[int], files: int = 2, text: bool = True) -> Path:
    """<speaker>/<chapter>/<speaker>-<chapter>-<i>.flac, 1 s of noise each, with a
    *.trans.txt when `text`."""
    rng = np.random.default_rng(sum(speakers))
    for spk in speakers:
        chapter = root / str(spk) / "10"
        chapter.mkdir(parents=True)
        lines = []
        for i in range(files):
            utt = f"{spk}-10-{i:04d}"
            sf.write(chapter / f"{utt}.flac",
                     (0.1 * rng.standard_normal(SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE)
            lines.append(f"{utt} WORDS OF {spk} {i}\n")
        if text:
            (chapter / f"{spk}-10.trans.txt").write_text("".join(lines))
    return root


def _windows(out: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()]
            for s in SPLITS}


def _speakers(windows: list[dict]) -> set[str]:
    return {w["group"] for w in windows}


def test_each_role_holds_exactly_its_speakers(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    _librispeech(data / "pool", [1, 2, 3, 4, 5, 6], text=False)  # much untranscribed audio
    _librispeech(data / "labelled", [11, 12])
    _librispeech(data / "dev", [21])
    _librispeech(data / "test", [31, 32])
    cfg = SourceConfig(source=str(data / "pool"), labelled=str(data / "labelled"),
                       dev=str(data / "dev"), test=str(data / "test"), watch=str(data))
    check_watch(cfg)
    raw = tmp_path / "raw"
    stats = acquire(cfg, raw)
    assert (stats["num_files"], stats["labelled_files"], stats["test_groups"]) == (22, 4, 2)
    entries = [json.loads(x) for x in (raw / "manifest.jsonl").read_text().splitlines()]
    roles = {e["group"]: e.get("role") for e in entries}
    assert roles == {**{str(s): None for s in range(1, 7)}, "11": "labelled", "12": "labelled",
                     "21": "dev", "31": "test", "32": "test"}
    assert all(e["id"].startswith(f"{e['role']}-") for e in entries if "role" in e)

    out = tmp_path / "seg"
    segment_corpus(raw / "manifest.jsonl", out,
                   SegmentConfig(pack=False, transcribed_share=0.2))
    splits = _windows(out)
    assert _speakers(splits["test"]) == {"31", "32"} and _speakers(splits["dev"]) == {"21"}
    assert _speakers(splits["train"]) == {"1", "2", "3", "4", "5", "6", "11", "12"}
    # The labelled set keeps every transcript whatever transcribed_share says; the held-out
    # sets keep theirs; the pool has none to keep.
    texts = {w["id"]: w["transcript"] for s in SPLITS for w in splits[s]}
    assert all(texts[w["id"]] for w in splits["train"] if w["group"] in ("11", "12"))
    assert sum(t is not None for t in texts.values()) == 4 + 2 + 4
    assert all(w.get("role") == "test" for w in splits["test"])
    err = capsys.readouterr().err
    assert "download.test: 2 speakers, 4 files, 4 with transcripts: test" in err
    assert "train keeps at least" not in err  # nothing is drawn


def test_a_missing_held_out_role_is_drawn_from_the_labelled_speakers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _librispeech(data / "pool", [1, 2, 3], text=False)
    _librispeech(data / "labelled", [11, 12, 13, 14, 15])
    _librispeech(data / "test", [31])
    raw = tmp_path / "raw"
    acquire(SourceConfig(source=str(data / "pool"), labelled=str(data / "labelled"),
                         test=str(data / "test"), watch=str(data)), raw)
    splits = _windows(_segment(raw, tmp_path / "seg"))
    assert _speakers(splits["test"]) == {"31"}
    assert _speakers(splits["dev"]) < {"11", "12", "13", "14", "15"}
    # Train keeps the rest of the labelled speakers (at least 40% of them: 2 of 5).
    assert len(_speakers(splits["train"]) & {"11", "12", "13", "14", "15"}) >= 2


def _segment(raw: Path, out: Path) -> Path:
    segment_corpus(raw / "manifest.jsonl", out, SegmentConfig(pack=False))
    return out


def test_a_speaker_in_two_roles_stops_before_any_decoding(tmp_path: Path,
                                                          monkeypatch) -> None:
    import bestrq.segment

    data = tmp_path / "data"
    _librispeech(data / "pool", [1, 2, 3], text=False)
    _librispeech(data / "labelled", [11, 12, 7])
    _librispeech(data / "test", [7, 31])  # speaker 7 in the labelled and the test set
    cfg = SourceConfig(source=str(data / "pool"), labelled=str(data / "labelled"),
                       test=str(data / "test"), watch=str(data))
    with pytest.raises(RoleOverlapError, match=r"^download: 1 speaker\(s\) in two roles: '7' "
                       r"\(download\.labelled and download\.test\); a speaker must be in one "
                       r"role only"):
        acquire(cfg, tmp_path / "raw")
    # A raw manifest written by hand is checked by segment too, before it decodes anything.
    raw = tmp_path / "raw2"
    raw.mkdir()
    rows = [{"id": "a", "path": "x.flac", "group": "7", "transcript": "t", "role": "test"},
            {"id": "b", "path": "y.flac", "group": "7", "transcript": None}]
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(bestrq.segment, "stream_audio", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(RoleOverlapError, match=r"'7' \(download\.source and download\.test\)"):
        segment_corpus(raw / "manifest.jsonl", tmp_path / "seg", SegmentConfig())


def test_role_sources_are_checked_by_name_before_any_work(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _librispeech(data / "pool", [1, 2, 3])
    _librispeech(data / "dev", [21], text=False)
    with pytest.raises(ValueError, match=r"^download\.test: synthetic speech is only for "
                                         r"download\.source"):
        validate(SourceConfig(test="synthetic"))
    with pytest.raises(ValueError, match=r"^download\.labelled: folder .*nowhere does not "
                                         r"exist"):
        validate(SourceConfig(labelled=str(tmp_path / "nowhere")))
    # download.watch must hold every local source: the pool's alone is not enough.
    with pytest.raises(ValueError, match=r"download\.watch: .* does not hold what "
                                         r"download\.dev read\(s\); set it to a folder holding "
                                         rf"every local source \(here {data}\)"):
        check_watch(SourceConfig(source=str(data / "pool"), dev=str(data / "dev"),
                                 watch=str(data / "pool")))
    # A dev set without transcripts cannot measure WER: said before any audio is decoded.
    raw = tmp_path / "raw"
    acquire(SourceConfig(source=str(data / "pool"), dev=str(data / "dev"), watch=str(data)), raw)
    with pytest.raises(SplitError, match=r"^download\.dev: none of its files has a transcript"):
        segment_corpus(raw / "manifest.jsonl", tmp_path / "seg", SegmentConfig())
