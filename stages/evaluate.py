"""Stage 5: the adapter on held-out clips beside a label-prior baseline and stock Whisper.

Stock Whisper's own figures come from the stock_eval stage (its per-window hypotheses and its
summary), which no BEST-RQ knob re-runs: this stage decodes the adapted Whisper only."""

from __future__ import annotations

import json

import typer

from bestrq.adapter import adapter_config, build_model, check_base, read_adapter
from bestrq.dataset import FeatureDataset
from bestrq.distributed import resolve_device
from bestrq.evaluate import (
    PROBED,
    compare_asr,
    decoded_from_rows,
    evaluate_adapter,
    probe_differences,
    probe_encoders,
    train_label_counts,
)
from bestrq.whisper_model import load_whisper
from stages.common import ADAPTER, FEATURES, LIVE, friendly_errors, log_summary, open_live, run_app
from stages.stock_common import (
    STOCK_EVAL,
    split_figures,
    stock_figures,
    stock_windows,
    windows_file,
)
from stages.training_common import REPORTED, params_or_exit, write_windows

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def evaluate(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """On data/features/test and data/features/dev (metrics `test/...`, `dev/...`; knobs are
    chosen on dev, test reports): BEST-RQ loss, masked accuracy and codebook utilisation of
    the adapted encoder beside the label prior of data/features/train scored on the same masked
    targets; with evaluate.asr, the WER of stock and adapted Whisper on the transcribed clips
    with a 95% paired bootstrap interval of their difference; with evaluate.probes, the
    label-free probes (effective rank, Davies-Bouldin index) of the stock and adapted
    encoder's output. The stock figures are the stock_eval stage's (dvclive/stock_eval/)."""
    p = params_or_exit("evaluate", params)
    windows: list[dict] = []  # per window: split, reference, both hypotheses, word errors
    metrics: dict[str, float] = {}
    with friendly_errors():
        stock = stock_figures(STOCK_EVAL)
        stock_rows = stock_windows(STOCK_EVAL) if p.evaluate.asr else []
        tensors, info = read_adapter(ADAPTER)
        base = load_whisper(p.run.model)
        check_base(base, info, ADAPTER, p.run.model)
        model = build_model(base, info, tensors)
        del base
        train = FeatureDataset(FEATURES / "train")  # the label prior's frequencies
        device = resolve_device(p.train.device)
        asr = p.evaluate.asr_config(p.train.precision)
        datasets = {split: FeatureDataset(FEATURES / split) for split in REPORTED}
        # The stock system's figures as stock_eval found them; the WERs are computed again
        # below, beside the adapted ones, from its hypotheses (the same numbers).
        found: dict[str, dict[str, float]] = {split: split_figures(stock, split)
                                              for split in REPORTED}
        counts = train_label_counts(model, train, p.evaluate, device)  # once, for every split
        for split, dataset in datasets.items():
            found[split].update(evaluate_adapter(model, dataset, train, p.evaluate, device,
                                                 train_counts=counts))
            if p.evaluate.probes:
                missing = [k for k in PROBED if f"stock/{k}" not in found[split]]
                if missing:
                    raise ValueError(f"dvclive/{STOCK_EVAL}/metrics.json has no {split}/stock/"
                                     f"{missing[0]}: run `dvc repro {STOCK_EVAL}` with "
                                     "evaluate.probes on")
                found[split].update(probe_encoders(model, dataset, p.evaluate, device,
                                                   systems=("adapted",)))
                found[split].update(probe_differences(found[split]))
        del model  # compare_asr loads its own Whisper, one copy at a time
        for split, dataset in datasets.items():
            if p.evaluate.asr:
                rows: list[dict] = []
                kept = decoded_from_rows(stock_rows, split, ["stock"],
                                         str(windows_file(STOCK_EVAL)))["stock"]
                found[split].update(compare_asr(p.run.model, tensors, dataset, asr, device, rows,
                                                adapter_config(info), stock=kept))
                windows += [{"split": split, **row} for row in rows]
            found[split]["clips"] = float(min(len(dataset), p.evaluate.max_clips or len(dataset)))
            metrics.update({f"{split}/{key}": value for key, value in found[split].items()})
    with open_live("evaluate") as live:
        log_summary(live, metrics)
    write_windows(LIVE / "evaluate" / "windows.json", windows)
    typer.echo(json.dumps(metrics, indent=2))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
