"""Stage 3: Whisper log-mels of every window, memory-mapped shards, train-set statistics."""

from __future__ import annotations

import typer

from bestrq.features import compute_features
from stages.common import (
    FEATURES,
    SEGMENTS,
    finish_stage,
    friendly_errors,
    params_or_exit,
    run_app,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def features(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Write data/features/{train,eval}/ shards and data/features/stats.json."""
    p = params_or_exit("features", params)
    with friendly_errors():
        stats = compute_features(SEGMENTS, FEATURES, p.run.n_mels, p.features)
    finish_stage("features", stats)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
