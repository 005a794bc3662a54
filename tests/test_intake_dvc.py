"""`dvc repro` with a folder source: edited, added or removed audio re-runs download and segment;
a touched file or an unchanged corpus re-runs nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["bestrq", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config",
                 ".dvcignore", ".gitignore"]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return [s for s in ("download", "segment") if f"Running stage '{s}'" in output]


def _clip(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * rng.standard_normal(16000)).astype(np.float32), 16000)


def test_dvc_repro_follows_a_folder_sources_audio(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for i in range(3):
        _clip(corpus / "spk" / f"u{i}.flac", seed=i)
    project = tmp_path / "project"
    for name in PROJECT_FILES:
        src, dst = REPO / name, project / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["download"].update(source=str(corpus), watch=str(corpus))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)

    assert _ran(_run(["dvc", "repro", "segment"], project)) == ["download", "segment"]
    assert _ran(_run(["dvc", "repro", "segment"], project)) == []
    # Same bytes, new mtime: DVC hashes content, so nothing re-runs.
    os.utime(corpus / "spk" / "u0.flac", ns=(10**18, 10**18))
    assert _ran(_run(["dvc", "repro", "segment"], project)) == []
    # New bytes in place, an added file, a removed file: each re-runs both stages.
    _clip(corpus / "spk" / "u0.flac", seed=99)
    assert _ran(_run(["dvc", "repro", "segment"], project)) == ["download", "segment"]
    _clip(corpus / "spk" / "u3.flac", seed=3)
    out = _run(["dvc", "repro", "segment"], project)
    assert _ran(out) == ["download", "segment"]
    train = (project / "data" / "segments" / "train.jsonl").read_text()
    evals = (project / "data" / "segments" / "eval.jsonl").read_text()
    assert "u3" in train + evals
    (corpus / "spk" / "u1.flac").unlink()
    assert _ran(_run(["dvc", "repro", "segment"], project)) == ["download", "segment"]
    manifest = (project / "data" / "raw" / "manifest.jsonl").read_text()
    assert '"u1"' not in manifest and '"u3"' in manifest
    assert not (project / "data" / "raw" / "spk").exists()  # the corpus is not copied
