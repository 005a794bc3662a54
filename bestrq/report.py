"""The pipeline's answer in one place: the four WERs and the two differences, in WER points.

Evaluate (zero-shot) and finetune (after the same supervised fine-tune) each write many numbers;
this module picks the ones that answer "does pre-training on the unlabelled audio give a better
Whisper?", names them short enough for `dvc exp show` to render them first in a 200-column
terminal, and turns them into the records of the interval plots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The four systems: (summary key, label in the plot, source, key prefix in that source).
SYSTEMS = (
    ("wer/stock", "zero-shot: stock Whisper", "evaluate", "stock"),
    ("wer/bestrq", "zero-shot: BEST-RQ adapter", "evaluate", "adapted"),
    ("wer/ft_stock", "fine-tuned from stock", "finetune", "stock"),
    ("wer/ft_bestrq", "fine-tuned from the adapter", "finetune", "adapted"),
)
# The two differences (adapter minus stock): (summary key, low, high, label, source).
DIFFERENCES = (
    ("diff/zero_shot", "diff/zs_low", "diff/zs_high", "zero-shot", "evaluate"),
    ("diff/finetuned", "diff/ft_low", "diff/ft_high", "fine-tuned", "finetune"),
)
# BEST-RQ itself on the held-out clips, beside the label prior (nats, share).
BESTRQ = (
    ("bestrq/loss", "evaluate", "adapted/loss"),
    ("bestrq/prior_loss", "evaluate", "prior/loss"),
    ("bestrq/accuracy", "evaluate", "adapted/accuracy"),
    ("bestrq/prior_accuracy", "evaluate", "prior/accuracy"),
    ("bestrq/train_loss", "pretrain", "train/loss"),
)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """DVCLive's nested summary ({"stock": {"wer": x}}) as {"stock/wer": x}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _points(fraction: float) -> float:
    return round(100.0 * float(fraction), 2)


def summary(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The answer columns in the order `dvc exp show` should show them: the four WERs (%), the
    two differences with their 95% paired intervals (points), then BEST-RQ's held-out loss and
    accuracy beside the label prior's. `sources` maps "evaluate", "finetune", "pretrain" to
    their flattened summaries; a number a source lacks (no transcripts, a skipped stage) is
    left out rather than invented."""
    out: dict[str, float] = {}
    for key, _, source, prefix in SYSTEMS:
        value = sources.get(source, {}).get(f"{prefix}/wer")
        if value is not None:
            out[key] = _points(value)
    for key, low, high, _, source in DIFFERENCES:
        found = sources.get(source, {})
        if "delta/wer" in found:
            out[key] = _points(found["delta/wer"])
            out[low] = _points(found["delta/wer_low"])
            out[high] = _points(found["delta/wer_high"])
    for key, source, name in BESTRQ:
        value = sources.get(source, {}).get(name)
        if value is not None:
            out[key] = round(float(value), 4)
    return out


def wer_records(sources: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per system with a WER: its label, WER and 95% bootstrap interval (%)."""
    records = []
    for _, label, source, prefix in SYSTEMS:
        found = sources.get(source, {})
        if f"{prefix}/wer" in found:
            records.append({"system": label, "wer": _points(found[f"{prefix}/wer"]),
                            "low": _points(found[f"{prefix}/wer_low"]),
                            "high": _points(found[f"{prefix}/wer_high"])})
    return records


def difference_records(sources: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per comparison: adapter minus stock WER (points), 95% paired interval."""
    records = []
    for _, _, _, label, source in DIFFERENCES:
        found = sources.get(source, {})
        if "delta/wer" in found:
            records.append({"comparison": label, "difference": _points(found["delta/wer"]),
                            "low": _points(found["delta/wer_low"]),
                            "high": _points(found["delta/wer_high"])})
    return records
