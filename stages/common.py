"""What every stage shares: where data lives, reading params, opening a DVCLive logger."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from dvclive import Live

from bestrq.checkpoint import latest_step
from bestrq.distributed import launch_torchrun
from bestrq.params import SECTIONS, Params, load_params

# Must match dvc.yaml.
DATA = Path("data")
RAW = DATA / "raw"
SEGMENTS = DATA / "segments"
FEATURES = DATA / "features"
ADAPTER = DATA / "adapters" / "adapter.safetensors"
IA3_ONLY_NAME = "ia3.safetensors"  # beside ADAPTER: the IA^3 vectors alone
CHECKPOINTS = DATA / "checkpoints"
FINETUNED = DATA / "finetune"  # <start>/ia3.safetensors: fine-tuned encoder+decoder vectors
FINETUNE_CHECKPOINTS = DATA / "finetune_checkpoints"  # <start>/step-*.pt
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


def step_logger(live: Live, prefix: str = "train") -> Callable[[int, dict[str, float]], None]:
    """A `log(step, metrics)` callback for the library that writes one DVCLive step, each
    metric named `<prefix>/<name>`."""
    def log(step: int, metrics: dict[str, float]) -> None:
        live.step = step
        for key, value in metrics.items():
            live.log_metric(f"{prefix}/{key}", float(value))
        live.next_step()
    return log


# Knobs that change how fast a run goes, not what it computes: a checkpoint made under other
# values of these is still resumed.
NOT_IN_FINGERPRINT = {"num_workers", "prefetch_factor", "log_every", "checkpoint_every",
                      "keep_checkpoints", "device"}


def training_values(p: Params) -> dict[str, Any]:
    """The top-level parameters that decide what a pre-training run computes."""
    return {k: v for k, v in p.raw.items() if k not in NOT_IN_FINGERPRINT and k not in SECTIONS}


def fingerprint(values: dict[str, Any], features_dir: Path, extra: bytes = b"") -> str:
    """What a checkpoint must have been made with to be resumed: parameter values, the training
    features (their statistics and index) and `extra` (e.g. the adapter a run starts from)."""
    h = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    for name in ("stats.json", "train/index.json"):
        h.update((features_dir / name).read_bytes())
    h.update(extra)
    return h.hexdigest()


def relaunch_under_torchrun(p: Params, module: str) -> None:
    """With nproc > 1 and not yet under torchrun, re-run this command on nproc processes."""
    if p.nproc > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(code=launch_torchrun(p.nproc, module, sys.argv[1:]))


def prepare_checkpoints(checkpoint_dir: Path, key: str) -> int:
    """Step to resume from (0: fresh). Checkpoints of other parameters or data are removed."""
    marker = checkpoint_dir / "fingerprint.txt"
    if checkpoint_dir.exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    return latest_step(checkpoint_dir)


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
