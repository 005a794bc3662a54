"""A parameter sweep through DVC's queue: `dvc exp run --queue -S num_codebooks=1,4` then
`dvc queue start` runs each value in a temporary workspace of its own; `dvc exp show` and
`dvc plots diff` (the README's commands) show their metrics and curves side by side."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path

import pytest
from test_pipeline import SMALL, exp_metrics_from, make_project, run

from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint

pytestmark = pytest.mark.slow

# README "Sweeps": the columns that answer "which value is better", the rest dropped.
KEEP = r"Experiment|num_codebooks|test\.\w+$"  # README's line: test's top-level numbers


def wait_for_queue(project: Path, timeout: float = 900) -> str:
    """`dvc queue status` once no task is queued or running (dvc has no `queue wait`)."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], project)
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        if time.monotonic() > deadline:
            run(["dvc", "queue", "stop", "--kill"], project)
            pytest.fail(f"the queue did not finish in {timeout:.0f} s:\n{status}")
        time.sleep(5)


def test_queued_sweep_runs_every_value_and_shows_them_side_by_side(tmp_path):
    ckpt = tmp_path / "random-whisper.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), ckpt)
    project = make_project(tmp_path, str(ckpt), {**SMALL, "finetune": {
        **SMALL["finetune"], "max_steps": 1}})
    # The data stages run and are committed once: each queued experiment starts from this
    # commit and checks its features out of the cache instead of making them again.
    run(["dvc", "repro", "features"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "features"], project)

    queued = run(["dvc", "exp", "run", "--queue", "-S", "num_codebooks=1,4"], project)
    assert queued.count("Queued experiment") == 2, queued
    run(["dvc", "queue", "start", "-j", "1"], project)
    status = wait_for_queue(project)
    assert status.count("Success") == 2, status
    # The sweep ran in temporary workspaces: this one has no adapter of either run.
    assert not (project / "data" / "adapters").exists()

    shown = run(["dvc", "exp", "show", "--json"], project)
    runs = {}
    for data in exp_metrics_from(json.loads(shown[shown.find("["):])):
        # The baseline commit has no report (an error entry in place of data).
        if "data" in data["metrics"].get("dvclive/report/metrics.json", {}):
            # Each run's commit holds every stage's numbers beside the report's answer.
            found = {stage: json.loads(run(["git", "show", f"{data['rev']}:dvclive/{stage}/"
                                                           "metrics.json"], project))
                     for stage in ("pretrain", "evaluate", "finetune")}
            found["report"] = data["metrics"]["dvclive/report/metrics.json"]["data"]
            runs[data["params"]["params.yaml"]["data"]["num_codebooks"]] = found
    assert set(runs) == {1, 4}
    for codebooks, found in runs.items():
        assert found["pretrain"]["steps"] == 2
        # USM's multi-softmax reports one accuracy per codebook.
        accuracies = {f"accuracy_cb{i}" for i in range(codebooks)} if codebooks > 1 else set()
        assert {"loss", "accuracy", *accuracies} <= set(found["pretrain"]["train"])
        report, evaluation = found["report"]["test"], found["evaluate"]["test"]
        assert report["heldout"]["loss"] == pytest.approx(evaluation["adapted"]["loss"],
                                                          abs=1e-4)
        assert report["heldout"]["prior_loss"] == pytest.approx(evaluation["prior"]["loss"],
                                                                abs=1e-4)
        delta = found["finetune"]["test"]["delta"]
        assert delta["wer_low"] <= delta["wer"] <= delta["wer_high"]
        assert report["ft_diff"] == pytest.approx(100 * delta["wer"], abs=0.006)
    assert runs[1]["evaluate"]["test"]["adapted"]["loss"] != \
        runs[4]["evaluate"]["test"]["adapted"]["loss"]

    # README's table: one row per run, the chosen columns only, best fine-tuned difference
    # first.
    table = run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", KEEP, "--sort-by",
                 "test.ft_diff", "--sort-order", "asc"], project)
    rows = [r for r in csv.DictReader(io.StringIO(table[table.find("Experiment"):]))
            if r["test.ft_diff"] != "!"]  # "!": the baseline has no such metric
    assert {"test.stock", "test.ft_bestrq", "test.ft_diff", "test.ft_low",
            "num_codebooks"} <= set(rows[0])
    assert len(rows) == 2 and "seed" not in rows[0] and "dev.stock" not in rows[0]
    assert "test.wer_low.stock" not in rows[0]  # the details stay out
    gaps = [float(r["test.ft_diff"]) for r in rows]
    assert gaps == sorted(gaps)
    assert {int(r["num_codebooks"]) for r in rows} == {1, 4}

    # README's curves: every pretrain curve of every run of the sweep, one series per run.
    names = run(["dvc", "exp", "list", "--name-only"], project).split()
    assert len(names) == 2
    plots = run(["dvc", "plots", "diff", *names, "--json", "--targets",
                 "dvclive/pretrain/plots/metrics"], project)
    curves = json.loads(plots[plots.find("{"):])["data"]
    points = curves["dvclive/pretrain/plots/metrics/train/loss.tsv"][0]["content"]["data"]
    for name in names:
        assert [int(p["step"]) for p in points["values"] if p["rev"] == name] == [1, 2]
