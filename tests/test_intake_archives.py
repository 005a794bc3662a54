"""Untrusted archives: link chains (CVE-2025-4517), hard links, absolute and `../` names,
devices, zip slip, bombs and corrupt files. Nothing may be written outside the target."""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bestrq.sources import ArchiveError, extract_archive


def _tree(root: Path) -> dict[str, bytes | str]:
    """Everything under root (links not followed): file bytes, link targets, "dir"."""
    out: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


@pytest.fixture()
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(target, outside): extraction goes to target; outside holds a file an attack would
    overwrite. After the test, nothing outside the target may have changed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    target = tmp_path / "work" / "target"
    target.parent.mkdir()
    before = _tree(tmp_path)

    def outside_target(tree: dict[str, bytes | str]) -> dict[str, bytes | str]:
        return {k: v for k, v in tree.items()
                if k.split("/")[0] != "archives" and not (k + "/").startswith("work/target/")}

    yield target, outside
    assert outside_target(_tree(tmp_path)) == outside_target(before), \
        "something outside the target changed"


def _archive(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "archives"
    folder.mkdir(exist_ok=True)
    return folder / name


def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
         linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _cve_2025_4517(archive: Path, up_to_outside: str) -> None:
    """The public proof of concept's shape: nested folders with long names and links to them,
    so that realpath overflows PATH_MAX and stops resolving; a link made through that chain
    points out of the target, and a file is written through it."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    with tarfile.open(archive, "w") as tar:
        path = ""
        for step in steps:
            _add(tar, os.path.join(path, comp), tarfile.DIRTYPE)
            _add(tar, os.path.join(path, step), tarfile.SYMTYPE, linkname=comp)
            path = os.path.join(path, comp)
        linkpath = os.path.join("/".join(steps), "l" * 254)
        _add(tar, linkpath, tarfile.SYMTYPE, linkname="../" * len(steps))
        _add(tar, "escape", tarfile.SYMTYPE, linkname=f"{linkpath}/{up_to_outside}")
        _add(tar, "escape/evil.flac", data=b"pwned")
        _add(tar, "escape/victim.txt", data=b"overwritten")


@pytest.mark.skipif(sys.version_info >= (3, 11, 13) or sys.platform != "linux",
                    reason="Python's tarfile has the CVE-2025-4517 fix from 3.11.13 on")
def test_the_link_chain_archive_defeats_tarfiles_data_filter_here(tmp_path: Path) -> None:
    # The attack is real on this Python: the standard library's "data" filter lets it out.
    archive = _archive(tmp_path, "cve.tar")
    _cve_2025_4517(archive, "../../outside")
    (tmp_path / "outside").mkdir()
    target = tmp_path / "work" / "target"
    target.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    assert (tmp_path / "outside" / "evil.flac").read_bytes() == b"pwned"


def test_link_chain_cve_2025_4517_writes_nothing_outside(tmp_path: Path, sandbox) -> None:
    target, outside = sandbox
    archive = _archive(tmp_path, "cve.tar")
    _cve_2025_4517(archive, "../../outside")
    skipped = extract_archive(archive, target)
    assert not (outside / "evil.flac").exists()
    assert (outside / "victim.txt").read_text() == "precious"
    # The links are left out; the files meant to go through one land in a real folder.
    assert (target / "escape" / "evil.flac").read_bytes() == b"pwned"
    assert (target / "escape" / "victim.txt").read_bytes() == b"overwritten"
    assert not [p for p in target.rglob("*") if p.is_symlink()]
    links = [s["path"] for s in skipped if s["reason"].startswith("symbolic link")]
    assert links[-2:] == [os.path.join("/".join("abcdefghijklmnop"), "l" * 254), "escape"]
    assert len(links) == 18


def test_hard_links_out_are_not_made(tmp_path: Path, sandbox) -> None:
    target, outside = sandbox
    archive = _archive(tmp_path, "hard.tar")
    with tarfile.open(archive, "w") as tar:
        _add(tar, "abs", tarfile.LNKTYPE, linkname=str(outside / "victim.txt"))
        _add(tar, "rel", tarfile.LNKTYPE, linkname="../../outside/victim.txt")
        _add(tar, "abs", data=b"overwritten")  # writes through the link if it was made
        _add(tar, "rel", data=b"overwritten")
    skipped = extract_archive(archive, target)
    assert (outside / "victim.txt").read_text() == "precious"
    assert [(s["path"], s["reason"]) for s in skipped] == [
        ("abs", f"hard link (to {str(outside / 'victim.txt')!r}): not extracted"),
        ("rel", "hard link (to '../../outside/victim.txt'): not extracted")]
    assert _tree(target) == {"abs": b"overwritten", "rel": b"overwritten"}
    assert os.stat(target / "abs").st_nlink == 1


@pytest.mark.parametrize("name, why", [
    ("/ABS/evil.flac", "has an absolute path"),
    ("../../outside/evil.flac", "escapes the target"),
    ("ok/../../../outside/evil.flac", "escapes the target"),
    ("..\\..\\outside\\evil.flac", "escapes the target"),
])
def test_absolute_and_climbing_names_refuse_the_archive(tmp_path: Path, sandbox, name: str,
                                                         why: str) -> None:
    target, outside = sandbox
    name = name.replace("/ABS", str(outside))
    for kind in ("tar", "zip"):
        archive = _archive(tmp_path, f"evil.{kind}")
        if kind == "tar":
            with tarfile.open(archive, "w") as tar:
                _add(tar, "fine.flac", data=b"ok")
                _add(tar, name, data=b"pwned")
        else:
            with zipfile.ZipFile(archive, "w") as zf:
                zf.writestr("fine.flac", b"ok")
                zf.writestr(zipfile.ZipInfo(name), b"pwned")  # ZipInfo keeps the name as is
        with pytest.raises(ArchiveError, match=f"unsafe archive {archive}: member .* {why}"):
            extract_archive(archive, target)
        assert not target.exists()  # nothing, not even the members before the bad one
        assert not (outside / "evil.flac").exists()


def test_devices_pipes_and_links_are_skipped_and_listed(tmp_path: Path, sandbox) -> None:
    target, _ = sandbox
    archive = _archive(tmp_path, "dev.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        _add(tar, "corpus", tarfile.DIRTYPE)
        info = tarfile.TarInfo("corpus/null")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(info)
        info = tarfile.TarInfo("corpus/disk")
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(info)
        _add(tar, "corpus/pipe", tarfile.FIFOTYPE)
        _add(tar, "corpus/up", tarfile.SYMTYPE, linkname="..")
        _add(tar, "corpus/a.flac", data=b"audio")
    skipped = extract_archive(archive, target)
    assert [(s["path"], s["reason"], s["archive"]) for s in skipped] == [
        ("corpus/null", "device file: not extracted", "dev.tar.gz"),
        ("corpus/disk", "device file: not extracted", "dev.tar.gz"),
        ("corpus/pipe", "named pipe: not extracted", "dev.tar.gz"),
        ("corpus/up", "symbolic link (to '..'): not extracted", "dev.tar.gz")]
    assert _tree(target) == {"corpus": "dir", "corpus/a.flac": b"audio"}
    assert stat.S_ISREG(os.lstat(target / "corpus" / "a.flac").st_mode)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_zip_slip_and_zip_links(tmp_path: Path, sandbox) -> None:
    target, outside = sandbox
    good = _archive(tmp_path, "good.zip")
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("a/b.txt", "hello")
        link = zipfile.ZipInfo("a/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "../../../outside/victim.txt")
        zf.writestr("a/link", "not through the link")  # a later member of the same name
    skipped = extract_archive(good, target)
    assert [(s["path"], s["reason"]) for s in skipped] == [("a/link",
                                                            "symbolic link: not extracted")]
    assert _tree(target) == {"a": "dir", "a/b.txt": b"hello", "a/link": b"not through the link"}
    evil = _archive(tmp_path, "evil.zip")
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escaped.txt", "boom")
    with pytest.raises(ArchiveError, match="escapes the target"):
        extract_archive(evil, target)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "work" / "escaped.txt"
                                                            ).exists()
    assert _tree(target)["a/b.txt"] == b"hello"  # the earlier extraction is untouched


class _Zeros(io.RawIOBase):
    """`size` zero bytes, without holding them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


BOMB = 80 << 20  # above the 64 MiB below which no ratio is judged


def test_high_ratio_bombs_are_refused_before_writing(tmp_path: Path, sandbox) -> None:
    target, _ = sandbox
    tgz = _archive(tmp_path, "bomb.tar.gz")
    with gzip.open(tgz, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo("zeros.wav")
        info.size = BOMB
        tar.addfile(info, _Zeros(BOMB))
    zipped = _archive(tmp_path, "bomb.zip")
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf, \
            zf.open("zeros.wav", "w") as member:
        for _ in range(BOMB >> 20):
            member.write(bytes(1 << 20))
    for archive in (tgz, zipped):
        assert archive.stat().st_size < BOMB / 500
        with pytest.raises(ArchiveError, match=rf"archive {archive} expands to more than 100 "
                                               r"times its size \(download\.max_ratio\), "
                                               r"reached at member 'zeros.wav'"):
            extract_archive(archive, target)
        assert not target.exists()
        assert not list(target.parent.iterdir())  # no temporary folder left either
    # A genuine archive of that ratio goes through with a higher limit.
    extract_archive(tgz, target, max_ratio=10_000)
    assert (target / "zeros.wav").stat().st_size == BOMB


def test_size_cap_counts_every_member(tmp_path: Path, sandbox) -> None:
    target, _ = sandbox
    archive = _archive(tmp_path, "many.tar")
    with tarfile.open(archive, "w") as tar:
        for i in range(200):  # empty files still cost a block each
            _add(tar, f"f{i:03d}.txt")
    with pytest.raises(ArchiveError, match=r"extracts to more than 0\.0005 GB "
                                           r"\(download\.max_extract_gb\), reached at member "
                                           r"'f122.txt'"):
        extract_archive(archive, target, max_bytes=500_000)
    assert not target.exists()
    assert len(extract_archive(archive, target, max_bytes=10**6)) == 0
    assert len(list(target.iterdir())) == 200


def _corrupt_archives(tmp_path: Path) -> dict[str, Path]:
    payload = os.urandom(300_000)  # incompressible: a cut lands inside the member's data
    made: dict[str, Path] = {}
    tgz = _archive(tmp_path, "good.tar.gz")
    with tarfile.open(tgz, "w:gz") as tar:
        _add(tar, "a.flac", data=payload)
        _add(tar, "b.flac", data=payload)
    data = tgz.read_bytes()
    made["truncated.tar.gz"] = _archive(tmp_path, "truncated.tar.gz")
    made["truncated.tar.gz"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    made["flipped.tar.gz"] = _archive(tmp_path, "flipped.tar.gz")
    made["flipped.tar.gz"].write_bytes(bytes(flipped))
    made["html.tar.gz"] = _archive(tmp_path, "html.tar.gz")
    made["html.tar.gz"].write_text("<html>404 not found</html>")
    plain = _archive(tmp_path, "plain.tar")
    with tarfile.open(plain, "w") as tar:
        _add(tar, "a.flac", data=payload)
        _add(tar, "b.flac", data=payload)
    data = plain.read_bytes()
    made["cut-in-member.tar"] = _archive(tmp_path, "cut-in-member.tar")
    made["cut-in-member.tar"].write_bytes(data[:100_000])
    made["cut-at-member.tar"] = _archive(tmp_path, "cut-at-member.tar")
    made["cut-at-member.tar"].write_bytes(data[: 512 + 300_032])  # just the first member
    damaged = bytearray(data)
    damaged[512 + 300_032 + 150] ^= 0xFF  # the second header's checksum: tarfile stops quietly
    made["bad-second-header.tar"] = _archive(tmp_path, "bad-second-header.tar")
    made["bad-second-header.tar"].write_bytes(bytes(damaged))
    zipped = _archive(tmp_path, "good.zip")
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.flac", payload)
    data = zipped.read_bytes()
    made["truncated.zip"] = _archive(tmp_path, "truncated.zip")
    made["truncated.zip"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[1000] ^= 0xFF
    made["flipped.zip"] = _archive(tmp_path, "flipped.zip")
    made["flipped.zip"].write_bytes(bytes(flipped))
    made["empty.zip"] = _archive(tmp_path, "empty.zip")
    made["empty.zip"].write_bytes(b"")
    return made


def test_corrupt_archives_fail_in_one_line_naming_them(tmp_path: Path, sandbox) -> None:
    target, _ = sandbox
    target.mkdir(parents=True)
    (target / "old.flac").write_bytes(b"earlier extraction")
    for name, archive in _corrupt_archives(tmp_path).items():
        kind = "zip file" if name.endswith(".zip") else "tar"
        with pytest.raises(ArchiveError) as err:
            extract_archive(archive, target)
        message = str(err.value)
        assert message.startswith(f"cannot extract archive {archive}: "), message
        assert "corrupt or truncated" in message or "not a readable zip file" in message, kind
        assert "\n" not in message
        # The earlier extraction is still whole, with nothing half-written beside it.
        assert _tree(target) == {"old.flac": b"earlier extraction"}, name
        assert sorted(p.name for p in target.parent.iterdir()) == ["target"], name


def test_a_latin1_tar_member_name_is_extracted_as_its_bytes(tmp_path: Path, sandbox) -> None:
    target, _ = sandbox
    archive = _archive(tmp_path, "names.tar")
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        _add(tar, "corpus/café.flac", data=b"fLaC-not-really")  # stored as b"caf\xe9.flac"
    assert b"caf\xe9.flac" in archive.read_bytes()
    assert extract_archive(archive, target) == []
    assert os.listdir(os.fsencode(target / "corpus")) == [b"caf\xe9.flac"]
    assert (target / "corpus" / "caf\udce9.flac").read_bytes() == b"fLaC-not-really"


def test_a_zip_name_flagged_utf8_but_not_is_one_error_naming_the_archive(
        tmp_path: Path, sandbox) -> None:
    target, _ = sandbox
    archive = _archive(tmp_path, "names.zip")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("corpus/cafX.flac", b"data")
    # Flag the name as UTF-8 (bit 11) and make it latin-1, in both headers.
    raw = archive.read_bytes().replace(b"cafX", b"caf\xe9")
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw = bytearray(raw)
    raw[local + 7] |= 0x08
    raw[central + 9] |= 0x08
    archive.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError) as err:
        extract_archive(archive, target)
    assert str(err.value).startswith(f"cannot extract archive {archive}: a member's name is "
                                     "flagged as UTF-8 but is not (UnicodeDecodeError: 'utf-8' "
                                     "codec can't decode byte 0xe9")
    assert not target.exists()
