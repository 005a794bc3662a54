"""The BEST-RQ model: an IA^3-adapted Whisper encoder, softmax heads, loss and metrics.

mel ─► normalise ─► quantizer ─► labels (targets, from the unmasked features)
          └──► span mask + noise ─► back to Whisper's log-mel scale ─► adapted encoder ─► heads
                                                             cross-entropy on masked targets ◄┘
The encoder sees Whisper's own log-mel scale on unmasked frames, so an adapter stays a small
change to a model that still works as Whisper; masking noise is drawn in the normalised space
as the paper specifies and mapped back with the same statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from whisper.model import AudioEncoder

from bestrq.ia3 import add_ia3, ia3_disabled, ia3_state_dict
from bestrq.masking import (
    MaskingConfig,
    apply_noise,
    draw_noise,
    span_mask,
    target_mask,
    target_valid,
)
from bestrq.quantizer import RandomProjectionQuantizer
from bestrq.seeding import generator

ENCODER_STRIDE = 2  # Whisper's conv stem halves the 10 ms frame rate
HEADS_STREAM = 0x6865616473  # "heads": the heads' own stream of the run's seed


def seeded_linear(in_features: int, out_features: int, gen: torch.Generator) -> nn.Linear:
    """An nn.Linear with PyTorch's default init (U(-1/sqrt(in), 1/sqrt(in)) for weight and
    bias) drawn from `gen`, never from the global RNG, so that it is the same in every process
    whatever ran before it."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer


@dataclass
class BestRQOutput:
    loss: Tensor  # scalar fp32, mean over codebooks of the masked-frame cross-entropy
    metrics: dict[str, float] = field(default_factory=dict)
    num_masked: int = 0  # masked valid targets in the batch (the loss's denominator)

    @property
    def count(self) -> int:
        """The training engine's name for the loss's denominator."""
        return self.num_masked


class BestRQModel(nn.Module):
    """Adapted encoder + one linear softmax head per codebook (held as one fused Linear)."""

    def __init__(self, encoder: AudioEncoder, quantizer: RandomProjectionQuantizer,
                 masking: MaskingConfig, distill_weight: float = 0.0) -> None:
        super().__init__()
        masking.validate()
        if not distill_weight >= 0.0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        self.distill_weight = float(distill_weight)
        stack = quantizer.config.stack_frames
        if stack % ENCODER_STRIDE:
            raise ValueError(f"stack_frames must be a multiple of the encoder stride "
                             f"{ENCODER_STRIDE}, got {stack}")
        if encoder.conv1.in_channels != quantizer.config.n_mels:
            raise ValueError(f"the quantizer expects {quantizer.config.n_mels} mel bins but the "
                             f"Whisper encoder takes {encoder.conv1.in_channels}")
        add_ia3(encoder)
        self.encoder = encoder
        self.quantizer = quantizer
        self.masking = masking
        self.group = stack // ENCODER_STRIDE  # encoder frames per target
        d_model = encoder.ln_post.normalized_shape[0]
        cfg = quantizer.config
        self.heads = seeded_linear(d_model * self.group, cfg.num_codebooks * cfg.codebook_size,
                                   generator(cfg.seed, HEADS_STREAM))

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Everything an adapter file holds: IA^3 vectors, heads and quantizer state."""
        state = {f"ia3.encoder.{k}": v for k, v in ia3_state_dict(self.encoder).items()}
        state.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
        state.update({f"quantizer.{k}": v for k, v in self.quantizer.state_dict().items()})
        return state

    def make_inputs(self, mel: Tensor, num_valid: Tensor, frame_mask: Tensor | None = None,
                    noise: Tensor | None = None, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Labels and masked encoder input for a batch.

        mel: (batch, n_mels, frames) Whisper log-mel; num_valid: (batch,) non-padding frames.
        frame_mask (batch, frames) and noise (batch, n_mels, frames) come from the data loader
        (`masking.draw_sample_mask`) in training; when absent they are drawn with `generator`.
        Returns (encoder input (batch, n_mels, frames), labels (batch, N, targets),
        loss mask (batch, targets): masked and made of real audio, valid (batch, targets)).
        """
        stack = self.quantizer.config.stack_frames
        z = self.quantizer.normalize(mel.float())  # (batch, n_mels, frames)
        labels = self.quantizer(z)  # (batch, N, targets)
        if frame_mask is None:
            frame_mask = span_mask(num_valid, mel.shape[-1], self.masking.mask_prob,
                                   self.masking.span_frames, generator)  # (batch, frames)
        if noise is None:
            noise = draw_noise(tuple(z.shape), self.masking.noise_std, generator)
        noisy = apply_noise(z, frame_mask.to(z.device), noise)
        x = self.quantizer.denormalize(noisy)  # (batch, n_mels, frames)
        targets = labels.shape[-1]
        valid = target_valid(num_valid, targets, stack)  # (batch, targets)
        loss_mask = target_mask(frame_mask, stack)[:, :targets] & valid
        return x, labels, loss_mask, valid

    def encode(self, x: Tensor) -> Tensor:
        """Encoder input (batch, n_mels, frames) -> (batch, targets, group * d_model)."""
        h = self.encoder(x)  # (batch, frames / 2, d_model)
        batch, frames, d = h.shape
        usable = frames // self.group * self.group
        return h[:, :usable].reshape(batch, usable // self.group, self.group * d)

    def forward(self, mel: Tensor, num_valid: Tensor, frame_mask: Tensor | None = None,
                noise: Tensor | None = None, generator: torch.Generator | None = None,
                with_metrics: bool = True) -> BestRQOutput:
        """Loss (and, unless `with_metrics` is False, metrics that cost host syncs) of a batch:
        BEST-RQ's, plus `distill_weight` times the distillation term when it is on."""
        x, labels, loss_mask, valid = self.make_inputs(mel, num_valid, frame_mask, noise,
                                                       generator)
        h = self.encode(x)  # (batch, targets, group * d_model)
        out = self.loss(h, labels, loss_mask, valid if with_metrics else None)
        if self.distill_weight > 0:
            distill = self.distillation(mel, num_valid)
            if with_metrics:
                out.metrics["bestrq_loss"] = float(out.loss.detach())
                out.metrics["distill_loss"] = float(distill.detach())
            out.loss = out.loss + self.distill_weight * distill
        return out

    def distillation(self, mel: Tensor, num_valid: Tensor) -> Tensor:
        """Mean squared difference, over valid encoder frames and channels, between the adapted
        encoder's output on the clean input and the stock encoder's (the same weights with the
        IA^3 vectors at one, no gradient): a guard that keeps the adapted encoder's output
        where Whisper's decoder expects it (BEARD, arXiv 2510.24570, distils from the frozen
        encoder the same way). mel: (batch, n_mels, frames) Whisper log-mel; scalar fp32."""
        with torch.no_grad(), ia3_disabled(self.encoder):
            target = self.encoder(mel)  # (batch, frames / 2, d_model)
        h = self.encoder(mel)  # (batch, frames / 2, d_model)
        frames = (num_valid + ENCODER_STRIDE - 1) // ENCODER_STRIDE  # (batch,)
        valid = torch.arange(h.shape[1], device=h.device)[None] < frames[:, None]
        diff = h.float()[valid] - target.float()[valid]  # (valid frames, d_model)
        # No valid frame: zero, with every vector still in the graph (DDP buckets).
        return diff.pow(2).mean() if diff.numel() else h.float().sum() * 0.0

    def loss(self, h: Tensor, labels: Tensor, loss_mask: Tensor,
             valid: Tensor | None = None) -> BestRQOutput:
        """Masked-target cross-entropy, mean over codebooks, in fp32 whatever the autocast.

        With `valid` (batch, targets) given, metrics are computed too.
        """
        cfg = self.quantizer.config
        n, k = cfg.num_codebooks, cfg.codebook_size
        targets = min(h.shape[1], labels.shape[-1])
        labels, loss_mask = labels[:, :, :targets], loss_mask[:, :targets]
        selected = h[:, :targets][loss_mask]  # (M, group * d_model): only masked frames
        y = labels.transpose(1, 2)[loss_mask]  # (M, N)
        num_masked = int(selected.shape[0])
        if num_masked == 0:
            # Keep every trainable tensor (heads' weight and bias, IA^3 vectors through h) in
            # the graph, with zero gradients, so that every rank of a distributed run reduces
            # the same buckets.
            loss = self.heads(selected).float().sum() * 0.0
            logits = None
        else:
            logits = self.heads(selected).reshape(num_masked, n, k)  # (M, N, K)
            with torch.autocast(device_type=logits.device.type, enabled=False):
                logits = logits.float()
                loss = F.cross_entropy(logits.reshape(num_masked * n, k), y.reshape(-1))
        metrics = {} if valid is None else self.metrics(
            labels, loss_mask, valid[:, :targets], None if logits is None else logits.detach(), y)
        return BestRQOutput(loss=loss, metrics=metrics, num_masked=num_masked)

    @torch.no_grad()
    def metrics(self, labels: Tensor, loss_mask: Tensor, valid: Tensor, logits: Tensor | None,
                y: Tensor) -> dict[str, float]:
        """Masked accuracy per codebook and their mean, share of valid targets masked, and the
        codebook utilisation over valid targets: distinct labels and exp(label entropy)."""
        cfg = self.quantizer.config
        metrics: dict[str, float] = {
            "mask_fraction": float(loss_mask.sum()) / max(float(valid.sum()), 1.0)}
        if logits is not None:
            correct = (logits.argmax(dim=-1) == y).float().mean(dim=0)  # (N,)
            for i, acc in enumerate(correct.tolist()):
                metrics[f"accuracy_cb{i}"] = acc
            metrics["accuracy"] = float(correct.mean())
        picked = labels.transpose(1, 2)[valid]  # (V, N)
        distinct, perplexity = [], []
        for i in range(cfg.num_codebooks):
            counts = torch.bincount(picked[:, i], minlength=cfg.codebook_size).float()
            total = counts.sum().clamp_min(1.0)
            probs = counts[counts > 0] / total
            distinct.append(float((counts > 0).sum()))
            perplexity.append(float(torch.exp(-(probs * probs.log()).sum())) if probs.numel()
                              else 0.0)
        metrics["distinct_labels"] = sum(distinct) / len(distinct)
        metrics["perplexity"] = sum(perplexity) / len(perplexity)
        return metrics
