"""The download and segment stages as commands: what they print for untrusted or bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

REPO = Path(__file__).resolve().parents[1]


def _stage(project: Path, name: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def _project(tmp_path: Path, download: dict) -> Path:
    project = tmp_path / "project"
    project.mkdir()
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
