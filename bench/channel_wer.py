"""Stock tiny.en's WER on the synthetic source under each acoustic condition (download.channel),
side by side: which shifted channel leaves stock Whisper clearly worse than clean speech (the
setting where in-domain pre-training has room to help: Hsu et al. 2021, arXiv 2104.01027).

The utterances are the synthetic source's own (its sentences, speakers and per-utterance channel
draws for --seed), resampled to 16 kHz as segment does, one utterance per 30 s window, decoded
as the pipeline's zero-shot WER decodes (whisper's temperature fallback, English normaliser).
Printed per channel: corpus WER with a 95% interval that resamples speakers then their clips,
and the paired difference from clean with its interval; beside the CPU.

    BESTRQ_TINY_EN=/path/tiny.en.pt python bench/channel_wer.py --utterances 40 \\
        --out results/channel/wer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.audio import N_SAMPLES, SAMPLE_RATE
from whisper.normalizers import EnglishTextNormalizer

from bestrq.asr import (
    clip_errors,
    decode_with_fallback,
    fallback_seed,
    is_silence,
    needs_fallback,
    paired_bootstrap,
)
from bestrq.audio import resample
from bestrq.channel import CHANNELS, ChannelConfig, apply_channel
from bestrq.synth import EspeakSynthesizer, generate_sentences, make_speakers


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--speakers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the corpus seed (download.seed)")
    parser.add_argument("--channels", nargs="+", default=list(CHANNELS), choices=CHANNELS)
    defaults = ChannelConfig()
    parser.add_argument("--snr-db", type=float, nargs=2, default=[defaults.snr_db_min,
                                                                   defaults.snr_db_max])
    parser.add_argument("--rt60", type=float, nargs=2, default=[defaults.rt60_min,
                                                                defaults.rt60_max])
    parser.add_argument("--model", default=os.environ.get("BESTRQ_TINY_EN", "tiny.en"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_line()} (a shared machine: timings are indicative)")
    cfg = ChannelConfig(snr_db_min=args.snr_db[0], snr_db_max=args.snr_db[1],
                        rt60_min=args.rt60[0], rt60_max=args.rt60[1])

    synth = EspeakSynthesizer()
    speakers = make_speakers(args.speakers, args.seed)
    texts = generate_sentences(args.utterances, args.seed)
    clips = []  # (id, speaker, text, audio at espeak's rate)
    for i, text in enumerate(texts):  # as the synthetic source names and speaks them
        spk = speakers[i % len(speakers)]
        audio, rate = synth.synthesize(text, voice=spk.voice, rate=spk.rate, pitch=spk.pitch)
        clips.append((f"{spk.name}-{i:05d}", spk.name, text, audio))

    model = whisper.load_model(args.model, device="cpu")
    model.eval()
    options = whisper.DecodingOptions(language="en", temperature=0.0, without_timestamps=True,
                                      fp16=False)
    normalize = EnglishTextNormalizer()
    references = [text for _, _, text, _ in clips]
    hypotheses: dict[str, list[str]] = {}
    drawn: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for channel in args.channels:
        start = time.perf_counter()
        hypotheses[channel], drawn[channel] = [], []
        mels = []
        for utt_id, _, _, audio in clips:
            shifted, record = apply_channel(audio, rate, channel, cfg, args.seed, utt_id)
            wave = resample(shifted, rate, SAMPLE_RATE)  # (samples,) at 16 kHz, as segment
            mels.append(whisper.log_mel_spectrogram(
                torch.from_numpy(whisper.pad_or_trim(wave, N_SAMPLES)), model.dims.n_mels))
            drawn[channel].append(record)
        for first in range(0, len(mels), args.batch_size):
            batch = torch.stack(mels[first:first + args.batch_size])  # (batch, n_mels, frames)
            with torch.no_grad():
                results = whisper.decode(model, batch, options)
                for i, result in enumerate(results, start=first):
                    if needs_fallback(result):  # whisper.transcribe's retries, as evaluate
                        result = decode_with_fallback(model, mels[i][None], options,
                                                      fallback_seed(0, i))
                    hypotheses[channel].append("" if is_silence(result) else result.text)
        seconds[channel] = time.perf_counter() - start

    systems = list(hypotheses)
    counts = [clip_errors(references, hypotheses[s], normalize) for s in systems]
    edits = np.stack([c[0] for c in counts])  # (systems, clips)
    words = counts[0][1]  # (clips,)
    groups = [spk for _, spk, _, _ in clips]
    boot = paired_bootstrap(edits, words, args.samples, seed=0, groups=groups)  # (samples, sys)
    wer = edits.sum(axis=1) / words.sum()  # (systems,)
    rows = {}
    base = systems.index("clean") if "clean" in systems else None
    print(f"stock tiny.en ({args.model}), {len(clips)} utterances of {args.speakers} speakers "
          f"(seed {args.seed}); noisy: SNR {args.snr_db[0]:g}-{args.snr_db[1]:g} dB, reverb: "
          f"RT60 {args.rt60[0]:g}-{args.rt60[1]:g} s")
    print(f"{'channel':<10} {'WER %':>7} {'95% interval':>16} {'- clean':>8} "
          f"{'95% interval':>16} {'relative':>9} {'s':>6}")
    for k, name in enumerate(systems):
        low, high = np.percentile(boot[:, k], [2.5, 97.5])
        row = {"wer": float(wer[k]), "wer_low": float(low), "wer_high": float(high),
               "edits": int(edits[k].sum()), "words": int(words.sum()),
               "seconds": seconds[name]}
        line = f"{name:<10} {100 * wer[k]:7.2f} [{100 * low:6.2f}, {100 * high:6.2f}]"
        if base is not None and k != base:
            diff = boot[:, k] - boot[:, base]
            d_low, d_high = np.percentile(diff, [2.5, 97.5])
            delta = float(wer[k] - wer[base])
            row |= {"diff": delta, "diff_low": float(d_low), "diff_high": float(d_high),
                    "relative": delta / float(wer[base]) if wer[base] else 0.0}
            line += (f" {100 * delta:+8.2f} [{100 * d_low:+6.2f}, {100 * d_high:+6.2f}] "
                     f"{row['relative']:+9.0%}")
        else:
            line += " " * 44
        rows[name] = row
        print(f"{line} {seconds[name]:6.1f}")
    # Per speaker (one espeak voice each): a voice stock Whisper cannot read swings the pooled
    # figures, so say how many speakers each channel makes worse.
    names = list(dict.fromkeys(groups))
    member = np.array([[g == n for g in groups] for n in names])  # (speakers, clips)
    by_speaker = (edits @ member.T) / (words @ member.T)  # (systems, speakers)
    print("per speaker WER %: " + ", ".join(
        f"{n} ({speakers[i].voice})" for i, n in enumerate(names)))
    for k, name in enumerate(systems):
        row = rows[name] | {"speakers": {n: float(by_speaker[k, i]) for i, n in enumerate(names)}}
        line = f"{name:<10} " + " ".join(f"{100 * x:5.0f}" for x in by_speaker[k])
        if base is not None and k != base:
            diff = by_speaker[k] - by_speaker[base]
            row |= {"speakers_worse": int((diff > 0).sum()),
                    "speaker_median_diff": float(np.median(diff))}
            line += (f"   worse for {row['speakers_worse']} of {len(names)}, median "
                     f"{100 * row['speaker_median_diff']:+.1f}")
        rows[name] = row
        print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "cpu": cpu_line(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()},
            "results": rows,
            "clips": [{"id": c[0], "reference": c[2],
                       **{s: {"hypothesis": hypotheses[s][i], **drawn[s][i]} for s in systems}}
                      for i, c in enumerate(clips)]}, indent=1) + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
