"""The training loader with log-mels stored (`features.store: true`) and computed on the fly
(`false`), against what a training step consumes, side by side in one run.

A corpus of --clips windows of --seconds of speech (espeak talk over noise, `synth.long_talk`,
16 kHz 16-bit FLAC as the segment stage writes it) is featurised both ways on the CPU. Then:
- the loader as pre-training builds it (FeatureDataset -> MaskedClips, masks drawn in the
  workers, GlobalBatchSampler, params.yaml's batch_size, num_workers and prefetch_factor):
  windows per second it delivers with the log-mels stored and with the audio (store false),
  and with store false also with the log-mel made on the training device, here the CPU;
- per window, on one core: reading a stored log-mel, decoding and padding the FLAC, and the
  log-mel itself (Whisper's, batched, rounded to float16 as stored);
- the training step of params.yaml's model (tiny.en) and knobs at its batch size, as the engine
  runs it (masking, quantizer, encoder forward/backward with the distillation guard, AdamW):
  the windows per second it consumes, from stored log-mels and from audio with the log-mel
  inside the step.
The ratio loader / step is the margin the loader has (goal: >= 3x with store false); the
per-window decode cost says how many worker cores keep a faster (GPU) step fed.

    python bench/loader_speed.py                      # params.yaml's model and knobs
    python bench/loader_speed.py --clips 64 --loader-batches 24 --steps 4 --out results/loader

Timings on a shared machine vary; only the figures of one run compare with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader
from whisper.audio import SAMPLE_RATE, pad_or_trim

from bestrq.batching import DataPosition, GlobalBatchSampler
from bestrq.dataset import FeatureDataset, mel_maker
from bestrq.features import (
    FeatureConfig,
    as_stored,
    compute_features,
    load_clip,
    load_stats,
    log_mel_batch,
)
from bestrq.model import BestRQModel
from bestrq.params import load_params
from bestrq.pretraining import MaskedClips, adapter_and_heads
from bestrq.quantizer import RandomProjectionQuantizer
from bestrq.synth import long_talk
from bestrq.throughput import model_flops
from bestrq.train import accumulate_gradients, autocast_dtype, finish_gradients, make_optimizer
from bestrq.whisper_model import load_whisper


def cpu_line() -> str:
    """The CPU model, its cores and whether it has bf16 / AMX (what `precision: auto` reads)."""
    model = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"flags: {' '.join(have) or 'none of avx2/avx512/bf16/amx'}")


def make_segments(root: Path, clips: int, seconds: float, seed: int) -> None:
    """A segment-stage folder of `clips` windows of `seconds` each (train split only), cut from
    one recording of espeak talk at several offsets and gains so no two windows are equal."""
    talk, _ = long_talk(min(clips * seconds, 240.0), seed)  # (samples,)
    rng = np.random.default_rng(seed)
    size = int(seconds * SAMPLE_RATE)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    with (root / "train.jsonl").open("w") as f:
        for k in range(clips):
            start = int(rng.integers(0, max(1, len(talk) - size)))
            wave = np.roll(talk, -start)[:size] * float(rng.uniform(0.5, 1.5))
            sf.write(root / f"audio/{k}.flac", np.clip(wave, -1, 1), SAMPLE_RATE,
                     subtype="PCM_16")
            f.write(json.dumps({"id": f"w{k}", "path": f"audio/{k}.flac", "duration": seconds,
                                "transcript": None, "group": f"s{k % 4}"}) + "\n")


def per_window(fn, items: list, repeats: int) -> tuple[float, float]:
    """Median wall and this thread's CPU seconds per item of `fn(item)` over `repeats` passes
    (after one untimed); CPU time is what a machine shared with other jobs disturbs least."""
    for item in items[:2]:
        fn(item)
    wall, cpu = [], []
    for _ in range(repeats):
        start, thread = time.perf_counter(), time.thread_time()
        for item in items:
            fn(item)
        wall.append((time.perf_counter() - start) / len(items))
        cpu.append((time.thread_time() - thread) / len(items))
    return statistics.median(wall), statistics.median(cpu)


def loader_rate(split: FeatureDataset, p, batches: int, warmup: int,
                on_device: bool) -> float:
    """Windows per second the pre-training loader delivers (and, with `on_device`, turns
    into log-mels in this process, as the training step would on its device)."""
    cfg = p.train
    sampler = GlobalBatchSampler(len(split), cfg.batch_size, cfg.accumulate_gradients, 1, 0,
                                 cfg.seed, DataPosition())
    loader = DataLoader(MaskedClips(split, p.masking, cfg.seed), batch_sampler=sampler,
                        num_workers=cfg.num_workers,
                        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
                        persistent_workers=False)
    to_mel = mel_maker(split) if on_device else None
    it = iter(loader)
    for _ in range(warmup):  # workers started, first batches prefetched
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        if to_mel is not None:
            to_mel(batch[0])
    seconds = time.perf_counter() - start
    del it
    return batches * cfg.batch_size / seconds


def step_rate(p, stored: FeatureDataset, fly: FeatureDataset, features: Path, steps: int,
              warmup: int) -> dict[str, float | str]:
    """Windows per second one training step consumes: from stored log-mels and from audio
    (the log-mel made inside the step), alternating the two so that both see the same load."""
    device = torch.device("cpu")
    cfg = p.train
    base = load_whisper(p.run.model)
    mean, std = load_stats(features)
    model = BestRQModel(base.encoder, RandomProjectionQuantizer(p.quantizer, mean, std),
                        p.masking, **asdict(p.loss), adapter=p.adapter)
    del base
    model.to(device).train()
    dtype = autocast_dtype(cfg, device)
    optimizer = make_optimizer(adapter_and_heads(model), cfg)
    params = list(model.trainable_parameters().values())
    micro = cfg.batch_size
    keys = [(0, i % len(stored)) for i in range(micro)]

    def batch_of(split: FeatureDataset) -> tuple[torch.Tensor, ...]:
        items = [MaskedClips(split, p.masking, cfg.seed)[k] for k in keys]
        return tuple(torch.stack([it[j] for it in items]) for j in range(len(items[0])))

    batches = {"stored": batch_of(stored), "fly": batch_of(fly)}
    makers = {"stored": None, "fly": mel_maker(fly)}

    def one(name: str) -> int:
        stats = accumulate_gradients(model, [batches[name]] * cfg.accumulate_gradients, device,
                                     dtype, False, makers[name])
        finish_gradients(params, stats, 1)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(stats.count)  # masked targets, for the FLOP count

    for _ in range(warmup):
        one("stored")
        masked = one("fly")
    times: dict[str, list[float]] = {"stored": [], "fly": []}
    cpu: dict[str, list[float]] = {"stored": [], "fly": []}
    for _ in range(steps):
        for name in ("stored", "fly"):
            start, process = time.perf_counter(), time.process_time()
            one(name)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - process)
    clips = micro * cfg.accumulate_gradients
    out: dict[str, float | str] = {
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "model_flops_per_window": model_flops(model, clips, masked)["total"] / clips}
    for name in ("stored", "fly"):
        out[f"step_s_{name}"] = statistics.median(times[name])
        out[f"step_cpu_s_{name}"] = statistics.median(cpu[name])  # summed over threads
        out[f"step_windows_per_s_{name}"] = clips / statistics.median(times[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clips", type=int, default=48, help="windows in the corpus")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each window")
    parser.add_argument("--loader-batches", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="passes of the per-window timings")
    parser.add_argument("--workdir", type=Path, help="keep the corpus here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="folder for loader_speed.json")
    parser.add_argument("--gpu-tflops", type=float, default=989.0,
                        help="a GPU's dense bf16 peak for the extrapolation (H100 SXM: 989)")
    parser.add_argument("--gpu-mfu", type=float, default=0.4, help="its assumed MFU")
    args = parser.parse_args()

    p = load_params(args.params)
    load_start = os.getloadavg()
    print(f"CPU: {cpu_line()} (a shared machine: compare only figures of this run)")
    print(f"params: model {p.run.model}, batch_size {p.train.batch_size} x accumulate "
          f"{p.train.accumulate_gradients}, num_workers {p.train.num_workers}, prefetch_factor "
          f"{p.train.prefetch_factor}, precision {p.train.precision}, n_mels {p.run.n_mels}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        if not (root / "segments" / "train.jsonl").is_file():
            make_segments(root / "segments", args.clips, args.seconds, seed=0)
        for name, store in (("stored", True), ("fly", False)):
            compute_features(root / "segments", root / name, p.run.n_mels,
                             FeatureConfig(device="cpu", store=store))
        stored = FeatureDataset(root / "stored" / "train")
        fly = FeatureDataset(root / "fly" / "train")
        disk = {name: sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
                for name in ("stored", "fly")}
        flac = sum(f.stat().st_size for f in (root / "segments").rglob("*.flac"))
        hours = len(stored) * args.seconds / 3600

        # Per window, one core (the main process; loader workers run one thread each).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        idx = list(range(len(stored)))
        read_s, read_cpu = per_window(lambda i: stored[i], idx, args.repeats)
        decode_s, decode_cpu = per_window(lambda i: pad_or_trim(load_clip(fly._audio[i])), idx,
                                          args.repeats)
        audio = torch.stack([fly[i][0] for i in range(min(len(fly), 16))])  # (b, N_SAMPLES)

        def mel(batch: torch.Tensor) -> torch.Tensor:
            return as_stored(log_mel_batch(batch, p.run.n_mels), "float16")

        mel_1core_s, mel_cpu = (t / len(audio) for t in per_window(mel, [audio], args.repeats))
        torch.set_num_threads(threads)
        mel_s = per_window(mel, [audio], args.repeats)[0] / len(audio)

        rates = {
            "loader_stored": loader_rate(stored, p, args.loader_batches, 2, on_device=False),
            "loader_fly": loader_rate(fly, p, args.loader_batches, 2, on_device=False),
            "loader_fly_with_mel": loader_rate(fly, p, args.loader_batches, 2, on_device=True),
        }
        steps = step_rate(p, stored, fly, root / "stored", args.steps, args.warmup)

    consumed = steps["step_windows_per_s_stored"]
    ratio = {k: v / consumed for k, v in rates.items()}
    record = {"cpu": cpu_line(), "clips": len(stored), "seconds_per_clip": args.seconds,
              "batch_size": p.train.batch_size, "num_workers": p.train.num_workers,
              "model": p.run.model, "disk_bytes_per_hour": {
                  "features_stored": disk["stored"] / hours, "features_fly": disk["fly"] / hours,
                  "segments_flac": flac / hours},
              "per_window_s": {"read_stored": read_s, "decode_flac": decode_s,
                               "log_mel_1_thread": mel_1core_s,
                               f"log_mel_{threads}_threads": mel_s},
              "per_window_cpu_s": {"read_stored": read_cpu, "decode_flac": decode_cpu,
                                   "log_mel": mel_cpu},
              "load_average": {"start": load_start, "end": os.getloadavg()},
              "loader_windows_per_s": rates, **steps,
              "loader_over_step": ratio}
    mb = 1e6
    print(f"corpus: {len(stored)} windows of {args.seconds:g} s of espeak talk; per hour of "
          f"audio: FLAC {flac / hours / mb:.1f} MB, features stored "
          f"{disk['stored'] / hours / mb:.1f} MB, on the fly {disk['fly'] / hours / mb:.3f} MB")
    print("per window, one thread, wall (CPU) ms: "
          f"read a stored log-mel {read_s * 1e3:.2f} ({read_cpu * 1e3:.2f}) | decode + pad the "
          f"FLAC {decode_s * 1e3:.2f} ({decode_cpu * 1e3:.2f}) | log-mel (batched, float16) "
          f"{mel_1core_s * 1e3:.2f} ({mel_cpu * 1e3:.2f}); {mel_s * 1e3:.2f} wall on {threads} "
          "threads")
    print(f"training step ({p.run.model}, batch {p.train.batch_size}, {steps['precision']}), "
          f"wall (CPU, all threads): stored {steps['step_s_stored']:.2f} s "
          f"({steps['step_cpu_s_stored']:.2f} s) = {consumed:.2f} windows/s | on the fly "
          f"(log-mel in the step) {steps['step_s_fly']:.2f} s ({steps['step_cpu_s_fly']:.2f} s)"
          f" = {steps['step_windows_per_s_fly']:.2f} windows/s")
    print(f"loader ({p.train.num_workers} workers)      |  windows/s | x what a step consumes")
    for name, label in (("loader_stored", "store true (memmap)"),
                        ("loader_fly", "store false (FLAC)"),
                        ("loader_fly_with_mel", "store false + log-mel")):
        print(f"{label:27s} | {rates[name]:10.1f} | {ratio[name]:6.1f}x")
    goal = ratio["loader_fly"]
    print(f"goal (store false loader >= 3x the step's consumption): {goal:.1f}x "
          f"{'met' if goal >= 3 else 'NOT met'}")
    # The same margin in CPU time, which the other jobs on a shared machine disturb least: a
    # step's CPU seconds per window over the CPU seconds of decoding one.
    step_cpu = float(steps["step_cpu_s_stored"]) / (
        p.train.batch_size * p.train.accumulate_gradients)
    record["cpu_time_ratio"] = step_cpu / decode_cpu
    print(f"in CPU time: a step spends {step_cpu:.2f} s a window, decoding one takes "
          f"{decode_cpu * 1e3:.1f} ms: {step_cpu / decode_cpu:.0f}x")
    gpu = args.gpu_tflops * 1e12 * args.gpu_mfu / float(steps["model_flops_per_window"])
    record["extrapolated_gpu"] = {"tflops": args.gpu_tflops, "mfu": args.gpu_mfu,
                                  "windows_per_s": gpu, "decode_cores": gpu * decode_cpu}
    print(f"per window, a step of {p.run.model} is "
          f"{float(steps['model_flops_per_window']) / 1e9:.0f} GFLOP: a GPU of "
          f"{args.gpu_tflops:g} TFLOP/s at {args.gpu_mfu:.0%} MFU would consume {gpu:.0f} "
          f"windows/s (extrapolated, not measured), and decoding them takes "
          f"{gpu * decode_cpu:.1f} worker cores at this CPU's {decode_cpu * 1e3:.1f} ms of CPU "
          f"a window (1 core: {1 / decode_cpu:.0f} windows/s); the log-mel then runs on the GPU")
    print(f"load average (1, 5, 15 min) at start {load_start[0]:.1f} {load_start[1]:.1f} "
          f"{load_start[2]:.1f}, at end " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loader_speed.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out / 'loader_speed.json'}")


if __name__ == "__main__":
    main()
