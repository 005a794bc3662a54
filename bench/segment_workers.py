"""Segment-stage throughput with one decoding process against several, on the same corpus.

Runs `segment_corpus` on a raw manifest (the download stage's data/raw/manifest.jsonl) with
num_workers=1 and with --workers, checks that both give the same windows, and prints the audio
hours per minute of each and their ratio.

    dvc repro download && python bench/segment_workers.py --workers 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bestrq.jsonl import read_jsonl
from bestrq.segment import SegmentConfig, segment_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data/raw/manifest.jsonl"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, args.workers):
            out = Path(tmp) / f"w{workers}"
            start = time.perf_counter()
            stats = segment_corpus(args.manifest, out, SegmentConfig(num_workers=workers))
            seconds = time.perf_counter() - start
            hours = stats["hours_train"] + stats["hours_dev"] + stats["hours_test"]
            windows = sorted(r["id"] for name in ("train", "dev", "test")
                             for _, r in read_jsonl(out / f"{name}.jsonl"))
            results[workers] = (seconds, hours, windows)
            print(f"{workers:3d} worker(s): {seconds:6.1f} s, {hours * 60 / seconds:6.2f} h of "
                  f"audio per minute, {len(windows)} windows")
    (t1, _, w1), (tn, _, wn) = results[1], results[args.workers]
    print(f"speed-up {args.workers} workers / 1: {t1 / tn:.2f}x; same windows: {w1 == wn}")


if __name__ == "__main__":
    main()
