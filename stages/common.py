"""What every stage shares: where data lives, reading params, opening a DVCLive logger."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from dvclive import Live

from bestrq.params import Params, load_params

# Must match dvc.yaml.
DATA = Path("data")
RAW = DATA / "raw"
SEGMENTS = DATA / "segments"
FEATURES = DATA / "features"
ADAPTER = DATA / "adapters" / "adapter.safetensors"
IA3_ONLY_NAME = "ia3.safetensors"  # beside ADAPTER: the IA^3 vectors alone
CHECKPOINTS = DATA / "checkpoints"
LIVE = Path("dvclive")


def params_or_exit(stage: str, path: str = "params.yaml",
                   overrides: dict[str, Any] | None = None) -> Params:
    """Validated params; a bad parameter ends the command before any work.

    Every stage checks every parameter, not only its own: a typo in `model` or
    `num_codebooks` must stop a fresh `dvc repro` at its first stage, not after the corpus has
    been downloaded, segmented and featurised.
    """
    try:
        return load_params(path, overrides, stage=None)
    except (ValueError, FileNotFoundError) as err:
        typer.secho(f"error ({stage}): {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from err


def open_live(name: str, resume: bool = False) -> Live:
    """A DVCLive logger in dvclive/<name>: one folder per stage, since DVCLive clears the
    metrics of the folder it opens; dvc.yaml declares the metrics and plots itself."""
    return Live(dir=str(LIVE / name), resume=resume, save_dvc_exp=False, dvcyaml=None)


def log_summary(live: Live, metrics: dict[str, float]) -> None:
    """Stage-level numbers: into metrics.json (for `dvc exp show`), not into plots."""
    for key, value in metrics.items():
        live.log_metric(key, float(value), plot=False)
    live.make_summary()


def finish_stage(name: str, stats: dict[str, float]) -> None:
    """Log a data stage's numbers to dvclive/<name>/metrics.json and print them."""
    with open_live(name) as live:
        log_summary(live, stats)
    typer.echo(f"{name}: {stats}")


def step_logger(live: Live) -> Callable[[int, dict[str, float]], None]:
    """A `log(step, metrics)` callback for the library that writes one DVCLive step."""
    def log(step: int, metrics: dict[str, float]) -> None:
        live.step = step
        for key, value in metrics.items():
            live.log_metric(f"train/{key}", float(value))
        live.next_step()
    return log


def truncate_history(live_dir: Path, last_step: int) -> None:
    """Drop plot rows after `last_step`: steps a crashed run logged past its last checkpoint
    are trained again on resume and must not appear twice."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        kept = [r for r in rows if int(r["step"]) <= last_step]
        with tsv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(kept)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn the library's expected failures into one red line and exit code 1."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        if "--traceback" in sys.argv:
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from err
