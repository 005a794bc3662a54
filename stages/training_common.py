"""What the training-side stages share (pretrain, evaluate, finetune, report and the `train`
command): the whole params.yaml checked, checkpoint claims, torchrun, DVCLive step logs and
per-window tables. The data stages import none of it (`stages.common`)."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer
from dvclive import Live

from bestrq import report
from bestrq.checkpoint import RunSignature, claim_checkpoints
from bestrq.distributed import launch_torchrun, nodes_from_env
from bestrq.jsonl import dumps
from bestrq.params import Params, load_params
from stages.common import checked_or_exit, live_folder, open_live, print_error, traceback_wanted

# The held-out splits every figure is reported on, test first (what `dvc exp show` opens with);
# knobs are chosen on dev: the report's own order.
REPORTED = report.SPLITS


def params_or_exit(stage: str, path: str = "params.yaml",
                   overrides: dict[str, Any] | None = None) -> Params:
    """Validated params; a bad parameter ends the command before any work.

    A training stage checks every parameter, not only its own; the check stage (dvc.yaml's
    first) does the same before any data stage runs, so a typo in `model` or `num_codebooks`
    stops a fresh `dvc repro` before the corpus is downloaded, segmented and featurised.
    """
    params = checked_or_exit(stage, lambda: load_params(path, overrides, stage=None))
    if stage == "pretrain" and os.environ.get("LOCAL_RANK", "0") == "0":
        for note in params.train.advice():
            typer.secho(f"warning ({stage}): {note}", fg=typer.colors.YELLOW, err=True)
    return params


def write_windows(path: Path, windows: list[dict]) -> None:
    """The per-window WER table (reference, each system's hypothesis and word errors), worst
    difference first, beside the stage's DVCLive summary."""
    systems = [k[:-len("_errors")] for k in (windows[0] if windows else {}) if
               k.endswith("_errors")]
    if len(systems) == 2:
        windows = sorted(windows, key=lambda w: -abs(w[f"{systems[1]}_errors"] -
                                                     w[f"{systems[0]}_errors"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(windows, indent=1) + "\n", encoding="utf-8")


def step_logger(live: Live, prefix: str = "train") -> Callable[[int, dict[str, float]], None]:
    """A `log(step, metrics)` callback for the library that writes one DVCLive step, each
    metric named `<prefix>/<name>`."""
    def log(step: int, metrics: dict[str, float]) -> None:
        live.step = step
        for key, value in metrics.items():
            live.log_metric(f"{prefix}/{key}", float(value))
        live.next_step()
    return log


class LiveLog:
    """A recipe's log (`bestrq.recipes`' PretrainLog, FinetuneLog) on DVCLive: lines on stdout,
    step curves under dvclive/<name>/."""

    def __init__(self, name: str, resume: bool) -> None:
        self.name = name
        self.live = open_live(name, resume=resume)

    def say(self, message: str) -> None:
        typer.echo(message)

    def resume(self, curve: str, step: int) -> None:
        """Run `curve` goes on from `step`: the rows it logged after it are dropped."""
        truncate_history(live_folder(self.name), step, under=curve)

    def steps(self, curve: str = "train") -> Callable[[int, dict[str, float]], None]:
        return step_logger(self.live, curve)

    def at(self, step: int, prefix: str, metrics: dict[str, float]) -> None:
        self.live.step = step
        for key, value in metrics.items():
            self.live.log_metric(f"{prefix}/{key}", value)


def hold_checkpoints(claims: ExitStack, checkpoint_dir: Path, key: RunSignature) -> int:
    """Lock `checkpoint_dir` for this run until `claims` closes
    (bestrq.checkpoint.claim_checkpoints: a second writer, a folder that is not ours and
    changed parameters are dealt with there); the step to resume from, 0 for a fresh run."""
    held = claims.enter_context(claim_checkpoints(
        checkpoint_dir, key, report=lambda message: typer.secho(message, fg=typer.colors.YELLOW,
                                                                err=True)))
    return held.start


def relaunch_under_torchrun(p: Params, module: str, args: list[str] | None = None) -> None:
    """With several processes (nproc) or machines (nnodes) and not yet under torchrun, re-run
    this command (with `args`, default its own) under torchrun: nproc processes here, one
    machine of nnodes, whose rank and rendezvous come from BESTRQ_NODE_RANK /
    BESTRQ_MASTER_ADDR / BESTRQ_MASTER_PORT."""
    if "LOCAL_RANK" in os.environ:
        return
    try:
        nodes = nodes_from_env(p.run.nnodes)
    except ValueError as err:
        if traceback_wanted():
            raise
        print_error(err, module)
        raise typer.Exit(code=2) from err
    if p.run.nproc > 1 or nodes.nnodes > 1:
        raise typer.Exit(code=launch_torchrun(
            p.run.nproc, module, sys.argv[1:] if args is None else args, nodes))


def truncate_history(live_dir: Path, last_step: int, under: str = "") -> None:
    """Drop plot rows after `last_step` (of the metrics under `under`, e.g. one fine-tune run):
    steps a crashed run logged past its last checkpoint are trained again on resume and must
    not appear twice."""
    for tsv in (live_dir / "plots" / "metrics" / under).rglob("*.tsv"):
        with tsv.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        kept = [r for r in rows if int(r["step"]) <= last_step]
        with tsv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(kept)
