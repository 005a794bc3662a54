"""The study (README "Does unlabelled audio help?"): every run of study.yaml as a DVC
experiment in this workspace, one after another, each finished run kept as
results/study/<run>.json. Run it in a clone of the project: it replaces data/ with the study's
corpus. Interrupted, it starts again where it stopped (a finished run is skipped, a killed
pre-training or fine-tune resumes from its checkpoints)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from bestrq.atomic import atomic_path
from bestrq.params_file import read_yaml
from bestrq.study import (
    StudyRun,
    curves_spec,
    learning_table,
    load_grid,
    load_records,
    read_tsv,
    run_record,
    study_table,
)
from stages.common import LIVE, exit_on_sigterm, print_error, run_app

app = typer.Typer(add_completion=False, help=__doc__)

PARAMS = Path("params.yaml")
RESULTS = Path("results/study")
STAGES = ("download", "segment", "features", "pretrain", "evaluate", "finetune", "report")
CURVES = LIVE / "pretrain" / "plots" / "metrics"
CURVE_NAMES = ("dev/loss", "dev/prior_loss", "dev/accuracy", "dev/prior_accuracy",
               "train/loss", "train/bestrq_loss", "train/distill_loss", "train/accuracy")


def _fail(message: str) -> None:
    print_error(message, "study")
    raise typer.Exit(code=2)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def collect(run: StudyRun, provenance: dict[str, Any]) -> dict[str, Any]:
    """The record of the run the workspace holds now."""
    metrics = {s: json.loads((LIVE / s / "metrics.json").read_text()) for s in STAGES}
    curves = {name: read_tsv(CURVES / f"{name}.tsv") for name in CURVE_NAMES
              if (CURVES / f"{name}.tsv").is_file()}
    return run_record(run, read_yaml(PARAMS), metrics, curves, provenance)


@app.command()
def run(grid: Annotated[Path, typer.Option(help="the grid of runs")] = Path("study.yaml"),
        results: Annotated[Path, typer.Option(help="where records go")] = RESULTS,
        only: Annotated[list[str] | None, typer.Option(
            help="run just this one (repeatable)")] = None,
        again: Annotated[bool, typer.Option(
            help="re-run runs that already have a record")] = False) -> None:
    """Run every run of the grid that has no record yet, in order."""
    try:
        runs = load_grid(grid, PARAMS)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    only = only or []
    unknown = sorted(set(only) - {r.name for r in runs})
    if unknown:
        _fail(f"--only {', '.join(unknown)}: not in {grid} "
              f"(runs: {', '.join(r.name for r in runs)})")
    if _git("status", "--porcelain", "--", str(PARAMS)):
        _fail(f"{PARAMS} has uncommitted changes: the study sets its overrides on the "
              f"committed file and restores it between runs; commit or stash yours first "
              f"(after a killed study: git checkout {PARAMS})")
    original = PARAMS.read_bytes()
    # A stop from the outside must still restore params.yaml (the `finally` below).
    exit_on_sigterm()
    commit = _git("rev-parse", "HEAD")
    try:
        for r in runs:
            if only and r.name not in only:
                continue
            out = results / f"{r.name}.json"
            if out.is_file() and not again:
                typer.echo(f"{r.name}: done ({out})")
                continue
            name = f"study-{r.name}"
            subprocess.run(["dvc", "exp", "remove", name], capture_output=True)
            command = ["dvc", "exp", "run", "--name", name,
                       *[arg for a in r.set_args() for arg in ("-S", a)]]
            typer.echo(f"{r.name}: {' '.join(command)}")
            start = time.time()
            done = subprocess.run(command)
            if done.returncode != 0:
                _fail(f"run {r.name!r} failed (exit {done.returncode}); fix and run again: "
                      "finished runs are kept, this one resumes from its checkpoints")
            record = collect(r, {"commit": commit, "experiment": name,
                                 "command": " ".join(command),
                                 "seconds": round(time.time() - start, 1)})
            with atomic_path(out) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n")
            typer.echo(f"{r.name}: record {out}")
            PARAMS.write_bytes(original)
    finally:
        PARAMS.write_bytes(original)


@app.command()
def table(results: Annotated[Path, typer.Option(help="the records")] = RESULTS,
          split: Annotated[str, typer.Option(help="test or dev")] = "test") -> None:
    """Print the study's tables (markdown) from the records: the WERs, and whether BEST-RQ
    learned more than the label frequencies."""
    records = load_records(results)
    if not records:
        _fail(f"no records in {results}")
    typer.echo(study_table(records, split))
    typer.echo()
    typer.echo(learning_table(records, split))


@app.command()
def plot(results: Annotated[Path, typer.Option(help="the records")] = RESULTS) -> None:
    """Draw every run's BEST-RQ dev loss and accuracy beside the label prior's as
    RESULTS/curves.svg (rendered offline with vl-convert, for README)."""
    import vl_convert

    records = load_records(results)
    if not records:
        _fail(f"no records in {results}")
    out = results / "curves.svg"
    with atomic_path(out) as tmp:
        tmp.write_text(vl_convert.vegalite_to_svg(curves_spec(records)))
    typer.echo(f"study: wrote {out}")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
