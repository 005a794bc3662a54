"""The study: a named grid of pipeline runs that answers "does pre-training on the unlabelled
audio give a better Whisper after the same small fine-tune?" for several recipes.

A grid file (`study.yaml`) holds `base`, the overrides every run shares (dotted params.yaml
keys: `max_steps`, `finetune.seeds`, ...; a section as a mapping sets the keys it names), and
`runs`, each run's own overrides on top. Every run is checked as a whole params file before any
run starts, as DVC will write it: values reach params.yaml as the grid gives them. A finished
run is kept as one record (its overrides, the params it ran with, every stage's metrics and the
pre-training dev curves); `study_table` turns the records into README's table.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bestrq.params import from_dict, validate
from bestrq.params_file import quote, read_yaml
from bestrq.report import SPLITS

RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # also a DVC experiment name


@dataclass(frozen=True)
class StudyRun:
    """One run of the grid: its name and every override it makes (base, then its own), as
    dotted keys (a section given as a mapping is set key by key: `grid_overrides`)."""

    name: str
    overrides: dict[str, Any]

    def set_args(self) -> list[str]:
        """The overrides as `dvc exp run -S key=value` arguments, in Hydra's override grammar
        (what DVC parses them with), so that each value reaches params.yaml as it is here."""
        return [f"{key}={hydra_value(value)}" for key, value in self.overrides.items()]


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar. Strings are always quoted: unquoted, `true`, `3`
    or `null` would change type and `café`, `#`, `:` or a space would not parse. Floats are
    Hydra floats, so they arrive as numbers (DVC writes them as Python's repr: `5e-05`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)  # inf, nan, 5e-05, 1e+20: all Hydra floats
    if isinstance(value, str):
        return _hydra_quoted(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise ValueError(f"{quote(value)}: not a value `dvc exp run -S` can set (strings, "
                     "numbers, booleans, null, lists of them, and non-empty sections)")


def _hydra_quoted(text: str) -> str:
    """`text` as a single-quoted Hydra string that DVC turns back into `text` exactly."""
    # OmegaConf (under Hydra) resolves `${...}` in strings: n backslashes before `${` are
    # written as 2n+1, which it reads back as n backslashes and a literal `${`.
    text = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m[1]) + 1) + "${", text)
    # Hydra's quoted strings: backslashes are literal except those before a quote (or the
    # closing one), which are doubled; the quote itself is escaped.
    text = re.sub(r"(\\*)'", lambda m: "\\" * (2 * len(m[1]) + 1) + "'", text)
    text = re.sub(r"(\\+)$", lambda m: 2 * m[1], text)
    return f"'{text}'"


def grid_overrides(overrides: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
    """The grid's overrides as dotted keys, a mapping value set key by key (`segment:
    {seed: 1}` is `segment.seed: 1`): DVC merges a mapping into the section it names, so the
    check must see the section's other keys kept, not dropped."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out.update(grid_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
        run = StudyRun(name, {**grid_overrides(base), **grid_overrides(own or {})})
        try:
            validate(from_dict(apply_overrides(raw, run.overrides), {},
                               f"{grid_path.name} run {name!r}"))
            run.set_args()
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


# The figures README's tables read, as dotted paths into a record ({split}: test or dev). A
# figure a record lacks (evaluate.asr or evaluate.probes off, a stage with nothing to measure)
# is shown as n/a and named under the table, never invented; one of another kind is refused.
Column = tuple[str, tuple[str, ...], Callable[..., str]]  # title, figures, how they are shown
NOT_SHOWN = "n/a"
REQUIRED_PARAMS = ("adapter", "bestrq_layer", "distill_layers", "distill_weight", "max_steps")
_REPORT = "metrics.report.{split}."
_EVALUATE = "metrics.evaluate.{split}."


def _points(v: float) -> str:
    return f"{v:.1f}"


def _interval(diff: float, low: float, high: float) -> str:
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]"


HELDOUT: list[Column] = [
    ("dev held-out loss", ("metrics.report.dev.heldout.loss",
                           "metrics.report.dev.heldout.prior_loss"),
     lambda loss, prior: f"{loss:.2f} / {prior:.2f}")]
WERS: list[Column] = [
    ("zero-shot stock", (_REPORT + "stock",), _points),
    ("zero-shot adapted", (_REPORT + "bestrq",), _points),
    ("zero-shot difference", tuple(_REPORT + k for k in ("zs_diff", "zs_low", "zs_high")),
     _interval),
    ("fine-tuned stock", (_REPORT + "ft_stock",), _points),
    ("fine-tuned from adapter", (_REPORT + "ft_bestrq",), _points),
    ("fine-tuned difference", tuple(_REPORT + k for k in ("ft_diff", "ft_low", "ft_high")),
     _interval),
]
LEARNING: list[Column] = [
    ("train BEST-RQ loss", ("metrics.pretrain.train.bestrq_loss",), lambda v: f"{v:.2f}"),
    ("held-out loss", (_EVALUATE + "adapted.loss", _EVALUATE + "prior.loss"),
     lambda a, p: f"{a:.2f} / {p:.2f}"),
    ("held-out accuracy", (_EVALUATE + "adapted.accuracy", _EVALUATE + "prior.accuracy"),
     lambda a, p: f"{100 * a:.1f}% / {100 * p:.1f}%"),
]
PROBES: list[Column] = [
    ("effective rank", (_EVALUATE + "stock.effective_rank",
                        _EVALUATE + "adapted.effective_rank"),
     lambda s, a: f"{s:.1f} -> {a:.1f}"),
    ("Davies-Bouldin index", (_EVALUATE + "stock.davies_bouldin",
                              _EVALUATE + "adapted.davies_bouldin"),
     lambda s, a: f"{s:.2f} -> {a:.2f}"),
    ("pre-training seconds", ("metrics.pretrain.train_seconds",), lambda v: f"{v:.0f}"),
]
# Which switch leaves a column out, for the note under the table.
_SWITCHES = (("zero-shot", "asr"), ("effective rank", "probes"), ("Davies-Bouldin", "probes"))


def _figure(rec: dict[str, Any], path: str) -> float | None:
    """The number at dotted `path` of a record; None if absent, ValueError if not a number."""
    node: Any = rec
    for part in path.split("."):
        if not isinstance(node, dict):
            raise ValueError(f"{path}: {quote(node)} where a mapping should be")
        if part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise ValueError(f"{path} is {quote(node)}, not a number")
    return float(node)


def _cells(rec: dict[str, Any], columns: list[Column], split: str
           ) -> tuple[list[str], list[str]]:
    """A record's cells for `columns`, and the titles of those it has no figures for."""
    cells, absent = [], []
    for title, paths, show in columns:
        values = [_figure(rec, path.format(split=split)) for path in paths]
        if None in values:
            cells.append(NOT_SHOWN)
            absent.append(title)
        else:
            cells.append(show(*values))
    return cells, absent


def _absent(rec: dict[str, Any], absent: list[str]) -> str:
    """The note naming the figures a run's row lacks, and the switch that left them out."""
    evaluate = rec["params"].get("evaluate")
    off = sorted({f"evaluate.{knob}: false" for words, knob in _SWITCHES
                  if isinstance(evaluate, dict) and evaluate.get(knob) is False
                  and any(title.startswith(words) for title in absent)})
    return (f"{NOT_SHOWN}: {rec['run']} has no {', '.join(absent)}"
            + (f" ({', '.join(off)})" if off else ""))


def _markdown(head: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + ([""] + notes if notes else []))  # a blank line ends the table


def _beat(rec: dict[str, Any]) -> str:
    beat = first_beat(rec["curves"])
    return "never" if beat is None else str(int(beat))


def _per_seed(rec: dict[str, Any], split: str) -> str:
    seeds = []
    for key in rec["metrics"].get("report", {}).get(split, {}):
        if key.startswith("ft_diff_seed_"):
            seed, value = key.removeprefix("ft_diff_seed_"), _figure(rec, _REPORT.format(
                split=split) + key)
            if not seed.isdigit() or value is None:
                raise ValueError(f"metrics.report.{split}.{key}: not a seed's difference")
            seeds.append((int(seed), value))
    return ", ".join(f"{v:+.2f}" for _, v in sorted(seeds)) or "-"


def study_table(records: list[dict[str, Any]], split: str = "test") -> str:
    """README's table: per run, the recipe, whether BEST-RQ beat the label prior on dev, and
    the test WERs (zero-shot and fine-tuned, stock and from the adapter) with the paired
    speaker-bootstrap intervals of their differences (points; below 0 the adapter is better)
    and each fine-tune seed's difference (the pooled interval holds the seeds fixed, so their
    spread is the part of the uncertainty it leaves out)."""
    head = ["run", "adapter", "BEST-RQ layer", "distilled", "distill weight", "updates",
            "dev loss / prior (last)", "beats prior at", "zero-shot stock", "zero-shot adapted",
            "difference [95%]", "fine-tuned stock", "fine-tuned from adapter",
            "difference [95%]", "per seed"]
    rows, notes = [], []
    for rec in records:
        p = rec["params"]
        held, absent_held = _cells(rec, HELDOUT, split)
        wers, absent = _cells(rec, WERS, split)
        rows.append([rec["run"], str(p["adapter"]), str(p["bestrq_layer"]),
                     str(p["distill_layers"]), f"{p['distill_weight']:g}", str(p["max_steps"]),
                     *held, _beat(rec), *wers, _per_seed(rec, split)])
        if absent_held + absent:
            notes.append(_absent(rec, absent_held + absent))
    return _markdown(head, rows, notes)


def learning_table(records: list[dict[str, Any]], split: str = "test") -> str:
    """Does BEST-RQ learn here? Per run: the last train BEST-RQ loss, the held-out masked loss
    and accuracy against the label prior's on the same targets (`split`, after the last update),
    the first dev evaluation below the prior, and the label-free probes, stock -> adapted."""
    head = ["run", "train BEST-RQ loss", "held-out loss / prior", "held-out accuracy / prior",
            "dev beats prior at", "effective rank stock -> adapted",
            "Davies-Bouldin stock -> adapted", "pre-training s"]
    rows, notes = [], []
    for rec in records:
        learned, absent = _cells(rec, LEARNING, split)
        probes, absent_probes = _cells(rec, PROBES, split)
        rows.append([rec["run"], *learned, _beat(rec), *probes])
        if absent + absent_probes:
            notes.append(_absent(rec, absent + absent_probes))
    return _markdown(head, rows, notes)


def load_records(folder: Path) -> list[dict[str, Any]]:
    """Every run record in a results folder, by name. A damaged one (truncated, a field
    missing, a figure that is not a number) is refused: ValueError naming its file."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:  # JSON's and UTF-8's errors are ValueErrors
            raise ValueError(f"{path}: not a complete JSON record ({err})") from None
        try:
            check_record(rec)
        except ValueError as err:
            raise ValueError(f"{path}: not a study record: {err}") from None
        records.append(rec)
    return records


def check_record(rec: Any) -> None:
    """ValueError naming what is wrong if `rec` is not a run record that the tables and the
    plot can read (a figure may be absent, never of another kind)."""
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    for key, kind in (("run", str), ("params", dict), ("metrics", dict), ("curves", dict)):
        if key not in rec:
            raise ValueError(f"no {key!r}")
        if not isinstance(rec[key], kind):
            raise ValueError(f"{key!r} is {quote(rec[key])}, not a {kind.__name__}")
    for key in REQUIRED_PARAMS:
        if key not in rec["params"]:
            raise ValueError(f"no params.{key}")
    for key in ("bestrq_layer", "distill_weight", "max_steps"):
        _figure(rec, f"params.{key}")
    for name, points in rec["curves"].items():
        if not isinstance(points, list) or not all(
                isinstance(point, list) and len(point) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) for x in point)
                for point in points):
            raise ValueError(f"curves[{quote(name)}] is not a list of [step, value] pairs")
    for split in SPLITS:  # every figure the tables read, of the right kind
        study_table([rec], split)
        learning_table([rec], split)


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
