"""Tests for bestrq.sources: synthetic, folder, glob, URL and preset sources."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import tarfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bestrq.atomic import atomic_path
from bestrq.sources import (
    LIBRISPEECH_SUBSETS,
    ArchiveError,
    ChecksumError,
    SourceConfig,
    UnverifiedDownloadWarning,
    acquire,
    check_watch,
    download_file,
    validate,
)
from bestrq.synth import generate_sentences


def _read_manifest(raw_dir: Path, name: str = "manifest.jsonl") -> list[dict]:
    lines = (raw_dir / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links as their target text, files by sha256)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _tone(path: Path, seconds: float = 0.3, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 300 * t), rate)


LIBRI_TEXT = {
    "19-198-0000": "NORTHANGER ABBEY",
    "19-198-0001": "THIS LITTLE WORK WAS FINISHED",
    "19-227-0000": "PART ONE",
    "26-495-0000": "CHAPTER ONE MISSUS RACHEL",
    "26-495-0001": "MISSUS RACHEL LYNDE LIVED",
}


def _librispeech_tree(root: Path) -> None:
    """speaker/chapter/<id>.flac plus speaker-chapter.trans.txt, as LibriSpeech lays it out."""
    chapters: dict[tuple[str, str], list[str]] = {}
    for utt in LIBRI_TEXT:
        spk, chap, _ = utt.split("-")
        chapters.setdefault((spk, chap), []).append(utt)
        _tone(root / spk / chap / f"{utt}.flac")
    for (spk, chap), utts in chapters.items():
        lines = [f"{u} {LIBRI_TEXT[u]}" for u in utts]
        (root / spk / chap / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    (root / "README.TXT").write_text("not audio")


# --- validate ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        (SourceConfig(num_utterances=0), r"download\.num_utterances"),
        (SourceConfig(num_speakers=0), r"download\.num_speakers"),
        (SourceConfig(source="/no/such/dir"), r"download\.source: folder /no/such/dir does not"),
        (SourceConfig(source="librispeech:dev-dirty"), r"download\.source: unknown librispeech"),
        (SourceConfig(source="gopher2://host/x.tar"), r"download\.source: unsupported URL scheme"),
        (SourceConfig(source="synthetic", checksum="crc:123"), r"download\.checksum"),
        (SourceConfig(source="https://x/a.tgz", checksum="sha256:abc"), r"download\.checksum"),
        (SourceConfig(source=""), r"download\.source"),
        (SourceConfig(watch=""), r"download\.watch"),
        (SourceConfig(max_extract_gb=0), r"download\.max_extract_gb"),
        (SourceConfig(max_ratio=0.5), r"download\.max_ratio"),
        (SourceConfig(max_ratio=True), r"download\.max_ratio"),
        (SourceConfig(max_download_gb=0), r"download\.max_download_gb: must be a number in "
                                          r"\(0, 1000000\] or null, got 0$"),
        (SourceConfig(max_download_gb=-1.0), r"download\.max_download_gb"),
    ],
)
def test_validate_names_the_parameter(cfg: SourceConfig, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        validate(cfg)


def test_validate_accepts_good_configs(tmp_path: Path) -> None:
    validate(SourceConfig())
    validate(SourceConfig(source=str(tmp_path)))
    validate(SourceConfig(source="librispeech:dev-clean"))
    validate(SourceConfig(source="https://example.org/a.tar.gz", checksum="md5:" + "0" * 32))
    validate(SourceConfig(source=f"file://{tmp_path}/a.tar.gz"))


def test_validate_glob_without_matches(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="download.source: glob .* matches no audio"):
        validate(SourceConfig(source=str(tmp_path / "*.flac")))


def test_librispeech_presets_have_real_looking_checksums() -> None:
    assert set(LIBRISPEECH_SUBSETS) == {
        "dev-clean", "dev-other", "test-clean", "test-other",
        "train-clean-100", "train-clean-360", "train-other-500",
    }  # fmt: skip
    for subset, (url, checksum) in LIBRISPEECH_SUBSETS.items():
        assert url == f"https://www.openslr.org/resources/12/{subset}.tar.gz"
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", checksum)
    assert LIBRISPEECH_SUBSETS["dev-clean"][1].endswith("903728ab3")


# --- synthetic ---------------------------------------------------------------------------


def test_synthetic_end_to_end(tmp_path: Path) -> None:
    cfg = SourceConfig(source="synthetic", num_utterances=6, num_speakers=3, seed=5)
    raw = tmp_path / "raw"
    stats = acquire(cfg, raw)
    assert stats == {"num_files": 6, "num_with_transcript": 6, "num_groups": 3, "num_skipped": 0}
    entries = _read_manifest(raw)
    assert len({e["id"] for e in entries}) == 6
    assert {e["group"] for e in entries} == {"spk000", "spk001", "spk002"}
    assert sorted(e["transcript"] for e in entries) == sorted(generate_sentences(6, 5))
    for e in entries:
        assert not Path(e["path"]).is_absolute()
        assert e["path"] == f"synthetic/{e['group']}/{e['id']}.flac"
        audio, rate = sf.read(raw / e["path"])
        assert rate == 22050 and len(audio) > rate // 2
        assert np.abs(audio).max() > 0.05
    assert (raw / "skipped.jsonl").read_text() == ""
    assert sorted(p.name for p in raw.iterdir()) == ["manifest.jsonl", "skipped.jsonl",
                                                     "synthetic"]
    assert not (tmp_path / "cache").exists()  # nothing to cache


# --- folders -----------------------------------------------------------------------------


def test_librispeech_like_folder(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _librispeech_tree(root)
    raw = tmp_path / "raw"
    stats = acquire(SourceConfig(source=str(root)), raw)
    assert stats == {"num_files": 5, "num_with_transcript": 5, "num_groups": 2, "num_skipped": 1}
    entries = _read_manifest(raw)
    assert [e["id"] for e in entries] == sorted(LIBRI_TEXT)
    for e in entries:
        speaker, chapter, _ = e["id"].split("-")
        assert e["transcript"] == LIBRI_TEXT[e["id"]]
        # Speaker and chapter come from the <speaker>/<chapter>/ folders; the speaker is the
        # unit the train/eval split keeps on one side.
        assert (e["group"], e["speaker"], e["chapter"]) == (speaker, speaker, chapter)
        # Files are left in the user's folder, referenced absolutely, with size and digest.
        path = Path(e["path"])
        assert path.is_absolute() and path.is_file()
        assert e["size"] == path.stat().st_size
        assert e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not (raw / "19").exists()
    (readme,) = _read_manifest(raw, "skipped.jsonl")
    assert readme["path"] == str(root / "README.TXT")
    assert readme["reason"].startswith("not an audio file: extension '.TXT'")


def test_plain_folder_with_tsv_groups_by_parent(tmp_path: Path) -> None:
    root = tmp_path / "meetings"
    _tone(root / "roomA" / "a1.wav")
    _tone(root / "roomA" / "a2.WAV")
    _tone(root / "roomB" / "deep" / "b1.flac")
    _tone(root / "top.ogg")
    (root / "notes.txt").write_text("ignore me")
    (root / "transcripts.tsv").write_text("path\ttranscript\nroomA/a1.wav\thello there\nb1\tbye\n")
    acquire(SourceConfig(source=str(root)), tmp_path / "raw")
    got = {e["id"]: (e["group"], e["transcript"]) for e in _read_manifest(tmp_path / "raw")}
    assert got == {
        "a1": ("roomA", "hello there"),
        "a2": ("roomA", None),
        "b1": ("roomB/deep", "bye"),
        "top": ("meetings", None),
    }
    skipped = _read_manifest(tmp_path / "raw", "skipped.jsonl")
    assert [s["path"] for s in skipped] == [str(root / "notes.txt")]


def test_folder_with_manifest_and_duplicate_stems(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _tone(root / "x" / "utt.flac")
    _tone(root / "y" / "utt.flac")
    (root / "manifest.jsonl").write_text(json.dumps({"path": "y/utt.flac", "text": "why"}) + "\n")
    acquire(SourceConfig(source=str(root)), tmp_path / "raw")
    got = {e["id"]: e["transcript"] for e in _read_manifest(tmp_path / "raw")}
    assert got == {"x__utt": None, "y__utt": "why"}


def test_ids_stay_unique_when_names_collide(tmp_path: Path) -> None:
    root = tmp_path / "c"
    for name in ("x/a.wav", "x/a.WAV", "x__a.flac"):
        _tone(root / name)
    acquire(SourceConfig(source=str(root)), tmp_path / "raw")
    got = {Path(e["path"]).relative_to(root).as_posix(): e["id"]
           for e in _read_manifest(tmp_path / "raw")}
    assert got == {"x/a.WAV": "x__a", "x/a.wav": "x__a~2", "x__a.flac": "x__a~3"}


def test_glob_source(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _librispeech_tree(root)
    stats = acquire(SourceConfig(source=str(root / "19" / "**" / "*.flac")), tmp_path / "raw")
    assert stats["num_files"] == 3 and stats["num_skipped"] == 0
    entries = _read_manifest(tmp_path / "raw")
    assert [e["id"] for e in entries] == ["19-198-0000", "19-198-0001", "19-227-0000"]
    assert all(e["transcript"] == LIBRI_TEXT[e["id"]] for e in entries)
    assert {e["group"] for e in entries} == {"19"}


def test_transcript_problems_are_listed(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _tone(root / "7" / "8" / "7-8-0000.flac")
    _tone(root / "7" / "8" / "7-8-0001.flac")
    _tone(root / "9" / "1" / "9-1-0000.flac")
    good = root / "7" / "8" / "7-8.trans.txt"
    good.write_text("7-8-0000 HELLO\n7-8-0001 WORLD\n7-8-0002 NOBODY HERE\n")
    latin1 = root / "9" / "1" / "9-1.trans.txt"
    latin1.write_bytes("9-1-0000 CAFÉ\n".encode("latin-1"))
    manifest = root / "manifest.jsonl"
    manifest.write_text('{"id": "7-8-0001", "text": "WORLD AGAIN"}\nnot json\n[1]\n')
    raw = tmp_path / "raw"
    stats = acquire(SourceConfig(source=str(root)), raw)
    got = {e["id"]: e["transcript"] for e in _read_manifest(raw)}
    assert got == {"7-8-0000": "HELLO", "7-8-0001": "WORLD AGAIN", "9-1-0000": None}
    listed = [(Path(s["path"]).name, s.get("line"), s["reason"])
              for s in _read_manifest(raw, "skipped.jsonl")]
    assert [(name, line) for name, line, _ in listed] == [
        ("9-1.trans.txt", None), ("7-8.trans.txt", 2), ("manifest.jsonl", 2),
        ("manifest.jsonl", 3), ("7-8.trans.txt", 3)]
    reasons = [reason for _, _, reason in listed]
    assert reasons[0].startswith("transcript file is not UTF-8 text")
    assert reasons[1] == f"transcript for '7-8-0001' replaced by the one at {manifest}:1"
    assert reasons[2].startswith("not valid JSON") and reasons[3].startswith("not a JSON object")
    assert reasons[4] == "transcript for '7-8-0002', which is not an audio file of the source"
    assert stats["num_skipped"] == 5


def test_folder_manifest_follows_the_audio_not_its_mtime(tmp_path: Path, monkeypatch) -> None:
    import bestrq.folder_source as folder_source

    root = tmp_path / "corpus"
    _tone(root / "a.flac")
    _tone(root / "b.flac")
    raw = tmp_path / "raw"
    acquire(SourceConfig(source=str(root)), raw)
    first = (raw / "manifest.jsonl").read_bytes()
    # A second run reads no audio: the digests are cached by size, mtime and inode.
    reads: list[Path] = []
    real = folder_source.file_digests
    monkeypatch.setattr(folder_source, "file_digests", lambda p, a: reads.append(p) or real(p, a))
    acquire(SourceConfig(source=str(root)), raw)
    assert reads == [] and (raw / "manifest.jsonl").read_bytes() == first
    # Touching a file (same bytes) changes nothing downstream would see.
    os.utime(root / "a.flac", ns=(1, 1))
    acquire(SourceConfig(source=str(root)), raw)
    assert (raw / "manifest.jsonl").read_bytes() == first
    # New bytes of the same size change that file's digest, and only it.
    size = (root / "a.flac").stat().st_size
    t = np.arange(4800) / 16000
    sf.write(root / "a.flac", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    with open(root / "a.flac", "r+b") as f:  # the same size, so only the digest can tell
        f.truncate(size)
    acquire(SourceConfig(source=str(root)), raw)
    before = {e["id"]: e for e in (json.loads(x) for x in first.decode().splitlines())}
    after = {e["id"]: e for e in _read_manifest(raw)}
    assert after["b"] == before["b"]
    assert after["a"]["sha256"] != before["a"]["sha256"]
    assert {k: v for k, v in after["a"].items() if k != "sha256"} == \
        {k: v for k, v in before["a"].items() if k != "sha256"}


def test_watch_must_hold_a_folder_sources_audio(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _tone(root / "sub" / "a.flac")
    with pytest.raises(ValueError, match=rf"download\.watch: .*set it to {re.escape(str(root))} "):
        check_watch(SourceConfig(source=str(root)))
    check_watch(SourceConfig(source=str(root), watch=str(root)))
    check_watch(SourceConfig(source=str(root), watch=str(tmp_path)))  # a folder above it
    pattern = str(root / "**" / "*.flac")
    check_watch(SourceConfig(source=pattern, watch=str(root)))
    with pytest.raises(ValueError, match="download.watch"):
        check_watch(SourceConfig(source=pattern, watch=str(root / "sub")))
    with pytest.raises(ValueError, match="download.watch"):
        check_watch(SourceConfig(source=str(root), watch=str(tmp_path / "nowhere")))
    # Sources DVC sees through the parameters need nothing watched.
    check_watch(SourceConfig())
    check_watch(SourceConfig(source="https://example.org/a.tar.gz"))


def test_source_overlapping_the_output_is_refused(tmp_path: Path) -> None:
    _tone(tmp_path / "raw" / "mine" / "a.flac")
    for source in (tmp_path / "raw" / "mine", tmp_path):
        with pytest.raises(ValueError, match="overlaps the output folder"):
            acquire(SourceConfig(source=str(source)), tmp_path / "raw")
    assert (tmp_path / "raw" / "mine" / "a.flac").is_file()


# --- URLs --------------------------------------------------------------------------------


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    """A local HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL, requests).
    Paths under /cut/ announce 100000 bytes and send 1000, as a dropped connection would."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            requests.append(self.path)
            if self.path.startswith("/cut/"):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"x" * 1000)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def _make_tarball(tmp_path: Path, dest: Path) -> str:
    tree = tmp_path / "tree" / "LibriSpeech" / "dev-tiny"
    _librispeech_tree(tree)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "LibriSpeech", arcname="LibriSpeech")
    return "sha256:" + hashlib.sha256(dest.read_bytes()).hexdigest()


def _tarball_of(dest: Path, files: dict[str, bytes]) -> None:
    import io

    with tarfile.open(dest, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _flac_bytes(tmp_path: Path, seconds: float = 0.3) -> bytes:
    path = tmp_path / "one.flac"
    _tone(path, seconds)
    return path.read_bytes()


def test_url_download_verified_extracted_and_cached(
    tmp_path: Path, http_root: tuple[Path, str, list[str]]
) -> None:
    served, base, requests = http_root
    checksum = _make_tarball(tmp_path, served / "dev-tiny.tar.gz")
    sha = checksum.split(":")[1]
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    cfg = SourceConfig(source=f"{base}/dev-tiny.tar.gz", checksum=checksum)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedDownloadWarning)  # verified: no warning
        stats = acquire(cfg, raw)
    size = (served / "dev-tiny.tar.gz").stat().st_size
    assert stats == {"num_files": 5, "num_with_transcript": 5, "num_groups": 2,
                     "num_skipped": 1, "download_sha256": sha, "download_bytes": size,
                     "download_verified": 1}
    entries = _read_manifest(raw)
    assert [e["id"] for e in entries] == sorted(LIBRI_TEXT)
    for e in entries:
        assert e["path"].startswith("download/LibriSpeech/dev-tiny/")
        assert (raw / e["path"]).is_file()
        assert e["transcript"] == LIBRI_TEXT[e["id"]]
    # The archive is in the cache, filed by URL hash and sha256, not beside its extracted copy.
    (cached,) = [p for p in cache.rglob("*.tar.gz")]
    assert cached.parent.name == sha and cached.name == "dev-tiny.tar.gz"
    assert cached.read_bytes() == (served / "dev-tiny.tar.gz").read_bytes()
    assert not list(raw.rglob("*.tar.gz"))
    record = json.loads((raw / "download.json").read_text())
    assert (record["url"], record["sha256"], record["checksum"], record["size"]) == (
        cfg.source, sha, checksum, size)
    assert requests == ["/dev-tiny.tar.gz"]
    # Re-running downloads nothing and extracts nothing again.
    extracted = raw / entries[0]["path"]
    inode = extracted.stat().st_ino
    assert acquire(cfg, raw) == stats
    assert requests == ["/dev-tiny.tar.gz"] and extracted.stat().st_ino == inode
    # DVC deletes data/raw before it re-runs the stage: the cached download is still used.
    shutil.rmtree(raw)
    assert acquire(cfg, raw) == stats and requests == ["/dev-tiny.tar.gz"]
    assert (raw / "download.json").read_text() == json.dumps(record, indent=2) + "\n"
    assert not list(raw.rglob("*.part")) and not list(cache.rglob("*.part"))


def test_url_without_checksum_warns_and_records_sha256(
    tmp_path: Path, http_root: tuple[Path, str, list[str]]
) -> None:
    served, base, _ = http_root
    _tone(served / "talk.flac")
    digest = hashlib.sha256((served / "talk.flac").read_bytes()).hexdigest()
    raw = tmp_path / "raw"
    with pytest.warns(UnverifiedDownloadWarning,
                      match=f"no download.checksum for {base}/talk.flac: .* sha256:{digest}"):
        stats = acquire(SourceConfig(source=f"{base}/talk.flac"), raw)
    assert stats["download_sha256"] == digest and stats["download_verified"] == 0
    (entry,) = _read_manifest(raw)
    assert entry["path"] == "download/talk.flac" and entry["transcript"] is None
    assert (raw / "download" / "talk.flac").read_bytes() == (served / "talk.flac").read_bytes()
    record = json.loads((raw / "download.json").read_text())
    assert record["sha256"] == digest and record["checksum"] is None


def test_changing_the_url_replaces_the_old_files(
    tmp_path: Path, http_root: tuple[Path, str, list[str]]
) -> None:
    served, base, _ = http_root
    flac = _flac_bytes(tmp_path)
    _tarball_of(served / "a.tar.gz", {"a/one.flac": flac, "a/two.flac": flac})
    _tarball_of(served / "b.tar.gz", {"b/three.flac": flac})
    raw = tmp_path / "raw"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedDownloadWarning)
        acquire(SourceConfig(source=f"{base}/a.tar.gz"), raw)
        assert [e["id"] for e in _read_manifest(raw)] == ["one", "two"]
        acquire(SourceConfig(source=f"{base}/b.tar.gz"), raw)
    assert [e["id"] for e in _read_manifest(raw)] == ["three"]
    files = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    assert files == ["download.json", "download/b/three.flac", "manifest.jsonl", "skipped.jsonl"]


def test_corrupt_download_keeps_the_previous_extraction(
    tmp_path: Path, http_root: tuple[Path, str, list[str]]
) -> None:
    served, base, requests = http_root
    flac = _flac_bytes(tmp_path, seconds=2.0)
    _tarball_of(served / "a.tar.gz", {"a/one.flac": flac})
    data = (served / "a.tar.gz").read_bytes()
    (served / "bad.tar.gz").write_bytes(data[: len(data) // 2])
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    acquire(SourceConfig(source=f"{base}/a.tar.gz", checksum=checksum), raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedDownloadWarning)
        with pytest.raises(ArchiveError, match=r"^cannot extract archive .*bad\.tar\.gz: it is "
                                               r"corrupt or truncated \(EOFError"):
            acquire(SourceConfig(source=f"{base}/bad.tar.gz"), raw)
    assert (raw / "download" / "a" / "one.flac").read_bytes() == flac
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]
    # Unverified, it may be a broken transfer: it left the cache, so a re-run fetches it again.
    assert not list(cache.rglob("bad.tar.gz"))


def test_url_wrong_checksum_fails_and_deletes(
    tmp_path: Path, http_root: tuple[Path, str, list[str]]
) -> None:
    served, base, _ = http_root
    _make_tarball(tmp_path, served / "dev-tiny.tar.gz")
    raw = tmp_path / "raw"
    cfg = SourceConfig(source=f"{base}/dev-tiny.tar.gz", checksum="md5:" + "0" * 32)
    with pytest.raises(ChecksumError, match="checksum mismatch.*dev-tiny.tar.gz"):
        acquire(cfg, raw)
    assert not [p for p in raw.rglob("*") if p.is_file()]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_dropped_connection_leaves_nothing(
    tmp_path: Path, http_root: tuple[Path, str, list[str]]
) -> None:
    _, base, _ = http_root
    dest = tmp_path / "dl" / "talk.flac"
    with pytest.raises(RuntimeError, match=r"download of .*/cut/talk\.flac failed: got 1000 of "
                                           r"100000 bytes; nothing was kept"):
        download_file(f"{base}/cut/talk.flac", dest)
    assert list(dest.parent.iterdir()) == []


def test_fsspec_file_url(tmp_path: Path) -> None:
    archive = tmp_path / "dev-tiny.tar.gz"
    checksum = _make_tarball(tmp_path, archive)
    stats = acquire(SourceConfig(source=f"file://{archive}", checksum=checksum), tmp_path / "raw")
    assert stats["num_files"] == 5 and stats["download_verified"] == 1


@pytest.mark.parametrize("mask, folder, file", [(0o002, 0o775, 0o664), (0o077, 0o700, 0o600)])
def test_what_the_download_writes_follows_the_umask(tmp_path: Path, mask: int, folder: int,
                                                    file: int) -> None:
    """mkdtemp and mkstemp make 0700 and 0600; a corpus shared with a group must not be."""
    archive = tmp_path / "dev-tiny.tar.gz"
    checksum = _make_tarball(tmp_path, archive)
    old = os.umask(mask)
    try:
        acquire(SourceConfig(source=f"file://{archive}", checksum=checksum), tmp_path / "raw")
        with atomic_path(tmp_path / "adapter.safetensors") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    download = tmp_path / "raw" / "download"
    folders = [download, *(p for p in download.rglob("*") if p.is_dir())]
    files = [p for p in download.rglob("*") if p.is_file()]
    files += list((tmp_path / "cache" / "downloads").rglob("*.tar.gz"))
    files += [tmp_path / "adapter.safetensors", tmp_path / "raw" / "download.json"]
    assert len(folders) >= 4 and len(files) >= 8
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(folder)}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file)}


# --- entries that cannot be read, links that loop, walks that never end -------------------


def _proc_denied() -> bool:
    try:
        os.stat("/proc/1/cwd/x.wav")
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def test_unreadable_and_looping_entries_are_listed_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _tone(root / "spk" / "good.flac")
    (root / "spk" / "a.wav").symlink_to("b.wav")
    (root / "spk" / "b.wav").symlink_to("a.wav")
    (root / "spk" / "gone.wav").symlink_to("nowhere.wav")
    denied = _proc_denied()
    if denied:  # a link into another process's folder: EACCES even for root in a container
        (root / "spk" / "bad.wav").symlink_to("/proc/1/cwd/x.wav")
    before = _tree(root)
    stats = acquire(SourceConfig(source=str(root)), tmp_path / "raw")
    assert stats["num_files"] == 1
    reasons = {Path(s["path"]).name: s["reason"]
               for s in _read_manifest(tmp_path / "raw", "skipped.jsonl")}
    expected = {"a.wav": "cannot read: Too many levels of symbolic links (ELOOP)",
                "b.wav": "cannot read: Too many levels of symbolic links (ELOOP)",
                "gone.wav": "broken link"}
    if denied:
        expected["bad.wav"] = "cannot read: Permission denied (EACCES)"
    assert reasons == expected
    assert _tree(root) == before


def test_a_glob_does_not_follow_a_folder_link_that_loops(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _librispeech_tree(root)
    (root / "19" / "self").symlink_to(".")  # glob.glob('**') would walk 19/self/self/...
    before = _tree(root)
    stats = acquire(SourceConfig(source=str(root / "**" / "*.flac")), tmp_path / "raw")
    assert stats["num_files"] == 5
    skipped = _read_manifest(tmp_path / "raw", "skipped.jsonl")
    assert skipped == [{"path": str(root / "19" / "self"),
                        "reason": "link to a folder, not followed"}]
    assert _tree(root) == before


def test_glob_files_match_what_glob_glob_matches(tmp_path: Path) -> None:
    import glob

    from bestrq.folder_source import glob_files

    for name in ("a.flac", ".hidden.flac", "x/b.flac", "x/.h/c.flac", "x/y/d.wav", "x/y/e.flac",
                 ".dot/f.flac", "z1/g.flac", "z2/h.FLAC"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    for pattern in ("**/*.flac", "*.flac", "x/**/*.flac", "x/*/*.flac", "z[12]/*", "**/?.wav",
                    ".*/*.flac", "x/**", "**/.h/*.flac", "**"):
        full = str(tmp_path / pattern)
        expected = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        assert glob_files(full, []) == expected, pattern


def test_a_walk_past_its_bound_is_an_error_naming_the_folder(tmp_path: Path,
                                                             monkeypatch) -> None:
    from bestrq import folder_source

    root = tmp_path / "big"
    for i in range(12):
        _tone(root / f"{i}.flac", 0.05)
    monkeypatch.setattr(folder_source, "MAX_ENTRIES", 10)
    with pytest.raises(ValueError, match=f"download.source: more than 10 files and folders "
                                         f"under {re.escape(str(root))}: point it at"):
        acquire(SourceConfig(source=str(root)), tmp_path / "raw")
