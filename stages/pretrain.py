"""Stage 4: BEST-RQ pre-training of an adapter (IA^3 or LoRA) and heads on a frozen Whisper
encoder."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import typer

from bestrq.dataset import FeatureDataset
from bestrq.distributed import distributed_session
from bestrq.features import INDEX_FILE, STATS_FILE
from bestrq.params import Params, validate_corpus
from bestrq.recipes.pretrain import pretrain as pretrain_recipe
from stages.common import (
    ADAPTER,
    ADAPTER_ONLY_NAME,
    CHECKPOINTS,
    FEATURES,
    friendly_errors,
    log_summary,
    run_app,
)
from stages.training_common import (
    LiveLog,
    hold_checkpoints,
    params_or_exit,
    relaunch_under_torchrun,
)

app = typer.Typer(add_completion=False, help=__doc__)


def run_pretrain(p: Params, features_dir: Path = FEATURES, adapter_path: Path = ADAPTER,
                 checkpoint_dir: Path = CHECKPOINTS, live_name: str = "pretrain") -> None:
    """Train and write the adapter; rank 0 alone logs and writes."""
    log: LiveLog | None = None
    train_split = features_dir / "train"
    # Features that are complete (stats.json is written last); the recipe names others.
    if (features_dir / STATS_FILE).is_file() and (train_split / INDEX_FILE).is_file():
        validate_corpus(p, len(FeatureDataset(train_split)), str(train_split))

    def open_log(start: int) -> LiveLog:
        nonlocal log
        log = LiveLog(live_name, resume=start > 0)
        if start:
            log.resume("", start)
        return log

    with distributed_session() as dist, ExitStack() as claims:
        done = pretrain_recipe(p, dist, features_dir, adapter_path, ADAPTER_ONLY_NAME,
                               checkpoint_dir, lambda folder, key: hold_checkpoints(
                                   claims, folder, key), open_log)
    if done is None or log is None:
        return  # not the process that writes
    result = done.result
    # The last step's train/* values are already in the summary; add the run's totals.
    log_summary(log.live, {"steps": result.step, "nonfinite_skipped_total": result.skipped,
                           "train_seconds": result.seconds, "precision": result.precision,
                           "adapter_mb": done.adapter_file.stat().st_size / 2**20,
                           "adapter_file_kb": done.adapter_only_file.stat().st_size / 2**10,
                           "adapter_parameters": done.adapter_parameters})
    log.live.end()
    typer.echo(f"pretrain: wrote {done.adapter_file} and {done.adapter_only_file} (the adapter "
               f"alone) after {result.step} steps ({result.seconds:.0f} s)")


@app.command()
def pretrain(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Train the adapter and BEST-RQ heads on data/features/train; write
    data/adapters/adapter.safetensors."""
    p = params_or_exit("pretrain", params)
    relaunch_under_torchrun(p, "stages.pretrain")
    with friendly_errors():
        run_pretrain(p)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
