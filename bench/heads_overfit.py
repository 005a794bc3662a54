"""Do BEST-RQ's heads over-fit a small unlabelled pool, and what keeps them from it?

Runs the `train` command (the pretrain stage's code, outside DVC) on the features in
data/features once per variant, with the same seed, updates and held-out schedule, and prints,
per variant, the dev BEST-RQ masked loss minus the label prior's at a few updates, the dev
accuracy against the prior's, and the train BEST-RQ loss. A train loss that keeps falling while
the dev gap stops closing, or widens, is the heads learning the pool instead of the audio.
Variants: the params.yaml recipe; AdamW weight decay on the heads (the only decayed group: the
adapter never is); heads an eighth the size (1,024 codes a codebook). A pool ten times larger
is the study's (results/study/ia3-last.json, same recipe at batch 2), printed beside them.

Each finished variant is kept as results/overfit/<variant>.json (its overrides, command, commit,
wall time and curves) and skipped when the script is run again.

    python bench/heads_overfit.py --max-steps 200 --every 25
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bestrq.study import read_tsv
from stages.study import CURVE_NAMES

VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "decay-1": {"weight_decay": 1.0},
    "codes-1024": {"codebook_size": 1024},
}
STUDY = Path("results/study/ia3-last.json")


def run_variant(name: str, overrides: dict[str, Any], steps: int, every: int,
                runs: Path) -> dict[str, Any]:
    """Train one variant from scratch and return its record."""
    out = runs / name
    if out.exists():
        raise SystemExit(f"{out} exists: remove it to train {name} again from step 0")
    args = ["--max_steps", str(steps), "--heldout_every", str(every), "--output_dir", str(out)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.train", *args], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    live = out / "dvclive"  # each `train` run logs inside its own folder
    curves = live / "plots" / "metrics"
    summary = json.loads((live / "metrics.json").read_text())
    return {"variant": name, "overrides": overrides, "command": "train " + " ".join(args),
            "commit": commit, "seconds": time.perf_counter() - start,
            "precision": summary.get("precision"),
            "curves": {n: read_tsv(curves / f"{n}.tsv") for n in CURVE_NAMES
                       if (curves / f"{n}.tsv").is_file()}}


def at(curve: list[list[float]], step: float) -> float | None:
    """The value logged at `step` (None: not logged there)."""
    return next((v for s, v in curve if s == step), None)


def table(records: list[dict[str, Any]], steps: list[int]) -> str:
    """Per record: dev loss minus prior at `steps` (below 0: BEST-RQ beats the label
    frequencies), and at the last of `steps` the dev accuracy against the prior's and the train
    BEST-RQ loss (a longer record, the study's, is read at the same update)."""
    last = steps[-1]
    head = ("| variant | " + " | ".join(f"dev loss - prior @{s}" for s in steps)
            + f" | dev accuracy / prior @{last} | train BEST-RQ loss @{last} |")
    lines = [head, "|" + "---|" * (len(steps) + 3)]
    for rec in records:
        c = rec["curves"]
        gaps = []
        for s in steps:
            loss, prior = at(c["dev/loss"], s), at(c["dev/prior_loss"], s)
            gaps.append("-" if loss is None or prior is None else f"{loss - prior:+.3f}")
        acc, prior_acc = at(c["dev/accuracy"], last), at(c["dev/prior_accuracy"], last)
        loss = at(c["train/bestrq_loss"], last)
        lines.append(f"| {rec['variant']} | " + " | ".join(gaps)
                     + (" | -" if acc is None or prior_acc is None else
                        f" | {100 * acc:.1f}% / {100 * prior_acc:.1f}%")
                     + (" | - |" if loss is None else f" | {loss:.2f} |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25, help="held-out evaluation interval")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, among " + ", ".join(VARIANTS))
    parser.add_argument("--results", type=Path, default=Path("results/overfit"))
    parser.add_argument("--runs", type=Path, default=Path("runs/overfit"))
    args = parser.parse_args()

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    args.results.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        path = args.results / f"{name}.json"
        if not path.is_file():
            record = run_variant(name, VARIANTS[name], args.max_steps, args.every, args.runs)
            path.write_text(json.dumps(record, indent=1) + "\n")
        records.append(json.loads(path.read_text()))
    if STUDY.is_file():
        study = json.loads(STUDY.read_text())
        records.append({"variant": f"study pool, 10x ({study['run']}, batch 2)",
                        "curves": study["curves"]})
    steps = sorted({s for s in (50, 100, 150, 200) if s % args.every == 0 and s < args.max_steps}
                   | {args.max_steps})
    print(table(records, steps))


if __name__ == "__main__":
    main()
