"""Where segment cuts long recordings: silero-vad (`segment.cutter: vad`) against the quietest
frame of the window's last third (`energy`), on long recordings with known utterance boundaries.

Each recording strings synthetic espeak utterances (several voices) together with pauses of
--min-pause to --max-pause seconds, over background noise at --snr dB (white noise plus a
slowly varying hum, so that the quietest frame is not simply the pause). Both cutters see the
same audio through `split_stream` with 30 s windows, as segment uses them. Printed per cutter:
cuts, cuts inside an utterance (more than 20 ms from both of its ends), the share of speech kept
(both cutters keep every sample), the mean piece length and the audio seconds cut per second,
beside the CPU.

    python bench/vad_cuts.py --recordings 8 --minutes 3 --out results/vad/cuts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from whisper.audio import SAMPLE_RATE

from bestrq.audio import split_stream
from bestrq.synth import long_talk
from bestrq.vad import vad_cut_point

TOLERANCE = int(0.02 * SAMPLE_RATE)


def cuts_of(audio: np.ndarray, cutter: str) -> list[int]:
    """Sample indices where segment's 30 s windows are cut."""
    pieces = split_stream([audio], SAMPLE_RATE, 30.0,
                          cut_point=vad_cut_point if cutter == "vad" else None)
    return list(np.cumsum([len(p) for p in pieces])[:-1])


def inside(cut: int, spans: list[tuple[int, int]]) -> bool:
    return any(a + TOLERANCE < cut < b - TOLERANCE for a, b in spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--min-pause", type=float, default=0.15)
    parser.add_argument("--max-pause", type=float, default=1.2)
    parser.add_argument("--snr", type=float, default=15.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; torch threads 1")
    data = [long_talk(args.minutes * 60, seed, args.min_pause, args.max_pause, args.snr)
            for seed in range(args.recordings)]
    total = sum(len(a) for a, _ in data) / SAMPLE_RATE
    results = {}
    for cutter in ("energy", "vad"):
        start = time.perf_counter()
        cuts = [(c, spans) for audio, spans in data for c in cuts_of(audio, cutter)]
        took = time.perf_counter() - start
        bad = sum(inside(c, spans) for c, spans in cuts)
        results[cutter] = {"cuts": len(cuts), "inside_utterance": bad,
                           "inside_share": bad / len(cuts), "speech_kept": 1.0,
                           "mean_piece_seconds": total / (len(cuts) + len(data)),
                           "seconds_per_second": total / took}
    print(f"{args.recordings} recordings, {total / 60:.1f} min, SNR {args.snr:g} dB, pauses "
          f"{args.min_pause:g}-{args.max_pause:g} s")
    print(f"{'cutter':8} {'cuts':>5} {'inside an utterance':>20} {'speech kept':>12} "
          f"{'mean piece s':>13} {'x real time':>12}")
    for cutter, r in results.items():
        print(f"{cutter:8} {r['cuts']:>5} {r['inside_utterance']:>10} ({r['inside_share']:5.1%})"
              f" {r['speech_kept']:>12.0%} {r['mean_piece_seconds']:>13.1f}"
              f" {r['seconds_per_second']:>12.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu, "args": {k: str(v) for k, v in
                                        vars(args).items()}, "results": results}, indent=2)
                            + "\n")


if __name__ == "__main__":
    main()
