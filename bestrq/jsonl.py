"""JSON-lines manifests: one object per line, errors that name the file and line; and the JSON
text every manifest and index is written with, which keeps any file name the file system
allows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bestrq.atomic import atomic_path

# A file name that is not UTF-8 reaches Python as a str whose undecodable bytes are lone
# surrogates U+DC80..U+DCFF (PEP 383); UTF-8 cannot hold them, JSON's \u escapes can.
_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` as UTF-8 text (non-ASCII kept as it is), with each lone surrogate written as
    a `\\udcXX` escape: json.loads gives back the same str, and os.fsencode the same bytes, so a
    name such as b"caf\\xe9.flac" survives a manifest unchanged."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of `path`."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write `rows` to `path` atomically, one compact JSON object per line (`dumps`)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(dumps(row) + "\n")
