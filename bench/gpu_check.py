"""The GPU check (issue 34 item 6): one command, one table, a bounded time.

Random Whisper weights of tiny, base and small shape (no download). Per shape: BEST-RQ
pre-training steps with 1 and 16 codebooks (8192 codes each; --smoke: 512),
`gradient_checkpointing` off and on, the distillation guard on as params.yaml's default
(distill_weight 10, clean input: three encoder passes a step); a fine-tune step (IA^3 in
encoder and decoder, teacher-forced cross-entropy on ~100 target tokens a window); a batched
greedy decode with whisper's decoding (`whisper.decode`, bounded at --decode-tokens tokens a
window; random weights emit tokens up to the cap). Each row: the batch, step (or call) time,
windows/s and tokens/s (pre-training: encoder frames; fine-tune: target tokens; decode:
generated tokens), achieved TFLOP/s and MFU (pre-training: `bestrq.throughput.model_flops`,
the model FLOPs, recomputation not counted; fine-tune and decode: torch's FlopCounterMode on
one untimed call), peak memory (torch.cuda.max_memory_allocated on a GPU; on a CPU the model's
and AdamW's bytes plus the step's measured peak above them) and, for pre-training,
`bestrq.memory`'s estimate.

The time is shared out: every row runs warm-up steps, then as many timed steps as its share of
--budget-s allows (at least --min-steps); a row that would start past the budget is listed as
skipped. `bench/gpu_check.sh` runs it in at most 8 minutes (budget 420 s).

    bash bench/gpu_check.sh                          # one GPU: tiny, base, small in bf16
    python bench/gpu_check.py --smoke                # any CPU: a small shape, a few steps
    python bench/gpu_check.py --smoke --json rows.jsonl
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import whisper
from torch.utils.flop_counter import FlopCounterMode
from whisper.audio import N_FRAMES
from whisper.model import ModelDimensions, Whisper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_overhead's helpers
from train_overhead import allocated_bytes, cpu_line, step_peak_bytes  # noqa: E402

from bestrq.adapters import AdapterConfig  # noqa: E402
from bestrq.finetune import FinetuneModel, pad_batch, token_targets, tokenizer_for  # noqa: E402
from bestrq.masking import MaskingConfig, draw_sample_mask  # noqa: E402
from bestrq.memory import estimate_peak_memory  # noqa: E402
from bestrq.model import BestRQModel  # noqa: E402
from bestrq.objective import one_group  # noqa: E402
from bestrq.pretraining import BEST_RQ  # noqa: E402
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer  # noqa: E402
from bestrq.throughput import mfu, model_flops  # noqa: E402
from bestrq.train import (  # noqa: E402
    TrainConfig,
    accumulate_gradients,
    autocast_dtype,
    finish_gradients,
    make_optimizer,
)
from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper  # noqa: E402


def dims(d: int, heads: int, layers: int) -> ModelDimensions:
    """An English-only Whisper's dimensions (80 mel bins, 448 text positions)."""
    return ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=d, n_audio_head=heads,
                           n_audio_layer=layers, n_vocab=51864, n_text_ctx=448, n_text_state=d,
                           n_text_head=heads, n_text_layer=layers)


SHAPES = {"tiny": dims(384, 6, 4), "base": dims(512, 8, 6), "small": dims(768, 12, 12)}
SMOKE = {"test": TINY_TEST_DIMS}  # d 64, 2 blocks
DISTILL_WEIGHT = 10.0  # params.yaml's
# What a window's transcript looks like to the fine-tune: ~100 tokens, cut to the context.
TEXT = " ".join(["the quick brown fox jumps over the lazy dog and runs into the woods"] * 7)
COLUMNS = ("config", "batch", "steps", "step_s", "windows_s", "tokens_s", "tflops", "mfu",
           "peak_mib", "estimate_mib", "note")


@dataclass
class Row:
    config: str
    batch: int
    steps: int = 0
    step_s: float = math.nan
    windows_s: float = math.nan
    tokens_s: float = math.nan
    tflops: float = math.nan  # achieved TFLOP/s
    mfu: float | None = None  # None where the device's peak is unknown (a CPU)
    peak_mib: float = math.nan
    estimate_mib: float | None = None  # pre-training rows
    note: str = ""

    def line(self) -> str:
        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None or not math.isfinite(value) else format(value, fmt)
        return (f"{self.config:30s} | {self.batch:5d} | {self.steps:5d} | "
                f"{num(self.step_s * 1e3, '9.1f'):>9s} | {num(self.windows_s, '9.1f'):>9s} | "
                f"{num(self.tokens_s, '10,.0f'):>10s} | {num(self.tflops, '8.3g'):>8s} | "
                f"{num(None if self.mfu is None else 100 * self.mfu, '5.1f'):>5s} | "
                f"{num(self.peak_mib, '9,.0f'):>9s} | {num(self.estimate_mib, '9,.0f'):>9s} | "
                f"{self.note}")


HEADER = ("config                         | batch | steps |   step ms | windows/s |   tokens/s | "
          " TFLOP/s | MFU % |  peak MiB |  est. MiB | note")


class Clock:
    """The run's time budget, shared out among the rows still to run."""

    def __init__(self, budget_s: float, rows: int) -> None:
        self.deadline = time.monotonic() + budget_s
        self.left = rows

    def share(self) -> float:
        """Seconds the next row may take; negative when the budget is spent."""
        remaining = self.deadline - time.monotonic()
        share = remaining / max(self.left, 1)
        self.left -= 1
        return share if remaining > 0 else -1.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], object], device: torch.device, warmup: int, until: float,
                min_steps: int, max_steps: int) -> tuple[int, float]:
    """(steps, mean seconds) of `step` after `warmup` untimed calls: as many timed steps as fit
    before `until` (time.perf_counter's), at least `min_steps`, at most `max_steps`."""
    last = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        step()
        sync(device)
        last = time.perf_counter() - start
    left = until - time.perf_counter()
    steps = max(min_steps, min(max_steps, int(left / max(last, 1e-6))))
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps, (time.perf_counter() - start) / steps


def peak_mib(device: torch.device, measure: Callable[[], int]) -> float:
    """The row's peak: on CUDA the allocator's since the row began (`reset`); on a CPU what
    `measure` gives (the model's bytes plus one more step's peak above them)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return measure() / 2**20


def window_batch(batch: int, n_mels: int, device: torch.device, seed: int = 0
                 ) -> tuple[torch.Tensor, ...]:
    """(mel, valid frames, frame mask, noise) of `batch` whole random 30 s windows."""
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, n_mels, N_FRAMES, generator=g) * 0.5 - 0.2
    masks, noises = zip(*(draw_sample_mask(N_FRAMES, N_FRAMES, n_mels, MaskingConfig(), i)
                          for i in range(batch)), strict=True)
    return tuple(t.to(device) for t in (mel, torch.full((batch,), N_FRAMES),
                                        torch.stack(masks), torch.stack(noises)))


def pretrain_row(base: Whisper, name: str, codebooks: int, checkpointing: bool, batch: int,
                 device: torch.device, dtype: torch.dtype | None, args: argparse.Namespace,
                 until: float) -> Row:
    row = Row(f"pretrain {name} N={codebooks} ckpt {'on' if checkpointing else 'off'}", batch)
    quantizer = RandomProjectionQuantizer(QuantizerConfig(
        n_mels=base.dims.n_mels, num_codebooks=codebooks, codebook_size=args.codebook_size))
    model = BestRQModel(copy.deepcopy(base.encoder), quantizer, MaskingConfig(), DISTILL_WEIGHT,
                        gradient_checkpointing=checkpointing).to(device)
    optimizer = make_optimizer(BEST_RQ.groups(model), TrainConfig())
    params = list(model.trainable_parameters().values())
    inputs = window_batch(batch, base.dims.n_mels, device)
    masked: list[int] = []

    def step() -> None:
        stats = accumulate_gradients(model, [inputs], device, dtype, with_metrics=False)
        finish_gradients(params, stats, world_size=1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masked.append(int(stats.count))

    row.steps, row.step_s = timed_steps(step, device, args.warmup, until, args.min_steps,
                                        args.max_steps)
    flops = model_flops(model, batch, masked[-1])["total"]
    row.windows_s = batch / row.step_s
    row.tokens_s = batch * model.encoder.positional_embedding.shape[0] / row.step_s
    row.tflops = flops / row.step_s / 1e12
    row.mfu = mfu(flops, row.step_s, device, dtype or torch.float32)
    row.peak_mib = peak_mib(device, lambda: allocated_bytes(model, optimizer)
                            + step_peak_bytes(step, device))
    row.estimate_mib = estimate_peak_memory(model, batch, dtype).total / 2**20
    return row


def finetune_row(base: Whisper, name: str, batch: int, device: torch.device,
                 dtype: torch.dtype | None, args: argparse.Namespace, until: float) -> Row:
    row = Row(f"finetune {name} ia3", batch)
    model = FinetuneModel(copy.deepcopy(base), AdapterConfig()).to(device)
    optimizer = make_optimizer(one_group(model), TrainConfig())
    params = list(model.trainable_parameters().values())
    tokenizer = tokenizer_for(model.whisper, "en")
    mel, frames = window_batch(batch, base.dims.n_mels, device)[:2]
    items = [(m, f, *token_targets(tokenizer, TEXT, base.dims.n_text_ctx))
             for m, f in zip(mel.cpu(), frames.cpu(), strict=True)]
    inputs = pad_batch(items)  # (mel, frames, decoder inputs, targets)
    targets = int((inputs[3] >= 0).sum())

    def step() -> None:
        stats = accumulate_gradients(model, [inputs], device, dtype, with_metrics=False)
        finish_gradients(params, stats, world_size=1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    row.steps, row.step_s = timed_steps(step, device, args.warmup, until, args.min_steps,
                                        args.max_steps)
    row.windows_s = batch / row.step_s
    row.tokens_s = targets / row.step_s
    row.tflops = flops / row.step_s / 1e12
    row.mfu = mfu(flops, row.step_s, device, dtype or torch.float32)
    row.peak_mib = peak_mib(device, lambda: allocated_bytes(model, optimizer)
                            + step_peak_bytes(step, device))
    return row


def decode_row(base: Whisper, name: str, batch: int, device: torch.device,
               args: argparse.Namespace, until: float) -> Row:
    cap = min(args.decode_tokens, base.dims.n_text_ctx // 2)
    row = Row(f"decode {name} greedy <={cap} tokens", batch)
    model = copy.deepcopy(base).to(device).eval()
    # As the WER evaluation decodes (bestrq.asr.transcribe): fp16 on CUDA, fp32 on a CPU.
    options = whisper.DecodingOptions(language="en", temperature=0.0, without_timestamps=True,
                                      sample_len=cap, fp16=device.type == "cuda")
    mel = window_batch(batch, base.dims.n_mels, device)[0]
    generated: list[int] = []

    @torch.no_grad()
    def call() -> None:
        results = whisper.decode(model, mel, options)
        generated.append(sum(len(r.tokens) for r in results))

    with FlopCounterMode(display=False) as counter:
        call()
    flops = counter.get_total_flops()
    row.steps, row.step_s = timed_steps(call, device, args.warmup, until, args.min_steps,
                                        args.max_steps)
    row.windows_s = batch / row.step_s
    row.tokens_s = max(generated[-1], 1) / row.step_s
    row.tflops = flops / row.step_s / 1e12
    row.mfu = mfu(flops, row.step_s, device, torch.float16 if options.fp16 else torch.float32)
    row.peak_mib = peak_mib(device, lambda: sum(t.numel() * t.element_size()
                                                 for t in model.state_dict().values())
                            + step_peak_bytes(call, device))
    row.note = f"{generated[-1] / batch:.0f} tokens a window"
    return row


def shape_jobs(name: str, base: Whisper, codebooks: list[int], device: torch.device,
               dtype: torch.dtype | None, args: argparse.Namespace
               ) -> list[tuple[str, Callable[[float], Row]]]:
    """The rows of one shape, in order: a label and what runs the row given when it should end
    (time.perf_counter's)."""
    batch = pick_batch(args.batch, name, device, args.smoke)
    jobs: list[tuple[str, Callable[[float], Row]]] = [
        (f"pretrain {name} N={n} ckpt {'on' if c else 'off'}",
         partial(pretrain_row, base, name, n, c, batch, device, dtype, args))
        for n in codebooks for c in (False, True)]
    jobs.append((f"finetune {name} ia3", partial(
        finetune_row, base, name, args.finetune_batch or max(1, batch // 2), device, dtype,
        args)))
    jobs.append((f"decode {name}", partial(decode_row, base, name,
                                           args.decode_batch or min(batch, 32), device, args)))
    return jobs


def pick_batch(requested: int | None, shape: str, device: torch.device, smoke: bool) -> int:
    """The pre-training micro-batch of a shape: given, else 2 in the smoke run, else 64 for
    tiny and base and 32 for small (`bestrq.memory`'s estimate of small at 64 with 16 codebooks
    and checkpointing off, 64 GiB, leaves too little of an H100's 80 GB)."""
    if requested:
        return requested
    if smoke or device.type != "cuda":
        return 2
    return 32 if shape == "small" else 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a small shape (d 64, 2 blocks), batch 2, a few steps: any CPU")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated of tiny, base, small (default: all; --smoke: its "
                             "own small shape)")
    parser.add_argument("--codebooks", default="1,16")
    parser.add_argument("--codebook-size", type=int, default=None,
                        help="codes a codebook (default 8192, params.yaml's; --smoke 512)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="pre-training and fine-tune autocast (auto: bf16 on CUDA and on "
                             "CPUs with AVX-512 BF16 / AMX)")
    parser.add_argument("--batch", type=int, default=None,
                        help="pre-training windows a step (default: pick_batch)")
    parser.add_argument("--finetune-batch", type=int, default=None,
                        help="fine-tune windows a step (default: half the pre-training batch)")
    parser.add_argument("--decode-batch", type=int, default=None,
                        help="windows a decode call (default: the pre-training batch, <= 32)")
    parser.add_argument("--decode-tokens", type=int, default=32,
                        help="tokens a window at most in the decode (whisper's sample_len)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds the rows share (bench/gpu_check.sh: 420 of its 480)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps a row (default 2, --smoke 1)")
    parser.add_argument("--min-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="timed steps a row at most (default 20, --smoke 1)")
    parser.add_argument("--json", type=Path, help="also write each row as a JSON line here")
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.max_steps = args.max_steps or (1 if args.smoke else 20)
    args.codebook_size = args.codebook_size or (512 if args.smoke else 8192)
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE if args.smoke else SHAPES
    if args.shapes:
        unknown = sorted(set(args.shapes.split(",")) - set(shapes))
        if unknown:
            parser.error(f"--shapes: {', '.join(unknown)} not among {', '.join(shapes)}")
        shapes = {s: shapes[s] for s in args.shapes.split(",")}
    codebooks = [int(n) for n in args.codebooks.split(",")]
    dtype = autocast_dtype(TrainConfig(precision=args.precision), device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: TF32, as MFU's peak assumes
    print(cpu_line())
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, precision {dtype or torch.float32}; random weights; "
          f"pre-training with the distillation guard (distill_weight {DISTILL_WEIGHT}, clean), "
          f"codebooks of {args.codebook_size}; budget {args.budget_s:.0f} s")
    print(HEADER, flush=True)
    out = args.json.open("w") if args.json else None
    per_shape = 2 * len(codebooks) + 2
    clock = Clock(args.budget_s, per_shape * len(shapes))
    for name, shape in shapes.items():
        for label, job in shape_jobs(name, random_whisper(shape), codebooks, device, dtype, args):
            share = clock.share()
            if share < 0:
                row = Row(label, 0, note="skipped: time budget spent")
            else:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    row = job(time.perf_counter() + share)  # the row ends by then
                except torch.cuda.OutOfMemoryError as err:
                    row = Row(label, 0, note=f"out of memory: {str(err).splitlines()[0]}")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(row.line(), flush=True)
            if out is not None:
                out.write(json.dumps(asdict(row)) + "\n")
                out.flush()
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
