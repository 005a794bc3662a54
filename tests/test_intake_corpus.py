"""A corpus of bad and odd files goes through download and segment without a crash, and every
file ends up in a window, as a transcript, or listed in skipped.jsonl with its reason."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from whisper.audio import SAMPLE_RATE

from bestrq.segment import SegmentConfig, segment_corpus
from bestrq.sources import SourceConfig, acquire


def _speech(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(int(round(seconds * rate)))).astype(np.float32)


def _wav_header(path: Path, rate: int, samples: int = 64) -> None:
    body = b"\0" * (2 * samples)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (2 * rate) & 0xFFFFFFFF, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt "
                     + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body))
                     + body)


LONG_NAME = "l" * 246 + ".wav"
# name -> what must become of it: "window", "transcript", or a piece of the listed reason.
EXPECTED: dict[str, str] = {
    "empty.wav": "cannot decode audio file",
    "zero_frames.wav": "it holds no samples",
    "truncated.flac": "cannot decode audio file",
    "flac_named.wav": "window",  # FLAC bytes, .wav name: decoded by content
    "text.wav": "cannot decode audio file",
    "ghz.wav": "sample rate of 2000000000 Hz",
    "rate400k.wav": "sample rate of 400000 Hz",
    "rate8k.wav": "window",
    "rate96k.flac": "window",
    "odd_rate.wav": "window",  # 44101 Hz
    "stereo.wav": "window",
    "pcm24.wav": "window",
    "u8.wav": "window",
    "vorbis.ogg": "window",
    "one_sample.wav": "file too short",
    "short.wav": "file too short",
    "silent.flac": "window",
    "long.flac": "window",  # 70 s: cut into pieces
    "nan.wav": "non-finite samples",
    "garbage.flac": "cannot decode audio file",
    "ñandú café.flac": "window",
    "with space.wav": "window",
    "new\nline.wav": "window",
    "UPPER.WAV": "window",
    "a/b/c/d/deep.flac": "window",
    "folder.wav/inner.flac": "window",
    "26/495/26-495-0000.flac": "window",
    "26/495/２６-495-0001.flac": "window",  # fullwidth digits: still speaker 26 by its folders
    "26/495/26-495.trans.txt": "transcript",
    "x/1/1-1.trans.txt": "transcript file is not UTF-8 text",
    "x/1/1-1-0000.flac": "window",
    "transcripts.tsv": "transcript",
    "dup/x/utt.flac": "window",
    "dup/y/utt.flac": "window",
    "dup/z.wav": "window",
    "dup/z.WAV": "window",
    "notes.txt": "not an audio file: extension '.txt'",
    ".DS_Store": "not an audio file: extension ''",
    "clip.wave": "not an audio file: extension '.wave'",
    "link.flac": "window",  # the user's own link to a file elsewhere
    "dangling.wav": "broken link",
    "linked_dir": "link to a folder, not followed",
    "caf\udce9.flac": "window",  # b"caf\xe9.flac": latin-1 bytes, not UTF-8 (PEP 383's str)
    LONG_NAME: "window",  # 35 s, 250 characters: its windows' names must be shortened
}


def _build(root: Path, elsewhere: Path) -> None:
    root.mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    w = sf.write
    (root / "empty.wav").write_bytes(b"")
    w(root / "zero_frames.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    w(root / "truncated.flac", _speech(2.0, seed=1), SAMPLE_RATE)
    data = (root / "truncated.flac").read_bytes()
    (root / "truncated.flac").write_bytes(data[: len(data) // 2])
    w(root / "flac_named.wav", _speech(1.0, seed=2), SAMPLE_RATE, format="FLAC")
    (root / "text.wav").write_text("this is not audio\n")
    _wav_header(root / "ghz.wav", 2_000_000_000)
    _wav_header(root / "rate400k.wav", 400_000)
    w(root / "rate8k.wav", _speech(1.0, 8000, seed=3), 8000)
    w(root / "rate96k.flac", _speech(1.0, 96000, seed=4), 96000)
    w(root / "odd_rate.wav", _speech(1.0, 44101, seed=5), 44101)
    w(root / "stereo.wav", np.stack([_speech(1.0, seed=6), _speech(1.0, seed=7)], 1), SAMPLE_RATE)
    w(root / "pcm24.wav", _speech(1.0, seed=8), SAMPLE_RATE, subtype="PCM_24")
    w(root / "u8.wav", _speech(1.0, seed=9), SAMPLE_RATE, subtype="PCM_U8")
    w(root / "vorbis.ogg", _speech(1.0, seed=10), SAMPLE_RATE, format="OGG", subtype="VORBIS")
    w(root / "one_sample.wav", _speech(1 / SAMPLE_RATE, seed=11), SAMPLE_RATE)
    w(root / "short.wav", _speech(0.3, seed=12), SAMPLE_RATE)
    w(root / "silent.flac", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    w(root / "long.flac", _speech(70.0, seed=13), SAMPLE_RATE)
    nan = _speech(1.0, seed=14)
    nan[100] = np.nan
    w(root / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
    (root / "garbage.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    for name in ("ñandú café.flac", "with space.wav", "new\nline.wav", "UPPER.WAV",
                 "a/b/c/d/deep.flac", "folder.wav/inner.flac", "x/1/1-1-0000.flac",
                 "dup/x/utt.flac", "dup/y/utt.flac", "dup/z.wav", "dup/z.WAV"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        w(root / name, _speech(1.0, seed=len(name)), SAMPLE_RATE)
    speaker = root / "26" / "495"
    speaker.mkdir(parents=True)
    w(speaker / "26-495-0000.flac", _speech(2.0, seed=20), SAMPLE_RATE)
    w(speaker / "２６-495-0001.flac", _speech(2.0, seed=21), SAMPLE_RATE)
    (speaker / "26-495.trans.txt").write_text(
        "26-495-0000 FIRST LINE\n２６-495-0001 SECOND LINE\n26-495-0099 NO SUCH FILE\n",
        encoding="utf-8")
    (root / "x" / "1" / "1-1.trans.txt").write_bytes("1-1-0000 CAFÉ\n".encode("latin-1"))
    # A third transcribed speaker: dev, test and the fine-tune need one each.
    (root / "transcripts.tsv").write_text(
        "with space.wav\tHELLO THERE\na/b/c/d/deep.flac\tDEEP\n", encoding="utf-8")
    (root / "notes.txt").write_text("recorded in the kitchen")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    w(root / "clip.wave", _speech(1.0, seed=22), SAMPLE_RATE, format="WAV")
    w(os.fsencode(root / "caf\udce9.flac"), _speech(1.0, seed=25), SAMPLE_RATE)
    w(root / LONG_NAME, _speech(35.0, seed=26), SAMPLE_RATE)
    w(elsewhere / "real.flac", _speech(1.0, seed=23), SAMPLE_RATE)
    (root / "link.flac").symlink_to(elsewhere / "real.flac")
    (root / "dangling.wav").symlink_to(elsewhere / "gone.wav")
    (elsewhere / "dir").mkdir()
    w(elsewhere / "dir" / "hidden.flac", _speech(1.0, seed=24), SAMPLE_RATE)
    (root / "linked_dir").symlink_to(elsewhere / "dir")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _inputs(root: Path) -> list[str]:
    """Every file, link and linked folder under root, relative to it."""
    names = []
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            names.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(names)


def test_odd_corpus_is_accounted_for_file_by_file(tmp_path: Path) -> None:
    root, raw, seg = tmp_path / "corpus", tmp_path / "raw", tmp_path / "seg"
    _build(root, tmp_path / "elsewhere")
    assert _inputs(root) == sorted(EXPECTED)
    acquire(SourceConfig(source=str(root)), raw)
    stats = segment_corpus(raw / "manifest.jsonl", seg,
                           SegmentConfig(dev_fraction=0.2, test_fraction=0.2, num_workers=1))

    entries = _jsonl(raw / "manifest.jsonl")
    windows = [w | {"split": name} for name in ("train", "dev", "test")
               for w in _jsonl(seg / f"{name}.jsonl")]
    listed = _jsonl(seg / "skipped.jsonl")
    assert listed[: len(_jsonl(raw / "skipped.jsonl"))] == [
        {"stage": "download", **r} for r in _jsonl(raw / "skipped.jsonl")]
    in_windows = {source for w in windows for source in w["sources"]}
    path_of = {e["id"]: Path(e["path"]).relative_to(root).as_posix() for e in entries}
    transcript_files = {"26/495/26-495.trans.txt", "transcripts.tsv"}

    outcome: dict[str, str] = {name: "transcript" for name in transcript_files}
    for record in listed:
        if "line" in record:  # a line of a transcript file: checked below
            continue
        name = Path(record["path"]).relative_to(root).as_posix()
        if record.get("id") not in in_windows:
            outcome[name] = record["reason"]
    for utt_id, name in path_of.items():
        if utt_id in in_windows:
            outcome[name] = "window"
    assert sorted(outcome) == sorted(EXPECTED)
    for name, want in EXPECTED.items():
        assert want in outcome[name], (name, outcome[name])

    # The transcript line for a file that is not there is listed with its line.
    (ghost,) = [r for r in listed if "line" in r]
    assert (Path(ghost["path"]).name, ghost["line"]) == ("26-495.trans.txt", 3)
    assert ghost["reason"] == "transcript for '26-495-0099', which is not an audio file of the " \
                              "source"
    # Non-ASCII digits keep the speaker of their folders, and the speaker stays on one side.
    by_name = {path_of[e["id"]]: e for e in entries}
    libri = [by_name["26/495/26-495-0000.flac"], by_name["26/495/２６-495-0001.flac"]]
    assert [(e["group"], e["speaker"], e["chapter"]) for e in libri] == [("26", "26", "495")] * 2
    assert [e["transcript"] for e in libri] == ["FIRST LINE", "SECOND LINE"]
    sides = {w["split"] for w in windows if set(w["sources"]) & {e["id"] for e in libri}}
    assert len(sides) == 1
    # Unique ids for files whose names collide; the undecodable transcript labels nothing.
    assert {by_name[n]["id"] for n in ("dup/x/utt.flac", "dup/y/utt.flac", "dup/z.wav",
                                       "dup/z.WAV")} == {"dup__x__utt", "dup__y__utt",
                                                         "dup__z", "dup__z~2"}
    assert by_name["x/1/1-1-0000.flac"]["transcript"] is None
    assert by_name["with space.wav"]["transcript"] == "HELLO THERE"
    assert by_name["a/b/c/d/deep.flac"]["transcript"] == "DEEP"
    # A window never mixes transcribed and untranscribed audio.
    labelled = {e["id"] for e in entries if e["transcript"] is not None}
    for w in windows:
        assert (w["transcript"] is not None) == bool(set(w["sources"]) & labelled)
        assert set(w["sources"]) <= labelled or not set(w["sources"]) & labelled
    assert sum(by_name["long.flac"]["id"] in w["sources"] for w in windows) == 3  # 70 s, cut
    gave_nothing = [n for n, want in EXPECTED.items()
                    if want not in ("window", "transcript") and n in by_name]
    assert stats["num_skipped"] == len(gave_nothing) == 10
    for w in windows:
        assert sf.info(seg / w["path"]).samplerate == SAMPLE_RATE


@pytest.mark.parametrize("workers", [2])
def test_odd_corpus_gives_the_same_output_with_worker_processes(tmp_path: Path,
                                                                 workers: int) -> None:
    root, raw = tmp_path / "corpus", tmp_path / "raw"
    _build(root, tmp_path / "elsewhere")
    acquire(SourceConfig(source=str(root)), raw)
    outputs = []
    for n in (1, workers):
        out = tmp_path / f"seg{n}"
        stats = segment_corpus(raw / "manifest.jsonl", out,
                               SegmentConfig(dev_fraction=0.2, test_fraction=0.2, num_workers=n))
        names = ("train.jsonl", "dev.jsonl", "test.jsonl", "skipped.jsonl")
        outputs.append((stats, *((out / f).read_text() for f in names)))
    assert outputs[0] == outputs[1]
