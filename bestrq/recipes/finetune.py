"""The fine-tune recipe: the same supervised adapter fine-tune (encoder and decoder, Whisper's
teacher-forced cross-entropy) from stock Whisper and from the BEST-RQ adapter, once per
`finetune.seeds`, with the same labelled clips, steps, seed and schedule; then the WERs of the
two on the held-out splits, with the paired interval of their difference.

Each start is run on its own (`finetune_runs(start=...)`): the stock fine-tune depends on no
BEST-RQ knob, so it is trained and decoded once and kept, and the adapter's fine-tune is
compared with its per-window hypotheses (`finetuned_wers(stock=...)`), with the same numbers as
when both are run together (every run is seeded by its own seed; a WER resample draws the same
windows whichever systems it scores).

What is trained, from what and under which checkpoint identity is decided here; where the
logs go is the caller's (`FinetuneLog`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from torch import Tensor

from bestrq.adapter import adapter_config, load_vectors, read_adapter, save_vectors
from bestrq.adapters import count_adapter_parameters
from bestrq.checkpoint import RunSignature
from bestrq.dataset import FeatureDataset
from bestrq.distributed import DistInfo, barrier, is_main, resolve_device, same_on_every_rank
from bestrq.evaluate import System, compare_wers, decoded_from_rows, system_wers
from bestrq.finetune import (
    FINETUNE,
    FinetuneModel,
    LabelledClips,
    max_decoder_tokens,
    select_labelled,
    tokenizer_for,
)
from bestrq.params import Params
from bestrq.report import SPLITS
from bestrq.run_identity import finetune_engine_config, finetune_key
from bestrq.train import train
from bestrq.whisper_model import load_whisper, model_identity

STARTS = ("stock", "adapted")  # fine-tuned from stock Whisper / from the BEST-RQ adapter
START_NAMES = {"stock": "stock Whisper", "adapted": "the BEST-RQ adapter"}


class FinetuneLog(Protocol):
    """Where the recipe reports, on the process that writes (rank 0)."""

    def say(self, message: str) -> None:
        """A line for the user."""

    def resume(self, curve: str, step: int) -> None:
        """Run `curve` goes on from `step` (0: from scratch): forget what it logged after it."""

    def steps(self, curve: str) -> Callable[[int, dict[str, float]], None]:
        """The step logger of run `curve`."""


def run_dir(root: Path, p: Params, seed: int, start: str) -> Path:
    """Where one (seed, start) run's checkpoints live under `root`: the first seed's at
    root/<start>, the others' at root/seed-<seed>/<start>."""
    return root / start if seed == p.finetune.seeds[0] else root / f"seed-{seed}" / start


def adapter_file(out_dir: Path, p: Params, seed: int, file_name: str) -> Path:
    """Where one run's fine-tuned adapter goes in its start's folder `out_dir`: the first
    seed's at out_dir/<file_name> (the stage's main output), the others' at
    out_dir/seed-<seed>/<file_name>."""
    return out_dir / file_name if seed == p.finetune.seeds[0] else \
        out_dir / f"seed-{seed}" / file_name


def system_name(p: Params, seed: int, start: str) -> str:
    """One run's name among the systems compared (`wer_comparison`'s repeats): the start, and
    `@<seed>` when there are several seeds."""
    return f"{start}@{seed}" if len(p.finetune.seeds) > 1 else start


def curve(p: Params, seed: int, start: str) -> str:
    """The name of one run's step curves (and of its history in the logs)."""
    return start if seed == p.finetune.seeds[0] else f"seed_{seed}/{start}"


def labelled_draws(p: Params, train_split: FeatureDataset) -> dict[int, list[int]]:
    """Each fine-tune seed's labelled clips of the train split (empty: none is transcribed)."""
    return {seed: select_labelled(train_split.transcripts, train_split.num_frames,
                                  p.finetune.max_clips, p.finetune.max_minutes, seed)
            for seed in p.finetune.seeds}


def start_adapter(path: Path, p: Params) -> tuple[bytes, dict[str, Tensor]]:
    """The bytes (part of the adapted runs' identity) and tensors of the BEST-RQ adapter file
    the adapted runs start from; one of another kind or shape than `p.adapter` is refused."""
    if not path.is_file():
        raise FileNotFoundError(f"no BEST-RQ adapter at {path}: run `dvc repro pretrain` first")
    vectors = path.read_bytes()
    tensors, info = read_adapter(path)
    found = adapter_config(info)
    if found != p.adapter:
        raise ValueError(f"{path} holds a {found.kind} adapter {found.to_dict()}, not the "
                         f"{p.adapter.kind} adapter {p.adapter.to_dict()} of the parameters: "
                         "run `dvc repro pretrain` with them first")
    return vectors, tensors


def finetune_runs(p: Params, dist: DistInfo, start: str, train_split: FeatureDataset,
                  draws: dict[int, list[int]], features_dir: Path, out_dir: Path,
                  file_name: str, checkpoint_root: Path,
                  claim: Callable[[Path, RunSignature], int],
                  open_log: Callable[[bool], FinetuneLog],
                  start_file: Path | None = None) -> dict[str, float | str] | None:
    """Train the (seed, `start`) run of every seed and write its adapter to
    `adapter_file(out_dir, ...)` (rank 0); `start_file`: the BEST-RQ adapter the adapted start
    begins from. `claim(folder, identity)` holds a run's checkpoint folder under
    `checkpoint_root` and gives the step it resumes from (rank 0 only); `open_log(resume)`
    gives the log once every run is claimed. Returns the runs' own figures (labelled set,
    train seconds and precision per run) on rank 0, None elsewhere."""
    if start not in STARTS:
        raise ValueError(f"a fine-tune starts from one of {STARTS}, not {start!r}")
    vectors, tensors = (None, None)
    if start == "adapted":
        if start_file is None:
            raise ValueError("the adapted fine-tune needs the BEST-RQ adapter file it starts from")
        vectors, tensors = start_adapter(start_file, p)
    base = load_whisper(p.run.model)
    identity = model_identity(p.run.model, base)
    tokenizer, max_tokens = tokenizer_for(base, p.evaluate.language), max_decoder_tokens(base)
    del base
    keys = {seed: finetune_key(p, features_dir, start, seed, vectors)
            for seed in p.finetune.seeds}
    same_on_every_rank([k.fingerprint for k in keys.values()],
                       "the parameters, training features or BEST-RQ adapter")
    starts = {seed: claim(run_dir(checkpoint_root, p, seed, start), keys[seed])
              for seed in p.finetune.seeds} if is_main() else {}
    barrier()  # rank 0 may have moved stale checkpoints aside
    log = open_log(any(starts.values())) if is_main() else None
    figures: dict[str, float | str] = {}
    runs_figures: dict[str, float | str] = {}
    for seed in p.finetune.seeds:
        data = LabelledClips(train_split, draws[seed], tokenizer, max_tokens)
        config = finetune_engine_config(p, seed)
        figures = figures or {"labelled_minutes": data.minutes,
                              "truncated_transcripts": float(data.truncated)}
        if log is not None:
            log.say(f"finetune: {p.run.model} on {dist.device} x{dist.world_size}, seed {seed}: "
                    f"{len(data)} labelled clips ({data.minutes:.1f} min, {data.truncated} cut "
                    f"to the decoder's context), {config.max_steps} updates from "
                    f"{START_NAMES[start]}")
        name = curve(p, seed, start)
        if log is not None:
            log.resume(name, starts[seed])
            if starts[seed]:
                log.say(f"finetune: {name}: resuming from the checkpoint of step {starts[seed]}")
        model = load_whisper(p.run.model)
        if tensors is not None:
            # The BEST-RQ encoder adapter; the decoder's computes the stock decoder.
            load_vectors(model, tensors, p.adapter, seed)
        result = train(FinetuneModel(model, p.adapter, seed), data, config,
                       run_dir(checkpoint_root, p, seed, start),
                       log=log.steps(f"{name}/train") if log else None, objective=FINETUNE)
        if log is not None:
            save_vectors(adapter_file(out_dir, p, seed, file_name), model, identity,
                         {"start": start, "seed": seed, "step": result.step,
                          "finetune": p.finetune.to_dict(), "labelled_clips": len(data),
                          "labelled_minutes": data.minutes,
                          "adapter_parameters": count_adapter_parameters(model)},
                         p.adapter)
        runs_figures[f"{name}/train_seconds"] = result.seconds
        runs_figures[f"{name}/precision"] = result.precision
        del model
    if log is None:
        return None
    return {**figures, "steps": float(p.finetune.max_steps), **runs_figures}


def finetuned_wers(p: Params, features_dir: Path, start: str, out_dir: Path, file_name: str,
                   stock: list[dict] | None = None, stock_source: str = ""
                   ) -> tuple[dict[str, float], list[dict], list[str]]:
    """WER of the `start` fine-tunes (their adapters in `out_dir`) on the transcribed test and
    dev clips (`test/...`, `dev/...`); with several finetune.seeds, each seed's
    (`seed_<s>/...`) and the pooled figures. `stock`: the stock fine-tunes' per-window rows
    (this function's for the stock start, read from `stock_source`): the adapted fine-tunes
    are then compared with them, `delta/wer` (adapted - stock) with its 95% paired bootstrap
    interval. Also the per-window rows and the splits without transcribed clips (which give
    nothing)."""
    seeds = p.finetune.seeds
    many = len(seeds) > 1
    tensors = {seed: read_adapter(adapter_file(out_dir, p, seed, file_name))[0] for seed in seeds}
    config = p.evaluate.asr_config(p.train.precision)
    device = resolve_device(p.train.device)
    repeats = [str(s) for s in seeds] if many else None
    windows: list[dict] = []
    out: dict[str, float] = {}
    untranscribed = []
    for split in SPLITS:
        rows: list[dict] = []
        dataset = FeatureDataset(features_dir / split)
        if stock is None:
            found = system_wers(p.run.model, start, {system_name(p, seed, start): (
                tensors[seed], p.adapter) for seed in seeds}, dataset, config, device,
                windows=rows, repeats=repeats)
        else:
            kept = decoded_from_rows(stock, split, [system_name(p, seed, "stock")
                                                    for seed in seeds], stock_source)
            systems: dict[str, System] = {}
            for seed in seeds:  # each seed's stock run, then its adapted one: the order of old
                systems[system_name(p, seed, "stock")] = kept[system_name(p, seed, "stock")]
                systems[system_name(p, seed, start)] = (tensors[seed], p.adapter)
            found = compare_wers(p.run.model, systems, dataset, config, device,
                                 baseline="stock", other=start, windows=rows, repeats=repeats)
        if not found:
            untranscribed.append(split)
        out.update({f"{split}/{key}": value for key, value in found.items()})
        windows += [{"split": split, **row} for row in rows]
    return out, windows, untranscribed
