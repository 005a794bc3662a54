"""Stage 1: acquire a corpus (synthetic speech, a folder, a URL or a LibriSpeech preset)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import typer

from bestrq.params_layout import read_configs
from bestrq.redact import redact
from bestrq.sources import (
    SourceConfig,
    UnverifiedDownloadWarning,
    acquire,
    check_watch,
    validate,
)
from stages.common import (
    DATA,
    RAW,
    checked_or_exit,
    exit_on_sigterm,
    friendly_errors,
    open_live,
    run_app,
)

app = typer.Typer(add_completion=False, help=__doc__)

# Downloads (keyed by URL hash and sha256) and the sha256 of in-place files: outside the DVC
# output, so an archive is not stored beside its extracted copy, and kept across the re-runs
# DVC starts by deleting data/raw. BESTRQ_CACHE_DIR moves it (e.g. to ~/.cache/whisper-bestrq
# to share downloads between checkouts).
CACHE = Path(os.environ.get("BESTRQ_CACHE_DIR") or DATA / "cache")


def read_params(path: str) -> SourceConfig:
    """params.yaml's `download` section, checked (declared types and ranges, then the sources
    can be read); the stage reads nothing else of the file."""
    cfg: SourceConfig = read_configs(path, {"download": SourceConfig})["download"]
    validate(cfg)
    return cfg


@app.command()
def download(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Write data/raw/manifest.jsonl (id, path, transcript, group), data/raw/skipped.jsonl and
    the audio they list; for URL sources data/raw/download.json (with the sha256)."""
    cfg = checked_or_exit("download", lambda: read_params(params))
    exit_on_sigterm()  # a stopped download leaves no partial file behind
    with friendly_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedDownloadWarning)
        check_watch(cfg)
        stats = acquire(cfg, RAW, CACHE)
    for warning in caught:
        typer.secho(f"warning: {redact(str(warning.message))}", fg=typer.colors.YELLOW, err=True)
    with open_live("download") as live:
        for key, value in stats.items():
            live.log_metric(key, value if isinstance(value, str) else float(value), plot=False)
        live.make_summary()
    typer.echo(f"download: {stats}")
    if "download_sha256" in stats:
        typer.echo(f"downloaded {redact(cfg.source)}: sha256:{stats['download_sha256']} "
                   f"({int(stats['download_bytes'])} bytes, "
                   f"{'verified' if stats['download_verified'] else 'NOT verified'})")
    if stats.get("num_skipped"):
        typer.secho(f"{int(stats['num_skipped'])} file(s), archive member(s) or transcript "
                    f"line(s) left aside, each with its reason: see {RAW / 'skipped.jsonl'}",
                    fg=typer.colors.YELLOW, err=True)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
