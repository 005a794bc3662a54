"""The pre-training recipe: BEST-RQ on the train split's features with an adapter (IA^3 or
LoRA) on a frozen Whisper encoder and the softmax heads; every `heldout_every` updates (and at
the last) the BEST-RQ loss and accuracy on the dev split beside the label prior's; then the
adapter file (with the heads and the quantizer) and the adapter-only file.

What is trained, on what and under which checkpoint identity is decided here; where the logs
go is the caller's (`PretrainLog`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from bestrq.adapter import save_adapter
from bestrq.adapters import count_adapter_parameters
from bestrq.checkpoint import RunSignature
from bestrq.dataset import FeatureDataset
from bestrq.distributed import DistInfo, barrier, is_main, resolve_device, same_on_every_rank
from bestrq.evaluate import heldout_tracker
from bestrq.features import load_stats
from bestrq.memory import estimate_peak_memory
from bestrq.model import BestRQModel
from bestrq.params import Params
from bestrq.pretraining import BEST_RQ
from bestrq.quantizer import RandomProjectionQuantizer
from bestrq.run_identity import pretrain_key
from bestrq.train import TrainResult, autocast_dtype, train
from bestrq.whisper_model import load_whisper, model_identity


class PretrainLog(Protocol):
    """Where the recipe reports, on the process that writes (rank 0)."""

    def say(self, message: str) -> None:
        """A line for the user."""

    def steps(self) -> Callable[[int, dict[str, float]], None]:
        """The step logger of the training curves (`train/...`)."""

    def at(self, step: int, prefix: str, metrics: dict[str, float]) -> None:
        """`metrics` as `<prefix>/<name>` at `step`, before that step's training values."""


@dataclass
class Pretrained:
    """What a finished pre-training wrote and measured."""

    result: TrainResult
    adapter_parameters: int
    adapter_file: Path
    adapter_only_file: Path


def pretrain(p: Params, dist: DistInfo, features_dir: Path, adapter_path: Path,
             adapter_only_name: str, checkpoint_dir: Path,
             claim: Callable[[Path, RunSignature], int],
             open_log: Callable[[int], PretrainLog]) -> Pretrained | None:
    """Train and write `adapter_path` and, beside it, `adapter_only_name` (the adapter without
    the heads: what merging and decoding need), on rank 0. `claim(folder, identity)` holds the
    checkpoint folder and gives the step the run resumes from (rank 0 only); `open_log(start)`
    gives the log once it is held. None on the other ranks."""
    if not (features_dir / "train" / "index.json").is_file():
        raise FileNotFoundError(f"no training features in {features_dir}/train: run "
                                "`dvc repro features` first")
    key = pretrain_key(p, features_dir)
    same_on_every_rank(key.fingerprint, "the parameters or training features")
    base = load_whisper(p.run.model)
    if base.dims.n_mels != p.run.n_mels:
        raise ValueError(f"n_mels: model {p.run.model!r} takes {base.dims.n_mels} mel bins "
                         f"but n_mels is {p.run.n_mels}; set n_mels: {base.dims.n_mels}, "
                         "re-run features")
    identity = model_identity(p.run.model, base)
    mean, std = load_stats(features_dir)
    quantizer = RandomProjectionQuantizer(p.quantizer, mean, std)
    model = BestRQModel(base.encoder, quantizer, p.masking, **asdict(p.loss),
                        adapter=p.adapter, gradient_checkpointing=p.train.gradient_checkpointing)
    del base  # the decoder is not needed for pre-training
    dataset = FeatureDataset(features_dir / "train")

    log = None
    if is_main():
        start = claim(checkpoint_dir, key)
        log = open_log(start)
        if start:
            log.say(f"pretrain: resuming from the checkpoint of step {start}")
        log.say(f"pretrain: {p.run.model} on {dist.device} x{dist.world_size}, "
                f"{count_adapter_parameters(model.encoder)} {p.adapter.kind} parameters, "
                f"{len(dataset)} training clips")
        dtype = autocast_dtype(p.train, resolve_device(p.train.device))
        log.say(f"pretrain: {estimate_peak_memory(model, p.train.batch_size, dtype).line()}")
    barrier()  # rank 0 may have moved stale checkpoints aside
    try:
        result = train(model, dataset, p.train, checkpoint_dir,
                       log=_with_heldout(p, log, model, dataset, features_dir, dist)
                       if log else None, objective=BEST_RQ)
    finally:
        cache = model.stock_cache
        if cache is not None:
            if log is not None:
                log.say(f"pretrain: distill_cache held the stock outputs of "
                        f"{int(cache.filled.sum())} of {cache.num_clips} clips, "
                        f"{cache.bytes_in_use / 2**20:.0f} MiB")
            cache.close()
    if log is None:
        return None
    parameters = count_adapter_parameters(model.encoder)
    extra = {"step": result.step, "params": p.raw, "adapter_parameters": parameters}
    save_adapter(adapter_path, model, identity, extra)
    adapter_only = adapter_path.with_name(adapter_only_name)
    save_adapter(adapter_only, model, identity, extra, parts=("adapter",))
    return Pretrained(result, parameters, adapter_path, adapter_only)


def _with_heldout(p: Params, log: PretrainLog, model: BestRQModel, train_split: FeatureDataset,
                  features_dir: Path, dist: DistInfo) -> Callable[[int, dict[str, float]], None]:
    """The step logger, with every `heldout_every` updates (and at the last) the BEST-RQ loss
    and accuracy on the dev split beside the label prior's (`dev/...`): the curve that shows
    whether pre-training learns more than the label frequencies."""
    steps = log.steps()
    dev_dir = features_dir / "dev"
    if not p.run.heldout_every or not (dev_dir / "index.json").is_file():
        return steps
    heldout = heldout_tracker(model, FeatureDataset(dev_dir), train_split, p.evaluate,
                              dist.device)

    def both(step: int, metrics: dict[str, float]) -> None:
        if step % p.run.heldout_every == 0 or step == p.train.max_steps:
            log.at(step, "dev", heldout())
        steps(step, metrics)

    return both
