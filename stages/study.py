"""The study (README "Does unlabelled audio help?"): every run of study.yaml as a DVC
experiment in this workspace, one after another, each finished run kept as
results/study/<run>.json. Run it in a clone of the project: it replaces data/ with the study's
corpus. Stopped (Ctrl-C, SIGTERM, SIGHUP), it ends DVC and the stage DVC runs and puts
params.yaml and git's index back as they were; started again, it goes on where it stopped (a
finished run is skipped, a killed pre-training or fine-tune resumes from its checkpoints)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from bestrq.atomic import atomic_path
from bestrq.params_file import read_yaml
from bestrq.report import SPLITS
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
from stages.common import LIVE, print_error, run_app

app = typer.Typer(add_completion=False, help=__doc__)

PARAMS = Path("params.yaml")
RESULTS = Path("results/study")
STAGES = ("download", "segment", "features", "pretrain", "evaluate", "finetune", "report")
CURVES = LIVE / "pretrain" / "plots" / "metrics"
# A study stopped by one of these ends DVC's process group (`stop_group`), giving it GRACE_S
# seconds a signal for its clean-ups (DVC's git state, a partial download).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 10.0
CURVE_NAMES = ("dev/loss", "dev/prior_loss", "dev/accuracy", "dev/prior_accuracy",
               "train/loss", "train/bestrq_loss", "train/distill_loss", "train/accuracy")


def _fail(message: str) -> NoReturn:
    print_error(message, "study")
    raise typer.Exit(code=2)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode != 0:
        why = "; ".join(line for line in done.stderr.splitlines() if line.strip())
        _fail(f"git {' '.join(args)}: {why or f'exit {done.returncode}'}")
    return done.stdout.strip()


class Stop:
    """SIGTERM, SIGINT and SIGHUP end the study as SystemExit(128 + signal), raised in the main
    thread so that the clean-ups run: DVC's process group ended (`stop_group`), params.yaml and
    git's index restored. Only the first counts: one arriving during the clean-up (bounded by
    GRACE_S) is ignored, and one arriving while DVC starts waits until DVC's process is known,
    so that it can be ended."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferred = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if not self._deferred:
            raise SystemExit(128 + signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
        if self.signum is not None:
            raise SystemExit(128 + self.signum)


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (one that ended but that no one has reaped
    yet, a zombie, does not: it writes nothing more)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").is_file():
        return True  # no /proc: a zombie counts as running, so the stop waits GRACE_S
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(group) == pgid and state != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S) -> int:
    """End the process group `proc` leads (DVC and every stage it started), each signal
    `grace` seconds after the last while any of it still runs: SIGINT first, what Ctrl-C sends
    (DVC then puts HEAD back on its branch, which a SIGTERM leaves detached, and the stages run
    their clean-ups), then SIGTERM, then SIGKILL. `proc`'s exit status."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        _signal_group(proc.pid, sig)
        deadline = time.monotonic() + grace
        while _group_running(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reap DVC itself once it has ended, so that only its stages count
            time.sleep(0.05)
        if not _group_running(proc.pid):
            break
    return proc.wait()


def _dvc(args: list[str], stop: Stop, quiet: bool = False) -> int:
    """Run DVC in a process group of its own and wait for it; if the study is stopped
    meanwhile, the whole group ends (a signal to DVC alone would leave its stage running)."""
    proc = None
    output = subprocess.DEVNULL if quiet else None
    try:
        with stop.deferred():
            proc = subprocess.Popen(["dvc", *args], start_new_session=True, stdout=output,
                                    stderr=output)
        return proc.wait()
    finally:
        if proc is not None and proc.returncode is None:
            stop_group(proc)


def _restore(original: bytes, index: str) -> None:
    """params.yaml and git's index as they were when the study started (DVC stages the
    overrides it writes)."""
    PARAMS.write_bytes(original)
    done = subprocess.run(["git", "read-tree", index], capture_output=True, text=True)
    if done.returncode != 0:
        print_error(f"git's index not restored ({done.stderr.strip()}): run "
                    f"`git reset -q -- {PARAMS}`", "study")


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
              f"(after a killed study: git checkout HEAD -- {PARAMS})")
    original = PARAMS.read_bytes()
    index = _git("write-tree")  # git's index now: DVC stages params.yaml, the study restores it
    commit = _git("rev-parse", "HEAD")
    stop = Stop()
    try:
        for r in runs:
            if only and r.name not in only:
                continue
            out = results / f"{r.name}.json"
            if out.is_file() and not again:
                typer.echo(f"{r.name}: done ({out})")
                continue
            name = f"study-{r.name}"
            _dvc(["exp", "remove", name], stop, quiet=True)
            command = ["dvc", "exp", "run", "--name", name,
                       *[arg for a in r.set_args() for arg in ("-S", a)]]
            typer.echo(f"{r.name}: {shlex.join(command)}")
            start = time.time()
            code = _dvc(command[1:], stop)
            if code != 0:
                _fail(f"run {r.name!r} failed (exit {code}); fix and run again: "
                      "finished runs are kept, this one resumes from its checkpoints")
            record = collect(r, {"commit": commit, "experiment": name,
                                 "command": shlex.join(command),
                                 "seconds": round(time.time() - start, 1)})
            with atomic_path(out) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n")
            typer.echo(f"{r.name}: record {out}")
            _restore(original, index)
    finally:
        with stop.deferred():  # a signal now waits until both are restored
            _restore(original, index)
            if stop.signum is not None:
                print_error(f"stopped by {signal.Signals(stop.signum).name}: DVC and its "
                            f"stages ended, {PARAMS} and git's index restored", "study")


def _records(results: Path) -> list[dict[str, Any]]:
    try:
        records = load_records(results)
    except ValueError as err:
        _fail(str(err))
    if not records:
        _fail(f"no records in {results}")
    return records


@app.command()
def table(results: Annotated[Path, typer.Option(help="the records")] = RESULTS,
          split: Annotated[str, typer.Option(help="test or dev")] = "test") -> None:
    """Print the study's tables (markdown) from the records: the WERs, and whether BEST-RQ
    learned more than the label frequencies."""
    if split not in SPLITS:
        _fail(f"--split {split}: expected {' or '.join(SPLITS)}")
    records = _records(results)
    typer.echo(study_table(records, split))
    typer.echo()
    typer.echo(learning_table(records, split))


@app.command()
def plot(results: Annotated[Path, typer.Option(help="the records")] = RESULTS) -> None:
    """Draw every run's BEST-RQ dev loss and accuracy beside the label prior's as
    RESULTS/curves.svg (rendered offline with vl-convert, for README)."""
    records = _records(results)
    import vl_convert

    out = results / "curves.svg"
    with atomic_path(out) as tmp:
        tmp.write_text(vl_convert.vegalite_to_svg(curves_spec(records)))
    typer.echo(f"study: wrote {out}")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
