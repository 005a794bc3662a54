"""Tests for bestrq.sources: synthetic, folder, glob, URL and preset sources."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bestrq.sources import (
    LIBRISPEECH_SUBSETS,
    ChecksumError,
    SourceConfig,
    acquire,
    extract_archive,
    validate,
)
from bestrq.synth import generate_sentences


def _read_manifest(raw_dir: Path) -> list[dict]:
    lines = (raw_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


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
    stats = acquire(cfg, tmp_path)
    assert stats == {"num_files": 6, "num_with_transcript": 6, "num_groups": 3}
    entries = _read_manifest(tmp_path)
    assert len({e["id"] for e in entries}) == 6
    assert {e["group"] for e in entries} == {"spk000", "spk001", "spk002"}
    assert sorted(e["transcript"] for e in entries) == sorted(generate_sentences(6, 5))
    for e in entries:
        assert not Path(e["path"]).is_absolute()
        assert e["path"] == f"synthetic/{e['group']}/{e['id']}.flac"
        audio, rate = sf.read(tmp_path / e["path"])
        assert rate == 22050 and len(audio) > rate // 2
        assert np.abs(audio).max() > 0.05


# --- folders -----------------------------------------------------------------------------


def test_librispeech_like_folder(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _librispeech_tree(root)
    raw = tmp_path / "raw"
    stats = acquire(SourceConfig(source=str(root)), raw)
    assert stats == {"num_files": 5, "num_with_transcript": 5, "num_groups": 3}
    entries = _read_manifest(raw)
    assert [e["id"] for e in entries] == sorted(LIBRI_TEXT)
    for e in entries:
        assert e["transcript"] == LIBRI_TEXT[e["id"]]
        assert e["group"] == "-".join(e["id"].split("-")[:2])
        # Files are left in the user's folder and referenced absolutely.
        assert Path(e["path"]).is_absolute() and Path(e["path"]).is_file()
    assert not (raw / "19").exists()


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


def test_folder_with_manifest_and_duplicate_stems(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _tone(root / "x" / "utt.flac")
    _tone(root / "y" / "utt.flac")
    (root / "manifest.jsonl").write_text(json.dumps({"path": "y/utt.flac", "text": "why"}) + "\n")
    acquire(SourceConfig(source=str(root)), tmp_path / "raw")
    got = {e["id"]: e["transcript"] for e in _read_manifest(tmp_path / "raw")}
    assert got == {"x__utt": None, "y__utt": "why"}


def test_glob_source(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _librispeech_tree(root)
    stats = acquire(SourceConfig(source=str(root / "19" / "**" / "*.flac")), tmp_path / "raw")
    assert stats["num_files"] == 3
    entries = _read_manifest(tmp_path / "raw")
    assert [e["id"] for e in entries] == ["19-198-0000", "19-198-0001", "19-227-0000"]
    assert all(e["transcript"] == LIBRI_TEXT[e["id"]] for e in entries)


# --- URLs --------------------------------------------------------------------------------


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    """A local HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL, requests)."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            requests.append(self.path)
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


def test_url_download_verified_extracted_and_cached(
    tmp_path: Path, http_root: tuple[Path, str, list[str]]
) -> None:
    served, base, requests = http_root
    checksum = _make_tarball(tmp_path, served / "dev-tiny.tar.gz")
    raw = tmp_path / "raw"
    cfg = SourceConfig(source=f"{base}/dev-tiny.tar.gz", checksum=checksum)
    stats = acquire(cfg, raw)
    assert stats == {"num_files": 5, "num_with_transcript": 5, "num_groups": 3}
    entries = _read_manifest(raw)
    assert [e["id"] for e in entries] == sorted(LIBRI_TEXT)
    for e in entries:
        assert e["path"].startswith("download/LibriSpeech/dev-tiny/")
        assert (raw / e["path"]).is_file()
        assert e["transcript"] == LIBRI_TEXT[e["id"]]
    assert requests == ["/dev-tiny.tar.gz"]
    # Re-running with the verified archive present downloads nothing.
    assert acquire(cfg, raw) == stats
    assert requests == ["/dev-tiny.tar.gz"]
    assert not list(raw.rglob("*.part"))


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


def test_plain_audio_url_is_saved(tmp_path: Path, http_root: tuple[Path, str, list[str]]) -> None:
    served, base, _ = http_root
    _tone(served / "talk.flac")
    raw = tmp_path / "raw"
    stats = acquire(SourceConfig(source=f"{base}/talk.flac"), raw)
    assert stats["num_files"] == 1
    (entry,) = _read_manifest(raw)
    assert entry["path"] == "download/talk.flac" and entry["transcript"] is None
    assert (raw / "download" / "talk.flac").read_bytes() == (served / "talk.flac").read_bytes()


def test_fsspec_file_url(tmp_path: Path) -> None:
    archive = tmp_path / "dev-tiny.tar.gz"
    checksum = _make_tarball(tmp_path, archive)
    stats = acquire(SourceConfig(source=f"file://{archive}", checksum=checksum), tmp_path / "raw")
    assert stats["num_files"] == 5


def test_extract_refuses_escaping_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"boom"
        info = tarfile.TarInfo("../../evil.flac")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="escapes the target"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path.parent / "evil.flac").exists()


def test_extract_zip_and_refuse_escaping_zip(tmp_path: Path) -> None:
    import zipfile

    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("a/b.txt", "hello")
    extract_archive(good, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "b.txt").read_text() == "hello"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escaped.txt", "boom")
    with pytest.raises(ValueError, match="escapes the target"):
        extract_archive(evil, tmp_path / "out2")
