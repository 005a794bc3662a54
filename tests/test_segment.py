"""Tests for bestrq.segment: cutting, packing, skipping, resampling and the train/dev/test split."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.segment import (
    SPLITS,
    SegmentConfig,
    SplitError,
    SplitShareWarning,
    hide_transcripts,
    segment_corpus,
    split_corpus,
    validate,
)

# Three splits need three voices with transcripts (dev, test and the fine-tune's): the corpora
# of tests about cutting and packing get three extra transcribed voices of one 1 s utterance
# each, left out by _windows.
PAD = 3


def _noise(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(int(round(seconds * rate)))).astype(np.float32)


def _corpus(tmp_path: Path, items: list[tuple[str, str, float, str | None]], rate: int = 16000,
            pad: bool = True):
    """Write (id, group, seconds, transcript) utterances and a raw manifest; returns its path.
    With `pad`, PAD more voices ("zpad<i>", one transcribed 1 s utterance each) follow."""
    raw = tmp_path / "raw"
    lines = []
    if pad:
        items = items + [(f"zpad{i}", f"zpad{i}", 1.0, "pad") for i in range(PAD)]
    for i, (utt, group, seconds, text) in enumerate(items):
        path = raw / group / f"{utt}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _noise(seconds, rate, seed=i), rate)
        rel = path.relative_to(raw).as_posix()
        lines.append({"id": utt, "path": rel, "transcript": text, "group": group})
    manifest = raw / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def _windows(out: Path, pad: bool = False) -> list[dict]:
    """Every window of the three splits (the padding voices' only with `pad`)."""
    recs = []
    for name in SPLITS:
        for line in (out / f"{name}.jsonl").read_text().splitlines():
            rec = json.loads(line) | {"split": name}
            if pad or not rec["group"].startswith("zpad"):
                recs.append(rec)
    return recs


def _count(stats: dict) -> float:
    """Windows of the three splits, without the padding voices'."""
    return sum(stats[f"num_{name}"] for name in SPLITS) - PAD


def _hours(stats: dict) -> float:
    return sum(stats[f"hours_{name}"] for name in SPLITS) - PAD / 3600


def test_validate_names_the_parameter() -> None:
    validate(SegmentConfig())
    for cfg, name in [
        (SegmentConfig(max_seconds=31), "segment.max_seconds"),
        (SegmentConfig(max_seconds=0), "segment.max_seconds"),
        (SegmentConfig(min_seconds=-1), "segment.min_seconds"),
        (SegmentConfig(min_seconds=40, max_seconds=30), "segment.min_seconds"),
        (SegmentConfig(dev_fraction=0), "segment.dev_fraction"),
        (SegmentConfig(test_fraction=1.0), "segment.test_fraction"),
        (SegmentConfig(dev_fraction=0.5, test_fraction=0.5), "dev_fraction \\+ segment.test"),
        (SegmentConfig(transcribed_share=1.5), "segment.transcribed_share"),
        (SegmentConfig(transcribed_share=True), "segment.transcribed_share"),
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
    assert _count(stats) == 3
    total = 24 + 16 + 6 + PAD
    assert stats["padding_fraction"] == pytest.approx(1 - total / ((3 + PAD) * 30))
    assert stats["mean_window_seconds"] == pytest.approx(total / (3 + PAD))
    assert _hours(stats) == pytest.approx((total - PAD) / 3600)


def test_no_packing_gives_one_window_per_utterance(tmp_path: Path) -> None:
    items = [(f"a-{i}", "a", 2.0, None) for i in range(3)] + [("b-0", "b", 1.0, "x")]
    manifest = _corpus(tmp_path, items)
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig(pack=False))
    wins = _windows(tmp_path / "seg")
    assert sorted(w["id"] for w in wins) == ["a-0", "a-1", "a-2", "b-0"]
    assert all(len(w["sources"]) == 1 for w in wins)
    assert _count(stats) == 4


def test_transcribed_and_untranscribed_are_never_packed_together(tmp_path: Path) -> None:
    items = [("g-0", "g", 1.0, "hi"), ("g-1", "g", 1.0, None), ("g-2", "g", 1.0, "there"),
             ("g-3", "g", 1.0, None)]
    manifest = _corpus(tmp_path, items)
    segment_corpus(manifest, tmp_path / "seg", SegmentConfig())
    got = sorted((w["sources"], w["transcript"]) for w in _windows(tmp_path / "seg"))
    # The transcribed utterances keep their text, packed together; the others go apart.
    assert got == [(["g-0", "g-2"], "hi there"), (["g-1", "g-3"], None)]


def test_long_recording_is_cut_losslessly(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("talk", "r", 70.0, "too long to keep")])
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig(min_seconds=0.0))
    wins = _windows(tmp_path / "seg")
    assert len(wins) == 3
    assert all(w["duration"] <= 30.0 for w in wins)
    assert sum(w["duration"] for w in wins) == pytest.approx(70.0, abs=1e-9)
    assert all(w["transcript"] is None and w["sources"] == ["talk"] for w in wins)
    assert stats["num_cut_recordings"] == 1
    # The transcript could not label any piece: that loss is listed, not silent.
    (listed,) = [json.loads(x) for x in (tmp_path / "seg" / "skipped.jsonl").read_text()
                 .splitlines()]
    assert listed["id"] == "talk" and listed["reason"].startswith("transcript not used")
    assert stats["num_skipped"] == 0 and stats["num_listed"] == 1
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
    assert sorted((s["id"], Path(s["path"]).name) for s in skipped) == [
        ("g-bad", "bad.flac"), ("h-e", "empty.wav")]
    assert all(Path(s["path"]).name in s["reason"] and s["kept_seconds"] == 0.0
               and s["stage"] == "segment" for s in skipped)
    wins = {w["id"]: w for w in _windows(out)}
    assert wins["g-0"]["transcript"] == "a b" and wins["h-0"]["transcript"] == "c"


def test_resamples_22050_to_16k(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("u", "g", 2.0, "t"), ("v", "h", 1.0, "t")], rate=22050)
    segment_corpus(manifest, tmp_path / "seg", SegmentConfig())
    (w,) = [w for w in _windows(tmp_path / "seg") if w["id"] == "u"]
    info = sf.info(tmp_path / "seg" / w["path"])
    assert info.samplerate == SAMPLE_RATE and info.frames == 2 * SAMPLE_RATE
    assert w["duration"] == pytest.approx(2.0)


def test_short_clips_are_dropped_and_named(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("g-0", "g", 0.2, "uh"), ("g-1", "g", 1.0, "yes"),
                                  ("one", "h", 1 / SAMPLE_RATE, None)])
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig(min_seconds=0.5))
    assert stats["num_dropped_short"] == 2 and stats["num_skipped"] == 2
    assert [w["sources"] for w in _windows(tmp_path / "seg")] == [["g-1"]]
    skipped = [json.loads(x) for x in (tmp_path / "seg" / "skipped.jsonl").read_text()
               .splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped] == [
        ("g-0", "file too short: 0.200 s < segment.min_seconds 0.5"),
        ("one", "file too short: 0.000 s < segment.min_seconds 0.5")]


def test_any_failure_of_one_file_skips_that_file_only(tmp_path: Path, monkeypatch) -> None:
    import bestrq.segment

    items = [(name, "g", 1.0, "t") for name in ("ok", "mem", "rt", "val")]
    manifest = _corpus(tmp_path, items)
    real = bestrq.segment.stream_audio
    failures = {"mem": MemoryError(), "rt": RuntimeError("libsndfile hiccup"),
                "val": ValueError("odd header")}

    def flaky(path, *args, **kwargs):
        if Path(path).stem in failures:
            raise failures[Path(path).stem]
        return real(path, *args, **kwargs)

    monkeypatch.setattr(bestrq.segment, "stream_audio", flaky)
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig(num_workers=1))
    assert [w["sources"] for w in _windows(tmp_path / "seg")] == [["ok"]]
    skipped = [json.loads(x) for x in (tmp_path / "seg" / "skipped.jsonl").read_text()
               .splitlines()]
    path = str(manifest.parent / "g")
    assert [(s["id"], s["reason"]) for s in skipped] == [
        ("mem", f"cannot decode audio file {path}/mem.flac: MemoryError: MemoryError"),
        ("rt", f"cannot decode audio file {path}/rt.flac: RuntimeError: libsndfile hiccup"),
        ("val", f"cannot decode audio file {path}/val.flac: ValueError: odd header")]
    assert stats["num_skipped"] == 3


def test_absurd_sample_rate_header_is_skipped_not_allocated(tmp_path: Path) -> None:
    import struct

    manifest = _corpus(tmp_path, [("fine", "g", 1.0, "t")])
    body = b"\0" * 128  # 64 samples, said to be at 2 GHz: 172 bytes in all
    fmt = struct.pack("<HHIIHH", 1, 1, 2_000_000_000, 4_000_000_000, 2, 16)
    wav = (b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt " + struct.pack("<I", 16)
           + fmt + b"data" + struct.pack("<I", len(body)) + body)
    assert len(wav) == 172
    (manifest.parent / "g" / "ghz.wav").write_bytes(wav)
    with open(manifest, "a") as f:
        f.write(json.dumps({"id": "ghz", "path": "g/ghz.wav", "group": "g"}) + "\n")
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig())
    (listed,) = [json.loads(x) for x in (tmp_path / "seg" / "skipped.jsonl").read_text()
                 .splitlines()]
    assert listed["id"] == "ghz" and "sample rate of 2000000000 Hz" in listed["reason"]
    assert _count(stats) == 1


def test_what_download_left_aside_is_listed_first(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, [("a", "g", 1.0, "t"), ("b", "h", 0.1, None)])
    aside = [{"path": "/corpus/notes.txt", "reason": "not an audio file"},
             {"path": "x/link", "archive": "c.tar.gz", "reason": "symbolic link"}]
    (manifest.parent / "skipped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in aside))
    stats = segment_corpus(manifest, tmp_path / "seg", SegmentConfig())
    listed = [json.loads(x) for x in (tmp_path / "seg" / "skipped.jsonl").read_text()
              .splitlines()]
    assert listed[:2] == [{"stage": "download", **r} for r in aside]
    assert [(r["stage"], r["id"]) for r in listed[2:]] == [("segment", "b")]
    assert stats["num_listed"] == 3 and stats["num_skipped"] == 1


def _voices(voices: int, each: int) -> list[tuple[str, str, float, str]]:
    """`each` transcribed 1 s utterances of each of `voices` speakers spk0, spk1, ..."""
    return [(f"spk{g}-{i}", f"spk{g}", 1.0, f"t{g}{i}") for g in range(voices)
            for i in range(each)]


def test_split_by_group_and_deterministic(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, _voices(10, 3), pad=False)
    cfg = SegmentConfig(pack=False, dev_fraction=0.2, test_fraction=0.3, seed=1)
    stats = segment_corpus(manifest, tmp_path / "a", cfg)
    wins = _windows(tmp_path / "a")
    groups = {split: {w["group"] for w in wins if w["split"] == split} for split in SPLITS}
    assert all(groups.values())
    assert not groups["train"] & groups["dev"] and not groups["train"] & groups["test"]
    assert not groups["dev"] & groups["test"]
    # 3 and 2 of 10 voices: the shares of the windows, whole voices each.
    assert (stats["num_test"], stats["num_dev"], stats["num_train"]) == (9, 6, 15)
    assert (stats["speakers_test"], stats["speakers_dev"], stats["speakers_train"]) == (3, 2, 5)
    segment_corpus(manifest, tmp_path / "b", cfg)
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.jsonl").read_text() == \
            (tmp_path / "b" / f"{name}.jsonl").read_text()


def _records(groups: dict[str, int], labelled: set[str] | None = None) -> list[dict]:
    return [{"id": f"{g}{i}", "group": g,
             "transcript": "t" if labelled is None or g in labelled else None}
            for g, n in groups.items() for i in range(n)]


def test_split_gives_three_nonempty_disjoint_splits_or_says_why() -> None:
    # Three voices, one of them far larger: each split still gets one whole voice.
    out = split_corpus(_records({"a": 1, "b": 50, "c": 2}), 0.01, 0.01, seed=0)
    assert all(out[split] for split in SPLITS)
    assert sum(len({w["group"] for w in out[s]}) for s in SPLITS) == 3
    # Dev and test come from voices with transcripts, and train keeps one of those too.
    out = split_corpus(_records({"a": 5, "b": 5, "c": 5, "d": 5, "e": 5},
                                labelled={"b", "d", "e"}), 0.2, 0.2, seed=0)
    assert {w["group"] for w in out["dev"] + out["test"]} < {"b", "d", "e"}
    assert len({w["group"] for w in out["train"]}) == 3
    assert sum(w["transcript"] is not None for w in out["train"]) == 5
    # Too few voices, or too few with transcripts (dev, test and the fine-tune need one
    # each): one line with the counts and the knobs.
    for groups, labelled in (({"only": 100}, None), ({"a": 3, "b": 3}, None),
                             ({"a": 3, "b": 3, "c": 3}, {"a"}),
                             ({"a": 3, "b": 3, "c": 3, "d": 3}, {"a", "b"})):
        with pytest.raises(SplitError, match=r"has \d speakers/recordings, \d of them with "
                       r"transcripts.*download.num_speakers.*one per speaker"):
            split_corpus(_records(groups, labelled), 0.1, 0.1, seed=0)


def test_much_untranscribed_audio_leaves_train_transcribed_voices() -> None:
    # The user's case: 16 untranscribed voices, 6 transcribed. Dev and test were sized as
    # shares of all windows and drawn from the transcribed voices only, so all 6 went there and
    # the fine-tune had nothing; now they are shares of the transcribed windows, and train
    # keeps segment.train_transcribed_speakers of the transcribed voices (40%: 3 of 6).
    groups = {**{f"u{i}": 10 for i in range(16)}, **{f"t{i}": 10 for i in range(6)}}
    for seed in range(4):
        out = split_corpus(_records(groups, {f"t{i}" for i in range(6)}), 0.15, 0.35, seed)
        labelled = {s: {w["group"] for w in out[s] if w["transcript"] is not None}
                    for s in SPLITS}
        assert len(labelled["train"]) == 3 and labelled["dev"] and labelled["test"]
        # 35% and 15% of the 60 transcribed windows: two voices and one.
        assert (len(out["test"]), len(out["dev"])) == (20, 10)
        assert all(w["group"].startswith("u") or w["group"] in labelled["train"]
                   for w in out["train"])
    # The share is a floor: at 0.9 train keeps 4 (dev and test one each, whatever their
    # shares ask); at 0 the draw alone decides, and leaves 3 here.
    def kept(share: float) -> int:
        out = split_corpus(_records(groups, {f"t{i}" for i in range(6)}), 0.15, 0.35, 0, share)
        return len({w["group"] for w in out["train"] if w["transcript"] is not None})

    assert (kept(0.9), kept(0.0)) == (4, 3)


def test_a_dominant_speaker_stays_in_train_and_the_missed_share_is_named() -> None:
    # One 120-window voice and six of one window: the big voice filled dev or test (and train
    # kept 11-16% of the windows) for seeds 0-3, with no warning.
    groups = {"big": 120, **{f"s{i}": 1 for i in range(6)}}
    for seed in range(4):
        with pytest.warns(SplitShareWarning) as caught:
            out = split_corpus(_records(groups), 0.15, 0.35, seed)
        assert "big" in {w["group"] for w in out["train"]}
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and all("speaker 'big' alone holds 95.2% of them (in train)"
                                          in m for m in messages)
        assert any(m.startswith("segment: test holds") and "not 35.0%" in m for m in messages)
    # Voices of equal size meet their shares within the tolerance, and nothing is said.
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitShareWarning)
        out = split_corpus(_records({f"v{i}": 5 for i in range(20)}), 0.15, 0.35, 0)
    assert (len(out["test"]), len(out["dev"])) == (35, 15)


def test_segment_on_real_files_keeps_transcribed_windows_in_train(tmp_path: Path,
                                                                  capsys) -> None:
    # 8 untranscribed voices and 4 transcribed ones, three 1 s files each, on disk.
    items = [(f"u{g}-{i}", f"u{g}", 1.0, None) for g in range(8) for i in range(3)] + \
        [(f"t{g}-{i}", f"t{g}", 1.0, f"words {g} {i}") for g in range(4) for i in range(3)]
    manifest = _corpus(tmp_path, items, pad=False)
    stats = segment_corpus(manifest, tmp_path / "seg",
                           SegmentConfig(pack=False, transcribed_share=1.0, dev_fraction=0.15,
                                         test_fraction=0.35))
    assert stats["transcribed_train"] == 3 * 2 and stats["speakers_train"] == 8 + 2
    assert stats["transcribed_dev"] == stats["num_dev"] == 3
    assert stats["transcribed_test"] == stats["num_test"] == 3
    plan = capsys.readouterr().err
    assert "plan: 12 speakers/recordings, 36 files, 0.01 h; 4 speakers with transcripts " \
           "(12 files)" in plan
    assert "train keeps at least 2 of them" in plan


def test_a_corpus_without_transcripts_is_told_so_before_decoding(tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    import bestrq.segment

    manifest = _corpus(tmp_path, [(f"u{g}", f"u{g}", 1.0, None) for g in range(3)], pad=False)
    monkeypatch.setattr(bestrq.segment, "stream_audio", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(BaseException, match="decoded"):
        segment_corpus(manifest, tmp_path / "seg", SegmentConfig(num_workers=1))
    err = capsys.readouterr().err
    assert "no file has a transcript" in err and "no fine-tune and no WER" in err


def test_too_few_voices_stop_before_any_audio_is_decoded(tmp_path: Path, monkeypatch) -> None:
    import bestrq.segment

    manifest = _corpus(tmp_path, [("a", "g", 1.0, "t"), ("b", "h", 1.0, "t")], pad=False)
    monkeypatch.setattr(bestrq.segment, "stream_audio", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(SplitError, match="has 2 speakers/recordings, 2 of them"):
        segment_corpus(manifest, tmp_path / "seg", SegmentConfig())
    assert not (tmp_path / "seg").exists()


def test_transcribed_share_hides_text_of_train_windows_only(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path, _voices(10, 6), pad=False)
    cfg = SegmentConfig(pack=False, dev_fraction=0.2, test_fraction=0.2, transcribed_share=0.25)
    stats = segment_corpus(manifest, tmp_path / "seg", cfg)
    wins = _windows(tmp_path / "seg")
    train = [w for w in wins if w["split"] == "train"]
    kept = sum(w["transcript"] is not None for w in train)
    assert kept == round(0.25 * len(train)) == stats["transcribed_train"]
    assert stats["num_hidden_transcripts"] == len(train) - kept
    # Dev and test keep every transcript: their WER needs them.
    assert all(w["transcript"] is not None for w in wins if w["split"] != "train")
    assert stats["transcribed_test"] == stats["num_test"] > 0


def test_hide_transcripts_is_a_seeded_draw_keeping_at_least_one() -> None:
    def kept(share: float, seed: int) -> list[str]:
        windows = _records({"a": 20})
        hide_transcripts(windows, share, seed)
        return [w["id"] for w in windows if w["transcript"] is not None]

    assert len(kept(0.3, 0)) == 6 and kept(0.3, 0) == kept(0.3, 0)
    assert kept(0.3, 0) != kept(0.3, 1)
    assert len(kept(0.01, 0)) == 1 and kept(0.0, 0) == [] and len(kept(1.0, 0)) == 20


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
    # Both are listed; only the short one gave no window at all.
    assert stats["num_skipped"] == 1 and set(skipped) == {"long.flac", "short.flac"}
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
    assert "after" in skipped["long.flac"]["reason"]


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


def test_a_long_recording_name_gives_short_stable_window_names(tmp_path: Path) -> None:
    # A 35 s recording named with 250 characters: its pieces' names would be 250 + "_p000.flac",
    # too long for a file; they are shortened with a hash of the whole name, the same each run.
    long_a, long_b = "a" * 249 + "1", "a" * 249 + "2"  # one start, two recordings
    manifest = _corpus(tmp_path, [(long_a, "g", 35.0, None), (long_b, "h", 2.0, "t")])
    outputs = []
    for run in ("one", "two"):
        segment_corpus(manifest, tmp_path / run, SegmentConfig(min_seconds=0.0))
        outputs.append(_windows(tmp_path / run))
    assert outputs[0] == outputs[1]
    names = [w["id"] for w in outputs[0]]
    assert len(names) == 3 and len(set(names)) == 3
    assert all(len(f"{n}.flac".encode()) <= 255 for n in names)
    assert sum(w["sources"] == [long_a] for w in outputs[0]) == 2
    for w in outputs[0]:
        assert (tmp_path / "one" / w["path"]).is_file()


def test_a_run_that_stops_part_way_leaves_no_manifest_of_the_last_one(tmp_path: Path,
                                                                      monkeypatch) -> None:
    import bestrq.segment

    manifest = _corpus(tmp_path, [("a", "g", 1.0, "t"), ("b", "h", 1.0, "t")])
    out = tmp_path / "seg"
    segment_corpus(manifest, out, SegmentConfig())
    assert (out / "train.jsonl").is_file()
    monkeypatch.setattr(bestrq.segment, "split_corpus", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        segment_corpus(manifest, out, SegmentConfig())
    assert not list(out.glob("*.jsonl"))  # nothing that points at the removed windows
