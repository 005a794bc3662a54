"""Overhead of a full BEST-RQ training step over a bare adapted-encoder forward/backward.

On one batch and device, times (a) a whole training step as `bestrq.train` runs it (labels from
the quantizer, masking, encoder forward/backward, heads, loss, gradient normalisation, clipping,
AdamW step) and (b) the adapted encoder alone (forward, sum of outputs as loss, backward), and
prints both, their ratio (goal <= 1.10), clips/s and, on CUDA, MFU. Then it times the data
pipeline (FeatureDataset from --features, else synthetic clips; masks drawn in the workers) and
compares its clips/s with what the training step consumes.

The full step is the one the default run takes: with the distillation guard at
--distill-weight (default 10, params.yaml's), i.e. with the stock encoder's forward on the clean
input. With --compare-precision fp32,bf16 it times the full step and the bare adapted encoder
for each precision in a fresh child process and prints them side by side, against the goals:
bf16's full step >= 1.6x faster than fp32's, and the full step <= 1.35x the bare encoder.
With --compare-distill clean,masked,masked+cache it does the same per `distill_input` (masked:
the BEST-RQ pass distilled on its unmasked frames, no second adapted pass; +cache: with
`distill_cache`, the stock outputs read back, as from a run's second epoch on: the first warm-up
step fills the cache).

With --compare-adapter ia3,lora it times the full step, the bare adapted encoder and peak
memory for each adapter (LoRA at --lora-rank on --lora-targets, PEFT's Whisper recipe by
default) in a fresh child process and prints them side by side with each one's trainable size.

With --compare-codebooks 1,16 it instead times the training step for each number of codebooks
in a fresh child process (same batch, model and seed), so that each one's peak memory is its own
(peak RSS on CPU, which cannot be reset; torch.cuda.max_memory_allocated on CUDA), and prints
achieved FLOP/s, peak memory and their ratios to the first, against the goals: >= 85% of its
FLOP/s, and no more memory than the extra heads' weights, gradients and AdamW state + 0.4 GB.

    python bench/train_overhead.py --random --batch-size 4 --steps 5 --device cpu
    python bench/train_overhead.py --model tiny.en --batch-size 64 --features data/features/train
    python bench/train_overhead.py --model tiny.en --batch-size 4 --steps 3 --warmup 1 \
        --device cpu --compare-codebooks 1,16
    python bench/train_overhead.py --model tiny.en --batch-size 4 --device cpu \
        --compare-precision fp32,bf16
    python bench/train_overhead.py --model tiny.en --batch-size 4 --steps 3 --warmup 1 \
        --device cpu --compare-adapter ia3,lora
    python bench/train_overhead.py --model tiny.en --batch-size 4 --device cpu \
        --compare-distill clean,masked,clean+cache,masked+cache
    python bench/train_overhead.py --model tiny.en --batch-size 8 --steps 2 --warmup 1 \
        --device cpu --precision fp32 --compare-checkpointing off,on

With --compare-checkpointing off,on it times the full step with `gradient_checkpointing` off
and on, each in a fresh child process, and prints side by side: step time, the step's peak
activation memory (the peak of the step above what is allocated before it: torch's CPU
allocations from the profiler on CPU, torch.cuda.max_memory_allocated on CUDA), the whole
peak beside `bestrq.memory`'s estimate, and peak RSS; against the goals: at least 40% less
peak activation memory at no more than 1.4x the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from whisper.audio import N_FRAMES

from bestrq.adapters import AdapterConfig, count_adapter_parameters
from bestrq.batching import DataPosition, GlobalBatchSampler
from bestrq.masking import MaskingConfig
from bestrq.memory import estimate_peak_memory, measured_cpu_peak_bytes
from bestrq.model import BestRQModel
from bestrq.pretraining import BEST_RQ, MaskedClips
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.throughput import mfu, model_flops
from bestrq.train import (
    TrainConfig,
    accumulate_gradients,
    autocast_dtype,
    finish_gradients,
    make_optimizer,
)
from bestrq.whisper_model import TINY_TEST_DIMS, load_whisper, random_whisper


class SyntheticClips(Dataset):
    """In-memory random log-mels with varied valid lengths, like FeatureDataset's items."""

    def __init__(self, num_clips: int, n_mels: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.mels = torch.randn(num_clips, n_mels, N_FRAMES, generator=g) * 0.5 - 0.2
        self.frames = torch.randint(N_FRAMES // 2, N_FRAMES + 1, (num_clips,), generator=g)
        self.n_mels = n_mels

    def __len__(self) -> int:
        return len(self.mels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mels[i], self.frames[i]


def cpu_line() -> str:
    """The CPU model, its cores and whether it multiplies bf16 (AVX-512 BF16) or has AMX."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    has = [name for name, flag in (("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx_bf16"))
           if flag in flags]
    return (f"CPU {model}, {os.cpu_count()} cores, "
            f"{' and '.join(has) if has else 'no bf16 hardware'}")


def step_peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated while `fn` runs above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return measured_cpu_peak_bytes(fn)


def allocated_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's tensors and the optimiser's state: what a step starts from."""
    tensors = [*model.parameters(), *model.buffers(),
               *(v for state in optimizer.state.values() for v in state.values()
                 if isinstance(v, torch.Tensor))]
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Mean wall and process CPU seconds per call of `fn` after `warmup` untimed calls (CPU
    time, summed over threads, is what a CPU shared with other jobs disturbs least)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def alternate_timed(fn, set_flag, steps: int, warmup: int, device: torch.device
                    ) -> dict[str, float]:
    """Median wall and process CPU seconds of `fn` with a flag off and on, the two timed in
    turn (off, on, off, on, ...), so that a load that comes and goes on a shared machine
    weighs on both alike; `warmup` untimed calls of each first."""
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(warmup + steps):
        for flag in (False, True):
            set_flag(flag)
            sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if i >= warmup:
                times[flag].append((time.perf_counter() - start, time.process_time() - cpu))
    out = {}
    for flag, name in ((False, "off"), (True, "on")):
        walls, cpus = zip(*times[flag], strict=True)
        out[f"{name}_s"] = statistics.median(walls)
        out[f"{name}_cpu_s"] = statistics.median(cpus)
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated on CUDA, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def heads_state_bytes(model: BestRQModel) -> int:
    """The heads' weights, gradients and AdamW's two moments, fp32."""
    return 4 * 4 * sum(p.numel() for p in model.heads.parameters())


def run_children(common: list[str], flag: str, values: list[str]) -> list[dict]:
    """This script's `--json` row for each value of `flag` (a value "v+cache" adds
    --distill-cache), each in a fresh child process (so that each one's peak memory is its
    own), in order."""
    rows = []
    for value in values:
        value, plus, extra = value.partition("+")
        if plus and extra != "cache":
            raise SystemExit(f"{flag}: {value}+{extra}: the only addition is +cache")
        child = subprocess.run([sys.executable, __file__, *common, flag, value,
                                *(["--distill-cache"] if extra else [])],
                               check=True, capture_output=True, text=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return rows


def compare_codebooks(args: argparse.Namespace, counts: list[int]) -> None:
    """Run the training-step measurement for each number of codebooks in a child process and
    print them side by side."""
    source = ["--random"] if args.random else ["--model", args.model]
    common = [*source, "--batch-size", str(args.batch_size), "--codebook-size",
              str(args.codebook_size), "--mask-prob", str(args.mask_prob), "--steps",
              str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
              "--precision", args.precision, "--distill-weight", str(args.distill_weight),
              "--json"]
    rows = run_children(common, "--num-codebooks", [str(n) for n in counts])
    base = rows[0]
    print(f"device {base['device']}, precision {base['precision']}, batch {args.batch_size}, "
          f"K {args.codebook_size}, {base['masked']} masked targets, {args.steps} steps")
    print("codebooks |   step s | CPU s/step | TFLOP/step | TFLOP/s | vs first | per CPU s, "
          "vs first | peak GB | +GB vs first | allowed +GB")
    for row in rows:
        rate, base_rate = row["flops"] / row["step_s"], base["flops"] / base["step_s"]
        cpu_ratio = (row["flops"] / row["step_cpu_s"]) / (base["flops"] / base["step_cpu_s"])
        extra = (row["peak_bytes"] - base["peak_bytes"]) / 1e9
        allowed = (row["heads_bytes"] - base["heads_bytes"]) / 1e9 + 0.4
        print(f"{row['num_codebooks']:9d} | {row['step_s']:8.2f} | {row['step_cpu_s']:10.2f} | "
              f"{row['flops'] / 1e12:10.3f} | {rate / 1e12:7.3f} | {rate / base_rate:8.1%} | "
              f"{cpu_ratio:19.1%} | {row['peak_bytes'] / 1e9:7.2f} | {extra:12.2f} | "
              f"{allowed:11.2f}")
    last = rows[-1]
    rate_ratio = (last["flops"] / last["step_s"]) / (base["flops"] / base["step_s"])
    extra = last["peak_bytes"] - base["peak_bytes"]
    allowed = last["heads_bytes"] - base["heads_bytes"] + 0.4e9
    print(f"FLOP/s goal (>= 85% of N={base['num_codebooks']}): {rate_ratio:.1%} "
          f"{'met' if rate_ratio >= 0.85 else 'NOT met'}; memory goal (+{allowed / 1e9:.2f} GB): "
          f"+{extra / 1e9:.2f} GB {'met' if extra <= allowed else 'NOT met'}")


def compare_adapter(args: argparse.Namespace, kinds: list[str]) -> None:
    """The full step, the bare adapted encoder and peak memory per adapter kind, each in a
    child process, side by side."""
    source = ["--random"] if args.random else ["--model", args.model]
    common = [*source, "--batch-size", str(args.batch_size), "--codebook-size",
              str(args.codebook_size), "--num-codebooks", str(args.num_codebooks),
              "--mask-prob", str(args.mask_prob), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--device", args.device, "--precision", args.precision,
              "--distill-weight", str(args.distill_weight), "--lora-rank", str(args.lora_rank),
              "--lora-targets", args.lora_targets, "--json", "--with-bare"]
    rows = run_children(common, "--adapter", kinds)
    base = rows[0]
    print(f"device {base['device']}, precision {base['precision']}, batch {args.batch_size}, "
          f"codebooks {args.num_codebooks} x {args.codebook_size}, distill_weight "
          f"{args.distill_weight}, {args.steps} steps; lora: r={args.lora_rank} on "
          f"{args.lora_targets}")
    print("adapter | trainable in encoder | full step s | bare encoder s | full vs first | "
          "peak GB | +GB vs first")
    for row in rows:
        print(f"{row['adapter']:7s} | {row['adapter_parameters']:20,d} | {row['step_s']:11.3f} | "
              f"{row['bare_s']:14.3f} | {row['step_s'] / base['step_s']:12.2f}x | "
              f"{row['peak_bytes'] / 1e9:7.2f} | "
              f"{(row['peak_bytes'] - base['peak_bytes']) / 1e9:12.2f}")


def full_and_bare(args: argparse.Namespace, flag: str, values: list[str],
                  column: str) -> list[dict]:
    """The full step and the bare adapted encoder for each value of `flag` (the others as
    given), each in a child process, printed side by side; the rows."""
    source = ["--random"] if args.random else ["--model", args.model]
    given = {"--precision": args.precision, "--distill-input": args.distill_input}
    cache = ["--distill-cache"] if args.distill_cache else []
    common = [*source, *cache, "--batch-size", str(args.batch_size), "--codebook-size",
              str(args.codebook_size), "--num-codebooks", str(args.num_codebooks),
              "--mask-prob", str(args.mask_prob), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--device", args.device, "--distill-weight",
              str(args.distill_weight), "--json", "--with-bare",
              *(x for name, value in given.items() if name != flag for x in (name, value))]
    rows = run_children(common, flag, values)
    base = rows[0]
    print(f"device {base['device']}, batch {args.batch_size}, codebooks {args.num_codebooks} x "
          f"{args.codebook_size}, distill_weight {args.distill_weight}, {args.steps} steps")
    print(f"{column:15s} |  full step s | bare encoder s | full / bare | full step vs first")
    for row in rows:
        print(f"{label(row, column):15s} | {row['step_s']:12.3f} | {row['bare_s']:14.3f} | "
              f"{row['step_s'] / row['bare_s']:11.3f} | {base['step_s'] / row['step_s']:17.2f}x")
    return rows


def label(row: dict, column: str) -> str:
    """A row's value of `column`, "+cache" when it ran with the stock-output cache."""
    return row[column] + ("+cache" if row.get("distill_cache") else "")


def compare_precision(args: argparse.Namespace, precisions: list[str]) -> None:
    """The full step (distillation included) and the bare adapted encoder, per precision."""
    rows = full_and_bare(args, "--precision", precisions, "precision")
    base, last = rows[0], rows[-1]
    speedup = base["step_s"] / last["step_s"]
    overhead = last["step_s"] / last["bare_s"]
    verdict = {True: "met", False: "NOT met"}
    print(f"speed-up goal ({last['precision']} full step >= 1.6x {base['precision']}'s): "
          f"{speedup:.2f}x {verdict[speedup >= 1.6]}; overhead goal (full <= 1.35x bare, "
          f"distillation on): {overhead:.3f} {verdict[overhead <= 1.35]}")


def compare_distill(args: argparse.Namespace, inputs: list[str]) -> None:
    """The full step and the bare adapted encoder per `distill_input` (clean: a second adapted
    pass; masked: the BEST-RQ pass distilled on its unmasked frames)."""
    rows = full_and_bare(args, "--distill-input", inputs, "distill_input")
    for row in rows:
        overhead = row["step_s"] / row["bare_s"]
        print(f"overhead goal (full <= 1.35x bare, distillation on) with distill_input "
              f"{label(row, 'distill_input')}: {overhead:.3f} "
              f"{'met' if overhead <= 1.35 else 'NOT met'}")


def compare_checkpointing(args: argparse.Namespace, values: list[str]) -> None:
    """The full step, its peak activation memory, the whole peak beside the estimate, and peak
    RSS, per `gradient_checkpointing`, each in a child process, side by side."""
    source = ["--random"] if args.random else ["--model", args.model]
    cache = ["--distill-cache"] if args.distill_cache else []
    common = [*source, *cache, "--batch-size", str(args.batch_size), "--codebook-size",
              str(args.codebook_size), "--num-codebooks", str(args.num_codebooks),
              "--mask-prob", str(args.mask_prob), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--device", args.device, "--precision", args.precision,
              "--distill-weight", str(args.distill_weight), "--distill-input",
              args.distill_input, "--adapter", args.adapter, "--lora-rank", str(args.lora_rank),
              "--lora-targets", args.lora_targets, "--json"]
    rows = run_children(common, "--gradient-checkpointing", values)
    # The step times: both settings in one process, in turn (see alternate_timed).
    child = subprocess.run([sys.executable, __file__, *common, "--alternate-checkpointing"],
                           check=True, capture_output=True, text=True)
    times = json.loads(child.stdout.strip().splitlines()[-1])
    for row in rows:
        row["step_s"] = times[f"{row['checkpointing']}_s"]
        row["step_cpu_s"] = times[f"{row['checkpointing']}_cpu_s"]
    base = rows[0]
    mib = 2**20
    print(cpu_line())
    print(f"device {base['device']}, precision {base['precision']}, batch {args.batch_size}, "
          f"{args.adapter}, codebooks {args.num_codebooks} x {args.codebook_size}, "
          f"distill_weight {args.distill_weight} ({args.distill_input}); step times: medians "
          f"of {args.steps} steps of each setting in turn after {args.warmup}, in one process; "
          "memory: each setting in its own process")
    print("checkpointing | step s | CPU s/step | vs first | activations MiB | vs first | "
          "peak MiB | estimate MiB | est / peak | peak RSS MiB")
    for row in rows:
        peak = row["start_bytes"] + row["step_peak_bytes"]
        print(f"{row['checkpointing']:13s} | {row['step_s']:6.2f} | {row['step_cpu_s']:10.2f} | "
              f"{row['step_s'] / base['step_s']:7.2f}x | "
              f"{row['step_peak_bytes'] / mib:15,.0f} | "
              f"{row['step_peak_bytes'] / base['step_peak_bytes']:8.1%} | {peak / mib:8,.0f} | "
              f"{row['estimate_bytes'] / mib:12,.0f} | {row['estimate_bytes'] / peak:10.2f} | "
              f"{row['peak_bytes'] / mib:12,.0f}")
    last = rows[-1]
    saved = 1 - last["step_peak_bytes"] / base["step_peak_bytes"]
    slower = last["step_s"] / base["step_s"]
    # CPU seconds: what a CPU shared with other jobs disturbs least
    slower_cpu = last["step_cpu_s"] / base["step_cpu_s"]
    verdict = {True: "met", False: "NOT met"}
    print(f"goal (>= 40% less peak activation memory at <= 1.4x the step time): {saved:.0%} "
          f"less at {slower:.2f}x the wall time ({verdict[saved >= 0.4 and slower <= 1.4]}), "
          f"{slower_cpu:.2f}x the CPU time ({verdict[saved >= 0.4 and slower_cpu <= 1.4]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Whisper model name or checkpoint path")
    source.add_argument("--random", action="store_true", help="small random Whisper (d=64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-codebooks", type=int, default=1)
    parser.add_argument("--codebook-size", type=int, default=8192)
    parser.add_argument("--mask-prob", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--features", type=Path, help="a FeatureDataset split folder")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--compare-codebooks", metavar="N,N,...",
                        help="time the training step for each number of codebooks, each in a "
                             "fresh process, and compare FLOP/s and peak memory")
    parser.add_argument("--distill-weight", type=float, default=10.0,
                        help="the distillation guard's weight (params.yaml's default; 0: off)")
    parser.add_argument("--compare-precision", metavar="P,P",
                        help="time the full step and the bare encoder for each precision "
                             "(fp32, bf16), each in a fresh process, side by side")
    parser.add_argument("--with-bare", action="store_true",
                        help="with --json: time the bare encoder too (used by "
                             "--compare-precision)")
    parser.add_argument("--distill-input", default="clean", choices=("clean", "masked"),
                        help="params.yaml's distill_input")
    parser.add_argument("--distill-cache", action="store_true",
                        help="params.yaml's distill_cache: the stock outputs cached (filled by "
                             "the first warm-up step: the steady state of a second epoch)")
    parser.add_argument("--compare-distill", metavar="I,I",
                        help="e.g. clean,masked,masked+cache: the full step and the bare "
                             "encoder per distill_input (+cache: with --distill-cache), side "
                             "by side")
    parser.add_argument("--adapter", default="ia3", choices=("ia3", "lora"))
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-targets", default="query,value",
                        help="comma-separated: query, key, value, out, fc1, fc2")
    parser.add_argument("--compare-adapter", metavar="A,A",
                        help="time the full step and bare encoder per adapter kind, side by "
                             "side (e.g. ia3,lora)")
    parser.add_argument("--gradient-checkpointing", default="off", choices=("off", "on"),
                        help="params.yaml's gradient_checkpointing")
    parser.add_argument("--compare-checkpointing", metavar="off,on",
                        help="the full step, peak activation memory and the estimate per "
                             "gradient_checkpointing, each in a fresh process, side by side")
    parser.add_argument("--alternate-checkpointing", action="store_true",
                        help="with --json: time steps with gradient_checkpointing off and on in "
                             "turn, in one process (used by --compare-checkpointing)")
    parser.add_argument("--json", action="store_true",
                        help="time only the training step and print one JSON line (used by "
                             "--compare-codebooks)")
    args = parser.parse_args()
    if (args.distill_cache or "cache" in (args.compare_distill or "")) and args.warmup < 1:
        parser.error("--distill-cache needs --warmup >= 1: the first step fills the cache")
    if args.compare_codebooks:
        compare_codebooks(args, [int(n) for n in args.compare_codebooks.split(",")])
        return
    if args.compare_precision:
        compare_precision(args, args.compare_precision.split(","))
        return
    if args.compare_adapter:
        compare_adapter(args, args.compare_adapter.split(","))
        return
    if args.compare_distill:
        compare_distill(args, args.compare_distill.split(","))
        return
    if args.compare_checkpointing:
        compare_checkpointing(args, args.compare_checkpointing.split(","))
        return

    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig(batch_size=args.batch_size, precision=args.precision,
                         num_workers=args.num_workers, device=str(device))
    dtype = autocast_dtype(config, device)
    whisper = random_whisper(TINY_TEST_DIMS) if args.random else load_whisper(args.model)
    n_mels = whisper.dims.n_mels
    quantizer = RandomProjectionQuantizer(QuantizerConfig(
        n_mels=n_mels, num_codebooks=args.num_codebooks, codebook_size=args.codebook_size))
    adapter = AdapterConfig(args.adapter, lora_rank=args.lora_rank,
                            lora_alpha=2.0 * args.lora_rank,
                            lora_targets=tuple(args.lora_targets.split(",")))
    model = BestRQModel(whisper.encoder, quantizer, MaskingConfig(mask_prob=args.mask_prob),
                        args.distill_weight, adapter=adapter, distill_input=args.distill_input,
                        distill_cache=args.distill_cache,
                        gradient_checkpointing=args.gradient_checkpointing == "on")
    del whisper.decoder  # not used; frees its memory
    model.to(device)
    if args.features is not None:
        from bestrq.dataset import FeatureDataset
        dataset: Dataset = FeatureDataset(args.features)
    else:
        dataset = SyntheticClips(max(4 * args.batch_size, 64), n_mels)
    clips = MaskedClips(dataset, model.masking, seed=0,
                        with_clip=model.cache_stock_outputs(len(dataset)))
    batch = next(iter(DataLoader(clips, batch_size=args.batch_size,
                                 sampler=[(0, i) for i in range(args.batch_size)])))
    mel = batch[0].to(device)  # (batch, n_mels, frames)

    params = list(model.trainable_parameters().values())
    optimizer = make_optimizer(BEST_RQ.groups(model), config)
    masked = []

    def training_step() -> None:
        stats = accumulate_gradients(model, [batch], device, dtype, with_metrics=False)
        finish_gradients(params, stats, world_size=1)
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if bool(torch.isfinite(norm)):  # the loop's one host sync per update
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masked.append(int(stats.count))

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            h = model.encoder(mel)  # (batch, frames / 2, d_model)
        h.float().sum().backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.alternate_checkpointing:
        def set_flag(flag: bool) -> None:
            model.gradient_checkpointing = flag

        print(json.dumps(alternate_timed(training_step, set_flag, args.steps, args.warmup,
                                         device)))
        return
    full, full_cpu = timed(training_step, args.steps, args.warmup, device)
    flops = model_flops(model, args.batch_size, masked[-1])["total"]
    if args.json:
        row = {"num_codebooks": args.num_codebooks, "step_s": full, "step_cpu_s": full_cpu,
               "flops": flops, "peak_bytes": peak_memory_bytes(device), "masked": masked[-1],
               "heads_bytes": heads_state_bytes(model), "device": str(device),
               "adapter": args.adapter, "distill_input": args.distill_input,
               "distill_cache": args.distill_cache,
               "adapter_parameters": count_adapter_parameters(model.encoder),
               "precision": str(dtype or torch.float32),
               "checkpointing": args.gradient_checkpointing,
               # One more step, untimed (the CPU measurement profiles it): its peak above
               # what the model and AdamW hold before it, and the estimate of the whole.
               "start_bytes": allocated_bytes(model, optimizer),
               "step_peak_bytes": step_peak_bytes(training_step, device),
               "estimate_bytes": estimate_peak_memory(model, args.batch_size, dtype).total}
        if args.with_bare:
            row["bare_s"] = timed(bare_step, args.steps, args.warmup, device)[0]
        print(json.dumps(row))
        return
    bare, _ = timed(bare_step, args.steps, args.warmup, device)
    clips_per_s = args.batch_size / full
    print(f"device {device}, precision {dtype or torch.float32}, batch {args.batch_size}, "
          f"codebooks {args.num_codebooks} x {args.codebook_size}")
    print(f"full training step   {full * 1e3:9.1f} ms  ({clips_per_s:.1f} clips/s)")
    print(f"bare encoder fwd+bwd {bare * 1e3:9.1f} ms")
    print(f"ratio                {full / bare:9.3f}  (goal <= 1.35 with distillation, "
          f"distill_weight {args.distill_weight})")
    print(f"model FLOPs per step {flops / 1e12:9.3f} TFLOP, achieved "
          f"{flops / full / 1e12:.2f} TFLOP/s")
    value = mfu(flops, full, device, dtype or torch.float32)
    if value is not None:
        print(f"MFU                  {100 * value:9.1f} %")
    if device.type == "cuda":
        print(f"peak memory          {torch.cuda.max_memory_allocated(device) / 1e9:9.2f} GB")

    sampler = GlobalBatchSampler(len(dataset), args.batch_size, 1, 1, 0, 0, DataPosition())
    loader = DataLoader(clips, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=2 if args.num_workers else None)
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        next(batches)
    loader_rate = args.loader_batches * args.batch_size / (time.perf_counter() - start)
    del batches
    print(f"data loader          {loader_rate:9.1f} clips/s with {args.num_workers} workers "
          f"({loader_rate / clips_per_s:.2f}x what training consumes)")


if __name__ == "__main__":
    main()
