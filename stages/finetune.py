"""Stage 6: supervised adapter fine-tune from the BEST-RQ adapter (per seed), and the WER of it
and of the fine-tune from stock Whisper on the test and dev clips, with a 95% paired bootstrap
interval of their difference. The fine-tune from stock Whisper is the stock_finetune stage's
(its per-window hypotheses and figures), which no BEST-RQ knob re-runs."""

from __future__ import annotations

from pathlib import Path

import typer

from bestrq.params import Params
from stages.common import (
    ADAPTER,
    ADAPTER_ONLY_NAME,
    FEATURES,
    FINETUNE_CHECKPOINTS,
    FINETUNED,
    friendly_errors,
    run_app,
)
from stages.finetune_common import run_start
from stages.stock_common import STOCK_FINETUNE
from stages.training_common import params_or_exit, relaunch_under_torchrun

app = typer.Typer(add_completion=False, help=__doc__)


def run_finetune(p: Params, features_dir: Path = FEATURES, adapter_dir: Path = ADAPTER.parent,
                 out_dir: Path = FINETUNED / "adapted",
                 checkpoint_root: Path = FINETUNE_CHECKPOINTS) -> None:
    """Fine-tune from the adapter, write its adapters, then compare their WERs with the stock
    fine-tunes' (rank 0)."""
    run_start(p, "finetune", "adapted", features_dir, out_dir, checkpoint_root,
              start_file=adapter_dir / ADAPTER_ONLY_NAME, stock_stage=STOCK_FINETUNE)


@app.command()
def finetune(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Fine-tune the adapter (encoder and decoder) on the transcribed train clips from
    data/adapters, once per finetune.seeds; write data/finetune/adapted/adapter-only.safetensors
    (the first seed; the others' under data/finetune/adapted/seed-<s>/) and its WERs on the
    test and dev clips beside those of the fine-tune from stock Whisper (stock_finetune)."""
    p = params_or_exit("finetune", params)
    relaunch_under_torchrun(p, "stages.finetune")
    with friendly_errors():
        run_finetune(p)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
