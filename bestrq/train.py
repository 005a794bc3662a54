"""The training engine: AdamW on the trainable tensors, resumable and distributed, for any
objective (`bestrq.objective.Objective`: its items, batches and optimiser groups): BEST-RQ
pre-training and supervised fine-tuning run through the same loop, so resume, accumulation,
precision and torchrun are written once.

Determinism is by construction: the clip order of an epoch is a permutation seeded by
(seed, epoch); the mask and noise of a clip are drawn from a seed of (seed, epoch, clip) inside
the data-loader workers; each optimiser update consumes one global batch of
batch_size * accumulate_gradients * world_size clips, and gradients are the exact mean over all
units (masked targets, target tokens) of that global batch however it is split into
micro-batches and processes. A
checkpoint holds everything that changes during training, so a killed and resumed run ends where
an uninterrupted one does (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bestrq.batching import DataPosition, GlobalBatchSampler
from bestrq.checkpoint import load_latest, save_checkpoint
from bestrq.dataset import mel_maker
from bestrq.distributed import current, resolve_device
from bestrq.knobs import (
    Accumulate,
    BatchSize,
    LearningRate,
    Length,
    Ratio,
    Seed,
    Steps,
    Text,
    Workers,
    check,
    knob,
)
from bestrq.objective import Objective, ParamGroup
from bestrq.precision import Precision, describe_precision, wants_bf16
from bestrq.schedule import Schedule, frozen_for, lr_lambda, updates
from bestrq.throughput import mfu

LogFn = Callable[[int, dict[str, float]], None]


@dataclass
class TrainConfig:
    batch_size: Annotated[BatchSize, knob("clips per micro-batch per process")] = 4
    accumulate_gradients: Annotated[Accumulate, knob("micro-batches per optimiser update")] = 1
    # The same loss and gradients (tests/test_gradient_checkpointing.py), so speed-only.
    gradient_checkpointing: Annotated[bool, knob(
        "pre-training's adapted encoder passes keep only each block's input and run the block "
        "again in the backward pass: less activation memory for more time",
        speed_only=True)] = False
    learning_rate: Annotated[LearningRate, knob("peak learning rate of AdamW")] = 3e-3
    lr_schedule: Annotated[Schedule, knob(
        "inverse_sqrt (BEST-RQ's Transformer schedule) | cosine | constant")] = "inverse_sqrt"
    warmup_steps: Annotated[Length, knob(
        "linear warm-up: a share of max_steps (below 1) or updates (>= 1)")] = 0.25
    max_steps: Annotated[Steps, knob("optimiser updates in the run")] = 50
    min_lr_ratio: Annotated[Ratio, knob(
        "floor of the schedule, as a fraction of learning_rate")] = 0.0
    # The objective's leading group (BEST-RQ's heads) trains alone first; the other groups'
    # schedules (warm-up included) start when this phase ends.
    heads_only_steps: Annotated[Length, knob(
        "first updates that train the heads alone, as a share of max_steps (below 1) or "
        "updates (>= 1); the IA^3 schedule starts after them")] = 0.1
    # Applied to the groups the objective marks as decaying (BEST-RQ's heads).
    weight_decay: Annotated[float, knob(
        "AdamW decay of the heads (never of the IA^3 vectors)", ge=0, le=100)] = 0.0
    adam_beta1: Annotated[float, knob("AdamW beta1", ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, knob("AdamW beta2", ge=0, lt=1)] = 0.98
    adam_eps: Annotated[float, knob("AdamW epsilon", gt=0, le=1)] = 1e-8
    grad_clip: Annotated[float, knob(
        "max global gradient norm; 0 disables clipping", ge=0, le=10**6)] = 1.0
    precision: Annotated[Precision, knob(
        "auto (bf16 autocast on CUDA and on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere) | "
        "bf16 | fp32")] = "auto"
    checkpoint_every: Annotated[Steps, knob(
        "optimiser updates between checkpoints", speed_only=True)] = 25
    keep_checkpoints: Annotated[int, knob(
        "checkpoints kept on disk", speed_only=True, ge=1, le=1000)] = 2
    log_every: Annotated[Steps, knob(
        "optimiser updates between logged steps", speed_only=True)] = 1
    num_workers: Annotated[Workers, knob("data-loader worker processes", speed_only=True)] = 2
    prefetch_factor: Annotated[int, knob(
        "batches each worker prepares ahead", speed_only=True, ge=1, le=1024)] = 2
    seed: Annotated[Seed, knob("seed of the quantizer, data order and masks")] = 0
    device: Annotated[Text, knob("auto | cpu | cuda | cuda:N", speed_only=True)] = "auto"
    max_nonfinite: Annotated[int, knob(
        "non-finite updates in a row that stop the run", ge=1, le=10**6)] = 5
    # CPU runs are deterministic without it.
    deterministic: Annotated[bool, knob(
        "CUDA: deterministic kernels, bitwise-repeatable GPU runs (slower)")] = False

    def validate(self) -> None:
        """Raise ValueError naming the invalid parameters."""
        check(self)
        lr_lambda(self.lr_schedule, self.warmup, self.max_steps, self.min_lr_ratio)
        if self.heads_only >= self.max_steps:
            raise ValueError(f"heads_only_steps ({self.heads_only} updates) must leave updates "
                             f"for the IA^3 vectors within max_steps ({self.max_steps})")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"device: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def warmup(self) -> int:
        """Warm-up length in updates; a share that rounds to none still warms up for one
        (inverse_sqrt needs one)."""
        length = updates(self.warmup_steps, self.max_steps, "warmup_steps")
        return max(1, length) if self.warmup_steps > 0 else 0

    @property
    def heads_only(self) -> int:
        """Updates at the start in which only the leading group trains (BEST-RQ's heads; no
        effect on an objective without one)."""
        return updates(self.heads_only_steps, self.max_steps, "heads_only_steps")

    def advice(self) -> list[str]:
        """Settings that are valid but likely wrong, to say before any work."""
        notes = []
        if self.max_steps >= 1000 and self.warmup_steps >= 1 and \
                self.warmup < 0.01 * self.max_steps:
            end = lr_lambda(self.lr_schedule, self.warmup, self.max_steps,
                            self.min_lr_ratio)(self.max_steps - 1)
            notes.append(f"warmup_steps is {self.warmup} of {self.max_steps} updates (under 1%): "
                         f"the {self.lr_schedule} schedule ends at {end:.3f}x the peak rate. "
                         "BEST-RQ recipes warm up for ~25k updates; a share (e.g. "
                         "warmup_steps: 0.25) scales with max_steps.")
        return notes

    def schedules(self, leads: Sequence[bool]) -> list[Callable[[int], float]]:
        """Multipliers of the peak rate per optimiser group, given which groups lead
        (`ParamGroup.leads`): a leading group's schedule starts at update 0, the others' are
        frozen through the `heads_only` phase and start after it, when some group leads."""
        base = lr_lambda(self.lr_schedule, self.warmup, self.max_steps, self.min_lr_ratio)
        if not any(leads) or not self.heads_only:
            return [base] * len(leads)
        later = lr_lambda(self.lr_schedule, self.warmup,
                          self.max_steps - self.heads_only, self.min_lr_ratio)
        return [base if lead else frozen_for(self.heads_only, later) for lead in leads]


@dataclass
class TrainResult:
    step: int  # optimiser updates done
    metrics: dict[str, float] = field(default_factory=dict)  # last logged
    skipped: int = 0  # updates skipped for a non-finite loss or gradient
    seconds: float = 0.0  # wall time of this call
    precision: str = "fp32"  # what autocast ran in (describe_precision)


# ----------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    # numpy's key array goes in a tensor so that the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def use_deterministic_kernels() -> None:
    """Make CUDA runs repeatable where torch allows it: deterministic kernels (a warning, not
    an error, where an op has none: only metrics use such ops here), no cuDNN autotuning, and
    the cuBLAS workspace setting its deterministic mode needs (set before the first cuBLAS call
    of the process)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def make_optimizer(groups: list[ParamGroup], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one group per `ParamGroup`, in order, `weight_decay` on those that decay."""
    param_groups = [{"params": g.params, "weight_decay": config.weight_decay if g.decays else 0.0}
                    for g in groups]
    # fused: one kernel per step on CPU and CUDA (16 codebooks' heads are 50M numbers on tiny)
    return torch.optim.AdamW(param_groups, lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                             fused=True)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for plain fp32 (`precision.wants_bf16`). Losses, softmaxes,
    the distillation MSE and the optimiser state stay fp32 under autocast (the model computes
    them so)."""
    return torch.bfloat16 if wants_bf16(config.precision, device) else None


# ----------------------------------------------------------------------------- one update


@dataclass
class UpdateStats:
    """Sums over the micro-batches of an update (global after `finish_gradients`)."""
    loss_sum: Tensor  # sum over micro-batches of loss * count
    count: Tensor  # the loss's units: masked targets, target tokens
    frames: Tensor  # valid encoder-input frames
    metrics: list[dict[str, float]] = field(default_factory=list)


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[tuple[Tensor, ...]],
                         device: torch.device, dtype: torch.dtype | None,
                         with_metrics: bool,
                         to_mel: Callable[[Tensor], Tensor] | None = None) -> UpdateStats:
    """Forward/backward each micro-batch with its loss weighted by its unit count.

    `to_mel`: what makes a batch's first tensor log-mels once on the device (features computed
    on the fly, `bestrq.dataset.mel_maker`); None when it holds them already.

    Gradients end up as sum_b(loss_b * count_b)'s; `finish_gradients` divides by the total count
    so that the update equals one batch holding all the micro-batches. Under DDP, gradients are
    all-reduced only on the last micro-batch.
    """
    stats = UpdateStats(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)))
    for i, batch in enumerate(micro_batches):
        # (mel (batch, n_mels, frames), valid frames (batch,), the objective's own tensors...)
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        if to_mel is not None:  # audio (batch, samples) -> log-mel, outside autocast
            batch = (to_mel(batch[0]), *batch[1:])
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not isinstance(
            model, DistributedDataParallel) else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                out = model(*batch, with_metrics=with_metrics)
            (out.loss * out.count).backward()
        stats.loss_sum += out.loss.detach().double() * out.count
        stats.count += out.count
        stats.frames += batch[1].sum()
        if with_metrics:
            stats.metrics.append(out.metrics)
    return stats


def finish_gradients(params: list[torch.nn.Parameter], stats: UpdateStats,
                     world_size: int) -> None:
    """Make the accumulated gradients the mean over all units of the global batch.

    DDP has already averaged the gradients over ranks (divided by world_size), hence the factor.
    """
    totals = torch.stack([stats.loss_sum, stats.count, stats.frames])  # (3,)
    if world_size > 1:
        dist.all_reduce(totals)
    stats.loss_sum, stats.count, stats.frames = totals.unbind()
    scale = (world_size / stats.count.clamp_min(1.0)).float()
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.device))


def _mean_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in metrics for k in m}
    return {k: sum(m[k] for m in metrics if k in m) / sum(k in m for m in metrics)
            for k in sorted(keys)}


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


# ----------------------------------------------------------------------------- loop


def train(model: nn.Module, dataset: Dataset, config: TrainConfig, checkpoint_dir: Path,
          log: LogFn | None = None, *, objective: Objective) -> TrainResult:
    """Train `model`'s trainable tensors for `objective` on `dataset`, resuming from
    `checkpoint_dir`.

    `dataset[i]` is what `objective.items` takes (for BEST-RQ: mel (n_mels, frames) float32,
    valid frames int64). Runs under an initialised process group when there is one (one DDP
    replica per process). `log(step, metrics)` is called on rank 0 every `log_every` updates.
    """
    config.validate()
    began = time.perf_counter()
    if config.deterministic:
        use_deterministic_kernels()
    info = current()
    device = resolve_device(config.device)
    dtype = autocast_dtype(config, device)
    model.to(device)
    params_by_name = model.trainable_parameters()
    params = list(params_by_name.values())
    groups = objective.groups(model)
    optimizer = make_optimizer(groups, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  config.schedules([g.leads for g in groups]))
    rate_names = [f"learning_rate_{g.name}" if g.name else "learning_rate" for g in groups]

    step, skipped, in_a_row, pos = 0, 0, 0, DataPosition()
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    # Rank 0 alone writes checkpoints and machines need not share a disk: the other ranks
    # resume from rank 0's, sent to them, not from what their own folder may (not) hold.
    resumed = load_latest(checkpoint_dir) if info.rank == 0 else None
    if info.distributed:
        sent = [resumed]
        dist.broadcast_object_list(sent, src=0)
        resumed = sent[0]
    if resumed is not None:
        step, state = resumed
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params_by_name[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        pos = DataPosition(**state["data"])
        skipped, in_a_row = state["skipped"], state["nonfinite_in_a_row"]
    if info.distributed:
        dist.barrier()  # no rank may start writing checkpoints before every rank has read them

    def checkpoint() -> None:
        if info.rank != 0:
            return
        state = {"trainable": {n: p.detach().cpu().clone() for n, p in params_by_name.items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": _rng_state(), "data": asdict(pos), "skipped": skipped,
                 "nonfinite_in_a_row": in_a_row, "config": config.to_dict()}
        save_checkpoint(checkpoint_dir, step, state, keep=config.keep_checkpoints)

    result = TrainResult(step=step, skipped=skipped, precision=describe_precision(dtype, device))
    if step >= config.max_steps:
        result.seconds = time.perf_counter() - began
        return result

    wrapped: torch.nn.Module = model
    if info.distributed:
        # Only the trainable tensors require grad, so DDP buckets and reduces just those.
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=False)
    sampler = GlobalBatchSampler(len(dataset), config.batch_size, config.accumulate_gradients,
                                 info.world_size, info.rank, config.seed, pos)
    pos = sampler.start
    if info.rank == 0:
        tqdm.write(f"{objective.name}: precision {result.precision} on {device}")
    if sampler.cycles and info.rank == 0:
        tqdm.write(f"{objective.name}: {len(dataset)} clips, fewer than one global batch of "
                   f"{sampler.global_batch} (batch_size * accumulate_gradients * processes): "
                   f"each update cycles through the data {sampler.epochs_per_update:.1f} times, "
                   "each clip with a new mask every time")
    loader = DataLoader(
        objective.items(model, dataset, config.seed), batch_sampler=sampler,
        collate_fn=objective.collate,
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=config.prefetch_factor if config.num_workers else None,
        persistent_workers=config.num_workers > 0,
        # Its own generator: creating the iterator must not consume the global torch RNG.
        generator=torch.Generator().manual_seed(config.seed))
    batches = iter(loader)
    to_mel = mel_maker(dataset)
    clips_per_update = sampler.global_batch
    last_time = time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=step, desc=objective.name, unit="update",
               disable=info.rank != 0)
    try:
        while step < config.max_steps:
            do_log = log is not None and info.rank == 0 and (step + 1) % config.log_every == 0
            with_metrics = (step + 1) % config.log_every == 0  # every rank: same code path
            wait_start = time.perf_counter()
            micro = [next(batches) for _ in range(config.accumulate_gradients)]
            data_wait = time.perf_counter() - wait_start
            stats = accumulate_gradients(wrapped, micro, device, dtype, with_metrics, to_mel)
            finish_gradients(params, stats, info.world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, config.grad_clip if config.grad_clip > 0 else math.inf)
            loss = stats.loss_sum / stats.count.clamp_min(1.0)
            finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # one host sync
            pos = sampler.advance(pos)
            rates = {name: g["lr"] for name, g in zip(rate_names, optimizer.param_groups,
                                                      strict=True)}  # this update's
            if finite:
                optimizer.step()
                scheduler.step()
                step += 1
                in_a_row = 0
            else:
                skipped += 1
                in_a_row += 1
                warnings.warn(f"non-finite loss or gradient before update {step + 1}: update "
                              f"skipped ({in_a_row} in a row)", stacklevel=2)
            optimizer.zero_grad(set_to_none=True)
            if in_a_row >= config.max_nonfinite:
                raise RuntimeError(
                    f"{in_a_row} updates in a row had a non-finite loss or gradient "
                    f"(max_nonfinite={config.max_nonfinite}); stopping at update {step}. Lower "
                    f"learning_rate, enable grad_clip or check the features for NaN/inf.")
            if not finite:
                continue
            now = time.perf_counter()
            step_time, last_time = now - last_time, now
            bar.update(1)
            if do_log:
                metrics = _mean_metrics(stats.metrics)
                metrics.update(
                    loss=float(loss), grad_norm=float(grad_norm), **rates,
                    nonfinite_skipped=float(skipped), step_time=step_time,
                    clips_per_second=clips_per_update / step_time,
                    frames_per_second=float(stats.frames) / step_time,
                    data_wait_fraction=min(1.0, data_wait / step_time),
                    peak_memory_gb=_peak_memory_gb(device))
                if device.type == "cuda" and objective.flops is not None:
                    flops = objective.flops(model, clips_per_update, int(stats.count))
                    value = mfu(flops, step_time, device, dtype or torch.float32)
                    if value is not None:
                        metrics["mfu"] = value
                log(step, metrics)
                result.metrics = metrics
                bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                acc=f"{metrics.get('accuracy', 0.0):.3f}",
                                clips_s=f"{metrics['clips_per_second']:.1f}", refresh=False)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                checkpoint()
    finally:
        bar.close()
        del batches  # shuts the loader's workers down
    result.step, result.skipped = step, skipped
    result.seconds = time.perf_counter() - began
    return result
