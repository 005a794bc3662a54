"""Stage 5: the adapter on held-out clips beside a label-prior baseline and stock Whisper."""

from __future__ import annotations

import json

import typer

from bestrq.adapter import build_model, check_base, read_adapter
from bestrq.dataset import FeatureDataset
from bestrq.distributed import resolve_device
from bestrq.evaluate import compare_asr, evaluate_adapter, probe_encoders
from bestrq.whisper_model import load_whisper
from stages.common import (
    ADAPTER,
    FEATURES,
    LIVE,
    friendly_errors,
    log_summary,
    open_live,
    params_or_exit,
    write_windows,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def evaluate(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """BEST-RQ loss, masked accuracy and codebook utilisation of the adapted encoder on
    data/features/eval, beside the label prior of data/features/train scored on the same masked
    targets; with evaluate.asr, the WER of stock and adapted Whisper on the transcribed eval
    clips with a 95% paired bootstrap interval of their difference; with evaluate.probes, the
    label-free probes (effective rank, Davies-Bouldin index) of the stock and adapted
    encoder's output on the eval clips."""
    p = params_or_exit("evaluate", params)
    windows: list[dict] = []  # per eval window: reference, both hypotheses, word errors
    with friendly_errors():
        tensors, info = read_adapter(ADAPTER)
        base = load_whisper(p.model)
        check_base(base, info, ADAPTER, p.model)
        model = build_model(base, info, tensors)
        dataset = FeatureDataset(FEATURES / "eval")
        train = FeatureDataset(FEATURES / "train")  # the label prior's frequencies
        device = resolve_device(p.train.device)
        metrics = evaluate_adapter(model, dataset, train, p.evaluate, device)
        if p.evaluate.probes:
            metrics.update(probe_encoders(model, dataset, p.evaluate, device))
        if p.evaluate.asr:
            del model, base  # compare_asr loads its own Whisper, one copy at a time
            asr = p.evaluate.asr_config(p.train.precision)
            metrics.update(compare_asr(p.model, tensors, dataset, asr, device, windows))
    metrics["eval_clips"] = float(min(len(dataset), p.evaluate.max_clips or len(dataset)))
    with open_live("evaluate") as live:
        log_summary(live, metrics)
    write_windows(LIVE / "evaluate" / "windows.json", windows)
    typer.echo(json.dumps(metrics, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
