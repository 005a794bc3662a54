"""Stage 4: BEST-RQ pre-training of an adapter (IA^3 or LoRA) and heads on a frozen Whisper
encoder."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import typer
from dvclive import Live

from bestrq.adapter import save_adapter
from bestrq.adapters import count_adapter_parameters
from bestrq.dataset import FeatureDataset
from bestrq.distributed import DistInfo, barrier, distributed_session, is_main, same_on_every_rank
from bestrq.evaluate import heldout_tracker
from bestrq.features import load_stats
from bestrq.model import BestRQModel
from bestrq.params import Params
from bestrq.pretraining import BEST_RQ
from bestrq.quantizer import RandomProjectionQuantizer
from bestrq.run_identity import pretrain_key
from bestrq.train import train
from bestrq.whisper_model import load_whisper, model_identity
from stages.common import (
    ADAPTER,
    ADAPTER_ONLY_NAME,
    CHECKPOINTS,
    FEATURES,
    LIVE,
    friendly_errors,
    hold_checkpoints,
    log_summary,
    open_live,
    params_or_exit,
    relaunch_under_torchrun,
    run_app,
    step_logger,
    truncate_history,
)

app = typer.Typer(add_completion=False, help=__doc__)


def run_pretrain(p: Params, features_dir: Path = FEATURES, adapter_path: Path = ADAPTER,
                 checkpoint_dir: Path = CHECKPOINTS, live_name: str = "pretrain") -> None:
    """Train and write the adapter; rank 0 alone logs and writes."""
    with distributed_session() as dist, ExitStack() as claims:
        _train_and_save(p, dist, claims, features_dir, adapter_path, checkpoint_dir, live_name)


def _train_and_save(p: Params, dist: DistInfo, claims: ExitStack, features_dir: Path,
                    adapter_path: Path, checkpoint_dir: Path, live_name: str) -> None:
    if not (features_dir / "train" / "index.json").is_file():
        raise FileNotFoundError(f"no training features in {features_dir}/train: run "
                                "`dvc repro features` first")
    key = pretrain_key(p, features_dir)
    same_on_every_rank(key.fingerprint, "the parameters or training features")
    base = load_whisper(p.model)
    if base.dims.n_mels != p.n_mels:
        raise ValueError(f"n_mels: model {p.model!r} takes {base.dims.n_mels} mel bins but "
                         f"n_mels is {p.n_mels}; set n_mels: {base.dims.n_mels}, re-run features")
    identity = model_identity(p.model, base)
    mean, std = load_stats(features_dir)
    quantizer = RandomProjectionQuantizer(p.quantizer, mean, std)
    model = BestRQModel(base.encoder, quantizer, p.masking, p.distill_weight, p.bestrq_layer,
                        p.distill_layers, p.distill_padding, p.adapter)
    del base  # the decoder is not needed for pre-training
    dataset = FeatureDataset(features_dir / "train")

    start = 0
    live = None
    if is_main():
        start = hold_checkpoints(claims, checkpoint_dir, key)
        live = open_live(live_name, resume=start > 0)
        if start:
            truncate_history(LIVE / live_name, start)
            typer.echo(f"pretrain: resuming from the checkpoint of step {start}")
        typer.echo(f"pretrain: {p.model} on {dist.device} x{dist.world_size}, "
                   f"{count_adapter_parameters(model.encoder)} {p.adapter.kind} parameters, "
                   f"{len(dataset)} training clips")
    barrier()  # rank 0 may have moved stale checkpoints aside
    result = train(model, dataset, p.train, checkpoint_dir,
                   log=_logger(p, live, model, dataset, features_dir, dist) if live else None,
                   objective=BEST_RQ)
    if live is None:
        return
    extra = {"step": result.step, "params": p.raw,
             "adapter_parameters": count_adapter_parameters(model.encoder)}
    save_adapter(adapter_path, model, identity, extra)
    # What using the adapted encoder needs (merge, ASR) without the large BEST-RQ heads.
    vectors_path = adapter_path.with_name(ADAPTER_ONLY_NAME)
    save_adapter(vectors_path, model, identity, extra, parts=("adapter",))
    # The last step's train/* values are already in the summary; add the run's totals.
    log_summary(live, {"steps": result.step, "nonfinite_skipped_total": result.skipped,
                       "train_seconds": result.seconds, "precision": result.precision,
                       "adapter_mb": adapter_path.stat().st_size / 2**20,
                       "adapter_file_kb": vectors_path.stat().st_size / 2**10,
                       "adapter_parameters": extra["adapter_parameters"]})
    live.end()
    typer.echo(f"pretrain: wrote {adapter_path} and {vectors_path} (the adapter alone) after "
               f"{result.step} steps ({result.seconds:.0f} s)")


def _logger(p: Params, live: Live, model: BestRQModel, train_split: FeatureDataset,
            features_dir: Path, dist: DistInfo) -> Callable[[int, dict[str, float]], None]:
    """The step logger, with every `heldout_every` updates (and at the last) the BEST-RQ loss
    and accuracy on the dev split beside the label prior's (`dev/...`): the curve that shows
    whether pre-training learns more than the label frequencies."""
    log = step_logger(live)
    dev_dir = features_dir / "dev"
    if not p.heldout_every or not (dev_dir / "index.json").is_file():
        return log
    heldout = heldout_tracker(model, FeatureDataset(dev_dir), train_split, p.evaluate,
                              dist.device)

    def both(step: int, metrics: dict[str, float]) -> None:
        if step % p.heldout_every == 0 or step == p.train.max_steps:
            live.step = step
            for key, value in heldout().items():
                live.log_metric(f"dev/{key}", value)
        log(step, metrics)

    return both


@app.command()
def pretrain(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Train the adapter and BEST-RQ heads on data/features/train; write
    data/adapters/adapter.safetensors."""
    p = params_or_exit("pretrain", params)
    relaunch_under_torchrun(p, "stages.pretrain")
    with friendly_errors():
        run_pretrain(p)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
