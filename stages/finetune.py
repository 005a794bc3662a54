"""Stage 6: supervised adapter fine-tune from stock Whisper and from the BEST-RQ adapter (per
seed), and the WER of both on the test and dev clips, with a 95% paired bootstrap interval of
their difference."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import typer

from bestrq.dataset import FeatureDataset
from bestrq.distributed import distributed_session, is_main
from bestrq.params import Params
from bestrq.recipes.finetune import compare_finetuned, finetune_runs, labelled_draws
from stages.common import (
    ADAPTER,
    ADAPTER_ONLY_NAME,
    FEATURES,
    FINETUNE_CHECKPOINTS,
    FINETUNED,
    LIVE,
    friendly_errors,
    log_summary,
    open_live,
    run_app,
)
from stages.training_common import (
    LiveLog,
    hold_checkpoints,
    params_or_exit,
    relaunch_under_torchrun,
    write_windows,
)

app = typer.Typer(add_completion=False, help=__doc__)


def skip(reason: str, metrics: dict[str, float], out_dir: Path) -> None:
    """No fine-tune is possible: say why, keep the stage's outputs, log what was found."""
    typer.secho(f"finetune: skipped: {reason}", fg=typer.colors.YELLOW, err=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "skipped.json").write_text(json.dumps({"reason": reason}, indent=2) + "\n")
    with open_live("finetune") as live:  # a fresh log: an earlier run's curves are removed
        log_summary(live, {**metrics, "skipped": reason})  # the report says why
    # Declared outputs, present and empty, so that `dvc repro` goes on to the report.
    (LIVE / "finetune" / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    write_windows(LIVE / "finetune" / "windows.json", [])


def run_finetune(p: Params, features_dir: Path = FEATURES, adapter_dir: Path = ADAPTER.parent,
                 out_dir: Path = FINETUNED, checkpoint_root: Path = FINETUNE_CHECKPOINTS) -> None:
    """Fine-tune from both starts, write both adapters, then compare their WERs (rank 0)."""
    with distributed_session() as dist, ExitStack() as claims:
        train_split = FeatureDataset(features_dir / "train")
        draws = labelled_draws(p, train_split)
        found = {"labelled_clips": float(len(draws[p.finetune.seeds[0]]))}
        if not draws[p.finetune.seeds[0]]:
            if is_main():
                skip(f"no transcribed clips in {features_dir / 'train'}: the fine-tune needs "
                     "some (LibriSpeech-style *.trans.txt, transcripts.tsv or manifest.jsonl "
                     "beside the audio; segment.transcribed_share above 0)", found, out_dir)
            return
        log: LiveLog | None = None

        def open_log(resume: bool) -> LiveLog:
            nonlocal log
            log = LiveLog("finetune", resume=resume)
            return log

        figures = finetune_runs(p, dist, train_split, draws, adapter_dir / ADAPTER_ONLY_NAME,
                                features_dir, out_dir, ADAPTER_ONLY_NAME, checkpoint_root,
                                claim=lambda folder, key: hold_checkpoints(claims, folder, key),
                                open_log=open_log)
        if figures is None or log is None:
            return  # not the process that writes
        wers, windows, untranscribed = compare_finetuned(p, features_dir, out_dir,
                                                         ADAPTER_ONLY_NAME)
        for split in untranscribed:
            typer.secho(f"finetune: no transcribed {split} clips: no WER to compare",
                        fg=typer.colors.YELLOW, err=True)
        write_windows(LIVE / "finetune" / "windows.json", windows)
        metrics = {**found, **figures, **wers}
        log_summary(log.live, metrics)
        log.live.end()
        typer.echo(json.dumps({k: v for k, v in metrics.items() if "wer" in k}, indent=2))


@app.command()
def finetune(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Fine-tune the adapter (encoder and decoder) on the transcribed train clips from stock
    Whisper and from data/adapters, once per finetune.seeds; write
    data/finetune/{stock,adapted}/adapter-only.safetensors (the first seed; the others' under
    data/finetune/seed-<s>/) and their WERs on the test and dev clips."""
    p = params_or_exit("finetune", params)
    relaunch_under_torchrun(p, "stages.finetune")
    with friendly_errors():
        run_finetune(p)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
