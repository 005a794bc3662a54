"""Stage: stock Whisper zero-shot on the held-out clips, the baseline evaluate compares with.

It reads the features, the model and the evaluate knobs, and no BEST-RQ knob or adapter, so an
experiment on BEST-RQ (`dvc exp run -S num_codebooks=16`) does not run it again: its per-window
hypotheses and figures are read by evaluate."""

from __future__ import annotations

import json

import typer

from bestrq.dataset import FeatureDataset
from bestrq.distributed import resolve_device
from bestrq.evaluate import probe_whisper, system_wers
from bestrq.whisper_model import load_whisper
from stages.common import FEATURES, friendly_errors, log_summary, open_live, run_app
from stages.stock_common import STOCK_EVAL, windows_file
from stages.training_common import REPORTED, params_or_exit, write_windows

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def stock_eval(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """On data/features/test and data/features/dev (metrics `test/stock/...`,
    `dev/stock/...`): with evaluate.asr, the WER of stock Whisper on the transcribed clips with
    its 95% bootstrap interval, and each window's hypothesis and word errors
    (dvclive/stock_eval/windows.json); with evaluate.probes, the label-free probes (effective
    rank, Davies-Bouldin index) of its encoder's output."""
    p = params_or_exit(STOCK_EVAL, params)
    windows: list[dict] = []  # per window: split, reference, stock hypothesis, word errors
    metrics: dict[str, float] = {}
    with friendly_errors():
        device = resolve_device(p.train.device)
        asr = p.evaluate.asr_config(p.train.precision)
        datasets = {split: FeatureDataset(FEATURES / split) for split in REPORTED}
        found: dict[str, dict[str, float]] = {split: {} for split in REPORTED}
        if p.evaluate.probes:
            encoder = load_whisper(p.run.model).encoder
            for split, dataset in datasets.items():
                found[split].update(probe_whisper(encoder, dataset, p.evaluate, device))
            del encoder  # system_wers loads its own Whisper
        for split, dataset in datasets.items():
            if p.evaluate.asr:
                rows: list[dict] = []
                found[split].update(system_wers(p.run.model, "stock", {"stock": None}, dataset,
                                                asr, device, rows))
                windows += [{"split": split, **row} for row in rows]
            found[split]["clips"] = float(min(len(dataset), p.evaluate.max_clips or len(dataset)))
            metrics.update({f"{split}/{key}": value for key, value in found[split].items()})
    with open_live(STOCK_EVAL) as live:
        log_summary(live, metrics)
    write_windows(windows_file(STOCK_EVAL), windows)
    typer.echo(json.dumps(metrics, indent=2))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
