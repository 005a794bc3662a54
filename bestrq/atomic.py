"""Files written so that a reader (a resumed run, DVC, a later stage) sees the old file or the
whole new one, never a part: a temporary file of a unique name beside the target, fsynced, then
renamed over it, and the rename itself made durable. Two writers never share a temporary."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's umask: read from /proc where it says, without the race of setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open` gives a new file (0666 less the umask): mkstemp's 0600 would hide it
    from the group and others the user shares the project with."""
    return 0o666 & ~umask()


def apply_file_mode(path: Path) -> None:
    """Give the file `path` the mode `open` would have (`file_mode`): a writer that makes its
    file through a temporary of its own and a rename (safetensors' save_file does) leaves
    mkstemp's 0600."""
    os.chmod(path, file_mode())


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path, prefix: str | None = None) -> Iterator[Path]:
    """A temporary path beside `final` for the block to write (by any means); on a clean exit
    it is given the umask's mode, fsynced and renamed over `final`, on an error removed.
    `prefix` names the temporary (default `.<name>.`), e.g. so that a cleaner can find
    leftovers."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix or f".{final.name}.", suffix=".part",
                                dir=final.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        # After the block: whatever wrote the file may have replaced it (safetensors does).
        apply_file_mode(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_write_text(path: Path, text: str, prefix: str | None = None) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path, prefix) as tmp:
        tmp.write_text(text, encoding="utf-8")
