"""Where the audio comes from: synthetic speech, a folder/glob, a URL, or a LibriSpeech preset.

`acquire` gathers the recordings of one source into a raw directory and indexes them in
`raw_dir/manifest.jsonl` (id, path, transcript, group).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from bestrq.audio import is_audio_file, write_audio
from bestrq.jsonl import read_jsonl, write_jsonl

__all__ = [
    "LIBRISPEECH_SUBSETS",
    "ChecksumError",
    "SourceConfig",
    "acquire",
    "download_file",
    "extract_archive",
    "index_folder",
    "parse_checksum",
    "source_kind",
    "validate",
]

MANIFEST_NAME = "manifest.jsonl"

_OPENSLR = "https://www.openslr.org/resources/12"
# sha256 digests as published in torchaudio.datasets.librispeech._CHECKSUMS.
LIBRISPEECH_SUBSETS: dict[str, tuple[str, str]] = {
    "dev-clean": (
        f"{_OPENSLR}/dev-clean.tar.gz",
        "sha256:76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    ),
    "dev-other": (
        f"{_OPENSLR}/dev-other.tar.gz",
        "sha256:12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    ),
    "test-clean": (
        f"{_OPENSLR}/test-clean.tar.gz",
        "sha256:39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    ),
    "test-other": (
        f"{_OPENSLR}/test-other.tar.gz",
        "sha256:d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    ),
    "train-clean-100": (
        f"{_OPENSLR}/train-clean-100.tar.gz",
        "sha256:d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    ),
    "train-clean-360": (
        f"{_OPENSLR}/train-clean-360.tar.gz",
        "sha256:146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    ),
    "train-other-500": (
        f"{_OPENSLR}/train-other-500.tar.gz",
        "sha256:ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
    ),
}

_HASH_HEX_LENGTH = {"sha256": 64, "md5": 32, "sha1": 40}
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_GLOB_CHARS = ("*", "?", "[")
# LibriSpeech utterance ids are "<speaker>-<chapter>-<utterance>".
_LIBRISPEECH_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded file does not match its expected checksum (the file has been deleted)."""


@dataclass
class SourceConfig:
    """Which audio to acquire (the "download" stage's parameters)."""

    source: str = "synthetic"  # "synthetic" | folder or glob | URL | "librispeech:<subset>"
    num_utterances: int = 240  # synthetic: how many sentences
    num_speakers: int = 8  # synthetic: voice/rate/pitch combinations
    seed: int = 0
    checksum: str = ""  # "sha256:<hex>" or "md5:<hex>" for URL sources; presets carry their own


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split "sha256:<hex>" into ("sha256", "<hex>"); ValueError when malformed."""
    algo, sep, digest = checksum.strip().partition(":")
    algo, digest = algo.lower(), digest.lower()
    if not sep or algo not in _HASH_HEX_LENGTH:
        raise ValueError(
            f"download.checksum: expected 'sha256:<hex>' or 'md5:<hex>', got {checksum!r}"
        )
    if len(digest) != _HASH_HEX_LENGTH[algo] or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(
            f"download.checksum: {algo} digest must be {_HASH_HEX_LENGTH[algo]} hex characters, "
            f"got {digest!r}"
        )
    return algo, digest


def source_kind(source: str) -> str:
    """Classify a source string: "synthetic", "librispeech", "url", "glob" or "folder"."""
    if source == "synthetic":
        return "synthetic"
    if source.startswith("librispeech:"):
        return "librispeech"
    if "://" in source:
        return "url"
    if any(c in source for c in _GLOB_CHARS):
        return "glob"
    return "folder"


def _check_url_scheme(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError as exc:
        raise ValueError(f"download.source: unsupported URL scheme {scheme!r} in {url}") from exc
    except ImportError as exc:
        raise ValueError(
            f"download.source: URL scheme {scheme!r} needs an extra package ({exc})"
        ) from exc


def validate(cfg: SourceConfig) -> None:
    """Check every parameter before any work; ValueError names the bad one."""
    if not isinstance(cfg.source, str) or not cfg.source.strip():
        raise ValueError("download.source: must be a non-empty string")
    if cfg.checksum:
        parse_checksum(cfg.checksum)
    kind = source_kind(cfg.source)
    if kind == "synthetic":
        if cfg.num_utterances < 1:
            raise ValueError(f"download.num_utterances: must be >= 1, got {cfg.num_utterances}")
        if cfg.num_speakers < 1:
            raise ValueError(f"download.num_speakers: must be >= 1, got {cfg.num_speakers}")
    elif kind == "librispeech":
        subset = cfg.source.split(":", 1)[1]
        if subset not in LIBRISPEECH_SUBSETS:
            raise ValueError(
                f"download.source: unknown librispeech subset {subset!r}; "
                f"choose one of {', '.join(LIBRISPEECH_SUBSETS)}"
            )
    elif kind == "url":
        _check_url_scheme(cfg.source)
    elif kind == "glob":
        if not any(is_audio_file(p) for p in glob.iglob(cfg.source, recursive=True)):
            raise ValueError(f"download.source: glob {cfg.source} matches no audio files")
    else:
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise ValueError(f"download.source: folder {path} does not exist")
        if not path.is_dir() and not is_audio_file(path):
            raise ValueError(f"download.source: {path} is neither a folder nor an audio file")


# --- manifest ----------------------------------------------------------------------------


def _write_manifest(raw_dir: Path, entries: list[dict]) -> dict[str, float]:
    entries = sorted(entries, key=lambda e: e["id"])
    write_jsonl(raw_dir / MANIFEST_NAME, entries)
    return {
        "num_files": len(entries),
        "num_with_transcript": sum(e["transcript"] is not None for e in entries),
        "num_groups": len({e["group"] for e in entries}),
    }


def _manifest_path(path: Path, raw_dir: Path) -> str:
    """Relative to raw_dir for files stored inside it, absolute for files left in place."""
    path = path.resolve()
    try:
        return path.relative_to(raw_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


# --- synthetic ---------------------------------------------------------------------------


def _acquire_synthetic(cfg: SourceConfig, raw_dir: Path) -> list[dict]:
    from bestrq.synth import EspeakSynthesizer, generate_sentences, make_speakers

    synth = EspeakSynthesizer()
    speakers = make_speakers(cfg.num_speakers, cfg.seed)
    sentences = generate_sentences(cfg.num_utterances, cfg.seed)
    out_root = raw_dir / "synthetic"
    (out_root).mkdir(parents=True, exist_ok=True)
    with open(out_root / "speakers.json", "w", encoding="utf-8") as f:
        json.dump([s.__dict__ for s in speakers], f, indent=2)
    entries = []
    for i, text in enumerate(tqdm(sentences, desc="synthesising", unit="utt")):
        spk = speakers[i % len(speakers)]
        utt_id = f"{spk.name}-{i:05d}"
        audio, rate = synth.synthesize(text, voice=spk.voice, rate=spk.rate, pitch=spk.pitch)
        path = out_root / spk.name / f"{utt_id}.flac"
        write_audio(path, audio, rate)  # native rate: resampling happens in the segment stage
        entries.append(
            {
                "id": utt_id,
                "path": path.relative_to(raw_dir).as_posix(),
                "transcript": text,
                "group": spk.name,
            }
        )
    return entries


# --- folders -----------------------------------------------------------------------------


def _read_transcripts(root: Path) -> dict[str, str]:
    """Transcripts keyed by utterance id / file stem and by path relative to root."""
    texts: dict[str, str] = {}
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, text = line.strip().partition(" ")
            if key:
                texts[key] = text.strip()
    tsv = root / "transcripts.tsv"
    if tsv.is_file():
        for line in tsv.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, text = line.rstrip("\n").partition("\t")
            if sep and key.strip() and key.strip().lower() not in ("id", "path", "file"):
                texts[key.strip()] = text.strip()
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        for _, obj in read_jsonl(manifest):
            text = obj.get("transcript", obj.get("text"))
            if text is None:
                continue
            for key in ("id", "path"):
                if obj.get(key):
                    texts[str(obj[key])] = str(text)
    return texts


def _group_for(path: Path, root: Path) -> str:
    match = _LIBRISPEECH_ID.match(path.stem)
    if match:
        return f"{match.group(1)}-{match.group(2)}"
    parent = path.parent.relative_to(root).as_posix()
    return parent if parent != "." else root.name or "."


def index_folder(root: Path, raw_dir: Path, files: list[Path] | None = None) -> list[dict]:
    """Manifest entries for the audio files under `root` (or the given `files` under it)."""
    root = root.resolve()
    if files is None:
        files = [p for p in root.rglob("*") if p.is_file() and is_audio_file(p)]
    files = sorted({p.resolve() for p in files})
    texts = _read_transcripts(root)
    stem_counts = Counter(p.stem for p in files)
    duplicated = {stem for stem, count in stem_counts.items() if count > 1}
    entries = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        # Stems are the natural ids (LibriSpeech utterance ids); fall back to the path if shared.
        utt_id = rel.rsplit(".", 1)[0].replace("/", "__") if path.stem in duplicated else path.stem
        transcript = texts.get(rel, texts.get(utt_id, texts.get(path.stem)))
        entries.append(
            {
                "id": utt_id,
                "path": _manifest_path(path, raw_dir),
                "transcript": transcript,
                "group": _group_for(path, root),
            }
        )
    return entries


def _glob_root(pattern: str) -> Path:
    """Longest leading directory of a glob pattern that has no wildcard in it."""
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


# --- URLs --------------------------------------------------------------------------------


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _open_url(url: str) -> tuple[IO[bytes], int | None, object]:
    """A readable stream for `url`, its size when known, and the object to close afterwards."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "whisper-bestrq"})
        response = urllib.request.urlopen(request, timeout=60)
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None, response
    import fsspec

    opened = fsspec.open(url, "rb")
    stream = opened.open()
    size = getattr(stream, "size", None)
    return stream, int(size) if isinstance(size, int) else None, stream


def download_file(url: str, dest: Path, checksum: str = "") -> bool:
    """Download `url` to `dest` (streamed to a temporary file, then renamed), verifying `checksum`.

    Returns False when `dest` already existed and matched the checksum (download skipped).
    Raises ChecksumError (and deletes the file) on a mismatch.
    """
    algo, expected = parse_checksum(checksum) if checksum else ("sha256", "")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (not expected or _file_digest(dest, algo) == expected):
        return False
    hasher = hashlib.new(algo)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out:
            stream, size, closer = _open_url(url)
            try:
                bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"download {dest.name}")
                with bar:
                    for chunk in iter(lambda: stream.read(_CHUNK), b""):
                        out.write(chunk)
                        hasher.update(chunk)
                        bar.update(len(chunk))
            finally:
                closer.close()  # type: ignore[attr-defined]
        if expected and hasher.hexdigest() != expected:
            raise ChecksumError(
                f"checksum mismatch for {url}: expected {algo}:{expected}, "
                f"got {algo}:{hasher.hexdigest()}; the downloaded file was deleted"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _safe_tar_members(tar: tarfile.TarFile, dest: Path, archive: Path) -> Iterator[tarfile.TarInfo]:
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not _is_within(target, dest):
            raise ValueError(f"unsafe archive {archive}: member {member.name!r} escapes the target")
        if member.issym() or member.islnk():
            link_root = target.parent if member.issym() else dest
            if not _is_within((link_root / member.linkname).resolve(), dest):
                raise ValueError(
                    f"unsafe archive {archive}: link {member.name!r} -> {member.linkname!r} "
                    "escapes the target"
                )
        if member.isdev() or member.isfifo():
            continue  # devices and pipes have no place in a corpus
        yield member


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract a .tar/.tar.gz/.tgz/.zip into `dest`, refusing members that would escape it."""
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not _is_within((dest / info.filename).resolve(), dest):
                    raise ValueError(
                        f"unsafe archive {archive}: member {info.filename!r} escapes the target"
                    )
            zf.extractall(dest)
        return
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = list(_safe_tar_members(tar, dest, archive))
            if hasattr(tarfile, "data_filter"):
                # Belt and braces: Python's own "data" filter also strips modes and owners.
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(dest, members=members)
    except tarfile.TarError as exc:
        raise ValueError(f"cannot extract archive {archive}: {exc}") from exc


def _is_archive(name: str) -> bool:
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


def _url_filename(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return name or "download"


def _acquire_url(url: str, checksum: str, raw_dir: Path) -> list[dict]:
    filename = _url_filename(url)
    download_dir = raw_dir / "download"
    if not _is_archive(filename):
        if not is_audio_file(filename):
            raise ValueError(
                f"download.source: {url} is neither an archive ({', '.join(_ARCHIVE_SUFFIXES)}) "
                "nor an audio file"
            )
        download_file(url, download_dir / filename, checksum)
        return index_folder(download_dir, raw_dir)
    archive = raw_dir / "archive" / filename
    fresh = download_file(url, archive, checksum)
    marker = download_dir / f".extracted-{filename}"
    stamp = f"{archive.stat().st_size} {archive.stat().st_mtime_ns}"
    # Re-extracting a multi-GB archive is slow: skip when this exact archive was extracted.
    if fresh or not marker.is_file() or marker.read_text() != stamp:
        extract_archive(archive, download_dir)
        marker.write_text(stamp)
    return index_folder(download_dir, raw_dir)


# --- entry point -------------------------------------------------------------------------


def acquire(cfg: SourceConfig, raw_dir: Path) -> dict[str, float]:
    """Gather the audio of `cfg.source` under `raw_dir` and write `raw_dir/manifest.jsonl`.

    Returns stats: num_files, num_with_transcript, num_groups.
    """
    validate(cfg)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    kind = source_kind(cfg.source)
    if kind == "synthetic":
        entries = _acquire_synthetic(cfg, raw_dir)
    elif kind == "librispeech":
        url, checksum = LIBRISPEECH_SUBSETS[cfg.source.split(":", 1)[1]]
        entries = _acquire_url(url, cfg.checksum or checksum, raw_dir)
    elif kind == "url":
        entries = _acquire_url(cfg.source, cfg.checksum, raw_dir)
    elif kind == "glob":
        files = [Path(p) for p in glob.glob(cfg.source, recursive=True)]
        files = [p for p in files if p.is_file() and is_audio_file(p)]
        entries = index_folder(_glob_root(cfg.source), raw_dir, files)
    else:
        path = Path(cfg.source).expanduser()
        if path.is_file():
            entries = index_folder(path.parent, raw_dir, [path])
        else:
            entries = index_folder(path, raw_dir)
    if not entries:
        raise ValueError(f"download.source: {cfg.source} gave no audio files")
    return _write_manifest(raw_dir, entries)
