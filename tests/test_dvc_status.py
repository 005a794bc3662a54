"""Data stages depend on data code only: on a small committed project whose corpus has been
made (`dvc repro features`), editing training or model code leaves download, segment and
features up to date in `dvc status`; editing segment code changes segment alone, and re-running
it leaves features as they were (a comment does not change the windows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import SMALL, make_project, run

pytestmark = pytest.mark.slow

DATA_STAGES = ("download", "segment", "features")


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


def test_training_code_edits_leave_the_data_stages_up_to_date(tmp_path):
    project = make_project(tmp_path, "tiny.en", {"download": SMALL["download"],
                                                 "segment": SMALL["segment"]})
    made = run(["dvc", "repro", "features"], project)
    assert all(f"Running stage '{s}'" in made for s in ("check", *DATA_STAGES))
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "corpus"], project)
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
