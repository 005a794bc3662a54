"""Held-out evaluation of an adapter: BEST-RQ loss, masked accuracy and codebook utilisation.

Every clip gets the same seeded mask and noise whatever model is evaluated, so the adapted
encoder and the stock encoder (the same model with its IA^3 vectors reset to one, keeping the
adapter's heads) are compared on identical inputs and targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bestrq.ia3 import ia3_state_dict
from bestrq.model import BestRQModel
from bestrq.train import MaskedClips


@dataclass
class EvaluateConfig:
    batch_size: int = 4
    max_clips: int = 0  # 0: the whole eval split
    seed: int = 1234  # masks of held-out clips; fixed so every experiment sees the same ones
    num_workers: int = 0

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        if self.max_clips < 0:
            raise ValueError(f"evaluate.max_clips must be >= 0, got {self.max_clips}")
        if self.num_workers < 0:
            raise ValueError(f"evaluate.num_workers must be >= 0, got {self.num_workers}")


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
