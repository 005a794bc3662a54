"""The study: a named grid of pipeline runs that answers "does pre-training on the unlabelled
audio give a better Whisper after the same small fine-tune?" for several recipes.

A grid file (`study.yaml`) holds `base`, the overrides every run shares (dotted params.yaml
keys: `max_steps`, `finetune.seeds`, ...), and `runs`, each run's own overrides on top. Every
run is checked as a whole params file before any run starts. A finished run is kept as one
record (its overrides, the params it ran with, every stage's metrics and the pre-training dev
curves); `study_table` turns the records into README's table.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bestrq.params import from_dict, validate
from bestrq.params_file import read_yaml

RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # also a DVC experiment name


@dataclass(frozen=True)
class StudyRun:
    """One run of the grid: its name and every override it makes (base, then its own)."""

    name: str
    overrides: dict[str, Any]

    def set_args(self) -> list[str]:
        """The overrides as `dvc exp run -S key=value` arguments (Hydra's value syntax)."""
        return [f"{key}={_hydra(value)}" for key, value in self.overrides.items()]


def _hydra(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z0-9_./+-]+", value) else json.dumps(value)
    return json.dumps(value)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a params mapping with dotted-key overrides set; a key that is not in the
    mapping is refused, naming it (a typo must not become a silently ignored knob)."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {key!r}: params.yaml has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {key!r}: params.yaml has no such key")
        node[leaf] = value
    return out


def load_grid(grid_path: Path, params_path: Path) -> list[StudyRun]:
    """The grid's runs in file order, each checked as a whole params file (ValueError naming
    the grid file, the run and the key otherwise)."""
    grid = read_yaml(grid_path)
    if not isinstance(grid, dict) or set(grid) - {"base", "runs"} or "runs" not in grid:
        raise ValueError(f"{grid_path}: expected a mapping with `runs` (and optionally `base`)")
    base = grid.get("base") or {}
    runs = grid["runs"]
    if not isinstance(base, dict) or not isinstance(runs, dict) or not runs:
        raise ValueError(f"{grid_path}: `base` must be a mapping and `runs` a non-empty one")
    raw = read_yaml(params_path)
    out = []
    for name, own in runs.items():
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise ValueError(f"{grid_path}: run name {name!r} must be 1-64 characters of "
                             "a-z, 0-9 and '-', starting with a letter or digit")
        if own is not None and not isinstance(own, dict):
            raise ValueError(f"{grid_path}: run {name!r} must be a mapping of overrides")
        run = StudyRun(name, {**base, **(own or {})})
        try:
            validate(from_dict(apply_overrides(raw, run.overrides), {},
                               f"{grid_path.name} run {name!r}"))
        except ValueError as err:
            raise ValueError(f"{grid_path}: run {name!r}: {err}") from err
        out.append(run)
    return out


def read_tsv(path: Path) -> list[list[float]]:
    """A DVCLive step file as [[step, value], ...]."""
    rows = path.read_text().splitlines()[1:]
    return [[float(x) for x in row.split("\t")[:2]] for row in rows if row.strip()]


def run_record(run: StudyRun, params: dict[str, Any], metrics: dict[str, Any],
               curves: dict[str, list[list[float]]], provenance: dict[str, Any]
               ) -> dict[str, Any]:
    """What a finished run leaves in results/: enough to rebuild its row of the table and to
    re-run it (`provenance`: the commit, the experiment and the wall time)."""
    return {"run": run.name, "overrides": run.overrides, **provenance, "params": params,
            "metrics": metrics, "curves": curves}


def first_beat(curves: dict[str, list[list[float]]], value: str = "dev/loss",
               prior: str = "dev/prior_loss") -> float | None:
    """The first logged step at which the dev loss is below the label prior's (None: never)."""
    prior_at = {step: v for step, v in curves.get(prior, [])}
    for step, v in curves.get(value, []):
        if step in prior_at and v < prior_at[step]:
            return step
    return None


def _interval(answer: dict[str, Any], stem: str) -> str:
    return (f"{answer[stem + '_diff']:+.2f} [{answer[stem + '_low']:+.2f}, "
            f"{answer[stem + '_high']:+.2f}]")


def _per_seed(answer: dict[str, Any]) -> str:
    seeds = sorted((int(k.removeprefix("ft_diff_seed_")), v) for k, v in answer.items()
                   if k.startswith("ft_diff_seed_"))
    return ", ".join(f"{v:+.2f}" for _, v in seeds) or "-"


def study_table(records: list[dict[str, Any]], split: str = "test") -> str:
    """README's table: per run, the recipe, whether BEST-RQ beat the label prior on dev, and
    the test WERs (zero-shot and fine-tuned, stock and from the adapter) with the paired
    speaker-bootstrap intervals of their differences (points; below 0 the adapter is better)
    and each fine-tune seed's difference (the pooled interval holds the seeds fixed, so their
    spread is the part of the uncertainty it leaves out)."""
    head = ("| run | adapter | BEST-RQ layer | distilled | distill weight | updates | "
            "dev loss / prior (last) | beats prior at | zero-shot stock | zero-shot adapted "
            "| difference [95%] | fine-tuned stock | fine-tuned from adapter "
            "| difference [95%] | per seed |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for rec in records:
        p, answer = rec["params"], rec["metrics"]["report"][split]
        held = rec["metrics"]["report"]["dev"]["heldout"]
        beat = first_beat(rec["curves"])
        lines.append(
            f"| {rec['run']} | {p['adapter']} | {p['bestrq_layer']} | {p['distill_layers']} | "
            f"{p['distill_weight']:g} | {p['max_steps']} | {held['loss']:.2f} / "
            f"{held['prior_loss']:.2f} | {'never' if beat is None else int(beat)} | "
            f"{answer['stock']:.1f} | {answer['bestrq']:.1f} | {_interval(answer, 'zs')} | "
            f"{answer['ft_stock']:.1f} | {answer['ft_bestrq']:.1f} | "
            f"{_interval(answer, 'ft')} | {_per_seed(answer)} |")
    return "\n".join(lines)


def load_records(folder: Path) -> list[dict[str, Any]]:
    """Every run record in a results folder, by name."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def curves_spec(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A Vega-Lite spec of each run's BEST-RQ dev loss and accuracy over the updates, beside
    the label prior's on the same masked targets (dashed): does pre-training learn more than
    the label frequencies, and from which update."""
    rows = []
    for rec in records:
        for metric in ("loss", "accuracy"):
            for series, name in (("BEST-RQ", f"dev/{metric}"),
                                 ("label prior", f"dev/prior_{metric}")):
                rows += [{"run": rec["run"], "metric": metric, "series": series,
                          "step": step, "value": value}
                         for step, value in rec["curves"].get(name, [])]

    def panel(metric: str, title: str) -> dict[str, Any]:
        return {"transform": [{"filter": {"field": "metric", "equal": metric}}],
                "mark": {"type": "line", "point": True},
                "width": 320, "height": 220, "title": title,
                "encoding": {
                    "x": {"field": "step", "type": "quantitative", "title": "update"},
                    "y": {"field": "value", "type": "quantitative", "title": title,
                          "scale": {"zero": False}},
                    "color": {"field": "run", "type": "nominal"},
                    "strokeDash": {"field": "series", "type": "nominal"}}}

    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json",
            "data": {"values": rows},
            "hconcat": [panel("loss", "dev masked cross-entropy (nats)"),
                        panel("accuracy", "dev masked accuracy")]}


def learning_table(records: list[dict[str, Any]], split: str = "test") -> str:
    """Does BEST-RQ learn here? Per run: the last train BEST-RQ loss, the held-out masked loss
    and accuracy against the label prior's on the same targets (`split`, after the last update),
    the first dev evaluation below the prior, and the label-free probes, stock -> adapted."""
    head = ("| run | train BEST-RQ loss | held-out loss / prior | held-out accuracy / prior | "
            "dev beats prior at | effective rank stock -> adapted | Davies-Bouldin stock -> "
            "adapted | pre-training s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for rec in records:
        ev = rec["metrics"]["evaluate"][split]
        pre = rec["metrics"]["pretrain"]
        beat = first_beat(rec["curves"])
        lines.append(
            f"| {rec['run']} | {pre['train']['bestrq_loss']:.2f} | "
            f"{ev['adapted']['loss']:.2f} / {ev['prior']['loss']:.2f} | "
            f"{100 * ev['adapted']['accuracy']:.1f}% / {100 * ev['prior']['accuracy']:.1f}% | "
            f"{'never' if beat is None else int(beat)} | "
            f"{ev['stock']['effective_rank']:.1f} -> {ev['adapted']['effective_rank']:.1f} | "
            f"{ev['stock']['davies_bouldin']:.2f} -> {ev['adapted']['davies_bouldin']:.2f} | "
            f"{pre['train_seconds']:.0f} |")
    return "\n".join(lines)
