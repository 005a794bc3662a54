"""WER of one system in two runs of the pipeline, on the same held-out windows, with the 95%
paired speaker-bootstrap interval of their difference (`bestrq.asr.wer_comparison`, as the
pipeline's own differences).

Each run's per-window table (`dvclive/evaluate/windows.json`: the zero-shot `stock` and
`adapted` systems; `dvclive/finetune/windows.json`: the two fine-tunes) holds the reference and
both hypotheses of every window. Two runs of different knobs (e.g. `distill_input`) give two
`adapted` columns over the same windows; this compares them as the pipeline compares adapted
with stock, so that a difference between two recipes comes with its interval.

    python bench/compare_runs.py clean/dvclive/finetune/windows.json \
        masked/dvclive/finetune/windows.json --system adapted --names clean,masked
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from whisper.normalizers import EnglishTextNormalizer

from bestrq.asr import wer_comparison


def load(path: Path) -> dict[tuple[str, str], dict]:
    """(split, window id) -> its row."""
    return {(row["split"], row["id"]): row for row in json.loads(path.read_text())}


def compare(a: Path, b: Path, system: str, names: tuple[str, str], split: str,
            samples: int, seed: int) -> dict[str, float]:
    """`system`'s WER in run `a` and run `b` on `split`, and b - a with its interval."""
    rows_a, rows_b = load(a), load(b)
    keys = sorted(k for k in rows_a if k[0] == split)
    if not keys or set(keys) != {k for k in rows_b if k[0] == split}:
        raise ValueError(f"{a} and {b} do not hold the same {split} windows")
    for k in keys:
        if rows_a[k]["reference"] != rows_b[k]["reference"]:
            raise ValueError(f"window {k[1]}: the two runs' references differ")
    references = [rows_a[k]["reference"] for k in keys]
    hypotheses = {names[0]: [rows_a[k][system] for k in keys],
                  names[1]: [rows_b[k][system] for k in keys]}
    return wer_comparison(references, hypotheses, EnglishTextNormalizer(), names[0], names[1],
                          samples, seed, groups=[rows_a[k]["speaker"] for k in keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first run's windows.json")
    parser.add_argument("b", type=Path, help="the second run's windows.json")
    parser.add_argument("--system", default="adapted", help="the column compared")
    parser.add_argument("--names", default="a,b", help="the two runs' names")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234, help="params.yaml's evaluate.seed")
    args = parser.parse_args()
    first, second = args.names.split(",")
    print(f"{args.system}: WER (%) and {second} - {first} (points), 95% paired speaker "
          "bootstrap")
    for split in ("test", "dev"):
        r = compare(args.a, args.b, args.system, (first, second), split, args.samples,
                    args.seed)
        print(f"{split:4s} | {first} {100 * r[f'{first}/wer']:.2f} | {second} "
              f"{100 * r[f'{second}/wer']:.2f} | difference {100 * r['delta/wer']:+.2f} "
              f"[{100 * r['delta/wer_low']:+.2f}, {100 * r['delta/wer_high']:+.2f}]")


if __name__ == "__main__":
    main()
