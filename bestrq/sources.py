"""Where the audio comes from: synthetic speech, a folder/glob, a URL, or a LibriSpeech preset.

`acquire` gathers the recordings of one source into a raw directory and indexes them in
`raw_dir/manifest.jsonl` (id, path, transcript, group; speaker and chapter for LibriSpeech's
folder layout; size and sha256 for files left in place). What it leaves aside (files that are
not audio, archive members that are not regular files, transcript lines that match no file,
unreadable transcript files) is listed with a reason in `raw_dir/skipped.jsonl`. A URL source
is downloaded into a cache outside `raw_dir` and described in `raw_dir/download.json` (its
sha256 included); an archive is extracted, safely, into `raw_dir/download`.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from bestrq.atomic import atomic_write_text, fsync_dir
from bestrq.audio import AUDIO_EXTENSIONS, is_audio_file, write_audio
from bestrq.jsonl import write_jsonl

__all__ = [
    "LIBRISPEECH_SUBSETS",
    "ArchiveError",
    "ChecksumError",
    "Download",
    "SourceConfig",
    "UnverifiedDownloadWarning",
    "acquire",
    "check_watch",
    "download_file",
    "extract_archive",
    "fetch",
    "index_folder",
    "parse_checksum",
    "source_kind",
    "validate",
]

MANIFEST_NAME = "manifest.jsonl"
SKIPPED_NAME = "skipped.jsonl"
DOWNLOAD_RECORD = "download.json"  # what a URL source downloaded and how it was extracted
DOWNLOAD_DIR = "download"

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
# ASCII digits only: `\d` also matches other scripts' digits, which gave a file with such
# characters in its name a group of its own.
_DIGITS = re.compile(r"[0-9]+")
_CHUNK = 1 << 20
# Files read as transcripts, not as audio (manifest.jsonl and transcripts.tsv at the root only).
_TRANS_SUFFIX = ".trans.txt"
_ROOT_TRANSCRIPTS = (MANIFEST_NAME, "transcripts.tsv")

# Every archive member costs at least one file-system block, so that millions of empty members
# count against the size cap too.
_MEMBER_COST = 4096
# No ratio is suspicious below this much output: a small archive of silence or text compresses
# far better than speech, and bombs only do harm when large.
_RATIO_FLOOR = 64 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class ChecksumError(RuntimeError):
    """A downloaded file does not match its expected checksum (the file has been deleted)."""


class ArchiveError(ValueError):
    """An archive is corrupt, unsafe or too large; the message names it. Nothing of it is left
    in the target folder."""


class UnverifiedDownloadWarning(UserWarning):
    """A URL source was used without `download.checksum`; its sha256 is in the message."""


@dataclass
class SourceConfig:
    """Which audio to acquire (the "download" stage's parameters)."""

    source: str = "synthetic"  # "synthetic" | folder or glob | URL | "librispeech:<subset>"
    num_utterances: int = 240  # synthetic: how many sentences
    num_speakers: int = 8  # synthetic: voice/rate/pitch combinations
    seed: int = 0
    checksum: str = ""  # "sha256:<hex>" or "md5:<hex>" for URL sources; presets carry their own
    # The path dvc.yaml makes a dependency of the download stage: for a folder or glob source
    # the folder holding its audio (so that edited audio re-runs the pipeline); for the other
    # sources the stage's own code, already a dependency.
    watch: str = "stages/download.py"
    max_extract_gb: float = 200.0  # an archive that extracts to more is refused
    max_ratio: float = 100.0  # ... and one that expands more than this many times its size


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


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def validate(cfg: SourceConfig) -> None:
    """Check every parameter before any work; ValueError names the bad one."""
    if not isinstance(cfg.source, str) or not cfg.source.strip():
        raise ValueError("download.source: must be a non-empty string")
    if cfg.checksum:
        parse_checksum(cfg.checksum)
    if not isinstance(cfg.watch, str) or not cfg.watch.strip():
        raise ValueError(f"download.watch: must be a non-empty path, got {cfg.watch!r}")
    if not _positive_number(cfg.max_extract_gb):
        raise ValueError(f"download.max_extract_gb: must be a number > 0, got "
                         f"{cfg.max_extract_gb!r}")
    if not _positive_number(cfg.max_ratio) or cfg.max_ratio < 1:
        raise ValueError(f"download.max_ratio: must be a number >= 1, got {cfg.max_ratio!r}")
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


def _watched_path(cfg: SourceConfig) -> Path | None:
    """What a folder or glob source reads: the folder, the one file, or the glob's fixed root."""
    kind = source_kind(cfg.source)
    if kind == "glob":
        return _glob_root(cfg.source)
    if kind == "folder":
        return Path(cfg.source).expanduser()
    return None


def check_watch(cfg: SourceConfig) -> None:
    """ValueError unless `download.watch` holds the audio of a folder or glob source.

    dvc.yaml makes `download.watch` a dependency of the download stage; DVC hashes it, so
    added, removed or edited audio there re-runs download and what follows. Without this
    check a folder source would silently be a constant to DVC."""
    target = _watched_path(cfg)
    if target is None:
        return
    watch = Path(cfg.watch).expanduser()
    if watch.exists() and _is_within(_real(target), _real(watch)):
        return
    raise ValueError(
        f"download.watch: is {cfg.watch!r}, which does not hold the audio of download.source; "
        f"set it to {target} so that `dvc repro` re-runs download when that audio changes "
        f"(e.g. dvc exp run -S download.source=... -S download.watch={target})"
    )


# --- helpers -----------------------------------------------------------------------------


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the complete folder `new` at `dest`; the old `dest`, if any, is removed after."""
    old = None
    if os.path.lexists(dest):
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{new.name}")
        os.replace(dest, old)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    if old is not None:
        _remove(old)


# --- manifest ----------------------------------------------------------------------------


def _write_manifest(raw_dir: Path, entries: list[dict], skipped: list[dict]) -> dict[str, float]:
    entries = sorted(entries, key=lambda e: e["id"])
    write_jsonl(raw_dir / MANIFEST_NAME, entries)
    write_jsonl(raw_dir / SKIPPED_NAME, skipped)
    return {
        "num_files": len(entries),
        "num_with_transcript": sum(e["transcript"] is not None for e in entries),
        "num_groups": len({e["group"] for e in entries}),
        "num_skipped": len(skipped),
    }


def _manifest_path(path: Path, raw_dir: Path) -> str:
    """Relative to raw_dir for files stored inside it, absolute for files left in place."""
    try:
        return path.relative_to(Path(os.path.abspath(raw_dir))).as_posix()
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


@dataclass
class _Transcript:
    """One transcript line and where it came from."""

    text: str
    origin: Path  # the transcript file
    line: int
    keys: tuple[str, ...]  # what it is looked up by: an id, a file stem or a relative path
    used: bool = False


@dataclass
class _Transcripts:
    by_key: dict[str, _Transcript] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    def add(self, text: str, origin: Path, line: int, *keys: str) -> None:
        record = _Transcript(text, origin, line, keys)
        for key in keys:
            earlier = self.by_key.get(key)
            if earlier is not None and earlier is not record and not earlier.used:
                # Later files win (manifest.jsonl over transcripts.tsv over *.trans.txt).
                earlier.used = True  # listed here, not again as unmatched
                self.skipped.append({
                    "path": str(earlier.origin), "line": earlier.line,
                    "reason": f"transcript for {key!r} replaced by the one at "
                              f"{origin}:{line}"})
            self.by_key[key] = record

    def find(self, *keys: str) -> str | None:
        for key in keys:
            record = self.by_key.get(key)
            if record is not None:
                record.used = True
                return record.text
        return None

    def unmatched(self) -> list[dict]:
        seen: set[int] = set()
        out = []
        for record in self.by_key.values():
            if record.used or id(record) in seen:
                continue
            seen.add(id(record))
            out.append({"path": str(record.origin), "line": record.line,
                        "reason": f"transcript for {record.keys[0]!r}, which is not an audio "
                                  "file of the source"})
        return out


def _read_text(path: Path, transcripts: _Transcripts) -> str | None:
    """A transcript file's text, or None (and the file listed) when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        reason = (f"transcript file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                  "none of its lines is used")
    except OSError as exc:
        reason = f"cannot read transcript file: {exc}"
    transcripts.skipped.append({"path": str(path), "reason": reason})
    return None


def _read_transcripts(root: Path, trans_files: Iterable[Path]) -> _Transcripts:
    """Transcripts keyed by utterance id / file stem and by path relative to root."""
    out = _Transcripts()
    for trans in sorted(trans_files):
        text = _read_text(trans, out)
        for n, line in enumerate((text or "").splitlines(), start=1):
            key, _, words = line.strip().partition(" ")
            if key:
                out.add(words.strip(), trans, n, key)
    tsv = root / "transcripts.tsv"
    if tsv.is_file():
        text = _read_text(tsv, out)
        for n, line in enumerate((text or "").splitlines(), start=1):
            key, sep, words = line.rstrip("\n").partition("\t")
            if sep and key.strip() and key.strip().lower() not in ("id", "path", "file"):
                out.add(words.strip(), tsv, n, key.strip())
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        text = _read_text(manifest, out)
        for n, line in enumerate((text or "").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                out.skipped.append({"path": str(manifest), "line": n,
                                    "reason": f"not valid JSON ({exc.msg}); line not used"})
                continue
            if not isinstance(obj, dict):
                out.skipped.append({"path": str(manifest), "line": n,
                                    "reason": "not a JSON object; line not used"})
                continue
            words = obj.get("transcript", obj.get("text"))
            keys = [str(obj[k]) for k in ("id", "path") if obj.get(k)]
            if words is not None and keys:
                out.add(str(words), manifest, n, *keys)
    return out


def _speaker_chapter(path: Path) -> tuple[str, str] | None:
    """(speaker, chapter) from LibriSpeech's folder layout <speaker>/<chapter>/<file>."""
    parts = path.parts
    if len(parts) >= 3 and _DIGITS.fullmatch(parts[-3]) and _DIGITS.fullmatch(parts[-2]):
        return parts[-3], parts[-2]
    return None


def _group_for(path: Path, root: Path) -> str:
    """The speaker of LibriSpeech's layout, else the file's folder below the root: the unit the
    train/eval split keeps on one side."""
    layout = _speaker_chapter(path)
    if layout:
        return layout[0]
    parent = path.parent.relative_to(root).as_posix()
    return parent if parent != "." else root.name or "."


def _is_transcript_file(path: Path, root: Path) -> bool:
    return path.name.endswith(_TRANS_SUFFIX) or (
        path.parent == root and path.name in _ROOT_TRANSCRIPTS)


def _walk(root: Path, skipped: list[dict]) -> list[Path]:
    """Every file under root (absolute, links not resolved), sorted; folders that are links
    are listed in `skipped`, not followed (they could loop or lead anywhere)."""
    files = []
    for folder, dirs, names in os.walk(root):
        base = Path(folder)
        for d in sorted(dirs):
            if (base / d).is_symlink():
                skipped.append({"path": str(base / d),
                                "reason": "link to a folder, not followed"})
        dirs.sort()
        files.extend(base / n for n in names)
    return sorted(files)


class _DigestCache:
    """sha256 of files left in place, remembered by (size, mtime_ns, inode), so that an
    unchanged corpus is not read again on every run of the download stage."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, list] = {}
        self.now: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.known = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.known = {}  # a broken cache only costs reading the files again

    def digest(self, file: Path) -> tuple[int, str]:
        st = os.stat(file)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.known.get(str(file))
        if isinstance(hit, list) and len(hit) == 4 and hit[:3] == stamp:
            digest = hit[3]
        else:
            digest = _file_digests(file, {"sha256"})["sha256"]
        self.now[str(file)] = [*stamp, digest]
        return st.st_size, digest

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.now, ensure_ascii=False))


def _unique_ids(files: list[Path], root: Path) -> list[str]:
    """Stems are the natural ids (LibriSpeech utterance ids); shared stems fall back to the
    path, and whatever still collides (a.wav and a.WAV) gets a numbered suffix."""
    stems = Counter(p.stem for p in files)
    ids: list[str] = []
    used: set[str] = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        utt_id = rel.rsplit(".", 1)[0].replace("/", "__") if stems[path.stem] > 1 else path.stem
        base, n = utt_id, 1
        while utt_id in used:
            n += 1
            utt_id = f"{base}~{n}"
        used.add(utt_id)
        ids.append(utt_id)
    return ids


def index_folder(root: Path, raw_dir: Path, files: list[Path] | None = None,
                 digests: _DigestCache | None = None) -> tuple[list[dict], list[dict]]:
    """Manifest entries for the audio files under `root` (or the given `files` under it), and
    what was left aside, each with a reason: files that are not audio, broken links,
    transcript lines for no file, transcript files that cannot be read.

    With `digests`, entries carry each file's size and sha256, so that the manifest changes
    when the audio does (files left in place are not part of the DVC output)."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    skipped: list[dict] = []
    if files is None:
        candidates = _walk(root, skipped)
        trans_files = [p for p in candidates if p.name.endswith(_TRANS_SUFFIX)]
    else:
        candidates = sorted({Path(os.path.abspath(p)) for p in files})
        trans_files = [p for p in _walk(root, []) if p.name.endswith(_TRANS_SUFFIX)]
    audio = []
    for path in candidates:
        if _is_transcript_file(path, root):
            continue
        if not path.is_file():
            if path.is_symlink():
                skipped.append({"path": str(path), "reason": "broken link"})
            elif os.path.lexists(path) and not path.is_dir():
                skipped.append({"path": str(path), "reason": "not a regular file"})
            continue
        if not is_audio_file(path):
            skipped.append({"path": str(path),
                            "reason": f"not an audio file: extension {path.suffix!r} is not "
                                      f"one of {', '.join(sorted(AUDIO_EXTENSIONS))}"})
            continue
        audio.append(path)
    transcripts = _read_transcripts(root, trans_files)
    entries = []
    for path, utt_id in zip(audio, _unique_ids(audio, root), strict=True):
        rel = path.relative_to(root).as_posix()
        entry: dict[str, Any] = {
            "id": utt_id,
            "path": _manifest_path(path, raw_dir),
            "transcript": transcripts.find(rel, utt_id, path.stem),
            "group": _group_for(path, root),
        }
        layout = _speaker_chapter(path)
        if layout:
            entry["speaker"], entry["chapter"] = layout
        if digests is not None:
            try:
                entry["size"], entry["sha256"] = digests.digest(path)
            except OSError as exc:
                skipped.append({"path": str(path), "reason": f"cannot read: {exc}"})
                continue
        entries.append(entry)
    return entries, skipped + transcripts.skipped + transcripts.unmatched()


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


def _file_digests(path: Path, algos: Iterable[str]) -> dict[str, str]:
    hashers = {algo: hashlib.new(algo) for algo in algos}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashers.items()}


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


def download_file(url: str, dest: Path, checksum: str = "") -> str:
    """Download `url` to `dest` atomically and return its sha256 (hex).

    The bytes go to a temporary file beside `dest`, are flushed to disk, and only then renamed
    to `dest`, so `dest` is either absent or complete. Raises ChecksumError (nothing left
    behind) when `checksum` ("sha256:<hex>", "md5:<hex>") does not match.
    """
    algo, expected = parse_checksum(checksum) if checksum else ("sha256", "")
    dest.parent.mkdir(parents=True, exist_ok=True)
    hashers = {name: hashlib.new(name) for name in {"sha256", algo}}
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out:
            written = 0
            try:
                stream, size, closer = _open_url(url)
                try:
                    bar = tqdm(total=size, unit="B", unit_scale=True,
                               desc=f"download {dest.name}")
                    with bar:
                        for chunk in iter(lambda: stream.read(_CHUNK), b""):
                            out.write(chunk)
                            written += len(chunk)
                            for h in hashers.values():
                                h.update(chunk)
                            bar.update(len(chunk))
                finally:
                    closer.close()  # type: ignore[attr-defined]
            except (OSError, http.client.HTTPException) as exc:
                raise RuntimeError(f"download of {url} failed: {exc}; nothing was kept") from exc
            # http.client ends a body cut short quietly: its announced length tells.
            if size is not None and written != size:
                raise RuntimeError(f"download of {url} failed: got {written} of {size} bytes; "
                                   "nothing was kept")
            out.flush()
            os.fsync(out.fileno())
        got = hashers[algo].hexdigest()
        if expected and got != expected:
            raise ChecksumError(
                f"checksum mismatch for {url}: expected {algo}:{expected}, "
                f"got {algo}:{got}; the downloaded file was deleted"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return hashers["sha256"].hexdigest()


def _url_filename(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    name = name.replace("\x00", "")
    return name if name not in ("", ".", "..") else "download"


@dataclass
class Download:
    """A URL's content in the download cache."""

    url: str
    path: Path
    sha256: str
    size: int
    checksum: str  # as given; "" when none was
    cached: bool  # found in the cache, not downloaded now

    @property
    def verified(self) -> bool:
        return bool(self.checksum)


def fetch(url: str, checksum: str, cache_dir: Path) -> Download:
    """The content of `url` in `cache_dir/downloads/<url hash>/<sha256>/<file name>`.

    A copy found there is used when it matches `checksum` (or, without one, when it is intact:
    its content still has the sha256 it is filed under); otherwise `url` is downloaded. The
    cache lies outside the DVC output, so an archive is not kept beside its extracted copy.
    """
    algo, expected = parse_checksum(checksum) if checksum else ("sha256", "")
    filename = _url_filename(url)
    url_dir = Path(cache_dir) / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]
    copies = [d / filename for d in (url_dir.iterdir() if url_dir.is_dir() else [])
              if re.fullmatch(r"[0-9a-f]{64}", d.name) and (d / filename).is_file()]
    # Newest first: without a checksum, the copy downloaded last is the one used.
    for copy in sorted(copies, key=lambda p: (-p.stat().st_mtime_ns, str(p))):
        digests = _file_digests(copy, {"sha256", algo})
        if digests["sha256"] != copy.parent.name:
            shutil.rmtree(copy.parent)  # damaged: never use, download again
            continue
        if not expected or digests[algo] == expected:
            return Download(url, copy, digests["sha256"], copy.stat().st_size, checksum, True)
    incoming = url_dir / "incoming" / filename
    for stale in incoming.parent.glob(".*.part"):  # left by a killed download
        stale.unlink(missing_ok=True)
    sha256 = download_file(url, incoming, checksum)
    final = url_dir / sha256 / filename
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(incoming, final)
    fsync_dir(final.parent)
    (url_dir / "url.txt").write_text(url + "\n", encoding="utf-8")  # for people browsing it
    return Download(url, final, sha256, final.stat().st_size, checksum, False)


def _is_archive(name: str) -> bool:
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


class _Extractor:
    """Writes archive members below a fresh folder: regular files and folders only, each path
    made one component at a time without following anything, under a size and a ratio cap."""

    def __init__(self, archive: Path, root: Path, max_bytes: int, max_ratio: float) -> None:
        self.archive = archive
        self.root = root
        self.real_root = _real(root)
        self.max_bytes = max_bytes
        self.max_ratio = max_ratio
        self.archive_size = max(archive.stat().st_size, 1)
        self.total = 0
        self.skipped: list[dict] = []

    def unsafe(self, name: str, why: str) -> ArchiveError:
        return ArchiveError(f"unsafe archive {self.archive}: member {name!r} {why}; "
                            "nothing was extracted")

    def skip(self, name: str, reason: str) -> None:
        self.parts(name)  # a member with a hostile name makes the archive unsafe, even skipped
        self.skipped.append({"path": name, "archive": self.archive.name, "reason": reason})

    def parts(self, name: str) -> list[str]:
        """The path components of a member name; ArchiveError if it could leave the target."""
        norm = name.replace("\\", "/")  # zips made on Windows use either separator
        if "\x00" in norm or norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
            raise self.unsafe(name, "has an absolute path")
        parts = [p for p in norm.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.unsafe(name, "escapes the target")
        return parts

    def charge(self, name: str, nbytes: int) -> None:
        """Count `nbytes` more of output; ArchiveError past either cap."""
        self.total += max(nbytes, _MEMBER_COST)
        if self.total > self.max_bytes:
            raise ArchiveError(
                f"archive {self.archive} extracts to more than {self.max_bytes / 1e9:g} GB "
                f"(download.max_extract_gb), reached at member {name!r}; nothing was extracted "
                "(raise download.max_extract_gb if the archive is genuine)")
        if self.total > max(_RATIO_FLOOR, self.max_ratio * self.archive_size):
            raise ArchiveError(
                f"archive {self.archive} expands to more than {self.max_ratio:g} times its "
                f"size (download.max_ratio), reached at member {name!r}: a decompression bomb? "
                "Nothing was extracted (raise download.max_ratio if the archive is genuine)")

    def folder(self, name: str, parts: list[str]) -> Path | None:
        """The folder `parts` below the root, made one component at a time; None (and the
        member listed) when one of them is a file."""
        path = self.root
        for part in parts:
            path = path / part
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                # lstat: what is there is judged itself, never what it would lead to.
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    self.skip(name, f"its folder {part!r} is a file in the archive")
                    return None
            except OSError as exc:
                if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                    self.skip(name, f"cannot create it here: {exc.strerror}")
                    return None
                raise RuntimeError(f"cannot extract archive {self.archive}: {exc}") from exc
        # Resolved after the parents exist: nothing may lead outside the root (this tree holds
        # only folders and files made here, so this is defence in depth).
        if not _is_within(_real(path), self.real_root):
            raise self.unsafe(name, "escapes the target")
        return path

    def add_dir(self, name: str) -> None:
        parts = self.parts(name)
        if parts:
            self.charge(name, 0)
            self.folder(name, parts)

    def add_file(self, name: str, declared: int, read: Callable[[int], bytes]) -> None:
        parts = self.parts(name)
        if not parts:
            self.skip(name, "a file without a name")
            return
        self.charge(name, declared)  # from the header: a bomb is refused before it is written
        folder = self.folder(name, parts[:-1])
        if folder is None:
            return
        target = folder / parts[-1]
        if os.path.lexists(target):
            if stat.S_ISDIR(os.lstat(target).st_mode):
                self.skip(name, "a folder of the same name is in the archive")
                return
            os.unlink(target)  # a later member of the same name replaces it, as in tar
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                self.skip(name, f"cannot create it here: {exc.strerror}")
                return
            raise RuntimeError(f"cannot extract archive {self.archive}: {exc}") from exc
        written = 0
        with open(fd, "wb") as out:
            while chunk := read(_CHUNK):
                written += len(chunk)
                if written > declared:
                    raise ArchiveError(f"cannot extract archive {self.archive}: member {name!r} "
                                       "holds more data than its header says")
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise RuntimeError(f"cannot extract archive {self.archive}: writing "
                                       f"{name!r}: {exc}") from exc
        if written < declared:
            raise ArchiveError(f"cannot extract archive {self.archive}: member {name!r} is "
                               "truncated")


def _one_line(exc: BaseException) -> str:
    """An exception as one line: the stage prints errors as a single line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# What reading a damaged archive raises, beside tarfile's and zipfile's own errors.
_READ_ERRORS = (EOFError, zlib.error, lzma.LZMAError, NotImplementedError, OSError)


def _extract_tar(archive: Path, ex: _Extractor) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            while (member := tar.next()) is not None:
                name = member.name
                if member.isreg():
                    source = tar.extractfile(member)
                    assert source is not None  # a regular member always has data
                    ex.add_file(name, member.size, source.read)
                elif member.isdir():
                    ex.add_dir(name)
                elif member.issym():
                    ex.skip(name, f"symbolic link (to {member.linkname!r}): not extracted")
                elif member.islnk():
                    ex.skip(name, f"hard link (to {member.linkname!r}): not extracted")
                elif member.ischr() or member.isblk():
                    ex.skip(name, "device file: not extracted")
                elif member.isfifo():
                    ex.skip(name, "named pipe: not extracted")
                else:
                    ex.skip(name, f"member of tar type {member.type!r}: not extracted")
            # tarfile ends quietly at a file cut at a member boundary and at a damaged header
            # after the first: what it read last must be a whole block (the end-of-archive
            # block), and only zeros may follow. Reading on to the end also checks a
            # compressed stream's trailer (its CRC and length). No seeking back: in a
            # compressed stream that means decompressing it all again.
            if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("it ends before tar's end-of-archive block")
            while chunk := tar.fileobj.read(_CHUNK):
                if chunk.count(0) != len(chunk):
                    raise tarfile.ReadError("a damaged header, or data after the end of the "
                                            "archive")
    except (tarfile.TarError, *_READ_ERRORS) as exc:
        raise ArchiveError(f"cannot extract archive {archive}: it is corrupt or truncated "
                           f"({_one_line(exc)})") from exc


def _extract_zip(archive: Path, ex: _Extractor) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = info.filename
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0: made where modes are unknown
                if info.is_dir() or kind == stat.S_IFDIR:
                    ex.add_dir(name)
                elif kind == stat.S_IFLNK:
                    ex.skip(name, "symbolic link: not extracted")
                elif kind not in (0, stat.S_IFREG):
                    ex.skip(name, "device file or pipe: not extracted")
                elif info.flag_bits & 0x1:
                    ex.skip(name, "encrypted: not extracted")
                else:
                    with zf.open(info) as source:
                        ex.add_file(name, info.file_size, source.read)
    except (zipfile.BadZipFile, *_READ_ERRORS) as exc:
        raise ArchiveError(f"cannot extract archive {archive}: it is not a readable zip file "
                           f"({_one_line(exc)})") from exc


def extract_archive(archive: Path, dest: Path, max_bytes: int = 200 * 10**9,
                    max_ratio: float = 100.0) -> list[dict]:
    """Extract a .tar/.tar.gz/.tgz/.zip into `dest`, safely; returns the members left aside.

    Only regular files and folders are written: symbolic and hard links, devices and pipes
    are skipped and listed (a corpus needs none, and not making links is what makes link
    chains such as CVE-2025-4517's harmless on every Python). A member whose name is absolute
    or climbs out with `..`, or whose resolved folder is outside the target, makes the archive
    unsafe: ArchiveError. So do more than `max_bytes` of output or more than `max_ratio` times
    the archive's size (checked from each member's header before it is written, and while it
    is), and a corrupt or truncated archive. Extraction goes to a fresh folder beside `dest`
    that replaces `dest` only once complete: on any error `dest` is as it was.
    """
    archive, dest = Path(archive), Path(dest)
    if not _is_archive(archive.name):
        raise ArchiveError(f"cannot extract {archive}: not a {', '.join(_ARCHIVE_SUFFIXES)} file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extracting-"))
    try:
        ex = _Extractor(archive, tmp, max_bytes, max_ratio)
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, ex)
        else:
            _extract_tar(archive, ex)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ex.skipped


def _install_file(source: Path, dest: Path) -> None:
    """Make `dest` a folder holding a copy of `source` alone, replacing it only when done."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extracting-"))
    try:
        shutil.copyfile(source, tmp / source.name)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _acquire_url(url: str, cfg: SourceConfig, checksum: str, raw_dir: Path, cache_dir: Path
                 ) -> tuple[list[dict], list[dict], dict[str, float | str]]:
    filename = _url_filename(url)
    if not _is_archive(filename) and not is_audio_file(filename):
        raise ValueError(
            f"download.source: {url} is neither an archive ({', '.join(_ARCHIVE_SUFFIXES)}) "
            "nor an audio file"
        )
    got = fetch(url, checksum, cache_dir)
    if not got.verified:
        warnings.warn(UnverifiedDownloadWarning(
            f"no download.checksum for {url}: what was downloaded has sha256:{got.sha256}; "
            f"set download.checksum: sha256:{got.sha256} to make sure later runs use the same "
            "bytes"), stacklevel=3)
    max_bytes = int(cfg.max_extract_gb * 1e9)
    record: dict[str, Any] = {
        "url": url, "file": filename, "size": got.size, "sha256": got.sha256,
        "checksum": checksum or None, "max_extract_bytes": max_bytes,
        "max_ratio": cfg.max_ratio,
    }
    record_path = raw_dir / DOWNLOAD_RECORD
    download_dir = raw_dir / DOWNLOAD_DIR
    previous = _read_record(record_path)
    # Extracting a multi-GB archive is slow: skip it when this archive was extracted (under
    # the same limits) into the folder that is there.
    if download_dir.is_dir() and {k: previous.get(k) for k in record} == record:
        members = previous.get("skipped_members", [])
    elif _is_archive(filename):
        try:
            members = extract_archive(got.path, download_dir, max_bytes, cfg.max_ratio)
        except ArchiveError as exc:
            if got.verified:
                raise
            # Unverified, it may be a broken download: the next run fetches it anew.
            shutil.rmtree(got.path.parent, ignore_errors=True)
            raise ArchiveError(f"{exc} (downloaded from {url}; the copy was removed from the "
                               "download cache)") from exc
    else:
        _install_file(got.path, download_dir)
        members = []
    atomic_write_text(record_path, json.dumps({**record, "skipped_members": members},
                                               indent=2, ensure_ascii=False) + "\n")
    entries, skipped = index_folder(download_dir, raw_dir)
    stats: dict[str, float | str] = {"download_sha256": got.sha256,
                                     "download_bytes": got.size,
                                     "download_verified": int(got.verified)}
    return entries, [*members, *skipped], stats


# --- entry point -------------------------------------------------------------------------


def _clear_stale(raw_dir: Path, kind: str) -> None:
    """Remove what an earlier run of another source (or of this code's older versions) left in
    raw_dir, which the DVC output would otherwise carry along."""
    stale = [raw_dir / "synthetic", raw_dir / "archive"]  # archive: where old versions kept it
    if kind not in ("url", "librispeech"):
        stale += [raw_dir / DOWNLOAD_DIR, raw_dir / DOWNLOAD_RECORD]
    stale += list(raw_dir.glob(f".{DOWNLOAD_DIR}.*"))  # folders of an interrupted extraction
    for path in stale:
        _remove(path)


def acquire(cfg: SourceConfig, raw_dir: Path, cache_dir: Path | None = None
            ) -> dict[str, float | str]:
    """Gather the audio of `cfg.source` under `raw_dir`; write `raw_dir/manifest.jsonl` and
    `raw_dir/skipped.jsonl` (what was left aside, with reasons).

    Downloads and the sha256 of in-place files are cached under `cache_dir` (default: a
    "cache" folder beside raw_dir). Returns stats: num_files, num_with_transcript, num_groups,
    num_skipped; for URL sources also download_sha256, download_bytes and download_verified
    (0 without a checksum, when an UnverifiedDownloadWarning is issued too).
    """
    validate(cfg)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else raw_dir.parent / "cache"
    kind = source_kind(cfg.source)
    watched = _watched_path(cfg)
    if watched is not None and (_is_within(_real(watched), _real(raw_dir))
                                or _is_within(_real(raw_dir), _real(watched))):
        raise ValueError(f"download.source: {cfg.source} overlaps the output folder {raw_dir}, "
                         "which the download stage rewrites; use a folder outside it")
    _clear_stale(raw_dir, kind)
    extra: dict[str, float | str] = {}
    skipped: list[dict] = []
    if kind == "synthetic":
        entries = _acquire_synthetic(cfg, raw_dir)
    elif kind in ("librispeech", "url"):
        url, checksum = cfg.source, cfg.checksum
        if kind == "librispeech":
            url, preset = LIBRISPEECH_SUBSETS[cfg.source.split(":", 1)[1]]
            checksum = cfg.checksum or preset
        entries, skipped, extra = _acquire_url(url, cfg, checksum, raw_dir, cache_dir)
    else:
        digests = _DigestCache(cache_dir / "digests.json")
        path = Path(cfg.source).expanduser()
        if kind == "glob":
            files = [Path(p) for p in glob.glob(cfg.source, recursive=True)]
            entries, skipped = index_folder(_glob_root(cfg.source), raw_dir, files, digests)
        elif path.is_file():
            entries, skipped = index_folder(path.parent, raw_dir, [path], digests)
        else:
            entries, skipped = index_folder(path, raw_dir, digests=digests)
        digests.save()
    if not entries:
        raise ValueError(f"download.source: {cfg.source} gave no audio files")
    return {**_write_manifest(raw_dir, entries, skipped), **extra}
