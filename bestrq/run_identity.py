"""Run identity: what a pre-training or fine-tune run's checkpoints must have been made with to
be resumed (`bestrq.checkpoint` decides what becomes of a folder made otherwise).

One rule for both: a run is keyed by every knob of the configs it is built from, except the
declared speed-only ones (`bestrq.params.SPEED_ONLY`), by what `precision` resolves to on its
device, and by the files it reads: the training features' statistics and index, and the adapter
a fine-tune starts from. No knob is listed here, so a new one keys the runs that read it.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bestrq.checkpoint import RunSignature, run_signature
from bestrq.distributed import resolve_device
from bestrq.params import SECTIONS, SPEED_ONLY, Params
from bestrq.train import TrainConfig, autocast_dtype


def resolved_autocast(p: Params) -> str:
    """What `precision` resolves to on this run's device: `auto` is bf16 on some CPUs and fp32
    on others, and a run resumed in the other precision would give the bytes of neither, so
    this, not the knob's value alone, belongs to a checkpoint's identity."""
    return "bf16" if autocast_dtype(p.train, resolve_device(p.train.device)) else "fp32"


def checkpoint_key(values: dict[str, Any], features_dir: Path, schedule: str,
                   max_steps_key: str = "max_steps",
                   start_from: bytes | None = None) -> RunSignature:
    """What a run's checkpoints must have been made with to be resumed: `values` (the knobs of
    `bestrq.params.SPEED_ONLY` aside), the training features (statistics and index) and
    `start_from` (the adapter the run starts from). Raising `max_steps_key` extends the run,
    unless `schedule` is cosine, whose rate at every update after warm-up depends on it."""
    inputs: dict[str, Path | bytes] = {
        "features stats.json": features_dir / "stats.json",
        "features train/index.json": features_dir / "train" / "index.json"}
    if start_from is not None:
        inputs["starting adapter"] = start_from
    return run_signature(values, inputs, ignore=SPEED_ONLY,
                         extendable=() if schedule == "cosine" else (max_steps_key,))


def training_values(p: Params) -> dict[str, Any]:
    """The top-level parameters: every knob of a pre-training run, and those a fine-tune
    shares with it (model, seed, precision, optimiser, adapter kind, ...)."""
    return {k: v for k, v in p.raw.items() if k not in SECTIONS}


def pretrain_key(p: Params, features_dir: Path) -> RunSignature:
    """The identity of the BEST-RQ pre-training of `p` on the features in `features_dir`."""
    return checkpoint_key({**training_values(p), "autocast": resolved_autocast(p)},
                          features_dir, p.train.lr_schedule)


def finetune_engine_config(p: Params, seed: int) -> TrainConfig:
    """The engine's config of the fine-tune of `seed`: the finetune section's knobs over
    pre-training's, and the fine-tune seed in place of the top-level one."""
    return replace(p.finetune.train_config(p.train), seed=seed)


def finetune_values(p: Params, start: str, seed: int) -> dict[str, Any]:
    """What one fine-tune run is built from: its configs, whole (the engine's exactly as it
    trains, the adapter's, the finetune section's); the model, the language and the start. The
    BEST-RQ knobs (the top-level seed among them) are not read by a fine-tune: the adapted
    start is keyed by the adapter's bytes instead, and the stock start stays valid across
    pre-training experiments."""
    return {"model": p.raw.get("model"), "n_mels": p.raw.get("n_mels"),
            "train": asdict(finetune_engine_config(p, seed)), "adapter": asdict(p.adapter),
            "finetune": p.finetune.to_dict(), "language": p.evaluate.language, "start": start,
            "autocast": resolved_autocast(p)}


def finetune_key(p: Params, features_dir: Path, start: str, seed: int,
                 start_from: bytes | None) -> RunSignature:
    """The identity of one fine-tune run: its values, the world size (nproc, nnodes: the global
    batch is batch_size * accumulate_gradients * processes), the features and, for the adapted
    start, the bytes of the adapter it starts from."""
    return checkpoint_key({**finetune_values(p, start, seed), "nproc": p.run.nproc,
                           "nnodes": p.run.nnodes},
                          features_dir, p.finetune.lr_schedule, "finetune.max_steps", start_from)
