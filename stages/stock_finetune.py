"""Stage: the supervised adapter fine-tune from stock Whisper (per seed) and its WER on the test
and dev clips, the baseline the fine-tune from the BEST-RQ adapter is compared with.

It reads the features, the model and the fine-tune knobs, and no BEST-RQ knob or adapter, so an
experiment on BEST-RQ (`dvc exp run -S num_codebooks=16`) does not run it again: its per-window
hypotheses and figures are read by finetune."""

from __future__ import annotations

import typer

from stages.common import FEATURES, FINETUNE_CHECKPOINTS, FINETUNED, friendly_errors, run_app
from stages.finetune_common import run_start
from stages.stock_common import STOCK_FINETUNE
from stages.training_common import params_or_exit, relaunch_under_torchrun

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def stock_finetune(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Fine-tune the adapter (encoder and decoder) on the transcribed train clips from stock
    Whisper, once per finetune.seeds; write data/finetune/stock/adapter-only.safetensors (the
    first seed; the others' under data/finetune/stock/seed-<s>/), its WERs on the test and dev
    clips and each window's hypotheses (dvclive/stock_finetune/windows.json)."""
    p = params_or_exit(STOCK_FINETUNE, params)
    relaunch_under_torchrun(p, "stages.stock_finetune")
    with friendly_errors():
        run_start(p, STOCK_FINETUNE, "stock", FEATURES, FINETUNED / "stock", FINETUNE_CHECKPOINTS)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
