"""The download and segment stages as commands: what they print for untrusted or bad input."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

REPO = Path(__file__).resolve().parents[1]


def _stage(project: Path, name: str, env: dict[str, str] | None = None, timeout: float = 600
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _project(tmp_path: Path, download: dict) -> Path:
    project = tmp_path / "project"
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump({"download": download}))
    return project


def _tarball(path: Path, tmp_path: Path) -> str:
    audio = tmp_path / "one.flac"
    sf.write(audio, 0.1 * np.ones(8000, np.float32), 16000)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(audio, arcname="corpus/one.flac")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_archive_ends_in_one_line_naming_it(tmp_path: Path) -> None:
    archive = tmp_path / "corpus.tar.gz"
    _tarball(archive, tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    project = _project(tmp_path, {"source": f"file://{archive}"})
    run = _stage(project, "download")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "Aborted" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error: cannot extract archive data/cache/downloads/"
        f"{hashlib.sha256(f'file://{archive}'.encode()).hexdigest()[:16]}/"
        f"{hashlib.sha256(archive.read_bytes()).hexdigest()}/corpus.tar.gz: it is corrupt or "
        "truncated (EOFError: Compressed file ended before the end-of-stream marker was "
        f"reached) (downloaded from file://{archive}; the copy was removed from the download "
        "cache)"]
    assert not (project / "data" / "raw" / "download").exists()


def test_unverified_url_is_warned_about_and_its_sha256_recorded(tmp_path: Path) -> None:
    archive = tmp_path / "corpus.tar.gz"
    digest = _tarball(archive, tmp_path)
    url = f"file://{archive}"
    project = _project(tmp_path, {"source": url})
    shared = tmp_path / "shared-cache"
    run = _stage(project, "download", {"BESTRQ_CACHE_DIR": str(shared)})
    assert run.returncode == 0, run.stderr
    assert f"warning: no download.checksum for {url}: what was downloaded has sha256:{digest}" \
        in run.stderr
    assert f"downloaded {url}: sha256:{digest} ({archive.stat().st_size} bytes, NOT verified)" \
        in run.stdout
    metrics = json.loads((project / "dvclive" / "download" / "metrics.json").read_text())
    assert metrics["download_sha256"] == digest and metrics["download_verified"] == 0
    assert metrics["num_files"] == 1
    record = json.loads((project / "data" / "raw" / "download.json").read_text())
    assert record["sha256"] == digest and record["checksum"] is None
    # The archive is in the cache named by BESTRQ_CACHE_DIR, not in the DVC output.
    assert [p.name for p in shared.rglob("*.tar.gz")] == ["corpus.tar.gz"]
    assert not list((project / "data").rglob("*.tar.gz"))

    (project / "params.yaml").write_text(yaml.safe_dump(
        {"download": {"source": url, "checksum": f"sha256:{digest}"}}))
    run = _stage(project, "download", {"BESTRQ_CACHE_DIR": str(shared)})
    assert run.returncode == 0 and "warning" not in run.stderr
    assert f"sha256:{digest} ({archive.stat().st_size} bytes, verified)" in run.stdout


def test_folder_source_needs_watch(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(corpus / "a.flac", 0.1 * np.ones(16000, np.float32), 16000)
    project = _project(tmp_path, {"source": str(corpus)})
    run = _stage(project, "download")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: download.watch: is 'stages/download.py', which does not hold the audio of "
        f"download.source; set it to {corpus} so that `dvc repro` re-runs download")
    assert not (project / "data" / "raw" / "manifest.jsonl").exists()


def test_odd_corpus_through_both_stages(tmp_path: Path) -> None:
    from tests.test_intake_corpus import EXPECTED, _build

    corpus = tmp_path / "corpus"
    _build(corpus, tmp_path / "elsewhere")
    project = _project(tmp_path, {"source": str(corpus), "watch": str(corpus)})
    download = _stage(project, "download")
    assert download.returncode == 0, download.stderr
    assert "7 file(s), archive member(s) or transcript line(s) left aside" in download.stderr
    segment = _stage(project, "segment")
    assert segment.returncode == 0, segment.stderr
    assert "10 file(s) gave no window" in segment.stderr
    listed = [json.loads(line) for line in
              (project / "data" / "segments" / "skipped.jsonl").read_text().splitlines()]
    named = {Path(r["path"]).relative_to(corpus).as_posix() for r in listed}
    assert named == {n for n, want in EXPECTED.items() if want not in ("window", "transcript")} \
        | {"26/495/26-495.trans.txt"}  # its line for a missing file
    # A name that is not UTF-8 reaches the features' index as the same bytes.
    features = _stage(project, "features")
    assert features.returncode == 0, features.stderr
    ids = [i for split in ("train", "dev", "test") for i in json.loads(
        (project / "data" / "features" / split / "index.json").read_text("utf-8"))["ids"]]
    windows = [json.loads(line) for split in ("train", "dev", "test") for line in
               (project / "data" / "segments" / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(w["id"] for w in windows)
    assert len([w for w in windows if "caf\udce9" in w["sources"]]) == 1
    manifest = [json.loads(line) for line in
                (project / "data" / "raw" / "manifest.jsonl").read_text("utf-8").splitlines()]
    (cafe,) = [e for e in manifest if e["id"] == "caf\udce9"]
    assert os.fsencode(cafe["path"]) == os.fsencode(corpus) + b"/caf\xe9.flac"


# --- every download is bounded (download.max_download_gb) ---------------------------------


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture()
def endless_http() -> Iterator[tuple[str, list[int]]]:
    """A server on 127.0.0.1: /endless.flac streams zeros without a Content-Length until the
    client hangs up (at most 1 GB); /big.flac announces 5,000,000 bytes. Yields the base URL
    and the bytes each /endless response got out."""
    sent: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            if self.path == "/big.flac":
                self.send_header("Content-Length", "5000000")
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(b"\0" * 5_000_000)
                return
            self.end_headers()  # HTTP/1.0 without a length: the body ends when the server closes
            total = 0
            try:
                while total < 10**9:
                    self.wfile.write(b"\0" * 65536)
                    total += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass
            sent.append(total)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sent
    finally:
        server.shutdown()
        server.server_close()


def _one_error(run: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_link_to_a_device_or_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    around = tmp_path / "around"
    around.mkdir()
    (around / "keep.txt").write_text("mine")
    (around / "zero.flac").symlink_to("/dev/zero")
    os.mkfifo(around / "pipe.flac")
    before = _tree_digest(around)
    for name, kind in (("zero.flac", "a character device"), ("pipe.flac", "a FIFO")):
        url = f"file://{around / name}"
        project = _project(tmp_path / name, {"source": url, "max_download_gb": 0.01})
        run = _stage(project, "download", timeout=60)  # a FIFO opened for reading would hang
        assert run.returncode == 1
        assert _one_error(run) == (
            f"error: download.source: {url} is not a regular file (it is {kind}); point it at "
            "an archive or audio file")
        assert _files_under(project / "data") == []
    assert _tree_digest(around) == before


def test_a_stream_without_a_length_stops_at_max_download_gb(
        tmp_path: Path, endless_http: tuple[str, list[int]]) -> None:
    base, sent = endless_http
    project = _project(tmp_path, {"source": f"{base}/endless.flac", "max_download_gb": 0.002})
    run = _stage(project, "download", timeout=120)
    assert run.returncode == 1
    assert _one_error(run) == (
        f"error: download of {base}/endless.flac stopped: it passed 2000000 bytes, more than "
        "download.max_download_gb (0.002 GB); nothing was kept (raise "
        "download.max_download_gb if the file is genuine)")
    assert _files_under(project / "data") == []  # neither the cache's .part nor any output
    # The client hung up soon after the cap (the server's socket buffers hold a few MB more).
    deadline = time.time() + 10
    while not sent and time.time() < deadline:
        time.sleep(0.05)
    assert sent and sent[0] < 100 * 10**6


def test_an_announced_length_over_max_download_gb_is_refused_before_streaming(
        tmp_path: Path, endless_http: tuple[str, list[int]]) -> None:
    base, _ = endless_http
    archive = tmp_path / "corpus.tar.gz"
    archive.write_bytes(os.urandom(50_000))  # refused before a byte is read: any content does
    for url in (f"{base}/big.flac", f"file://{archive}"):
        project = _project(tmp_path / str(len(url)), {"source": url, "max_download_gb": 1e-6})
        run = _stage(project, "download", timeout=120)
        size = 5_000_000 if url.startswith("http") else archive.stat().st_size
        assert run.returncode == 1
        assert _one_error(run).startswith(
            f"error: download of {url} stopped: it announces {size} bytes, more than "
            "download.max_download_gb (1e-06 GB); nothing was kept")
        assert _files_under(project / "data") == []
    # By default the cap is max_extract_gb's: the same archive under a 1 kB extraction cap.
    project = _project(tmp_path / "default", {"source": f"file://{archive}",
                                              "max_extract_gb": 1e-6})
    run = _stage(project, "download", timeout=120)
    assert f"announces {archive.stat().st_size} bytes" in _one_error(run)


def test_a_stopped_download_leaves_no_partial_file(
        tmp_path: Path, endless_http: tuple[str, list[int]]) -> None:
    base, _ = endless_http
    project = _project(tmp_path, {"source": f"{base}/endless.flac"})
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.download"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        parts: list[Path] = []
        while time.time() < deadline and not any(p.stat().st_size > 10**6 for p in parts):
            time.sleep(0.1)
            parts = list((project / "data").rglob("*.part"))
        assert parts, "the download never started"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert list((project / "data").rglob("*.part")) == []


def test_a_password_in_the_url_is_never_printed_or_recorded(tmp_path: Path) -> None:
    url = "http://bob:s3cret@127.0.0.1:9/corpus.tar.gz"  # port 9 (discard): refused here
    project = _project(tmp_path, {"source": url})
    run = _stage(project, "download", timeout=120)
    assert run.returncode == 1
    assert _one_error(run).startswith(
        "error: download of http://bob:***@127.0.0.1:9/corpus.tar.gz failed: ")
    assert "s3cret" not in run.stdout + run.stderr
    for path in (project / "data").rglob("*"):
        assert not path.is_file() or b"s3cret" not in path.read_bytes(), path
    # The params check, before any work, prints through the same redaction.
    url = "gopher2://bob:s3cret@127.0.0.1/corpus.tar.gz"
    (project / "params.yaml").write_text(yaml.safe_dump({"download": {"source": url}}))
    run = _stage(project, "download", timeout=120)
    assert run.returncode == 2
    assert "error (download): " in run.stderr and "bob:***@127.0.0.1" in run.stderr
    assert "s3cret" not in run.stdout + run.stderr
