"""What the two fine-tune stages share: stock_finetune (from stock Whisper, no BEST-RQ input)
and finetune (from the BEST-RQ adapter, compared with the stock one) each run one start of the
recipe, once per finetune.seeds, log it under dvclive/<stage>/ and write its adapters under
data/finetune/<start>/; with nothing transcribed to train on, each says why and writes its
declared outputs empty."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import typer

from bestrq.atomic import atomic_write_text
from bestrq.dataset import FeatureDataset
from bestrq.distributed import distributed_session, is_main
from bestrq.params import Params
from bestrq.recipes.finetune import finetune_runs, finetuned_wers, labelled_draws
from stages.common import ADAPTER_ONLY_NAME, LIVE, log_summary, open_live
from stages.stock_common import stock_figures, stock_windows, windows_file
from stages.training_common import LiveLog, hold_checkpoints, write_windows


def skip(stage: str, reason: str, metrics: dict[str, float], out_dir: Path) -> None:
    """No fine-tune is possible: say why, keep the stage's outputs, log what was found."""
    typer.secho(f"{stage}: skipped: {reason}", fg=typer.colors.YELLOW, err=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A new file, never written in place: with DVC's link cache types the old one is the cache.
    atomic_write_text(out_dir / "skipped.json", json.dumps({"reason": reason}, indent=2) + "\n")
    with open_live(stage) as live:  # a fresh log: an earlier run's curves are removed
        log_summary(live, {**metrics, "skipped": reason})  # the report says why
    # Declared outputs, present and empty, so that `dvc repro` goes on to the report.
    (LIVE / stage / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    write_windows(windows_file(stage), [])


def run_start(p: Params, stage: str, start: str, features_dir: Path, out_dir: Path,
              checkpoint_root: Path, start_file: Path | None = None,
              stock_stage: str | None = None) -> None:
    """Fine-tune from `start` once per seed (`start_file`: the BEST-RQ adapter the adapted
    start begins from), write the adapters under `out_dir`, then their WERs on the test and
    dev clips (rank 0) into dvclive/<stage>/. `stock_stage`: the stage whose stock fine-tunes
    these are compared with (its per-window hypotheses; its stock figures are carried into
    this stage's summary)."""
    with distributed_session() as dist, ExitStack() as claims:
        train_split = FeatureDataset(features_dir / "train")
        draws = labelled_draws(p, train_split)
        found = {"labelled_clips": float(len(draws[p.finetune.seeds[0]]))}
        if not draws[p.finetune.seeds[0]]:
            if is_main():
                skip(stage, f"no transcribed clips in {features_dir / 'train'}: the fine-tune "
                     "needs some (LibriSpeech-style *.trans.txt, transcripts.tsv or "
                     "manifest.jsonl beside the audio; segment.transcribed_share above 0)",
                     found, out_dir)
            return
        # Read before any training, so that a missing stock output stops the stage at once; by
        # the process that writes only (another machine of nnodes need not hold them).
        stock = (stock_figures(stock_stage), stock_windows(stock_stage)) \
            if stock_stage and is_main() else None
        log: LiveLog | None = None

        def open_log(resume: bool) -> LiveLog:
            nonlocal log
            log = LiveLog(stage, resume=resume)
            return log

        figures = finetune_runs(p, dist, start, train_split, draws, features_dir, out_dir,
                                ADAPTER_ONLY_NAME, checkpoint_root,
                                claim=lambda folder, key: hold_checkpoints(claims, folder, key),
                                open_log=open_log, start_file=start_file)
        if figures is None or log is None:
            return  # not the process that writes
        wers, windows, untranscribed = finetuned_wers(
            p, features_dir, start, out_dir, ADAPTER_ONLY_NAME,
            stock=stock[1] if stock else None,
            stock_source=str(windows_file(stock_stage)) if stock_stage else "")
        for split in untranscribed:
            typer.secho(f"{stage}: no transcribed {split} clips: no WER to compare",
                        fg=typer.colors.YELLOW, err=True)
        write_windows(windows_file(stage), windows)
        # The stock figures first: the WERs computed again beside the adapted ones are equal.
        metrics = {**found, **(stock[0] if stock else {}), **figures, **wers}
        log_summary(log.live, metrics)
        log.live.end()
        typer.echo(json.dumps({k: v for k, v in metrics.items() if "wer" in k}, indent=2))
