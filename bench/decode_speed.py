"""Decoding speed of the WER evaluation: the fallback batched against window by window, and
against faster-whisper, on the same windows.

First, the fallback decoding (whisper.transcribe's temperatures, the pipeline's `decoding:
fallback`) as `bestrq.asr.transcribe` runs it now, the windows that fail at a temperature
decoded together at the next from the encoder output computed once, beside the earlier
decoder (`per_window=True`: each failing window alone at every temperature, its encoder run
again each time in fp32): wall time of each, the windows decoded again, and whether every
text is the same; in fp32 and with the bf16 encoder, on each `--features` split (the default
held-out windows: test and dev). Then (unless `--skip-faster-whisper`):
Times the project's decoding (`bestrq.asr.transcribe`: openai-whisper's greedy decoder, batched,
on the stored log-mel windows) in fp32 and under bf16 autocast, and faster-whisper (CTranslate2,
the same base exported with `bestrq.convert.save_ct2_folder`) in int8 and float32 on the
first split's windows' audio: greedy (beam 1), temperature 0, no VAD, no timestamps, no
previous-text prompt.
Prints each one's real-time factor (audio seconds per wall second) and its WER with the 95%
bootstrap interval over windows, side by side, and the goal: the project's fastest decoding at
least half of faster-whisper int8's speed.

    python bench/decode_speed.py --model ~/.cache/whisper/tiny.en.pt \
        --segments data/segments --features data/features/test data/features/dev
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from whisper.normalizers import EnglishTextNormalizer

from bestrq import convert
from bestrq.asr import AsrConfig, transcribe, wer_comparison
from bestrq.dataset import FeatureDataset
from bestrq.whisper_model import load_whisper


def cpu_line() -> str:
    """The CPU's model name and whether it has AVX-512 BF16 and AMX."""
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return (f"{model}; avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
            f"amx {'yes' if 'amx_tile' in flags else 'no'}; {os.cpu_count()} cores; torch "
            f"threads {torch.get_num_threads()}")


def fallback_side_by_side(model: torch.nn.Module, features: Path, batch_size: int,
                          seed: int, repeats: int) -> list[dict]:
    """The batched fallback against the window-by-window one on `features`' transcribed
    windows, in fp32 and with the bf16 encoder: wall time (the least of `repeats` runs, the
    two decoders alternating so that a change of load on a shared machine falls on both),
    windows decoded again, and the windows whose texts differ in any run (none expected)."""
    dataset = FeatureDataset(features)
    indices = [i for i, t in enumerate(dataset.transcripts) if t and t.strip()]
    cpu = torch.device("cpu")
    rows = []
    for precision in ("fp32", "bf16"):
        config = AsrConfig(batch_size=batch_size, precision=precision, seed=seed)
        transcribe(model, dataset, indices[:1], config, cpu)  # warm-up, not timed
        decoders = [("per window (before)", True), ("batched (now)", False)]
        texts: dict[str, list[list[str]]] = {name: [] for name, _ in decoders}
        wall = {name: float("inf") for name, _ in decoders}
        stats: dict[str, dict[str, int]] = {}
        for r in range(repeats):
            for name, per_window in decoders if r % 2 == 0 else decoders[::-1]:
                stats[name] = {}
                start = time.perf_counter()
                texts[name].append(transcribe(model, dataset, indices, config, cpu,
                                              stats=stats[name], per_window=per_window,
                                              desc=f"{precision} {name}"))
                wall[name] = min(wall[name], time.perf_counter() - start)
        before = texts["per window (before)"][0]
        differ = sorted({dataset.ids[indices[k]] for runs in texts.values() for run in runs
                         for k, (a, b) in enumerate(zip(before, run, strict=True)) if a != b})
        rows.append({"split": features.name, "precision": precision, "windows": len(indices),
                     "repeats": repeats,
                     "fallback_windows": stats["batched (now)"]["fallbacks"],
                     "silent_windows": stats["batched (now)"]["silent"],
                     "wall_before_s": wall["per window (before)"],
                     "wall_now_s": wall["batched (now)"],
                     "identical": not differ, "differing_windows": differ})
    return rows


def faster_whisper_texts(folder: Path, audio: list[np.ndarray], compute_type: str,
                         threads: int) -> tuple[list[str], float]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(folder), device="cpu", compute_type=compute_type,
                         cpu_threads=threads)
    model.transcribe(audio[0][:16000], beam_size=1, language="en")  # warm-up, not timed
    start = time.perf_counter()
    texts = []
    for wave in audio:
        segments, _ = model.transcribe(wave, beam_size=1, temperature=0.0, vad_filter=False,
                                       without_timestamps=True, language="en",
                                       condition_on_previous_text=False)
        texts.append(" ".join(s.text.strip() for s in segments))
    return texts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Whisper name or checkpoint path")
    parser.add_argument("--segments", type=Path, default=Path("data/segments"))
    parser.add_argument("--features", type=Path, nargs="+",
                        default=[Path("data/features/test"), Path("data/features/dev")],
                        help="held-out splits; faster-whisper runs on the first")
    parser.add_argument("--batch-size", type=int, default=8, help="the project's decoding")
    parser.add_argument("--seed", type=int, default=0, help="evaluate.seed: the fallback's")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each fallback decoder; the least wall time is shown")
    parser.add_argument("--skip-faster-whisper", action="store_true",
                        help="only the fallback's side-by-side comparison")
    parser.add_argument("--json", type=Path, help="also write the tables here")
    args = parser.parse_args()

    print(cpu_line())
    print(f"model {args.model}; batch size {args.batch_size}; evaluate.seed {args.seed}")
    model = load_whisper(args.model)
    fallback = [row for features in args.features
                for row in fallback_side_by_side(model, features, args.batch_size, args.seed,
                                                 args.repeats)]
    print("fallback decoding: split, precision | windows | decoded again | per window (before) "
          "| batched (now) | speed-up | every text identical")
    for row in fallback:
        print(f"{row['split']:5s} {row['precision']:4s} | {row['windows']:7d} | "
              f"{row['fallback_windows']:13d} | {row['wall_before_s']:17.1f} s | "
              f"{row['wall_now_s']:11.1f} s | {row['wall_before_s'] / row['wall_now_s']:7.2f}x "
              f"| {'yes' if row['identical'] else 'NO: ' + ', '.join(row['differing_windows'])}")
    if args.skip_faster_whisper:
        if args.json:
            args.json.write_text(json.dumps({"fallback": fallback}, indent=2) + "\n")
        return

    features = args.features[0]
    rows = [json.loads(line) for line in
            (args.segments / f"{features.name}.jsonl").read_text().splitlines()
            if line.strip()]
    dataset = FeatureDataset(features)
    ids = dataset.ids
    by_id = {r["id"]: r for r in rows}
    indices = [i for i, t in enumerate(dataset.transcripts) if t and t.strip()]
    references = [dataset.transcripts[i] for i in indices]
    audio = []
    for i in indices:
        wave, rate = sf.read(args.segments / by_id[ids[i]]["path"], dtype="float32")
        assert rate == 16000, rate
        audio.append(wave)
    seconds = sum(len(a) for a in audio) / 16000
    threads = torch.get_num_threads()

    hypotheses: dict[str, list[str]] = {}
    wall: dict[str, float] = {}
    cpu = torch.device("cpu")
    for precision in ("fp32", "bf16"):
        config = AsrConfig(batch_size=args.batch_size, precision=precision)
        transcribe(model, dataset, indices[:1], config, cpu)  # warm-up, not timed
        start = time.perf_counter()
        hypotheses[f"openai-whisper {precision}"] = transcribe(model, dataset, indices, config,
                                                               cpu)
        wall[f"openai-whisper {precision}"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        for compute_type in ("int8", "float32"):
            folder = convert.save_ct2_folder(model, Path(tmp) / compute_type, compute_type)
            name = f"faster-whisper {compute_type}"
            hypotheses[name], wall[name] = faster_whisper_texts(folder, audio, compute_type,
                                                                threads)

    normalize = EnglishTextNormalizer()
    table = []
    baseline = "faster-whisper int8"
    print(f"{len(indices)} windows, {seconds:.0f} s of audio, {threads} threads, "
          f"{sum(len(r.split()) for r in references)} reference words")
    print("decoder                | wall s | real-time factor | vs faster-whisper int8 | "
          "WER % [95%]")
    for name in hypotheses:
        both = {baseline: hypotheses[baseline], name: hypotheses[name]}
        wer = wer_comparison(references, both, normalize, baseline=baseline, other=name,
                             samples=1000, seed=0)
        rtf = seconds / wall[name]
        row = {"decoder": name, "wall_s": wall[name], "rtf": rtf,
               "vs_int8": rtf / (seconds / wall[baseline]), "wer": wer[f"{name}/wer"],
               "wer_low": wer[f"{name}/wer_low"], "wer_high": wer[f"{name}/wer_high"],
               "delta_vs_int8": wer["delta/wer"] if name != baseline else 0.0,
               "delta_low": wer["delta/wer_low"] if name != baseline else 0.0,
               "delta_high": wer["delta/wer_high"] if name != baseline else 0.0}
        table.append(row)
        print(f"{name:22s} | {row['wall_s']:6.1f} | {rtf:16.1f} | {row['vs_int8']:22.2f} | "
              f"{100 * row['wer']:.1f} [{100 * row['wer_low']:.1f}, {100 * row['wer_high']:.1f}]"
              f" (vs int8 {100 * row['delta_vs_int8']:+.1f} [{100 * row['delta_low']:+.1f}, "
              f"{100 * row['delta_high']:+.1f}])")
    best = max((r for r in table if r["decoder"].startswith("openai")), key=lambda r: r["rtf"])
    print(f"goal (project's decoding >= 0.5x faster-whisper int8's speed): {best['decoder']} "
          f"{best['vs_int8']:.2f}x {'met' if best['vs_int8'] >= 0.5 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"fallback": fallback, "decoders": table}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
