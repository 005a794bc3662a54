"""Safe extraction of a corpus archive (.tar, .tar.gz, .tgz, .zip): regular files and folders
only, every member path checked, under a size and an expansion-ratio cap, into a fresh folder
that replaces the target only when complete."""

from __future__ import annotations

import errno
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from bestrq.files import CHUNK, fresh_dir, is_within, real_path

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# Every archive member costs at least one file-system block, so that millions of empty members
# count against the size cap too.
_MEMBER_COST = 4096
# No ratio is suspicious below this much output: a small archive of silence or text compresses
# far better than speech, and bombs only do harm when large.
_RATIO_FLOOR = 64 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class ArchiveError(ValueError):
    """An archive is corrupt, unsafe or too large; the message names it. Nothing of it is left
    in the target folder."""


def is_archive(name: str) -> bool:
    """Whether a file name ends in one of ARCHIVE_SUFFIXES (any case)."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


class _Extractor:
    """Writes archive members below a fresh folder: regular files and folders only, each path
    made one component at a time without following anything, under a size and a ratio cap."""

    def __init__(self, archive: Path, root: Path, max_bytes: int, max_ratio: float) -> None:
        self.archive = archive
        self.root = root
        self.real_root = real_path(root)
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
                os.mkdir(path, 0o777)  # less the umask, as mkdir does
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
        if not is_within(real_path(path), self.real_root):
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
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                self.skip(name, f"cannot create it here: {exc.strerror}")
                return
            raise RuntimeError(f"cannot extract archive {self.archive}: {exc}") from exc
        written = 0
        with open(fd, "wb") as out:
            while chunk := read(CHUNK):
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
            while chunk := tar.fileobj.read(CHUNK):
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
    except UnicodeDecodeError as exc:  # zipfile decodes a name flagged UTF-8 strictly
        raise ArchiveError(f"cannot extract archive {archive}: a member's name is flagged as "
                           f"UTF-8 but is not ({_one_line(exc)})") from exc
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
    if not is_archive(archive.name):
        raise ArchiveError(f"cannot extract {archive}: not a {', '.join(ARCHIVE_SUFFIXES)} file")
    with fresh_dir(dest) as tmp:
        ex = _Extractor(archive, tmp, max_bytes, max_ratio)
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, ex)
        else:
            _extract_tar(archive, ex)
    return ex.skipped
