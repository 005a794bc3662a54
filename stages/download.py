"""Stage 1: acquire a corpus (synthetic speech, a folder, a URL or a LibriSpeech preset)."""

from __future__ import annotations

import shutil

import typer

from bestrq.sources import acquire
from stages.common import RAW, finish_stage, friendly_errors, params_or_exit

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def download(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Write data/raw/manifest.jsonl (id, path, transcript, group) and the audio it lists."""
    p = params_or_exit("download", params)
    with friendly_errors():
        # Keep a verified archive across re-runs: only the index and synthetic audio are redone.
        for sub in ("synthetic", "manifest.jsonl"):
            target = RAW / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        stats = acquire(p.download, RAW)
    finish_stage("download", stats)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
