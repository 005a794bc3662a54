"""Held-out evaluation of an adapter: BEST-RQ loss, masked accuracy and codebook utilisation,
and the word error rate of Whisper with and without it.

Every clip gets the same seeded mask and noise whatever model is evaluated, so the adapted
encoder and the stock encoder (the same model with its IA^3 vectors reset to one, keeping the
adapter's heads) are compared on identical inputs and targets. The ASR comparison decodes the
same transcribed clips with stock Whisper and with Whisper whose encoder has the vectors merged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bestrq.adapter import merge_vectors
from bestrq.asr import AsrConfig, normalizer_for, transcribe, transcribed_clips, word_errors
from bestrq.ia3 import ia3_state_dict
from bestrq.model import BestRQModel
from bestrq.train import MaskedClips
from bestrq.whisper_model import load_whisper


@dataclass
class EvaluateConfig:
    batch_size: int = 4
    max_clips: int = 0  # 0: the whole eval split
    seed: int = 1234  # masks of held-out clips; fixed so every experiment sees the same ones
    num_workers: int = 0
    asr: bool = True  # also the WER of stock vs adapted Whisper on transcribed eval clips
    asr_max_clips: int = 0  # 0: every transcribed eval clip
    asr_batch_size: int = 8
    language: str = "en"

    def asr_config(self) -> AsrConfig:
        return AsrConfig(max_clips=self.asr_max_clips, batch_size=self.asr_batch_size,
                         language=self.language)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        if self.max_clips < 0:
            raise ValueError(f"evaluate.max_clips must be >= 0, got {self.max_clips}")
        if self.num_workers < 0:
            raise ValueError(f"evaluate.num_workers must be >= 0, got {self.num_workers}")
        if not isinstance(self.asr, bool):
            raise ValueError(f"evaluate.asr must be true or false, got {self.asr!r}")
        self.asr_config().validate()


@torch.no_grad()
def bestrq_metrics(model: BestRQModel, dataset: Dataset, config: EvaluateConfig,
                   device: torch.device, progress: bool = True) -> dict[str, float]:
    """Loss and accuracy over all masked targets, utilisation over all valid targets."""
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
    counts = torch.zeros(n, k, dtype=torch.float64)
    valid_targets = 0
    for mel, frames, mask, noise in tqdm(loader, desc="evaluate", disable=not progress):
        mel, frames = mel.to(device), frames.to(device)
        x, labels, loss_mask, valid = model.make_inputs(mel, frames, mask.to(device),
                                                        noise.to(device))
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
        for i in range(n):
            counts[i] += torch.bincount(picked[:, i], minlength=k).double().cpu()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (N,)
    metrics = {
        "loss": loss_sum / max(masked, 1),
        "accuracy": float(correct.sum() / max(masked * n, 1)),
        "perplexity": float(entropy.exp().mean()),
        "distinct_labels": float((counts > 0).sum(-1).double().mean()),
        "mask_fraction": masked / max(valid_targets, 1),
        "masked_targets": float(masked),
        "chance_loss": math.log(k),
    }
    for i in range(n if n > 1 else 0):
        metrics[f"accuracy_cb{i}"] = float(correct[i] / max(masked, 1))
    return metrics


def with_stock_encoder(model: BestRQModel, fn: Callable[[], dict[str, float]]
                       ) -> dict[str, float]:
    """Run `fn` with every IA^3 vector temporarily reset to one (the un-adapted encoder)."""
    vectors = ia3_state_dict(model.encoder)
    saved = {name: v.detach().clone() for name, v in vectors.items()}
    try:
        with torch.no_grad():
            for v in vectors.values():
                v.fill_(1.0)
        return fn()
    finally:
        with torch.no_grad():
            for name, v in vectors.items():
                v.copy_(saved[name])


def evaluate_adapter(model: BestRQModel, dataset: Dataset, config: EvaluateConfig,
                     device: torch.device, progress: bool = True) -> dict[str, float]:
    """Adapted and stock metrics side by side: `adapted/...`, `stock/...` and their deltas."""
    adapted = bestrq_metrics(model, dataset, config, device, progress)
    stock = with_stock_encoder(model, lambda: bestrq_metrics(model, dataset, config, device,
                                                             progress))
    out = {f"adapted/{k}": v for k, v in adapted.items()}
    out.update({f"stock/{k}": v for k, v in stock.items()})
    out["delta/loss"] = adapted["loss"] - stock["loss"]
    out["delta/accuracy"] = adapted["accuracy"] - stock["accuracy"]
    return out


def compare_asr(base_model: str, tensors: dict[str, torch.Tensor], dataset: Dataset,
                config: AsrConfig, device: torch.device) -> dict[str, float]:
    """WER of stock Whisper (`base_model`) and of Whisper with the adapter's IA^3 vectors merged
    into its encoder, on the transcribed clips of `dataset`: `stock/wer`, `adapted/wer`,
    `delta/wer` and their error counts. Empty when no clip has a transcript."""
    indices = transcribed_clips(dataset, config)
    if not indices:
        return {}
    references = [dataset.transcripts[i] for i in indices]  # type: ignore[attr-defined]
    model = load_whisper(base_model)
    normalize = normalizer_for(model, config.language)
    out: dict[str, float] = {"asr_clips": float(len(indices))}
    for name in ("stock", "adapted"):
        if name == "adapted":
            merge_vectors(model.cpu(), tensors)  # one copy of the model at a time
        hypotheses = transcribe(model, dataset, indices, config, device, desc=f"asr {name}")
        out.update({f"{name}/{k}": v for k, v in
                    word_errors(references, hypotheses, normalize).items()})
    out["delta/wer"] = out["adapted/wer"] - out["stock/wer"]
    return out
