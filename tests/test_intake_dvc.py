"""`dvc repro` with a folder source: edited, added or removed audio re-runs download and segment;
a touched file or an unchanged corpus re-runs nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_pipeline import make_project, ran_stages, run

pytestmark = pytest.mark.slow


def _ran(output: str) -> list[str]:
    return [s for s in ("download", "segment") if s in ran_stages(output)]


def _clip(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * rng.standard_normal(16000)).astype(np.float32), 16000)


def test_dvc_repro_follows_a_folder_sources_audio(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for i in range(3):  # three speakers: train, dev and test need one each
        _clip(corpus / f"spk{i}" / f"u{i}.flac", seed=i)
    project = make_project(tmp_path, "tiny.en",
                           {"download": {"source": str(corpus), "watch": str(corpus)}})

    assert _ran(run(["dvc", "repro", "segment"], project)) == ["download", "segment"]
    assert _ran(run(["dvc", "repro", "segment"], project)) == []
    # Same bytes, new mtime: DVC hashes content, so nothing re-runs.
    os.utime(corpus / "spk0" / "u0.flac", ns=(10**18, 10**18))
    assert _ran(run(["dvc", "repro", "segment"], project)) == []
    # New bytes in place, an added file, a removed file: each re-runs both stages.
    _clip(corpus / "spk0" / "u0.flac", seed=99)
    assert _ran(run(["dvc", "repro", "segment"], project)) == ["download", "segment"]
    _clip(corpus / "spk1" / "u3.flac", seed=3)
    out = run(["dvc", "repro", "segment"], project)
    assert _ran(out) == ["download", "segment"]
    train = (project / "data" / "segments" / "train.jsonl").read_text()
    held_out = "".join((project / "data" / "segments" / f"{split}.jsonl").read_text()
                       for split in ("dev", "test"))
    assert "u3" in train + held_out
    (corpus / "spk1" / "u1.flac").unlink()  # spk1 keeps u3
    assert _ran(run(["dvc", "repro", "segment"], project)) == ["download", "segment"]
    manifest = (project / "data" / "raw" / "manifest.jsonl").read_text()
    assert '"u1"' not in manifest and '"u3"' in manifest
    assert not (project / "data" / "raw" / "spk0").exists()  # the corpus is not copied


def test_readmes_folder_source_command_runs_through_dvc_exp_run(tmp_path: Path) -> None:
    # README "Real data": the folder-source line, as written there, with this corpus' path.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "/data/my-recordings" in x
                and x.startswith("dvc exp run"))
    corpus = tmp_path / "corpus"
    for i in range(3):  # three speakers: train, dev and test need one each
        _clip(corpus / f"spk{i}" / f"u{i}.flac", seed=i)
    project = make_project(tmp_path, "tiny.en", {})
    cmd = line.split("#")[0].replace("/data/my-recordings", str(corpus)).split() + ["segment"]
    assert cmd[:3] == ["dvc", "exp", "run"] and cmd.count("-S") == 2, line
    out = run(cmd, project)
    assert _ran(out) == ["download", "segment"]
    manifest = (project / "data" / "raw" / "manifest.jsonl").read_text()
    assert all(f'"u{i}"' in manifest for i in range(3))
