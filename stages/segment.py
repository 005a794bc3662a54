"""Stage 2: decode, resample to 16 kHz mono, cut and pack into <= 30 s windows, split."""

from __future__ import annotations

import warnings

import typer

from bestrq.params_layout import read_configs
from bestrq.segment import SPLITS, SegmentConfig, SplitShareWarning, segment_corpus, validate
from stages.common import RAW, SEGMENTS, checked_or_exit, finish_stage, friendly_errors, run_app

app = typer.Typer(add_completion=False, help=__doc__)


def read_params(path: str) -> SegmentConfig:
    """params.yaml's `segment` section, checked; the stage reads nothing else of the file."""
    cfg: SegmentConfig = read_configs(path, {"segment": SegmentConfig})["segment"]
    validate(cfg)
    return cfg


@app.command()
def segment(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Write data/segments/{train,dev,test}.jsonl, the window audio and skipped.jsonl."""
    cfg = checked_or_exit("segment", lambda: read_params(params))
    with friendly_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SplitShareWarning)
        stats = segment_corpus(RAW / "manifest.jsonl", SEGMENTS, cfg)
    finish_stage("segment", stats)
    for split in SPLITS:
        typer.echo(f"segment: {split}: {int(stats[f'speakers_{split}'])} speakers, "
                   f"{int(stats[f'num_{split}'])} windows, {stats[f'hours_{split}']:.2f} h, "
                   f"{int(stats[f'transcribed_{split}'])} transcribed windows")
    for warning in caught:
        typer.secho(f"warning: {warning.message}", fg=typer.colors.YELLOW, err=True)
    if stats.get("num_listed"):
        typer.secho(f"{int(stats['num_skipped'])} file(s) gave no window (undecodable, too "
                    f"short, ...); {int(stats['num_listed'])} problem(s) in all, each with its "
                    f"reason: see {SEGMENTS / 'skipped.jsonl'}", fg=typer.colors.YELLOW, err=True)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
