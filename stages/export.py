"""`bestrq-export`: fold an adapter (IA^3 vectors or LoRA matrices) into the base Whisper and
write the merged model as an openai-whisper checkpoint, a Hugging Face folder or a CTranslate2
folder.

The encoder's adapter is always merged; the decoder's too where the file has them (fine-tuned
adapters; BEST-RQ adapters adapt the encoder only and leave the decoder stock). The result runs
anywhere Whisper runs, with no dependency on this project:
  --format openai (default): a checkpoint for `whisper.load_model(OUT)`;
  --format hf: a folder for transformers (`WhisperForConditionalGeneration`, `pipeline`);
  --format ct2: a folder for faster-whisper (`WhisperModel(OUT)`), weights in --quantization;
  --format peft: not merged, the adapter as a PEFT folder (adapter_config.json,
    adapter_model.safetensors) for `peft.PeftModel.from_pretrained(hf_base, OUT)`, where
    hf_base is the stock base written by `bestrq-export BASE --format hf --no-adapter`.
hf and ct2 need the optional packages: pip install 'whisper-bestrq[export]'.
Not a DVC stage: merged models are the size of the base model.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from bestrq.adapter import export_merged
from bestrq.convert import CT2_QUANTIZATIONS, require_export_extra
from bestrq.peft_adapter import export_peft
from stages.common import ADAPTER, DATA, friendly_errors, run_app

app = typer.Typer(add_completion=False, help=__doc__)


class Format(str, Enum):
    """The formats of bestrq.convert.FORMATS, as Typer choices."""

    openai = "openai"
    hf = "hf"
    ct2 = "ct2"
    peft = "peft"


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="what to write: a checkpoint file for openai "
                                             "(e.g. tiny.en-adapted.pt), a folder for hf and "
                                             "ct2")],
    adapter: Annotated[Path, typer.Option(help="adapter file: full BEST-RQ, adapter only, or "
                                                  "fine-tuned (encoder and decoder)")
                       ] = ADAPTER,
    base: Annotated[str, typer.Option(help="base model: Whisper name, checkpoint path, Hugging "
                                           "Face folder or hub name; empty: the one recorded "
                                           "in the adapter")] = "",
    format: Annotated[Format, typer.Option(  # named as the option: --format
        help="openai: openai-whisper checkpoint; hf: Hugging Face folder; ct2: CTranslate2 "
             "folder for faster-whisper; peft: the adapter alone as a PEFT folder")
    ] = Format.openai,
    quantization: Annotated[str | None, typer.Option(
        help=f"ct2 only: weight type ({', '.join(CT2_QUANTIZATIONS)}); default float32")
    ] = None,
    no_adapter: Annotated[bool, typer.Option(
        "--no-adapter", help="write the stock --base alone (openai, hf, ct2): e.g. the "
                             "Hugging Face model a --format peft adapter is loaded onto")
    ] = False,
) -> None:
    """Write OUT: the base Whisper with the adapter merged into its encoder weights and,
    where the adapter has a decoder part (fine-tuned adapters), into its decoder's; with
    --format peft, the adapter alone for PEFT; with --no-adapter, the stock base."""
    with friendly_errors():
        if no_adapter and format is Format.peft:
            raise ValueError("--no-adapter: a peft export is the adapter; write the stock "
                             "base with --format hf")
        if no_adapter and not base:
            raise ValueError("--no-adapter needs --base (the model to write)")
        require_export_extra(format.value)  # before reading anything
        # Never into the pipeline's outputs (data/), never over the adapter or the base.
        if format is Format.peft:
            if quantization is not None:
                raise ValueError("--quantization applies to --format ct2 only")
            path = export_peft(adapter, out, base or None, protected=[DATA])
        else:
            path = export_merged(None if no_adapter else adapter, base or None, out,
                                 format.value, quantization, protected=[DATA])
    typer.echo(f"export: wrote {path} ({format.value}, {_size_mb(path):.1f} MB)")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
