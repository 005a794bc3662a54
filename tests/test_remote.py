"""Data and adapters move between machines through a DVC remote: after `dvc repro` and
`dvc push`, a fresh `git clone` and `dvc pull` hold the same bytes and are up to date."""

from __future__ import annotations

import pytest
from test_pipeline import SMALL, file_digests, make_project, run

from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint

pytestmark = pytest.mark.slow

# Every cached output of dvc.yaml: what `dvc push` sends.
OUTPUTS = ("raw", "segments", "features", "adapters", "finetune")


def test_clone_and_pull_restore_the_pipeline_outputs(tmp_path):
    ckpt = tmp_path / "random-whisper.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), ckpt)
    project = make_project(tmp_path, str(ckpt), SMALL)
    remote = tmp_path / "remote"  # a local folder remote; s3://, ssh://, ... work the same way
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], project)
    run(["dvc", "repro"], project)
    run(["dvc", "push"], project)
    # What git carries: dvc.lock, the remote's address in .dvc/config, the DVCLive metrics.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "pipeline run"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data" / "features").exists()
    run(["dvc", "pull"], clone)
    for name in OUTPUTS:
        pulled = file_digests(clone / "data" / name)
        assert pulled, name
        assert pulled == file_digests(project / "data" / name), name  # sha256 of every file
    assert {"adapter.safetensors", "adapter-only.safetensors"} <= set(file_digests(clone / "data" /
                                                                          "adapters"))
    # The checkpoint folders are not outputs (scratch state for resuming, never pushed): their
    # absence must not make DVC train again on the clone.
    assert not (clone / "data" / "checkpoints").exists()
    assert "Data and pipelines are up to date." in run(["dvc", "status"], clone)
    dry = run(["dvc", "repro", "--dry"], clone)
    assert "Running stage" not in dry and "Stage 'pretrain' didn't change, skipping" in dry
