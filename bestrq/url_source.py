"""A source at a URL (http(s), or any scheme fsspec opens): downloaded atomically into a
cache outside the DVC output, checked against `download.checksum`, and extracted (an archive)
or installed (one audio file) into `raw_dir/download`, with `raw_dir/download.json` saying
what was fetched."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tempfile
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from bestrq.archive import ARCHIVE_SUFFIXES, ArchiveError, extract_archive, is_archive
from bestrq.atomic import atomic_write_text, file_mode, fsync_dir
from bestrq.audio import is_audio_file
from bestrq.files import CHUNK, file_digests, fresh_dir
from bestrq.folder_source import index_folder
from bestrq.jsonl import dumps
from bestrq.redact import redact

DOWNLOAD_RECORD = "download.json"  # what a URL source downloaded and how it was extracted
DOWNLOAD_DIR = "download"
_HASH_HEX_LENGTH = {"sha256": 64, "md5": 32, "sha1": 40}


class ChecksumError(RuntimeError):
    """A downloaded file does not match its expected checksum (the file has been deleted)."""


class DownloadTooLargeError(RuntimeError):
    """A download passed `download.max_download_gb` (what came so far has been deleted)."""


class UnverifiedDownloadWarning(UserWarning):
    """A URL source was used without `download.checksum`; its sha256 is in the message."""


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


def check_url_scheme(url: str) -> None:
    """ValueError unless `url`'s scheme is http(s) or one fsspec can open here."""
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


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


def _too_large(url: str, nbytes: int, max_bytes: int, announced: bool) -> DownloadTooLargeError:
    what = f"announces {nbytes} bytes" if announced else f"passed {max_bytes} bytes"
    return DownloadTooLargeError(
        f"download of {url} stopped: it {what}, more than download.max_download_gb "
        f"({max_bytes / 1e9:g} GB); nothing was kept (raise download.max_download_gb if the "
        "file is genuine)")


def _open_url(url: str) -> tuple[IO[bytes], int | None, object]:
    """A readable stream for `url`, its size when known, and the object to close afterwards."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "whisper-bestrq"})
        response = urllib.request.urlopen(request, timeout=60)
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None, response
    import fsspec

    if scheme in ("file", "local"):
        # A device or FIFO never ends (or blocks on open): only a regular file is a download.
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"download.source: {url} is not a regular file (it is "
                             f"{_file_kind(info.st_mode)}); point it at an archive or audio file")
        stream = path.open("rb")
        return stream, info.st_size, stream
    opened = fsspec.open(url, "rb")
    stream = opened.open()
    size = getattr(stream, "size", None)
    return stream, int(size) if isinstance(size, int) else None, stream


def download_file(url: str, dest: Path, checksum: str = "",
                  max_bytes: int | None = None) -> str:
    """Download `url` to `dest` atomically and return its sha256 (hex).

    The bytes go to a temporary file beside `dest`, are flushed to disk, and only then renamed
    to `dest`, so `dest` is either absent or complete. Raises ChecksumError (nothing left
    behind) when `checksum` ("sha256:<hex>", "md5:<hex>") does not match, and
    DownloadTooLargeError as soon as more than `max_bytes` are announced or have come.
    """
    algo, expected = parse_checksum(checksum) if checksum else ("sha256", "")
    dest.parent.mkdir(parents=True, exist_ok=True)
    hashers = {name: hashlib.new(name) for name in {"sha256", algo}}
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, file_mode())
        with open(fd, "wb") as out:
            written = 0
            try:
                stream, size, closer = _open_url(url)
                try:
                    if max_bytes is not None and size is not None and size > max_bytes:
                        raise _too_large(url, size, max_bytes, announced=True)
                    bar = tqdm(total=size, unit="B", unit_scale=True,
                               desc=f"download {dest.name}")
                    with bar:
                        for chunk in iter(lambda: stream.read(CHUNK), b""):
                            written += len(chunk)
                            if max_bytes is not None and written > max_bytes:
                                raise _too_large(url, written, max_bytes, announced=False)
                            out.write(chunk)
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


def url_filename(url: str) -> str:
    """The file name a URL's path ends in ("download" when it names none)."""
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


def fetch(url: str, checksum: str, cache_dir: Path, max_bytes: int | None = None) -> Download:
    """The content of `url` in `cache_dir/downloads/<url hash>/<sha256>/<file name>`.

    A copy found there is used when it matches `checksum` (or, without one, when it is intact:
    its content still has the sha256 it is filed under); otherwise `url` is downloaded, at most
    `max_bytes` of it. The cache lies outside the DVC output, so an archive is not kept beside
    its extracted copy.
    """
    algo, expected = parse_checksum(checksum) if checksum else ("sha256", "")
    filename = url_filename(url)
    url_dir = Path(cache_dir) / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]
    copies = [d / filename for d in (url_dir.iterdir() if url_dir.is_dir() else [])
              if re.fullmatch(r"[0-9a-f]{64}", d.name) and (d / filename).is_file()]
    # Newest first: without a checksum, the copy downloaded last is the one used.
    for copy in sorted(copies, key=lambda p: (-p.stat().st_mtime_ns, str(p))):
        digests = file_digests(copy, {"sha256", algo})
        if digests["sha256"] != copy.parent.name:
            shutil.rmtree(copy.parent)  # damaged: never use, download again
            continue
        if not expected or digests[algo] == expected:
            return Download(url, copy, digests["sha256"], copy.stat().st_size, checksum, True)
    incoming = url_dir / "incoming" / filename
    for stale in incoming.parent.glob(".*.part"):  # left by a killed download
        stale.unlink(missing_ok=True)
    sha256 = download_file(url, incoming, checksum, max_bytes)
    final = url_dir / sha256 / filename
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(incoming, final)
    fsync_dir(final.parent)
    (url_dir / "url.txt").write_text(redact(url) + "\n", encoding="utf-8")  # for people browsing it
    return Download(url, final, sha256, final.stat().st_size, checksum, False)


def _install_file(source: Path, dest: Path) -> None:
    """Make `dest` a folder holding a copy of `source` alone, replacing it only when done."""
    with fresh_dir(dest) as tmp:
        shutil.copyfile(source, tmp / source.name)


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def acquire_url(url: str, checksum: str, raw_dir: Path, cache_dir: Path, max_extract_gb: float,
                max_ratio: float, max_download_gb: float | None = None,
                ) -> tuple[list[dict], list[dict], dict[str, float | str]]:
    """Fetch `url` (through the cache; at most `max_download_gb`, by default `max_extract_gb`),
    extract it into `raw_dir/download` when it is an archive (skipped when that exact archive
    is already extracted there under the same caps), record what was fetched in
    `raw_dir/download.json`, and index the result: entries, what was left aside, and the
    download's stats."""
    filename = url_filename(url)
    if not is_archive(filename) and not is_audio_file(filename):
        raise ValueError(
            f"download.source: {url} is neither an archive ({', '.join(ARCHIVE_SUFFIXES)}) "
            "nor an audio file"
        )
    download_gb = max_extract_gb if max_download_gb is None else max_download_gb
    got = fetch(url, checksum, cache_dir, int(download_gb * 1e9))
    if not got.verified:
        warnings.warn(UnverifiedDownloadWarning(
            f"no download.checksum for {url}: what was downloaded has sha256:{got.sha256}; "
            f"set download.checksum: sha256:{got.sha256} to make sure later runs use the same "
            "bytes"), stacklevel=3)
    max_bytes = int(max_extract_gb * 1e9)
    record: dict[str, Any] = {
        "url": redact(url), "file": filename, "size": got.size, "sha256": got.sha256,
        "checksum": checksum or None, "max_extract_bytes": max_bytes,
        "max_ratio": max_ratio,
    }
    record_path = raw_dir / DOWNLOAD_RECORD
    download_dir = raw_dir / DOWNLOAD_DIR
    previous = _read_record(record_path)
    # Extracting a multi-GB archive is slow: skip it when this archive was extracted (under
    # the same limits) into the folder that is there.
    if download_dir.is_dir() and {k: previous.get(k) for k in record} == record:
        members = previous.get("skipped_members", [])
    elif is_archive(filename):
        try:
            members = extract_archive(got.path, download_dir, max_bytes, max_ratio)
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
    atomic_write_text(record_path, dumps({**record, "skipped_members": members}, indent=2) + "\n")
    entries, skipped = index_folder(download_dir, raw_dir)
    stats: dict[str, float | str] = {"download_sha256": got.sha256,
                                     "download_bytes": got.size,
                                     "download_verified": int(got.verified)}
    return entries, [*members, *skipped], stats
