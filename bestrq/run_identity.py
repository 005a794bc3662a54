"""Run identity: what a pre-training or fine-tune run's checkpoints must have been made with to
be resumed (`bestrq.checkpoint` decides what becomes of a folder made otherwise).

One rule for both: a run is keyed by every knob of the configs it is built from, except the
declared speed-only ones (`bestrq.params.SPEED_ONLY`), by what `precision` resolves to on its
device, and by the files it reads: the training features' statistics and index, and the adapter
a fine-tune starts from. No knob is listed here, so a new one keys the runs that read it.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def checkpoint_key(values: dict[str, Any], features_dir: Path, config: TrainConfig,
                   max_steps_key: str = "max_steps",
                   start_from: bytes | None = None) -> RunSignature:
    """What a run's checkpoints must have been made with to be resumed: `values` (the knobs of
    `bestrq.params.SPEED_ONLY` aside), the training features (statistics and index) and
    `start_from` (the adapter the run starts from). Raising `max_steps_key` extends the run
    whose engine `config` gives the updates already made the same rates under both limits
    (`extension_differs`); never with a cosine schedule, whose rate at every update after
    warm-up depends on it."""
    inputs: dict[str, Path | bytes] = {
        "features stats.json": features_dir / "stats.json",
        "features train/index.json": features_dir / "train" / "index.json"}
    if start_from is not None:
        inputs["starting adapter"] = start_from

    def why_not_extend(before: Mapping[str, Any], start: int) -> str | None:
        made_under = before.get(max_steps_key)
        if not isinstance(made_under, int) or isinstance(made_under, bool) or made_under < 1:
            shares = limit_shares(config)
            return (f"the {max_steps_key} they were made under is not recorded, and "
                    f"{' and '.join(shares)} depend on it") if shares else None
        return extension_differs(replace(config, max_steps=made_under), config, start,
                                 max_steps_key)

    return run_signature(values, inputs, ignore=SPEED_ONLY,
                         extendable=() if config.lr_schedule == "cosine" else (max_steps_key,),
                         why_not_extend=why_not_extend)


def limit_shares(config: TrainConfig) -> list[str]:
    """The knobs of `config` whose updates depend on max_steps: lengths given as shares of
    it, and a cosine schedule."""
    shares = [f"{name} {value:g}" for name, value in (("warmup_steps", config.warmup_steps),
                                                      ("heads_only_steps",
                                                       config.heads_only_steps))
              if 0 < value < 1]
    return shares + (["the cosine schedule"] if config.lr_schedule == "cosine" else [])


def extension_differs(done: TrainConfig, longer: TrainConfig, start: int,
                      max_steps_key: str = "max_steps") -> str | None:
    """What the first `start` updates of a run under `done` did differently from those of
    the same run under `longer` (which differs in max_steps alone): a warm-up or heads-only
    phase of another length, or another rate; None when they are the same updates, so that
    the run may go on from its checkpoint of `start` to `longer.max_steps` and end as a run
    of `longer` from scratch does."""
    old, new = done.max_steps, longer.max_steps
    for name, value, before, after in (
            ("warmup_steps", done.warmup_steps, done.warmup, longer.warmup),
            ("heads_only_steps", done.heads_only_steps, done.heads_only, longer.heads_only)):
        if before != after:
            return (f"{name} {value:g} of {max_steps_key} is {before} updates under {old} and "
                    f"{after} under {new}")
    # Every group's multiplier, the heads' (leading) and the adapter's (after the heads-only
    # phase). Update `start + 1` too: its rate was set after update `start` and is restored
    # with the optimiser's state.
    groups = ("", " of the adapter") if done.heads_only else ("",)
    leads = [True, False][:len(groups)]
    for s in range(start + 1):
        for group, a, b in zip(groups, done.schedules(leads), longer.schedules(leads),
                               strict=True):
            if a(s) != b(s):
                return (f"the {done.lr_schedule} schedule gives update {s + 1}{group} "
                        f"{a(s):.6g}x the peak rate under {old} and {b(s):.6g}x under {new}")
    return None


def training_values(p: Params) -> dict[str, Any]:
    """The top-level parameters: every knob of a pre-training run, and those a fine-tune
    shares with it (model, seed, precision, optimiser, adapter kind, ...)."""
    return {k: v for k, v in p.raw.items() if k not in SECTIONS}


def pretrain_key(p: Params, features_dir: Path) -> RunSignature:
    """The identity of the BEST-RQ pre-training of `p` on the features in `features_dir`."""
    return checkpoint_key({**training_values(p), "autocast": resolved_autocast(p)},
                          features_dir, p.train)


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
    start, the bytes of the adapter it starts from. Its engine config, whole, keys it too
    (`train.max_steps` among it): a longer fine-tune is a new run, never an extended one."""
    return checkpoint_key({**finetune_values(p, start, seed), "nproc": p.run.nproc,
                           "nnodes": p.run.nnodes},
                          features_dir, finetune_engine_config(p, seed), "finetune.max_steps",
                          start_from)
