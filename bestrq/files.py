"""Small file-system helpers the sources share: where a path really is, whether it lies
below another, removing a file or a tree, filling a fresh folder that replaces another only
when complete, and digests."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bestrq.atomic import fsync_dir, umask

CHUNK = 1 << 20  # bytes read or written at a time


def real_path(path: Path) -> Path:
    """`path` with every link resolved."""
    return Path(os.path.realpath(path))


def is_within(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or below it, as written (resolve both to compare places)."""
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def remove_path(path: Path) -> None:
    """Remove a file, a link (never what it leads to) or a folder tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def replace_dir(new: Path, dest: Path) -> None:
    """Put the complete folder `new` at `dest`; the old `dest`, if any, is removed after."""
    old = None
    if os.path.lexists(dest):
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{new.name}")
        os.replace(dest, old)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    if old is not None:
        remove_path(old)


@contextmanager
def fresh_dir(dest: Path) -> Iterator[Path]:
    """A new empty folder beside `dest` for the block to fill; on a clean exit it replaces
    `dest` (`replace_dir`), on any error it is removed and `dest` is as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extracting-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the corpus from the group
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_digests(path: Path, algos: Iterable[str]) -> dict[str, str]:
    """Hex digests of a file by each of `algos` (hashlib names), read once."""
    hashers = {algo: hashlib.new(algo) for algo in algos}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashers.items()}
