"""Decoding speed of the WER evaluation against faster-whisper, on the same windows.

Times the project's decoding (`bestrq.asr.transcribe`: openai-whisper's greedy decoder, batched,
on the stored log-mel windows) in fp32 and under bf16 autocast, and faster-whisper (CTranslate2,
the same base exported with `bestrq.convert.save_ct2_folder`) in int8 and float32 on the same
windows' audio: greedy (beam 1), temperature 0, no VAD, no timestamps, no previous-text prompt.
Prints each one's real-time factor (audio seconds per wall second) and its WER with the 95%
bootstrap interval over windows, side by side, and the goal: the project's fastest decoding at
least half of faster-whisper int8's speed.

    python bench/decode_speed.py --model ~/.cache/whisper/tiny.en.pt \
        --segments data/segments --features data/features/test
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--features", type=Path, default=Path("data/features/test"))
    parser.add_argument("--batch-size", type=int, default=8, help="the project's decoding")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()

    rows = [json.loads(line) for line in
            (args.segments / f"{args.features.name}.jsonl").read_text().splitlines()
            if line.strip()]
    dataset = FeatureDataset(args.features)
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

    model = load_whisper(args.model)
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
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
