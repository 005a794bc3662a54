"""NeMo-style JSONL manifests as a source: one JSON object a line,
`{"audio_filepath": ..., "duration": ..., "text": ...}`, with optional `offset` (seconds into the
file, for a span of a longer recording) and `speaker`.

The interchange format of NeMo, and of most tools that prepare speech corpora. Relative paths
resolve against the manifest's folder. A line that does not parse, or lacks what it needs, is
listed (file and line) in skipped.jsonl like any other input left aside; the audio is decoded
later, by segment, span by span.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bestrq.folder_source import DigestCache, group_for, numbered

__all__ = ["MANIFEST_SUFFIXES", "is_manifest", "read_nemo_manifest"]

MANIFEST_SUFFIXES = (".json", ".jsonl")


def is_manifest(source: str) -> bool:
    """Whether a source string names a JSONL manifest (by its suffix)."""
    return "://" not in source and Path(source).suffix.lower() in MANIFEST_SUFFIXES


def _seconds(value: Any, name: str, positive: bool) -> float:
    """A finite number of seconds (> 0 with `positive`, else >= 0); ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got "
                         f"{value!r}")
    return float(value)


def _line_entry(obj: Any, folder: Path) -> dict[str, Any]:
    """The manifest entry of one parsed line (without its id); ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object: {type(obj).__name__}")
    audio = obj.get("audio_filepath")
    if not isinstance(audio, str) or not audio:
        raise ValueError("audio_filepath must be a non-empty string")
    path = Path(audio).expanduser()
    path = Path(os.path.abspath(path if path.is_absolute() else folder / path))
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    entry: dict[str, Any] = {
        "path": str(path),
        "transcript": text.strip() or None if text is not None else None,
        "offset": _seconds(obj.get("offset", 0.0), "offset", positive=False),
        "duration": _seconds(obj.get("duration"), "duration", positive=True),
    }
    speaker = obj.get("speaker")
    # The split keeps a group on one side: the speaker when given, else the file's folder.
    entry["group"] = str(speaker) if speaker is not None else (
        group_for(path, folder) if path.is_relative_to(folder) else path.parent.name or ".")
    if speaker is not None:
        entry["speaker"] = str(speaker)
    return entry


def read_nemo_manifest(manifest: Path, digests: DigestCache | None = None
                       ) -> tuple[list[dict], list[dict]]:
    """Raw-manifest entries (id, path, transcript, group, offset, duration) for each usable
    line of a NeMo manifest, and what was left aside with a reason (a line that does not
    parse, names no file, or whose audio file is missing). With `digests`, entries carry the
    audio file's size and sha256, so that the raw manifest changes when the audio does."""
    manifest = Path(os.path.abspath(Path(manifest).expanduser()))
    folder = manifest.parent
    entries: list[dict] = []
    skipped: list[dict] = []
    with open(manifest, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = _line_entry(json.loads(line), folder)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                skipped.append({"path": str(manifest), "line": n, "reason": f"{manifest}:{n}: "
                                f"not a usable manifest line: {exc}"})
                continue
            path = Path(entry["path"])
            if not path.is_file():
                skipped.append({"path": entry["path"], "line": n, "reason": f"{manifest}:{n}: "
                                "audio_filepath is not a file"})
                continue
            if digests is not None:
                try:
                    entry["size"], entry["sha256"] = digests.digest(path)
                except OSError as exc:  # one unreadable file must not stop the corpus
                    skipped.append({"path": entry["path"], "line": n, "reason": f"{manifest}:"
                                    f"{n}: cannot read {path}: {exc}"})
                    continue
            entries.append(entry)
    # Ids: the file's stem, with the span's start in ms when the line cuts one out; whatever
    # still collides gets a numbered suffix.
    used: set[str] = set()
    out = []
    for entry in entries:
        stem = Path(entry["path"]).stem
        base = f"{stem}_{round(entry['offset'] * 1000):09d}ms" if entry["offset"] else stem
        out.append({"id": numbered(base, used), **entry})
    return out, skipped
