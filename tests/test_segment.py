"""Tests for bestrq.segment: cutting, packing, skipping, resampling and the train/eval split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.segment import SegmentConfig, segment_corpus, split_train_eval, validate


def _noise(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(int(round(seconds * rate)))).astype(np.float32)


def _corpus(tmp_path: Path, items: list[tuple[str, str, float, str | None]], rate: int = 16000):
    """Write (id, group, seconds, transcript) utterances and a raw manifest; returns its path."""
    raw = tmp_path / "raw"
    lines = []
    for i, (utt, group, seconds, text) in enumerate(items):
        path = raw / group / f"{utt}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _noise(seconds, rate, seed=i), rate)
        rel = path.relative_to(raw).as_posix()
        lines.append({"id": utt, "path": rel, "transcript": text, "group": group})
    manifest = raw / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def _windows(out: Path) -> list[dict]:
    recs = []
    for name in ("train", "eval"):
        for line in (out / f"{name}.jsonl").read_text().splitlines():
            recs.append(json.loads(line) | {"split": name})
    return recs


def test_validate_names_the_parameter() -> None:
    validate(SegmentConfig())
    for cfg, name in [
        (SegmentConfig(max_seconds=31), "segment.max_seconds"),
        (SegmentConfig(max_seconds=0), "segment.max_seconds"),
        (SegmentConfig(min_seconds=-1), "segment.min_seconds"),
        (SegmentConfig(min_seconds=40, max_seconds=30), "segment.min_seconds"),
        (SegmentConfig(eval_fraction=0), "segment.eval_fraction"),
        (SegmentConfig(eval_fraction=1.0), "segment.eval_fraction"),
    ]:
        with pytest.raises(ValueError, match=name):
            validate(cfg)


def test_packing_respects_max_seconds_and_joins_transcripts(tmp_path: Path) -> None:
    items = [(f"s1-{i}", "s1", 8.0, f"word{i}") for i in range(5)]
    items += [(f"s2-{i}", "s2", 3.0, f"other{i}") for i in range(2)]
    manifest = _corpus(tmp_path, items)
    out = tmp_path / "seg"
    stats = segment_corpus(manifest, out, SegmentConfig(max_seconds=30.0))
    wins = {w["id"]: w for w in _windows(out)}
    assert set(wins) == {"s1-0", "s1-3", "s2-0"}
    assert wins["s1-0"]["sources"] == ["s1-0", "s1-1", "s1-2"]
    assert wins["s1-0"]["transcript"] == "word0 word1 word2"
    assert wins["s1-0"]["duration"] == pytest.approx(24.0)
    assert wins["s1-3"]["transcript"] == "word3 word4"
    assert wins["s2-0"]["transcript"] == "other0 other1"
    for w in wins.values():
        assert w["duration"] <= 30.0
        audio, rate = sf.read(out / w["path"])
        assert rate == SAMPLE_RATE and len(audio) == round(w["duration"] * SAMPLE_RATE)
    assert stats["num_train"] + stats["num_eval"] == 3
    total = 24 + 16 + 6
    assert stats["padding_fraction"] == pytest.approx(1 - total / (3 * 30))
    assert stats["mean_window_seconds"] == pytest.approx(total / 3)
    assert stats["hours_train"] + stats["hours_eval"] == pytest.approx(total / 3600)


def test_no_packing_gives_one_window_per_utterance(tmp_path: Path) -> None:
    items = [(f"a-{i}", "a", 2.0, None) for i in range(3)] + [("b-0", "b", 1.0, "x")]
    manifest = _corpus(tmp_path, items)
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig(pack=False))
    wins = _windows(tmp_path / "seg")
    assert sorted(w["id"] for w in wins) == ["a-0", "a-1", "a-2", "b-0"]
    assert all(len(w["sources"]) == 1 for w in wins)
    assert stats["num_train"] + stats["num_eval"] == 4


def test_missing_transcript_nulls_the_window(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("g-0", "g", 1.0, "hi"), ("g-1", "g", 1.0, None)])
    segment_corpus(manifest, tmp_path / "seg", SegmentConfig())
    (w,) = [w for w in _windows(tmp_path / "seg") if w["id"] == "g-0"]
    assert w["sources"] == ["g-0", "g-1"] and w["transcript"] is None


def test_long_recording_is_cut_losslessly(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("talk", "r", 70.0, "too long to keep")])
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig(min_seconds=0.0))
    wins = _windows(tmp_path / "seg")
    assert len(wins) == 3
    assert all(w["duration"] <= 30.0 for w in wins)
    assert sum(w["duration"] for w in wins) == pytest.approx(70.0, abs=1e-9)
    assert all(w["transcript"] is None and w["sources"] == ["talk"] for w in wins)
    assert stats["num_cut_recordings"] == 1
    # The pieces, decoded and concatenated in order, are the original recording.
    pieces = [sf.read(tmp_path / "seg" / w["path"])[0] for w in sorted(wins, key=lambda w: w["id"])]
    original = sf.read(tmp_path / "raw" / "r" / "talk.flac")[0]
    np.testing.assert_allclose(np.concatenate(pieces), original, atol=1 / 32768)


def test_corrupt_files_are_skipped_and_listed(tmp_path: Path) -> None:
    items = [("g-0", "g", 1.0, "a"), ("g-1", "g", 1.0, "b"), ("h-0", "h", 1.0, "c")]
    manifest = _corpus(tmp_path, items)
    raw = manifest.parent
    (raw / "g" / "bad.flac").write_bytes(np.random.default_rng(0).bytes(2048))
    (raw / "h" / "empty.wav").write_bytes(b"")
    with open(manifest, "a") as f:
        f.write(json.dumps({"id": "g-bad", "path": "g/bad.flac", "transcript": "x", "group": "g"}))
        f.write("\n" + json.dumps({"id": "h-e", "path": "h/empty.wav", "group": "h"}) + "\n")
    out = tmp_path / "seg"
    stats = segment_corpus(manifest, out, SegmentConfig())
    assert stats["num_skipped"] == 2
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(s["path"]).name for s in skipped) == ["bad.flac", "empty.wav"]
    assert all(Path(s["path"]).name in s["error"] for s in skipped)
    wins = {w["id"]: w for w in _windows(out)}
    assert wins["g-0"]["transcript"] == "a b" and wins["h-0"]["transcript"] == "c"


def test_resamples_22050_to_16k(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("u", "g", 2.0, "t"), ("v", "h", 1.0, "t")], rate=22050)
    segment_corpus(manifest, tmp_path / "seg", SegmentConfig())
    (w,) = [w for w in _windows(tmp_path / "seg") if w["id"] == "u"]
    info = sf.info(tmp_path / "seg" / w["path"])
    assert info.samplerate == SAMPLE_RATE and info.frames == 2 * SAMPLE_RATE
    assert w["duration"] == pytest.approx(2.0)


def test_short_pieces_are_dropped(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("g-0", "g", 0.2, "uh"), ("g-1", "g", 1.0, "yes")])
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig(min_seconds=0.5))
    assert stats["num_dropped_short"] == 1
    assert [w["sources"] for w in _windows(tmp_path / "seg")] == [["g-1"]]


def test_split_by_group_and_deterministic(tmp_path: Path) -> None:
    items = [(f"spk{g}-{i}", f"spk{g}", 1.0, f"t{g}{i}") for g in range(10) for i in range(3)]
    manifest = _corpus(tmp_path, items)
    cfg = SegmentConfig(pack=False, eval_fraction=0.2, seed=1)
    stats = segment_corpus(manifest, tmp_path / "a", cfg)
    wins = _windows(tmp_path / "a")
    groups = {split: {w["id"].split("-")[0] for w in wins if w["split"] == split}
              for split in ("train", "eval")}  # fmt: skip
    assert groups["train"] and groups["eval"]
    assert not groups["train"] & groups["eval"]
    assert stats["num_eval"] == 6 and stats["num_train"] == 24  # 2 of 10 groups
    segment_corpus(manifest, tmp_path / "b", cfg)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_split_guarantees_both_sides() -> None:
    two = [{"id": "a0", "group": "a"}] * 1 + [{"id": f"b{i}", "group": "b"} for i in range(50)]
    train, evals = split_train_eval(two, fraction=0.01, seed=0)
    assert train and evals
    assert not {w["group"] for w in train} & {w["group"] for w in evals}
    one = [{"id": f"w{i}", "group": "only"} for i in range(2)]
    train, evals = split_train_eval(one, fraction=0.1, seed=0)
    assert len(train) == 1 and len(evals) == 1
    many = [{"id": f"w{i}", "group": "only"} for i in range(100)]
    train, evals = split_train_eval(many, fraction=0.1, seed=3)
    assert len(evals) == 10 and len(train) == 90


def test_broken_long_recording_keeps_what_decoded_and_is_listed(tmp_path: Path) -> None:
    items = [("long", "a", 100.0, None), ("short", "b", 8.0, "words"), ("fine", "c", 3.0, "ok")]
    manifest = _corpus(tmp_path, items, rate=44100)
    raw = manifest.parent
    for name in ("a/long.flac", "b/short.flac"):  # lose the second half of the frames
        data = (raw / name).read_bytes()
        (raw / name).write_bytes(data[: len(data) // 2])
    out = tmp_path / "seg"
    stats = segment_corpus(manifest, out, SegmentConfig(min_seconds=0.0))
    skipped = {Path(s["path"]).name: s for s in
               (json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines())}
    assert stats["num_skipped"] == 2 and set(skipped) == {"long.flac", "short.flac"}
    # The short one is dropped whole: a transcript must not label half its audio.
    assert skipped["short.flac"]["kept_seconds"] == 0.0
    wins = {w["id"]: w for w in _windows(out)}
    assert "short" not in wins and wins["fine"]["transcript"] == "ok"
    # The long one keeps every piece decoded before the break, in windows of at most 30 s.
    kept = [w for w in wins.values() if w["sources"] == ["long"]]
    assert len(kept) >= 2 and all(w["duration"] <= 30.0 for w in kept)
    total = sum(w["duration"] for w in kept)
    assert total == pytest.approx(skipped["long.flac"]["kept_seconds"], abs=1e-3)
    assert 40.0 <= total <= 50.0  # about half of 100 s
    assert "after" in skipped["long.flac"]["error"]


def test_segmenting_in_blocks_gives_the_windows_of_whole_files(tmp_path: Path, monkeypatch
                                                                ) -> None:
    import bestrq.audio

    items = [("talk", "r", 95.0, None), ("u1", "s", 12.0, "one"), ("u2", "s", 11.0, "two"),
             ("u3", "s", 13.0, "three")]
    manifest = _corpus(tmp_path, items, rate=48000)
    segment_corpus(manifest, tmp_path / "whole", SegmentConfig(min_seconds=0.0))
    monkeypatch.setattr(bestrq.audio.stream_audio, "__defaults__", (SAMPLE_RATE, 3.7))
    segment_corpus(manifest, tmp_path / "blocks", SegmentConfig(min_seconds=0.0))
    whole, blocks = _windows(tmp_path / "whole"), _windows(tmp_path / "blocks")
    assert [(w["id"], w["duration"], w["transcript"]) for w in whole] == \
        [(w["id"], w["duration"], w["transcript"]) for w in blocks]
    assert sum(w["sources"] == ["talk"] for w in whole) >= 4  # cut pieces, 3.7 s blocks
    for w in whole:
        a = sf.read(tmp_path / "whole" / w["path"])[0]
        b = sf.read(tmp_path / "blocks" / w["path"])[0]
        np.testing.assert_allclose(a, b, atol=2 / 32768)  # FLAC's 16-bit steps


def test_parallel_workers_give_the_same_corpus_as_one_process(tmp_path: Path) -> None:
    # "a b" and "a_b" sanitise to the same window id in different groups: the names must still
    # be given in group order, not in the order workers finish.
    items = [("a b", "g1", 2.0, "x"), ("a_b", "g2", 2.5, "y"), ("talk", "g3", 65.0, None),
             ("c", "g4", 1.0, "z"), ("d", "g4", 1.5, "w")]
    manifest = _corpus(tmp_path, items)
    (manifest.parent / "g2" / "bad.flac").write_bytes(b"not audio")
    with open(manifest, "a") as f:
        f.write(json.dumps({"id": "bad", "path": "g2/bad.flac", "group": "g2"}) + "\n")
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"seg{workers}"
        stats = segment_corpus(manifest, out, SegmentConfig(min_seconds=0.0, num_workers=workers))
        runs[workers] = (stats, _windows(out), (out / "skipped.jsonl").read_text())
        assert not (out / ".work").exists()
    assert runs[1] == runs[2]
    stats, windows, skipped = runs[2]
    ids = sorted(w["id"] for w in windows)
    assert "a_b" in ids and "a_b_" in ids and stats["num_skipped"] == 1 and "bad.flac" in skipped
    for w in windows:
        assert (tmp_path / "seg1" / w["path"]).read_bytes() == \
            (tmp_path / "seg2" / w["path"]).read_bytes()
    with pytest.raises(ValueError, match="segment.num_workers"):
        validate(SegmentConfig(num_workers=-1))
