"""Data stages depend on data code only, and their outputs are on disk once.

On a small committed project whose corpus has been made (`dvc repro features`): editing
training or model code leaves download, segment and features up to date in `dvc status`;
editing segment code changes segment alone, and re-running it leaves features as they were (a
comment does not change the windows). With the committed `.dvc/config` (cache.type hardlink,
symlink) every output file is its cache object, and no stage writes through the link into it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_pipeline import SMALL, make_project, run

pytestmark = pytest.mark.slow

DATA_STAGES = ("download", "segment", "features")
OUTPUTS = ("raw", "segments", "features")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed project with its small corpus made: check, download, segment, features."""
    project = make_project(tmp_path_factory.mktemp("status"), "tiny.en",
                           {"download": SMALL["download"], "segment": SMALL["segment"]})
    made = run(["dvc", "repro", "features"], project)
    assert all(f"Running stage '{s}'" in made for s in ("check", *DATA_STAGES))
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "corpus"], project)
    return project


def changed(project: Path) -> dict[str, set[str]]:
    """`dvc status --json` as stage -> the dependencies it names as changed."""
    status = json.loads(run(["dvc", "status", "--json"], project))
    out: dict[str, set[str]] = {}
    for stage, items in status.items():
        deps: set[str] = set()
        for item in items:
            if isinstance(item, dict):
                deps |= set(item.get("changed deps", {}))
        out[stage] = deps
    return out


def append_comment(path: Path) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("# an edit that changes no behaviour\n")


def cache_objects(project: Path) -> dict[tuple[int, int], Path]:
    """DVC's cached files by (device, inode), each checked to hold the bytes its name (md5)
    says: a write through a workspace link into the cache would show here."""
    objects = {}
    for path in (project / ".dvc" / "cache" / "files" / "md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".dir"):
            digest = hashlib.md5(path.read_bytes()).hexdigest()
            assert digest == path.parent.name + path.name, f"{path}: the cache object changed"
            objects[(path.stat().st_dev, path.stat().st_ino)] = path
    return objects


def test_outputs_are_their_cache_objects_not_copies(corpus):
    cached = cache_objects(corpus)
    files = [p for name in OUTPUTS for p in (corpus / "data" / name).rglob("*") if p.is_file()]
    assert len(files) > 20 and len(cached) >= len(files) - 1
    for path in files:
        info = os.stat(path)  # a symlink's target: the cache's file
        if info.st_size == 0:
            continue  # DVC writes an empty file afresh rather than linking it
        assert (info.st_dev, info.st_ino) in cached, f"{path}: a copy, not the cache's file"
        assert not info.st_mode & 0o222, f"{path}: DVC leaves linked outputs read-only"


def test_training_code_edits_leave_the_data_stages_up_to_date(corpus):
    project = corpus
    before = changed(project)
    assert not set(before) & {"check", *DATA_STAGES}, before

    for module in ("bestrq/train.py", "bestrq/model.py"):
        append_comment(project / module)
        now = changed(project)
        # The edit is seen (the check stage, which reads every config, imports it) ...
        assert module in now["check"] and module in now["pretrain"], now
        # ... and no data stage is touched by it.
        assert not set(now) & set(DATA_STAGES), (module, now)
        run(["git", "checkout", "--", module], project)

    append_comment(project / "bestrq" / "segment.py")
    now = changed(project)
    assert now["segment"] == {"bestrq/segment.py"}, now
    assert "download" not in now and "features" not in now, now
    # DVC runs segment again; its windows are the same bytes, so features is not re-run.
    again = run(["dvc", "repro", "features"], project)
    assert "Running stage 'segment'" in again
    assert "Running stage 'features'" not in again and "Running stage 'download'" not in again
    assert not set(changed(project)) & {"check", *DATA_STAGES}
    cache_objects(project)  # the re-run replaced its linked outputs, never wrote into them
