"""Peak memory and speed of segmenting one long recording: block-by-block decoding (what the
segment stage does) against decoding the whole file first (what it did before).

Writes a synthetic stereo FLAC of --minutes at --rate, then runs each way in a fresh process and
prints the peak resident memory above a process that only imports the same libraries, the
throughput in times real time, and the ratios. Both ways give the same 30 s pieces.

    python bench/segment_memory.py --minutes 30 --rate 44100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

IMPORTS = "import soundfile, torch, torchaudio, whisper, bestrq.audio, bestrq.segment"


def run_one(mode: str, path: str, out: str) -> dict[str, float]:
    """In this process: segment `path` one way; peak RSS in MB and seconds taken."""
    from whisper.audio import SAMPLE_RATE

    from bestrq.audio import resample, split_long
    from bestrq.jsonl import write_jsonl
    from bestrq.segment import SegmentConfig, segment_corpus

    start = time.perf_counter()
    pieces = 0
    if mode == "whole":
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # (samples, channels)
        audio = resample(data.mean(axis=1), rate, SAMPLE_RATE)
        del data
        pieces = len(split_long(audio, SAMPLE_RATE, 30.0))
    elif mode == "stream":
        Path(out).mkdir(parents=True, exist_ok=True)
        manifest = Path(out) / "raw.jsonl"
        # Two 1 s voices more: three splits need three speakers/recordings.
        short = Path(out) / "short.flac"
        sf.write(short, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
        write_jsonl(manifest, [{"id": "long", "path": path, "transcript": None},
                               *({"id": f"short{i}", "path": str(short), "transcript": None}
                                 for i in range(2))])
        stats = segment_corpus(manifest, Path(out) / "seg", SegmentConfig())
        pieces = int(stats["num_train"] + stats["num_dev"] + stats["num_test"]) - 2
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak_mb, "seconds": seconds, "pieces": pieces}


def measure(mode: str, path: Path, out: Path) -> dict[str, float]:
    code = (f"{IMPORTS}\nimport json, sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"from segment_memory import run_one\n"
            f"print(json.dumps(run_one({mode!r}, {str(path)!r}, {str(out)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=44100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        path = tmp_path / "long.flac"
        n = int(args.minutes * 60 * args.rate)
        rng = np.random.default_rng(0)
        with sf.SoundFile(path, "w", args.rate, 2, format="FLAC") as f:
            for i in range(0, n, 60 * args.rate):  # speech-like bursts: noise with pauses
                m = min(60 * args.rate, n - i)
                block = 0.1 * rng.standard_normal((m, 2)).astype(np.float32)
                block *= (np.sin(np.arange(m) / args.rate * 2.1) > -0.3)[:, None]
                f.write(block)
        audio_s = n / args.rate
        print(f"recording: {args.minutes:g} min, {args.rate} Hz stereo FLAC, "
              f"{path.stat().st_size / 2**20:.0f} MB; float32 in memory: "
              f"{n * 2 * 4 / 2**20:.0f} MB")
        base = measure("imports", path, tmp_path / "i")
        results = {m: measure(m, path, tmp_path / m) for m in ("whole", "stream")}
        for mode, r in results.items():
            print(f"{mode:>7}: peak {r['peak_mb'] - base['peak_mb']:7.0f} MB above imports, "
                  f"{audio_s / r['seconds']:6.0f}x real time, {r['pieces']} pieces of <= 30 s")
        whole, stream = results["whole"], results["stream"]
        print(f"memory ratio whole/stream: "
              f"{(whole['peak_mb'] - base['peak_mb']) / (stream['peak_mb'] - base['peak_mb']):.1f}"
              f"; time ratio stream/whole: {stream['seconds'] / whole['seconds']:.2f} (stream "
              f"also encodes and writes the FLAC windows)")


if __name__ == "__main__":
    main()
