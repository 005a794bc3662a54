"""Held-out evaluation of an adapter: BEST-RQ loss, masked accuracy and codebook utilisation
beside a label-prior baseline, and the word error rate of Whisper with and without the adapter.

- `adapted/loss`, `adapted/accuracy`: the adapted encoder and its heads on the eval split's
  masked targets. Every clip gets the same seeded mask and noise whatever model is evaluated.
- `prior/loss`, `prior/accuracy`: a model that knows only label frequencies (per codebook,
  counted on the train split's valid targets, add-one smoothed; accuracy by always guessing the
  most frequent train label), scored on those same masked targets. `delta/loss_vs_prior` and
  `delta/accuracy_vs_prior` are what the encoder's context adds beyond the label frequencies;
  log(codebook_size) would overstate it since labels are far from uniform (`prior/train_entropy`).
- `stock/wer`, `adapted/wer`, `delta/wer`: stock Whisper and Whisper with the adapter merged
  into its encoder, decoding the same transcribed clips; the delta has a 95% paired bootstrap
  interval (`delta/wer_low`, `delta/wer_high`). The heads are not compared on the stock
  encoder: they were trained with the adapted one, so that comparison would favour the adapter.
- `stock/effective_rank`, `adapted/effective_rank`, `stock/davies_bouldin`,
  `adapted/davies_bouldin` and their `delta/`: label-free probes (`bestrq.probes`) of the
  stock and the adapted encoder's output on the same clean eval frames.

Stock Whisper's figures depend on no BEST-RQ knob, so they can be computed once and kept
(`Decoded`: its hypotheses per window; `probe_outputs` of its encoder alone): the adapted
system is then compared with them, with the same numbers as when both are computed together
(a WER resample draws the same windows whichever systems it scores).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from whisper.model import Whisper

from bestrq.adapter import merge_vectors
from bestrq.adapters import IA3, AdapterConfig, adapter_disabled
from bestrq.asr import (
    AsrConfig,
    clip_errors,
    normalizer_for,
    transcribe,
    transcribed_clips,
    wer_comparison,
)
from bestrq.dataset import as_mel, collate
from bestrq.knobs import BatchSize, ClipCount, Seed, Text, Workers, check, knob
from bestrq.masking import target_valid
from bestrq.model import ENCODER_STRIDE, BestRQModel
from bestrq.pretraining import MaskedClips
from bestrq.probes import ProbeConfig, probe, sample_frames
from bestrq.whisper_model import load_whisper


@dataclass
class EvaluateConfig:
    batch_size: Annotated[BatchSize, knob("clips per batch of the BEST-RQ pass")] = 4
    max_clips: Annotated[ClipCount, knob("clips of each split used (0: all)")] = 0
    seed: Annotated[Seed, knob(
        "masks of the held-out clips, probes' draw and the WER bootstrap; fixed across "
        "experiments")] = 1234
    num_workers: Annotated[Workers, knob("data-loader worker processes", speed_only=True)] = 0
    asr: Annotated[bool, knob(
        "also the WER of stock vs adapted Whisper on the transcribed test and dev clips")] = True
    asr_max_clips: Annotated[ClipCount, knob("transcribed clips decoded (0: all)")] = 0
    asr_batch_size: Annotated[BatchSize, knob("windows decoded at once")] = 8
    language: Annotated[Text, knob(
        "language of the eval audio (ignored by English-only models)")] = "en"
    bootstrap_samples: Annotated[int, knob(
        "resamples of the 95% paired bootstrap WER intervals", ge=100, le=10**7)] = 1000
    bootstrap_unit: Annotated[Literal["speaker", "window"], knob(
        "what the intervals resample: speaker (then their windows) | window")] = "speaker"
    decoding: Annotated[Literal["fallback", "greedy"], knob(
        "fallback (whisper.transcribe's temperatures) | greedy (temperature 0)")] = "fallback"
    probes: Annotated[bool, knob(
        "effective rank and Davies-Bouldin index of stock and adapted encoder")] = True
    probe_frames: Annotated[int, knob(
        "encoder frames the probes use (seeded draw from each split)", ge=1, le=10**7)] = 20_000
    probe_clusters: Annotated[int, knob(
        "k-means clusters of the Davies-Bouldin index", ge=2, le=10**5)] = 32

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(max_frames=self.probe_frames, clusters=self.probe_clusters,
                           seed=self.seed)

    def asr_config(self, precision: str = "auto") -> AsrConfig:
        """The WER settings; `precision` is the top-level knob's (decoding like training)."""
        return AsrConfig(max_clips=self.asr_max_clips, batch_size=self.asr_batch_size,
                         language=self.language, bootstrap_samples=self.bootstrap_samples,
                         seed=self.seed, precision=precision,
                         bootstrap_unit=self.bootstrap_unit, decoding=self.decoding)

    def validate(self) -> None:
        check(self, "evaluate.")
        self.asr_config().validate()


@torch.no_grad()
def _bestrq_pass(model: BestRQModel, dataset: Dataset, config: EvaluateConfig,
                 device: torch.device, progress: bool) -> tuple[dict[str, float], Tensor]:
    """`bestrq_metrics` and the per-codebook label counts (N, K) of the masked targets."""
    config.validate()
    if config.max_clips:
        dataset = Subset(dataset, range(min(config.max_clips, len(dataset))))  # type: ignore[arg-type]
    # The training loader's per-clip masks, all from "epoch 0" of the evaluation seed.
    keys = [(0, i) for i in range(len(dataset))]  # type: ignore[arg-type]
    batches = [keys[i:i + config.batch_size] for i in range(0, len(keys), config.batch_size)]
    loader = DataLoader(MaskedClips(dataset, model.masking, config.seed), batch_sampler=batches,
                        num_workers=config.num_workers)
    qcfg = model.quantizer.config
    n, k = qcfg.num_codebooks, qcfg.codebook_size
    model.eval().to(device)
    loss_sum, correct, masked = 0.0, torch.zeros(n, dtype=torch.float64), 0
    counts = torch.zeros(n, k, dtype=torch.float64)  # labels of valid targets
    masked_counts = torch.zeros(n, k, dtype=torch.float64)  # labels of masked targets
    valid_targets = 0
    for mel, frames, mask, noise in tqdm(loader, desc="evaluate", disable=not progress):
        mel, frames = as_mel(mel.to(device), dataset), frames.to(device)
        x, labels, loss_mask, valid = model.make_inputs(mel, frames, mask.to(device),
                                                        noise.to(device), all_labels=True)
        out = model.loss(model.encode(x), labels, loss_mask, valid)
        targets = min(loss_mask.shape[1], labels.shape[-1])
        labels = labels[:, :, :targets]
        if out.num_masked:
            acc = torch.tensor([out.metrics[f"accuracy_cb{i}"] for i in range(n)],
                               dtype=torch.float64)
            correct += acc * out.num_masked
            loss_sum += out.loss.item() * out.num_masked
            masked += out.num_masked
        picked = labels.transpose(1, 2)[valid[:, :targets]]  # (V, N)
        valid_targets += picked.shape[0]
        counts += label_counts(picked, k)
        masked_counts += label_counts(labels.transpose(1, 2)[loss_mask[:, :targets]], k)
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (N,)
    metrics = {
        "loss": loss_sum / max(masked, 1),
        "accuracy": float(correct.sum() / max(masked * n, 1)),
        "perplexity": float(entropy.exp().mean()),
        "distinct_labels": float((counts > 0).sum(-1).double().mean()),
        "mask_fraction": masked / max(valid_targets, 1),
        "masked_targets": float(masked),
    }
    for i in range(n if n > 1 else 0):
        metrics[f"accuracy_cb{i}"] = float(correct[i] / max(masked, 1))
    return metrics, masked_counts


@torch.no_grad()
def bestrq_metrics(model: BestRQModel, dataset: Dataset, config: EvaluateConfig,
                   device: torch.device, progress: bool = True) -> dict[str, float]:
    """Loss and accuracy over all masked targets, utilisation over all valid targets."""
    return _bestrq_pass(model, dataset, config, device, progress)[0]


def label_counts(labels: Tensor, codebook_size: int) -> Tensor:
    """Labels (targets, N) -> float64 counts (N, codebook_size) of each label per codebook."""
    n = labels.shape[1]
    # Offset codebook i's labels by i * K so one bincount counts every codebook.
    offset = torch.arange(n, device=labels.device) * codebook_size  # (N,)
    flat = (labels + offset).reshape(-1)
    return torch.bincount(flat, minlength=n * codebook_size).reshape(
        n, codebook_size).double().cpu()


@torch.no_grad()
def train_label_counts(model: BestRQModel, dataset: Dataset, config: EvaluateConfig,
                       device: torch.device, progress: bool = True) -> Tensor:
    """Per-codebook counts (N, K) of the quantizer's labels over the valid targets of
    `dataset` (labels of the unmasked features, as the training targets are made)."""
    config.validate()
    qcfg = model.quantizer.config
    quantizer = model.quantizer.to(device)
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                        collate_fn=collate)
    counts = torch.zeros(qcfg.num_codebooks, qcfg.codebook_size, dtype=torch.float64)
    for mel, frames in tqdm(loader, desc="label prior", disable=not progress):
        mel, frames = as_mel(mel.to(device), dataset), frames.to(device)
        valid = target_valid(frames, mel.shape[-1] // qcfg.stack_frames,
                             qcfg.stack_frames)  # (batch, T)
        labels = quantizer(quantizer.label_input(mel, frames), where=valid)  # (batch, N, T)
        counts += label_counts(labels.transpose(1, 2)[valid], qcfg.codebook_size)
    return counts


def prior_metrics(train_counts: Tensor, eval_counts: Tensor) -> dict[str, float]:
    """Scores of the add-one smoothed label prior of `train_counts` (N, K) on the targets
    counted in `eval_counts` (N, K): cross-entropy (mean over codebooks and targets, nats),
    accuracy of always predicting each codebook's most frequent train label (the lowest index
    on ties), and the prior's own entropy (mean over codebooks, nats)."""
    train_counts, eval_counts = train_counts.double(), eval_counts.double()
    k = train_counts.shape[1]
    log_prior = ((train_counts + 1.0) / (train_counts.sum(-1, keepdim=True) + k)).log()  # (N, K)
    targets = eval_counts.sum().clamp_min(1.0)
    best = train_counts.argmax(-1, keepdim=True)  # (N, 1)
    return {"loss": float(-(eval_counts * log_prior).sum() / targets),
            "accuracy": float(eval_counts.gather(1, best).sum() / targets),
            "train_entropy": float(-(log_prior.exp() * log_prior).sum(-1).mean())}


def evaluate_adapter(model: BestRQModel, dataset: Dataset, train_dataset: Dataset,
                     config: EvaluateConfig, device: torch.device, progress: bool = True,
                     train_counts: Tensor | None = None) -> dict[str, float]:
    """The adapted model's metrics on `dataset` (`adapted/...`) beside the label prior of
    `train_dataset` scored on the same masked targets (`prior/...`), and their differences
    `delta/loss_vs_prior`, `delta/accuracy_vs_prior` (negative loss delta: better than prior).
    `train_counts`: `train_label_counts` of `train_dataset` when already counted (they do not
    depend on the split evaluated)."""
    adapted, masked_counts = _bestrq_pass(model, dataset, config, device, progress)
    if train_counts is None:
        train_counts = train_label_counts(model, train_dataset, config, device, progress)
    prior = prior_metrics(train_counts, masked_counts)
    out = {f"adapted/{k}": v for k, v in adapted.items()}
    out.update({f"prior/{k}": v for k, v in prior.items()})
    out["delta/loss_vs_prior"] = adapted["loss"] - prior["loss"]
    out["delta/accuracy_vs_prior"] = adapted["accuracy"] - prior["accuracy"]
    return out


def heldout_tracker(model: BestRQModel, dataset: Dataset, train_dataset: Dataset,
                    config: EvaluateConfig, device: torch.device
                    ) -> Callable[[], dict[str, float]]:
    """A function giving the BEST-RQ loss and masked accuracy of `model` as it is now, on the
    held-out `dataset` with the evaluation's seeded masks, beside the label prior's on the same
    targets (`loss`, `accuracy`, `prior_loss`, `prior_accuracy`): called during pre-training
    it draws the curve that shows whether the heads learn something the prior does not. The
    prior is counted once (the quantizer and the masks do not change); the model's train/eval
    mode is restored after each call. At the last step its numbers are the evaluate stage's."""
    prior: dict[str, float] = {}

    def measure() -> dict[str, float]:
        training = model.training
        adapted, masked_counts = _bestrq_pass(model, dataset, config, device, progress=False)
        if not prior:
            prior.update(prior_metrics(
                train_label_counts(model, train_dataset, config, device, progress=False),
                masked_counts))
        model.train(training)
        return {"loss": adapted["loss"], "accuracy": adapted["accuracy"],
                "prior_loss": prior["loss"], "prior_accuracy": prior["accuracy"]}

    return measure


PROBED = ("effective_rank", "davies_bouldin")  # each probe's figure, per encoder


@torch.no_grad()
def probe_outputs(encoders: Mapping[str, Callable[[Tensor], Tensor]], dataset: Dataset,
                  config: EvaluateConfig, device: torch.device, progress: bool = True
                  ) -> dict[str, float]:
    """`bestrq.probes` of each named encoder's output (`<name>/effective_rank`,
    `<name>/davies_bouldin`), on the same clean valid frames of `dataset` (at most `max_clips`
    clips, `probe_frames` frames drawn with the evaluation seed): an encoder's figures do not
    depend on the others probed beside it."""
    config.validate()
    if config.max_clips:
        dataset = Subset(dataset, range(min(config.max_clips, len(dataset))))  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                        collate_fn=collate)
    outputs: dict[str, list[Tensor]] = {name: [] for name in encoders}
    for mel, frames in tqdm(loader, desc="probes", disable=not progress):
        mel = as_mel(mel.to(device), dataset)  # (batch, n_mels, frames)
        valid = (frames + ENCODER_STRIDE - 1) // ENCODER_STRIDE  # (batch,) encoder frames
        for name, encode in encoders.items():
            out = encode(mel).float().cpu()  # (batch, frames / 2, d_model)
            for i, n in enumerate(valid.tolist()):
                outputs[name].append(out[i, :n])
    cfg = config.probe_config()
    found: dict[str, float] = {}
    for name, parts in outputs.items():
        for key, value in probe(sample_frames(parts, cfg.max_frames, cfg.seed), cfg).items():
            found[f"{name}/{key}"] = value
    return found


def probe_differences(found: Mapping[str, float]) -> dict[str, float]:
    """`delta/<probe>`: the adapted encoder's figure minus the stock one's."""
    return {f"delta/{key}": found[f"adapted/{key}"] - found[f"stock/{key}"] for key in PROBED}


@torch.no_grad()
def probe_encoders(model: BestRQModel, dataset: Dataset, config: EvaluateConfig,
                   device: torch.device, progress: bool = True,
                   systems: tuple[str, ...] = ("stock", "adapted")) -> dict[str, float]:
    """`bestrq.probes` of the stock encoder (adapter switched off) and the adapted one, on the
    same clean valid frames of `dataset` (`probe_outputs`): `stock/...`, `adapted/...` and
    `delta/...` (adapted - stock). `systems`: which of the two are probed (the differences
    only when both are)."""
    encoder = model.encoder.eval().to(device)

    def stock(mel: Tensor) -> Tensor:
        with adapter_disabled(encoder):
            return encoder(mel)

    found = probe_outputs({name: {"stock": stock, "adapted": encoder}[name] for name in systems},
                          dataset, config, device, progress)
    return {**found, **(probe_differences(found) if len(systems) == 2 else {})}


def probe_whisper(encoder: nn.Module, dataset: Dataset, config: EvaluateConfig,
                  device: torch.device, progress: bool = True) -> dict[str, float]:
    """The probes of stock Whisper's `encoder` (`stock/...`), with no adapter built: the same
    figures as `probe_encoders`' stock ones (an adapter switched off computes nothing)."""
    return probe_outputs({"stock": encoder.eval().to(device)}, dataset, config, device,
                         progress)


@dataclass(frozen=True)
class Decoded:
    """A system's hypotheses decoded before, by another run (stock Whisper's, kept by the
    stage that decodes it): per window id, its text and the reference it was decoded for;
    `source` names where they were read, for the message when they do not cover the windows
    compared now."""
    texts: dict[str, str]
    references: dict[str, str]
    source: str

    def for_windows(self, name: str, ids: list[str], references: list[str]) -> list[str]:
        """The texts of the windows `ids` in that order; one missing, one with another
        reference, or windows beyond them: a ValueError naming the source."""
        stale = [i for i, ref in zip(ids, references, strict=True)
                 if self.references.get(i) != ref]
        if stale or len(self.texts) != len(ids):
            which = f"window {stale[0]}" if stale else f"{len(self.texts)} windows, not {len(ids)}"
            raise ValueError(f"{self.source}: the {name} hypotheses were decoded for other "
                             f"windows ({which}; other features or evaluate knobs): run their "
                             "stage again")
        return [self.texts[i] for i in ids]


def decoded_from_rows(rows: list[dict], split: str, names: list[str], source: str
                      ) -> dict[str, Decoded]:
    """The systems `names` of the per-window rows `compare_wers` gave (`windows`, each row
    with its `split` added) on `split`, as `Decoded`."""
    rows = [row for row in rows if row.get("split") == split]
    for name in names:
        if any(name not in row for row in rows):
            raise ValueError(f"{source}: no {name!r} hypothesis on some {split} windows: run "
                             "its stage again")
    return {name: Decoded({row["id"]: row[name] for row in rows},
                          {row["id"]: row["reference"] for row in rows}, source)
            for name in names}


System = tuple[dict[str, torch.Tensor], AdapterConfig] | Decoded | None


def compare_wers(base_model: str, systems: dict[str, System], dataset: Dataset,
                 config: AsrConfig, device: torch.device, baseline: str,
                 other: str, windows: list[dict] | None = None,
                 repeats: list[str] | None = None) -> dict[str, float]:
    """WER of each system on the transcribed clips of `dataset`: Whisper `base_model` with that
    system's adapter (its file's tensors, and which adapter they are) merged (None: stock
    Whisper; `Decoded`: hypotheses decoded before, not decoded again), through
    `wer_comparison`:
    `<name>/...` (WER, 95% interval, error counts), `delta/wer` (other - baseline) with its
    paired 95% interval and `delta/wer_relative`. Empty when no clip has a transcript.
    `windows`, when given, receives one row per clip: its id, speaker, reference and each
    system's hypothesis and word errors, so that a user sees which windows drive a
    difference. `repeats`: the systems are `{name}@{r}` per repeat (fine-tune seeds), pooled
    as `wer_comparison` does."""
    config.validate()
    if not transcribed_clips(dataset, config):
        return {}
    model: Whisper | None = load_whisper(base_model)
    normalize = normalizer_for(model, config.language)
    indices = transcribed_clips(dataset, config, normalize)
    if not indices:
        return {}
    references = [dataset.transcripts[i] or "" for i in indices]  # type: ignore[attr-defined]
    ids = getattr(dataset, "ids", None)
    window_ids = [ids[clip] if ids is not None else str(clip) for clip in indices]
    hypotheses: dict[str, list[str]] = {}
    redecoded: dict[str, dict[str, int]] = {}  # of the systems decoded here
    for name, system in systems.items():
        if isinstance(system, Decoded):
            hypotheses[name] = system.for_windows(name, window_ids, references)
            continue
        if model is None:
            model = load_whisper(base_model)
        if system is not None:
            merge_vectors(model.cpu(), *system)
        counts: dict[str, int] = {}
        hypotheses[name] = transcribe(model, dataset, indices, config, device, desc=f"asr {name}",
                                      stats=counts)
        redecoded[name] = counts
        if system is not None:
            model = None  # merged: the next system starts from the base again
    groups = speaker_groups(dataset, indices) if config.bootstrap_unit == "speaker" else None
    out: dict[str, float] = {"asr_clips": float(len(indices)),
                             "asr_speakers": float(len(set(groups))) if groups else 0.0}
    out.update(wer_comparison(references, hypotheses, normalize, baseline=baseline, other=other,
                              samples=config.bootstrap_samples, seed=config.seed, groups=groups,
                              repeats=repeats))
    for name, counts in redecoded.items():  # windows whisper.transcribe's rules decoded again
        out[f"{name}/fallback_windows"] = float(counts["fallbacks"])
        out[f"{name}/silent_windows"] = float(counts["silent"])
    if windows is not None:
        errors = {name: clip_errors(references, texts, normalize)[0]
                  for name, texts in hypotheses.items()}
        speakers = getattr(dataset, "groups", None)
        for row, clip in enumerate(indices):
            windows.append({
                "id": window_ids[row],
                "speaker": speakers[clip] if speakers is not None else None,
                "reference": references[row],
                **{name: hypotheses[name][row] for name in hypotheses},
                **{f"{name}_errors": int(errors[name][row]) for name in hypotheses}})
    return out


def speaker_groups(dataset: Dataset, indices: list[int]) -> list[str]:
    """The speaker (or recording) of each clip in `indices`, for speaker-level intervals."""
    groups = getattr(dataset, "groups", None)
    if groups is None or any(groups[i] is None for i in indices):
        raise ValueError("evaluate.bootstrap_unit is speaker but the eval features record no "
                         "speaker for some clips (features made before speakers were kept: "
                         "re-run `dvc repro segment features`, or set evaluate.bootstrap_unit: "
                         "window)")
    return [str(groups[i]) for i in indices]


def system_wers(base_model: str, name: str, systems: dict[str, System], dataset: Dataset,
                config: AsrConfig, device: torch.device, windows: list[dict] | None = None,
                repeats: list[str] | None = None) -> dict[str, float]:
    """`compare_wers` of one system alone (`systems` holds it, `{name}@{r}` per repeat): its
    figures, pooled over repeats, without a difference. They are the numbers `compare_wers`
    gives it beside another system: every system is scored on the same resamples."""
    found = compare_wers(base_model, systems, dataset, config, device, baseline=name,
                         other=name, windows=windows, repeats=repeats)
    return {key: value for key, value in found.items()
            if not key.startswith("delta/") and "/delta/" not in key}  # itself minus itself


def compare_asr(base_model: str, tensors: dict[str, torch.Tensor], dataset: Dataset,
                config: AsrConfig, device: torch.device,
                windows: list[dict] | None = None,
                adapter: AdapterConfig | None = None,
                stock: Decoded | None = None) -> dict[str, float]:
    """Zero-shot: stock Whisper (`base_model`) against Whisper with the adapter file's
    `tensors` (of kind `adapter`, IA^3 when None) merged (`compare_wers` with `stock` and
    `adapted`); stock is decoded first and the adapter is then merged into the same copy, so
    one model is held at a time. `stock`: stock Whisper's hypotheses decoded before (the
    stock_eval stage's), not decoded again."""
    system = (tensors, adapter or IA3)
    return compare_wers(base_model, {"stock": stock, "adapted": system}, dataset, config,
                        device, baseline="stock", other="adapted", windows=windows)
