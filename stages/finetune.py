"""Stage 6: supervised IA^3 fine-tune from stock Whisper and from the BEST-RQ adapter, and the
WER of both on the held-out clips, with a 95% paired bootstrap interval of their difference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from bestrq.adapter import load_vectors, read_adapter, save_vectors
from bestrq.dataset import FeatureDataset
from bestrq.distributed import (
    DistInfo,
    barrier,
    distributed_session,
    is_main,
    resolve_device,
    same_on_every_rank,
)
from bestrq.evaluate import compare_wers
from bestrq.finetune import (
    FINETUNE,
    FinetuneModel,
    LabelledClips,
    max_decoder_tokens,
    select_labelled,
    tokenizer_for,
)
from bestrq.ia3 import count_ia3_parameters
from bestrq.params import Params
from bestrq.train import TrainResult, train
from bestrq.whisper_model import load_whisper, model_identity
from stages.common import (
    ADAPTER,
    FEATURES,
    FINETUNE_CHECKPOINTS,
    FINETUNED,
    IA3_ONLY_NAME,
    LIVE,
    checkpoint_key,
    friendly_errors,
    hold_checkpoints,
    log_summary,
    open_live,
    params_or_exit,
    relaunch_under_torchrun,
    resolved_autocast,
    step_logger,
    truncate_history,
    write_windows,
)

app = typer.Typer(add_completion=False, help=__doc__)

STARTS = ("stock", "adapted")  # fine-tuned from stock Whisper / from the BEST-RQ adapter
# Top-level knobs that change what a fine-tune computes (the rest of the engine's are speed).
ENGINE_KEYS = ("model", "n_mels", "seed", "precision", "weight_decay", "adam_beta1",
               "adam_beta2", "adam_eps", "grad_clip", "max_nonfinite", "deterministic")


def run_values(p: Params, start: str) -> dict[str, Any]:
    """What one fine-tune run's checkpoints must have been made with."""
    return {**{k: p.raw.get(k) for k in ENGINE_KEYS}, "finetune": p.finetune.to_dict(),
            "language": p.evaluate.language, "start": start, "autocast": resolved_autocast(p)}


def start_vectors(adapter_dir: Path) -> bytes:
    """The BEST-RQ adapter's vectors file, whose bytes the `adapted` run starts from."""
    path = adapter_dir / IA3_ONLY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no BEST-RQ adapter at {path}: run `dvc repro pretrain` first")
    return path.read_bytes()


def skip(reason: str, metrics: dict[str, float], out_dir: Path) -> None:
    """No fine-tune is possible: say why, keep the stage's outputs, log what was found."""
    typer.secho(f"finetune: skipped: {reason}", fg=typer.colors.YELLOW, err=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "skipped.json").write_text(json.dumps({"reason": reason}, indent=2) + "\n")
    with open_live("finetune") as live:
        log_summary(live, metrics)
    write_windows(LIVE / "finetune" / "windows.json", [])  # a declared output: present, empty


def run_finetune(p: Params, features_dir: Path = FEATURES, adapter_dir: Path = ADAPTER.parent,
                 out_dir: Path = FINETUNED, checkpoint_root: Path = FINETUNE_CHECKPOINTS) -> None:
    """Fine-tune from both starts, write both adapters, then compare their WERs (rank 0)."""
    with distributed_session() as dist:
        _finetune(p, dist, features_dir, adapter_dir, out_dir, checkpoint_root)


def _finetune(p: Params, dist: DistInfo, features_dir: Path, adapter_dir: Path, out_dir: Path,
              checkpoint_root: Path) -> None:
    train_split = FeatureDataset(features_dir / "train")
    indices = select_labelled(train_split.transcripts, train_split.num_frames,
                              p.finetune.max_clips, p.finetune.max_minutes, p.train.seed)
    config = p.finetune.train_config(p.train)
    found = {"labelled_clips": float(len(indices))}
    if not indices:
        if is_main():
            skip(f"no transcribed clips in {features_dir / 'train'}: the fine-tune needs some "
                 "(LibriSpeech-style *.trans.txt, transcripts.tsv or manifest.jsonl beside the "
                 "audio)", found, out_dir)
        return
    vectors = start_vectors(adapter_dir)
    tensors, _ = read_adapter(adapter_dir / IA3_ONLY_NAME)
    base = load_whisper(p.model)
    identity = model_identity(p.model, base)
    data = LabelledClips(train_split, indices, tokenizer_for(base, p.evaluate.language),
                         max_decoder_tokens(base))
    del base

    # nproc, nnodes: the global batch is batch_size * accumulate_gradients * processes.
    keys = {start: checkpoint_key({**run_values(p, start), "nproc": p.nproc, "nnodes": p.nnodes},
                                  features_dir, p.finetune.lr_schedule, "finetune.max_steps",
                                  vectors if start == "adapted" else None)
            for start in STARTS}
    same_on_every_rank([k.fingerprint for k in keys.values()],
                       "the parameters, training features or BEST-RQ adapter")
    starts: dict[str, int] = {}
    if is_main():
        for start in STARTS:
            starts[start] = hold_checkpoints(checkpoint_root / start, keys[start])
    barrier()  # rank 0 may have moved stale checkpoints aside
    live = open_live("finetune", resume=any(starts.values())) if is_main() else None
    if live is not None:
        for start, step in starts.items():
            truncate_history(LIVE / "finetune", step, under=start)
        typer.echo(f"finetune: {p.model} on {dist.device} x{dist.world_size}, "
                   f"{len(data)} labelled clips ({data.minutes:.1f} min, {data.truncated} cut "
                   f"to the decoder's context), {config.max_steps} updates from each start")
    results: dict[str, TrainResult] = {}
    for start in STARTS:
        model = load_whisper(p.model)
        if start == "adapted":
            load_vectors(model, tensors)  # the BEST-RQ encoder vectors; decoder's at one
        finetuned = FinetuneModel(model)
        if live is not None and starts[start]:
            typer.echo(f"finetune: {start}: resuming from the checkpoint of step "
                       f"{starts[start]}")
        results[start] = train(finetuned, data, config, checkpoint_root / start,
                               log=step_logger(live, f"{start}/train") if live else None,
                               objective=FINETUNE)
        if live is not None:
            save_vectors(out_dir / start / IA3_ONLY_NAME, model, identity,
                         {"start": start, "step": results[start].step,
                          "finetune": p.finetune.to_dict(), "labelled_clips": len(data),
                          "labelled_minutes": data.minutes,
                          "ia3_parameters": count_ia3_parameters(model)})
        del model, finetuned
    if live is None:
        return
    metrics: dict[str, float | str] = {
        **found, "labelled_minutes": data.minutes, "truncated_transcripts": data.truncated,
        "steps": float(config.max_steps)}
    for start, result in results.items():
        metrics[f"{start}/train_seconds"] = result.seconds
        metrics[f"{start}/precision"] = result.precision
    metrics.update(compare_finetuned(p, features_dir, out_dir))
    log_summary(live, metrics)
    live.end()
    typer.echo(json.dumps({k: v for k, v in metrics.items() if "wer" in k}, indent=2))


def compare_finetuned(p: Params, features_dir: Path, out_dir: Path) -> dict[str, float]:
    """WER of both fine-tuned models on the transcribed eval clips, and `delta/wer` (adapted -
    stock) with its 95% paired bootstrap interval. Empty when no eval clip has a transcript."""
    systems = {start: read_adapter(out_dir / start / IA3_ONLY_NAME)[0] for start in STARTS}
    windows: list[dict] = []
    out = compare_wers(p.model, systems, FeatureDataset(features_dir / "eval"),
                       p.evaluate.asr_config(p.train.precision), resolve_device(p.train.device),
                       baseline="stock", other="adapted", windows=windows)
    write_windows(LIVE / "finetune" / "windows.json", windows)
    if not out:
        typer.secho("finetune: no transcribed eval clips: no WER to compare",
                    fg=typer.colors.YELLOW, err=True)
    return out


@app.command()
def finetune(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Fine-tune IA^3 vectors (encoder and decoder) on the transcribed train clips from stock
    Whisper and from data/adapters; write data/finetune/{stock,adapted}/ia3.safetensors and
    their WERs on the eval clips."""
    p = params_or_exit("finetune", params)
    relaunch_under_torchrun(p, "stages.finetune")
    with friendly_errors():
        run_finetune(p)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
