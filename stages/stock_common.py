"""The stock baselines' outputs, as the stages that compare with them read them.

stock_eval (stock Whisper zero-shot) and stock_finetune (the fine-tune from stock Whisper)
depend on no BEST-RQ knob, so an experiment on one re-runs neither. evaluate and finetune read
what they wrote: the per-window hypotheses (`windows.json`), for the paired intervals, and
their DVCLive summary, whose stock figures (`.../stock/...`: WERs, decoding counts, probes,
training figures) go into the comparing stage's summary as they are, so that it holds both
systems, as it did when one stage computed both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bestrq.report import flatten
from stages.common import LIVE

STOCK_EVAL = "stock_eval"  # must match dvc.yaml
STOCK_FINETUNE = "stock_finetune"


def windows_file(stage: str, live_dir: Path = LIVE) -> Path:
    """A stage's per-window table."""
    return live_dir / stage / "windows.json"


def _read(path: Path, stage: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {stage} stage's output is missing: run "
                                f"`dvc repro {stage}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}): run `dvc repro -f {stage}`") from err


def stock_windows(stage: str, live_dir: Path = LIVE) -> list[dict]:
    """The per-window rows (split, id, reference, hypotheses, errors) the stock stage wrote."""
    return _read(windows_file(stage, live_dir), stage)


def stock_figures(stage: str, live_dir: Path = LIVE) -> dict[str, Any]:
    """The stock figures of the stock stage's summary, flattened (`test/stock/wer`,
    `seed_1/stock/train_seconds`, `test/stock@1/fallback_windows`, ...): every key with a
    `stock` part."""
    summary = flatten(_read(live_dir / stage / "metrics.json", stage))
    # `stock@<seed>/...`: one seed's run among several (its decoding counts)
    return {key: value for key, value in summary.items()
            if any(part.split("@")[0] == "stock" for part in key.split("/"))}


def split_figures(figures: dict[str, Any], split: str) -> dict[str, Any]:
    """The figures of one held-out split, without its `<split>/` prefix."""
    return {key.removeprefix(f"{split}/"): value for key, value in figures.items()
            if key.startswith(f"{split}/")}
