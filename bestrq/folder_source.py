"""A folder or glob of audio files left in place: which files are audio, their ids, their
group (the unit the splits keep on one side), LibriSpeech's speaker/chapter layout, and the
transcripts found beside them (`*.trans.txt`, a root `transcripts.tsv` or `manifest.jsonl`).
What is left aside is listed with a reason, never dropped silently."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bestrq.atomic import atomic_write_text
from bestrq.audio import AUDIO_EXTENSIONS, is_audio_file
from bestrq.files import file_digests
from bestrq.jsonl import dumps

MANIFEST_NAME = "manifest.jsonl"
GLOB_CHARS = ("*", "?", "[")
# ASCII digits only: `\d` also matches other scripts' digits, which gave a file with such
# characters in its name a group of its own.
_DIGITS = re.compile(r"[0-9]+")
# Files read as transcripts, not as audio (manifest.jsonl and transcripts.tsv at the root only).
_TRANS_SUFFIX = ".trans.txt"
_ROOT_TRANSCRIPTS = (MANIFEST_NAME, "transcripts.tsv")
# Entries a folder or glob source may visit: a corpus is far smaller (LibriSpeech's 960 h is
# ~300,000 files); `/` or `/proc` given by mistake ends in an error, not an endless walk.
MAX_ENTRIES = 5_000_000


def manifest_path(path: Path, raw_dir: Path) -> str:
    """Relative to raw_dir for files stored inside it, absolute for files left in place."""
    try:
        return path.relative_to(Path(os.path.abspath(raw_dir))).as_posix()
    except ValueError:
        return str(path)


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


def group_for(path: Path, root: Path) -> str:
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
    are listed in `skipped`, not followed (they could loop or lead anywhere), and so are
    folders that cannot be listed. ValueError past MAX_ENTRIES entries."""
    def unlisted(exc: OSError) -> None:
        skipped.append({"path": str(exc.filename), "reason": f"cannot list folder: {_why(exc)}"})

    files = []
    seen = 0
    for folder, dirs, names in os.walk(root, onerror=unlisted):
        seen += len(dirs) + len(names)
        if seen > MAX_ENTRIES:
            raise ValueError(f"download.source: more than {MAX_ENTRIES:,} files and folders "
                             f"under {root}: point it at the corpus's own folder")
        base = Path(folder)
        for d in sorted(dirs):
            if (base / d).is_symlink():
                skipped.append({"path": str(base / d),
                                "reason": "link to a folder, not followed"})
        dirs.sort()
        files.extend(base / n for n in names)
    return sorted(files)


def _why(exc: OSError) -> str:
    """An OSError in words and by name, e.g. "Permission denied (EACCES)"."""
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def _parts_match(names: list[str], pats: list[str]) -> bool:
    """Whether path segments `names` match glob segments `pats` as glob.glob(recursive=True)
    would: `**` spans any number of folders, and no wildcard matches a leading dot."""
    if not pats:
        return not names
    pat = pats[0]
    if pat == "**":
        return any(_parts_match(names[i:], pats[1:]) for i in range(len(names) + 1)
                   if all(not n.startswith(".") for n in names[:i]))
    if not names:
        return False
    name = names[0]
    if name.startswith(".") and not pat.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pat) and _parts_match(names[1:], pats[1:])


def glob_files(pattern: str, skipped: list[dict]) -> list[Path]:
    """The files a glob pattern matches, found by walking its fixed root (`_walk`: links to
    folders are not followed, so `spk/self -> .` cannot loop, and the walk is bounded)."""
    root = glob_root(pattern)
    pats = Path(pattern).expanduser().parts[len(root.parts):]
    rel_root = Path(os.path.abspath(root))
    return [path for path in _walk(rel_root, skipped)
            if _parts_match(list(path.relative_to(rel_root).parts), list(pats))]


class DigestCache:
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
            digest = file_digests(file, {"sha256"})["sha256"]
        self.now[str(file)] = [*stamp, digest]
        return st.st_size, digest

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, dumps(self.now))


def _unique_ids(files: list[Path], root: Path) -> list[str]:
    """Stems are the natural ids (LibriSpeech utterance ids); shared stems fall back to the
    path, and whatever still collides (a.wav and a.WAV) gets a numbered suffix."""
    stems = Counter(p.stem for p in files)
    ids: list[str] = []
    used: set[str] = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        ids.append(numbered(
            rel.rsplit(".", 1)[0].replace("/", "__") if stems[path.stem] > 1 else path.stem,
            used))
    return ids


def numbered(base: str, used: set[str]) -> str:
    """`base`, or `base~2`, `base~3`, ... whichever is not in `used` yet; added to `used`."""
    utt_id, n = base, 1
    while utt_id in used:
        n += 1
        utt_id = f"{base}~{n}"
    used.add(utt_id)
    return utt_id


def index_folder(root: Path, raw_dir: Path, files: list[Path] | None = None,
                 digests: DigestCache | None = None) -> tuple[list[dict], list[dict]]:
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
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            broken = exc.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path)
            if broken or os.path.lexists(path):
                skipped.append({"path": str(path),
                                "reason": "broken link" if broken else f"cannot read: {_why(exc)}"})
            continue
        if not stat.S_ISREG(mode):
            if not stat.S_ISDIR(mode):
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
            "path": manifest_path(path, raw_dir),
            "transcript": transcripts.find(rel, utt_id, path.stem),
            "group": group_for(path, root),
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


def glob_root(pattern: str) -> Path:
    """Longest leading directory of a glob pattern that has no wildcard in it."""
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts:
        if any(c in part for c in GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")
