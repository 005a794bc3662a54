"""Stage 3: Whisper log-mels of every window, memory-mapped shards, train-set statistics."""

from __future__ import annotations

from pathlib import Path

import typer

from bestrq.features import SUPPORTED_N_MELS, FeatureConfig, compute_features, validate
from bestrq.params_layout import read_configs
from bestrq.run import RunConfig
from stages.common import (
    FEATURES,
    SEGMENTS,
    checked_or_exit,
    finish_stage,
    friendly_errors,
    run_app,
)

app = typer.Typer(add_completion=False, help=__doc__)


def read_params(path: str) -> tuple[int, FeatureConfig]:
    """params.yaml's top-level n_mels (declared with the run's knobs) and `features` section,
    checked; the stage reads nothing else of the file."""
    found = read_configs(path, {"features": FeatureConfig}, {"n_mels": RunConfig})
    n_mels, cfg = found["n_mels"], found["features"]
    validate(cfg)
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"{Path(path).name}: n_mels: must be one of "
                         f"{', '.join(map(str, sorted(SUPPORTED_N_MELS)))}, got {n_mels}")
    return n_mels, cfg


@app.command()
def features(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Write data/features/{train,eval}/ shards and data/features/stats.json."""
    n_mels, cfg = checked_or_exit("features", lambda: read_params(params))
    with friendly_errors():
        stats = compute_features(SEGMENTS, FEATURES, n_mels, cfg)
    finish_stage("features", stats)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
