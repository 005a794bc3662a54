"""`bestrq-export`: fold an adapter's IA^3 vectors into a stock openai-whisper checkpoint.

The encoder's vectors are always merged; the decoder's too where the file has them (fine-tuned
adapters; BEST-RQ adapters adapt the encoder only and leave the decoder stock). The result
loads with `whisper.load_model(path)` and runs anywhere Whisper runs, with no dependency on
this project. Not a DVC stage: merged checkpoints are the size of the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bestrq.adapter import export_merged
from stages.common import ADAPTER, friendly_errors

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="checkpoint to write, e.g. tiny.en-adapted.pt")],
    adapter: Annotated[Path, typer.Option(help="adapter file: full BEST-RQ, IA^3 vectors only, "
                                                  "or fine-tuned (encoder and decoder vectors)")
                       ] = ADAPTER,
    base: Annotated[str, typer.Option(help="Whisper name or checkpoint path of the base model; "
                                           "empty: the one recorded in the adapter")] = "",
) -> None:
    """Write OUT: the base Whisper with the adapter's IA^3 vectors merged into its encoder
    weights and, where the adapter has decoder vectors (fine-tuned adapters), its decoder's."""
    with friendly_errors():
        path = export_merged(adapter, base or None, out)
    typer.echo(f"export: wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
