"""`bestrq-export`: fold an adapter (IA^3 vectors or LoRA matrices) into the base Whisper and
write the merged model as an openai-whisper checkpoint, a Hugging Face folder or a CTranslate2
folder.

The encoder's adapter is always merged; the decoder's too where the file has them (fine-tuned
adapters; BEST-RQ adapters adapt the encoder only and leave the decoder stock). The result runs
anywhere Whisper runs, with no dependency on this project:
  --format openai (default): a checkpoint for `whisper.load_model(OUT)`;
  --format hf: a folder for transformers (`WhisperForConditionalGeneration`, `pipeline`);
  --format ct2: a folder for faster-whisper (`WhisperModel(OUT)`), weights in --quantization.
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
from stages.common import ADAPTER, DATA, friendly_errors

app = typer.Typer(add_completion=False, help=__doc__)

class Format(str, Enum):
    """The formats of bestrq.convert.FORMATS, as Typer choices."""

    openai = "openai"
    hf = "hf"
    ct2 = "ct2"


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
             "folder for faster-whisper")] = Format.openai,
    quantization: Annotated[str | None, typer.Option(
        help=f"ct2 only: weight type ({', '.join(CT2_QUANTIZATIONS)}); default float32")
    ] = None,
) -> None:
    """Write OUT: the base Whisper with the adapter merged into its encoder weights and,
    where the adapter has a decoder part (fine-tuned adapters), into its decoder's."""
    with friendly_errors():
        require_export_extra(format.value)  # before reading anything
        # Never into the pipeline's outputs (data/), never over the adapter or the base.
        path = export_merged(adapter, base or None, out, format.value, quantization,
                             protected=[DATA])
    typer.echo(f"export: wrote {path} ({format.value}, {_size_mb(path):.1f} MB)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
