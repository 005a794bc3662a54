"""The pipeline's answer in one place: the four WERs and the two differences, in WER points.

Evaluate (zero-shot) and finetune (after the same supervised fine-tune) each write many numbers;
this module picks the ones that answer "does pre-training on the unlabelled audio give a better
Whisper?", names them short enough for `dvc exp show` to render them first in a 200-column
terminal, and turns them into the records of the interval plots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The held-out splits, test first: the figures a run reports; dev is where knobs are chosen.
SPLITS = ("test", "dev")
# The four systems: (short name, label in the plot, source, key prefix in that source).
SYSTEMS = (
    ("stock", "zero-shot: stock Whisper", "evaluate", "stock"),
    ("bestrq", "zero-shot: BEST-RQ adapter", "evaluate", "adapted"),
    ("ft_stock", "fine-tuned from stock", "finetune", "stock"),
    ("ft_bestrq", "fine-tuned from the adapter", "finetune", "adapted"),
)
# The two differences (adapter minus stock): (summary key, low, high, label, source).
DIFFERENCES = (
    ("zs_diff", "zs_low", "zs_high", "zero-shot", "evaluate"),
    ("ft_diff", "ft_low", "ft_high", "fine-tuned", "finetune"),
)
# Per system, after the answer: its interval and word error counts (summary group, source key).
DETAILS = (("wer_low", "wer_low"), ("wer_high", "wer_high"), ("sub", "substitutions"),
           ("del", "deletions"), ("ins", "insertions"))
# BEST-RQ itself on a held-out split, beside the label prior (nats, share).
# ("heldout", not "bestrq": `<split>/bestrq` is the adapter's WER.)
BESTRQ = (
    ("heldout/loss", "adapted/loss"),
    ("heldout/prior_loss", "prior/loss"),
    ("heldout/accuracy", "adapted/accuracy"),
    ("heldout/prior_accuracy", "prior/accuracy"),
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
    """The answer columns in the order `dvc exp show` should show them, test first, then dev:
    the four WERs (%) as `<split>/<system>`, the two differences with their 95% paired
    intervals (points; `<split>/zs_diff`, `/ft_diff`, with `_low`, `_high`), each
    system's 95% interval and substitution, deletion and insertion counts, BEST-RQ's held-out
    loss and accuracy beside the label prior's; last, pre-training's final train loss.
    `sources` maps "evaluate", "finetune", "pretrain" to their flattened summaries (keys
    `<split>/...`); a number a source lacks (no transcripts, a skipped stage) is left out
    rather than invented."""
    out: dict[str, float] = {}
    for split in SPLITS:
        def get(source: str, key: str, split: str = split) -> Any:
            return sources.get(source, {}).get(f"{split}/{key}")

        for name, _, source, prefix in SYSTEMS:
            if (value := get(source, f"{prefix}/wer")) is not None:
                out[f"{split}/{name}"] = _points(value)
        for key, low, high, _, source in DIFFERENCES:
            if (value := get(source, "delta/wer")) is not None:
                out[f"{split}/{key}"] = _points(value)
                out[f"{split}/{low}"] = _points(get(source, "delta/wer_low"))
                out[f"{split}/{high}"] = _points(get(source, "delta/wer_high"))
        # With several fine-tune seeds, each seed's difference (the one above is pooled).
        for key, value in sources.get("finetune", {}).items():
            seed = key.removeprefix(f"{split}/seed_").removesuffix("/delta/wer")
            if key == f"{split}/seed_{seed}/delta/wer":
                out[f"{split}/ft_diff_seed_{seed}"] = _points(value)
        for group, found in DETAILS:
            for name, _, source, prefix in SYSTEMS:
                if (value := get(source, f"{prefix}/{found}")) is not None:
                    out[f"{split}/{group}/{name}"] = _points(value) if group.startswith("wer") \
                        else float(value)
        for key, found in BESTRQ:
            if (value := get("evaluate", found)) is not None:
                out[f"{split}/{key}"] = round(float(value), 4)
    if (value := sources.get("pretrain", {}).get("train/loss")) is not None:
        out["bestrq/train_loss"] = round(float(value), 4)
    return out


def absent(sources: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per system of the answer without a WER on a held-out split, saying why: the
    reason a skipped stage recorded (`skipped` in its summary), else that the split has no
    transcribed windows or its stage has not run."""
    lines = []
    for name, label, source, prefix in SYSTEMS:
        found = sources.get(source, {})
        missing = [split for split in SPLITS if f"{split}/{prefix}/wer" not in found]
        if not missing:
            continue
        why = found.get("skipped") or (f"dvclive/{source} has no summary" if not found else
                                       f"no transcribed {' or '.join(missing)} windows")
        lines.append(f"{name} ({label}) on {', '.join(missing)}: absent: {why}")
    return lines


def wer_records(sources: Mapping[str, Mapping[str, Any]], split: str = "test"
                ) -> list[dict[str, Any]]:
    """One record per system with a WER on `split`: its label, WER and 95% interval (%)."""
    records = []
    for _, label, source, prefix in SYSTEMS:
        found = sources.get(source, {})
        key = f"{split}/{prefix}/wer"
        if key in found:
            records.append({"system": label, "wer": _points(found[key]),
                            "low": _points(found[f"{key}_low"]),
                            "high": _points(found[f"{key}_high"])})
    return records


def difference_records(sources: Mapping[str, Mapping[str, Any]], split: str = "test"
                       ) -> list[dict[str, Any]]:
    """One record per comparison on `split`: adapter minus stock WER (points), 95% paired
    interval."""
    records = []
    for _, _, _, label, source in DIFFERENCES:
        found = sources.get(source, {})
        key = f"{split}/delta/wer"
        if key in found:
            records.append({"comparison": label, "difference": _points(found[key]),
                            "low": _points(found[f"{key}_low"]),
                            "high": _points(found[f"{key}_high"])})
    return records
