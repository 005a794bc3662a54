"""Where an export may write: nothing a user owns is overwritten or deleted.

An export writes only to a path that does not exist, to an empty folder, or over an earlier
export of this project that nobody has changed since: a folder whose marker file
(`.bestrq-export.json`) lists exactly the files in it, or a checkpoint file whose sidecar
(`<file>.bestrq-export.json`) records its sha256. Never inside a protected folder (the
pipeline's `data/`) and never over its own inputs (the adapter, the base model). Everything is
checked before any work, and a refusal is one line naming the path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MARKER", "ExportTargetError", "check_target", "record_file", "record_folder",
           "sidecar"]

MARKER = ".bestrq-export.json"  # in an exported folder: the files the export wrote


class ExportTargetError(ValueError):
    """The export's output path holds something that is not an unchanged earlier export."""


def sidecar(path: Path) -> Path:
    """The marker of an exported checkpoint file, beside it."""
    return path.with_name(path.name + MARKER)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _listing(folder: Path) -> set[str]:
    """Every entry below `folder` (files, links, empty folders), relative, without the marker."""
    out = set()
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            out.add((Path(root) / name).relative_to(folder).as_posix())
        if not dirs and not files and Path(root) != folder:
            out.add(Path(root).relative_to(folder).as_posix() + "/")
    out.discard(MARKER)
    return out


def check_target(out: str | Path, fmt: str, inputs: Iterable[str | Path] = (),
                 protected: Iterable[str | Path] = ()) -> Path:
    """The resolved output path of an export in `fmt` ("openai": a file; "hf", "ct2": a
    folder), or ExportTargetError naming it when writing there could destroy something."""
    target = Path(out).expanduser().resolve()
    for folder in protected:
        folder = Path(folder).resolve()
        if _inside(target, folder):
            raise ExportTargetError(f"export: {out} is inside {folder}, the pipeline's outputs: "
                                    "write the export elsewhere")
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if source.exists() and (_inside(target, source) or _inside(source, target)):
            raise ExportTargetError(f"export: {out} would overwrite {given}, an input of this "
                                    "export: choose another path")
    if not os.path.lexists(target):
        return target
    if fmt == "openai":
        record = _read_marker(sidecar(target))
        if target.is_file() and not target.is_symlink() and record is not None \
                and record.get("sha256") == _sha256(target):
            return target
        raise ExportTargetError(f"export: {out} exists and is not an unchanged earlier export "
                                f"(no matching {sidecar(target).name}): choose another path or "
                                "remove it")
    if target.is_dir() and not target.is_symlink():
        if not any(target.iterdir()):
            return target
        record = _read_marker(target / MARKER)
        if record is not None and record.get("format") == fmt \
                and set(record.get("files", [])) == _listing(target):
            return target
    raise ExportTargetError(f"export: {out} exists and is not an unchanged earlier {fmt} export "
                            f"(a folder whose {MARKER} lists every file in it): choose another "
                            "folder or remove it")


def record_folder(folder: Path, fmt: str) -> None:
    """Write the marker of a finished folder export: its format and every file it holds."""
    data = {"format": fmt, "files": sorted(_listing(folder))}
    (folder / MARKER).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def record_file(path: Path, fmt: str) -> None:
    """Write the sidecar of a finished checkpoint export: its format and sha256."""
    data = {"format": fmt, "sha256": _sha256(path)}
    sidecar(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
