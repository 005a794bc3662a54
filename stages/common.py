"""What every stage shares: where data lives, errors in one line, a DVCLive summary.

The data stages (download, segment, features) import this module and no other of `stages`
but their own: it imports no training, model or evaluation code, so editing that code re-runs
no data stage (dvc.yaml lists each stage's imports). What only the training stages share (the
whole params.yaml, checkpoint claims, torchrun, step logs) is in `stages.training_common`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from dvclive import Live

from bestrq.redact import redact

T = TypeVar("T")

# Must match dvc.yaml.
DATA = Path("data")
RAW = DATA / "raw"
SEGMENTS = DATA / "segments"
FEATURES = DATA / "features"
ADAPTER = DATA / "adapters" / "adapter.safetensors"
ADAPTER_ONLY_NAME = "adapter-only.safetensors"  # beside ADAPTER: the adapter without the heads
CHECKPOINTS = DATA / "checkpoints"
FINETUNED = DATA / "finetune"  # <start>/adapter-only.safetensors: fine-tuned encoder+decoder
FINETUNE_CHECKPOINTS = DATA / "finetune_checkpoints"  # <start>/step-*.pt
LIVE = Path("dvclive")

# `--traceback` on any command shows the full traceback of an error instead of one red line.
# No command declares it: `run_app` takes it out of sys.argv before Typer parses, and it reaches
# torchrun's workers through the environment.
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "BESTRQ_TRACEBACK"


def exit_on_sigterm() -> None:
    """Make SIGTERM (a `kill`, DVC stopping a run) raise SystemExit(143) in the main thread, so
    that the clean-ups in `finally` and `except BaseException` blocks (a partial download, a
    params file to restore) run before the process ends."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def take_traceback_flag(argv: list[str]) -> None:
    """Remove `--traceback` from `argv` (in place) and remember it in the environment."""
    if TRACEBACK_FLAG in argv[1:]:
        argv[1:] = [a for a in argv[1:] if a != TRACEBACK_FLAG]
        os.environ[TRACEBACK_ENV] = "1"


def traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV) == "1"


def run_app(app: Callable[[], Any]) -> None:
    """A command's entry point: `--traceback` taken out of the arguments, then the command."""
    take_traceback_flag(sys.argv)
    app()


def print_error(err: BaseException | str, where: str = "") -> None:
    """One red `error (where): ...` line on stderr, with any URL's password shown as `***`."""
    prefix = f"error ({where})" if where else "error"
    typer.secho(f"{prefix}: {redact(str(err))}", fg=typer.colors.RED, err=True)


def checked_or_exit(stage: str, read: Callable[[], T]) -> T:
    """The parameters `read()` returns, checked; a bad one (ValueError, FileNotFoundError) ends
    the command in one red line, exit code 2, before any work (`--traceback`: re-raised)."""
    try:
        return read()
    except (ValueError, FileNotFoundError) as err:
        if traceback_wanted():
            raise
        print_error(err, stage)
        raise typer.Exit(code=2) from err


def live_folder(name: str) -> Path:
    """A log's folder: dvclive/<name> for a stage; an absolute path as it is (each `train`
    run logs inside its own folder)."""
    return LIVE / name  # an absolute `name` replaces LIVE


def open_live(name: str, resume: bool = False) -> Live:
    """A DVCLive logger in `live_folder(name)`: one folder per stage, since DVCLive clears the
    metrics of the folder it opens; dvc.yaml declares the metrics and plots itself."""
    return Live(dir=str(live_folder(name)), resume=resume, save_dvc_exp=False, dvcyaml=None)


def log_summary(live: Live, metrics: dict[str, float | str]) -> None:
    """Stage-level numbers (and labels, such as the precision a run used): into metrics.json,
    not into plots."""
    for key, value in metrics.items():
        live.log_metric(key, value if isinstance(value, str) else float(value), plot=False)
    live.make_summary()


def finish_stage(name: str, stats: dict[str, float]) -> None:
    """Log a data stage's numbers to dvclive/<name>/metrics.json and print them."""
    with open_live(name) as live:
        log_summary(live, stats)
    typer.echo(f"{name}: {stats}")


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn the library's expected failures into one red line and exit code 1 (`--traceback`:
    re-raise them)."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        if traceback_wanted():
            raise
        print_error(err)
        raise typer.Exit(code=1) from err
