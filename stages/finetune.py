"""Stage 6: supervised adapter fine-tune from stock Whisper and from the BEST-RQ adapter (per
seed), and the WER of both on the test and dev clips, with a 95% paired bootstrap interval of
their difference."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import typer

from bestrq.adapter import adapter_config, load_vectors, read_adapter, save_vectors
from bestrq.adapters import count_adapter_parameters
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
from bestrq.params import Params
from bestrq.run_identity import finetune_engine_config, finetune_key
from bestrq.train import TrainResult, train
from bestrq.whisper_model import load_whisper, model_identity
from stages.common import (
    ADAPTER,
    ADAPTER_ONLY_NAME,
    FEATURES,
    FINETUNE_CHECKPOINTS,
    FINETUNED,
    LIVE,
    REPORTED,
    friendly_errors,
    hold_checkpoints,
    log_summary,
    open_live,
    params_or_exit,
    relaunch_under_torchrun,
    run_app,
    step_logger,
    truncate_history,
    write_windows,
)

app = typer.Typer(add_completion=False, help=__doc__)

STARTS = ("stock", "adapted")  # fine-tuned from stock Whisper / from the BEST-RQ adapter


def run_dir(root: Path, p: Params, seed: int, start: str) -> Path:
    """Where one (seed, start) run lives under `root`: the first seed's at root/<start> (the
    stage's main outputs), the others' at root/seed-<seed>/<start>."""
    return root / start if seed == p.finetune.seeds[0] else root / f"seed-{seed}" / start


def curve(p: Params, seed: int, start: str) -> str:
    """The DVCLive name prefix of one run's step curves (and its checkpoint history)."""
    return start if seed == p.finetune.seeds[0] else f"seed_{seed}/{start}"


def start_vectors(adapter_dir: Path) -> bytes:
    """The BEST-RQ adapter's vectors file, whose bytes the `adapted` run starts from."""
    path = adapter_dir / ADAPTER_ONLY_NAME
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
    with distributed_session() as dist, ExitStack() as claims:
        _finetune(p, dist, claims, features_dir, adapter_dir, out_dir, checkpoint_root)


def _finetune(p: Params, dist: DistInfo, claims: ExitStack, features_dir: Path,
              adapter_dir: Path, out_dir: Path, checkpoint_root: Path) -> None:
    train_split = FeatureDataset(features_dir / "train")
    seeds = p.finetune.seeds
    draws = {seed: select_labelled(train_split.transcripts, train_split.num_frames,
                                   p.finetune.max_clips, p.finetune.max_minutes, seed)
             for seed in seeds}
    found = {"labelled_clips": float(len(draws[seeds[0]]))}
    if not draws[seeds[0]]:
        if is_main():
            skip(f"no transcribed clips in {features_dir / 'train'}: the fine-tune needs some "
                 "(LibriSpeech-style *.trans.txt, transcripts.tsv or manifest.jsonl beside the "
                 "audio; segment.transcribed_share above 0)", found, out_dir)
        return
    vectors = start_vectors(adapter_dir)
    tensors, info = read_adapter(adapter_dir / ADAPTER_ONLY_NAME)
    if adapter_config(info) != p.adapter:
        raise ValueError(f"{adapter_dir / ADAPTER_ONLY_NAME} holds a {adapter_config(info).kind} "
                         f"adapter {adapter_config(info).to_dict()}, not the {p.adapter.kind} "
                         f"adapter {p.adapter.to_dict()} of the parameters: run `dvc repro "
                         "pretrain` with them first")
    base = load_whisper(p.model)
    identity = model_identity(p.model, base)
    tokenizer, max_tokens = tokenizer_for(base, p.evaluate.language), max_decoder_tokens(base)
    del base
    runs = [(seed, start) for seed in seeds for start in STARTS]

    keys = {run: finetune_key(p, features_dir, run[1], run[0],
                              vectors if run[1] == "adapted" else None) for run in runs}
    same_on_every_rank([k.fingerprint for k in keys.values()],
                       "the parameters, training features or BEST-RQ adapter")
    starts: dict[tuple[int, str], int] = {}
    if is_main():
        for run in runs:
            starts[run] = hold_checkpoints(claims, run_dir(checkpoint_root, p, *run), keys[run])
    barrier()  # rank 0 may have moved stale checkpoints aside
    live = open_live("finetune", resume=any(starts.values())) if is_main() else None
    results: dict[tuple[int, str], TrainResult] = {}
    first: dict[str, float] = {}  # the first seed's labelled set, as the stage reports it
    for seed in seeds:
        data = LabelledClips(train_split, draws[seed], tokenizer, max_tokens)
        config = finetune_engine_config(p, seed)
        first = first or {"labelled_minutes": data.minutes,
                          "truncated_transcripts": float(data.truncated)}
        if live is not None:
            typer.echo(f"finetune: {p.model} on {dist.device} x{dist.world_size}, seed {seed}: "
                       f"{len(data)} labelled clips ({data.minutes:.1f} min, {data.truncated} "
                       f"cut to the decoder's context), {config.max_steps} updates from each "
                       "start")
        for start in STARTS:
            run = (seed, start)
            if live is not None:
                truncate_history(LIVE / "finetune", starts[run], under=curve(p, *run))
                if starts[run]:
                    typer.echo(f"finetune: {curve(p, *run)}: resuming from the checkpoint of "
                               f"step {starts[run]}")
            model = load_whisper(p.model)
            if start == "adapted":
                # The BEST-RQ encoder adapter; the decoder's computes the stock decoder.
                load_vectors(model, tensors, p.adapter, seed)
            results[run] = train(FinetuneModel(model, p.adapter, seed), data, config,
                                 run_dir(checkpoint_root, p, *run),
                                 log=step_logger(live, f"{curve(p, *run)}/train") if live
                                 else None, objective=FINETUNE)
            if live is not None:
                save_vectors(run_dir(out_dir, p, *run) / ADAPTER_ONLY_NAME, model, identity,
                             {"start": start, "seed": seed, "step": results[run].step,
                              "finetune": p.finetune.to_dict(), "labelled_clips": len(data),
                              "labelled_minutes": data.minutes,
                              "adapter_parameters": count_adapter_parameters(model)},
                             p.adapter)
            del model
    if live is None:
        return
    metrics: dict[str, float | str] = {
        **found, **first, "steps": float(p.finetune.max_steps)}
    for run, result in results.items():
        metrics[f"{curve(p, *run)}/train_seconds"] = result.seconds
        metrics[f"{curve(p, *run)}/precision"] = result.precision
    metrics.update(compare_finetuned(p, features_dir, out_dir))
    log_summary(live, metrics)
    live.end()
    typer.echo(json.dumps({k: v for k, v in metrics.items() if "wer" in k}, indent=2))


def compare_finetuned(p: Params, features_dir: Path, out_dir: Path) -> dict[str, float]:
    """WER of both fine-tuned models on the transcribed test and dev clips (`test/...`,
    `dev/...`), and `delta/wer` (adapted - stock) with its 95% paired bootstrap interval;
    with several finetune.seeds, each seed's (`seed_<s>/...`) and the pooled figures. A split
    without transcribed clips gives nothing."""
    seeds = p.finetune.seeds
    many = len(seeds) > 1
    systems = {f"{start}@{seed}" if many else start:
               (read_adapter(run_dir(out_dir, p, seed, start) / ADAPTER_ONLY_NAME)[0], p.adapter)
               for seed in seeds for start in STARTS}
    windows: list[dict] = []
    out: dict[str, float] = {}
    for split in REPORTED:
        rows: list[dict] = []
        found = compare_wers(p.model, systems, FeatureDataset(features_dir / split),
                             p.evaluate.asr_config(p.train.precision),
                             resolve_device(p.train.device), baseline="stock", other="adapted",
                             windows=rows, repeats=[str(s) for s in seeds] if many else None)
        if not found:
            typer.secho(f"finetune: no transcribed {split} clips: no WER to compare",
                        fg=typer.colors.YELLOW, err=True)
        out.update({f"{split}/{key}": value for key, value in found.items()})
        windows += [{"split": split, **row} for row in rows]
    write_windows(LIVE / "finetune" / "windows.json", windows)
    return out


@app.command()
def finetune(params: str = typer.Option("params.yaml", help="parameters file")) -> None:
    """Fine-tune the adapter (encoder and decoder) on the transcribed train clips from stock
    Whisper and from data/adapters, once per finetune.seeds; write
    data/finetune/{stock,adapted}/adapter-only.safetensors (the first seed; the others' under
    data/finetune/seed-<s>/) and their WERs on the test and dev clips."""
    p = params_or_exit("finetune", params)
    relaunch_under_torchrun(p, "stages.finetune")
    with friendly_errors():
        run_finetune(p)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
