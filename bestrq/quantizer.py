"""BEST-RQ's random-projection quantizer (arXiv 2202.01855 sec. 2.1; USM's multi-codebook
variant, arXiv 2303.01037 sec. 3.2).

Log-mel frames are normalised with global per-bin statistics, stacked to the encoder's frame rate,
projected by a frozen random matrix and labelled with the index of the nearest frozen random code
(cosine similarity). Nothing here is trained: the quantizer only makes targets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass
class QuantizerConfig:
    n_mels: int = 80
    num_codebooks: int = 1  # N >= 1; N = 1 is the original BEST-RQ, N > 1 USM's multi-softmax
    codebook_size: int = 8192
    code_dim: int = 16
    stack_frames: int = 2  # 10 ms frames per target; 2 matches Whisper's 20 ms encoder frames
    seed: int = 0

    def validate(self) -> None:
        for name in ("n_mels", "num_codebooks", "codebook_size", "code_dim", "stack_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def stack_frames(features: Tensor, stack: int) -> Tensor:
    """(batch, n_mels, frames) -> (batch, frames // stack, stack * n_mels); drops a ragged tail."""
    batch, n_mels, frames = features.shape
    usable = frames // stack * stack
    x = features[:, :, :usable].transpose(1, 2)  # (batch, usable, n_mels)
    return x.reshape(batch, usable // stack, stack * n_mels)


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projection + codebooks; `forward` maps normalised log-mels to labels."""

    def __init__(self, config: QuantizerConfig, mean: Tensor | None = None,
                 std: Tensor | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        n, k, d = config.num_codebooks, config.codebook_size, config.code_dim
        input_dim = config.n_mels * config.stack_frames
        # Drawn on the CPU from a private generator so that the same seed gives the same
        # quantizer on every device and whatever else consumed the global RNG.
        generator = torch.Generator().manual_seed(config.seed)
        xavier_std = math.sqrt(2.0 / (input_dim + d))
        projection = torch.randn(n, input_dim, d, generator=generator) * xavier_std
        codebooks = torch.randn(n, k, d, generator=generator)
        codebooks = codebooks / codebooks.norm(dim=-1, keepdim=True)
        self.register_buffer("projection", projection)  # (N, stack * n_mels, code_dim)
        self.register_buffer("codebooks", codebooks)  # (N, codebook_size, code_dim)
        self.register_buffer("mean", torch.zeros(config.n_mels) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(config.n_mels) if std is None else std.float())
        if self.mean.shape != (config.n_mels,) or self.std.shape != (config.n_mels,):
            raise ValueError(f"normalisation statistics must have shape ({config.n_mels},), got "
                             f"{tuple(self.mean.shape)} and {tuple(self.std.shape)}")

    def normalize(self, mel: Tensor) -> Tensor:
        """Whisper log-mel (batch, n_mels, frames) -> globally normalised, same shape."""
        return (mel - self.mean[:, None]) / self.std[:, None]

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.std[:, None] + self.mean[:, None]

    @torch.no_grad()
    def forward(self, normalized: Tensor, max_elements: int = 1 << 26) -> Tensor:
        """Labels of normalised features (batch, n_mels, frames) -> (batch, N, frames // stack).

        The similarity matrix (N, frames, codebook_size) is built in chunks of frames so that it
        never exceeds `max_elements` floats (256 MiB by default), whatever the batch.
        """
        cfg = self.config
        with torch.autocast(device_type=normalized.device.type, enabled=False):
            x = stack_frames(normalized.float(), cfg.stack_frames)  # (batch, T, stack * n_mels)
            batch, targets, dim = x.shape
            flat = x.reshape(batch * targets, dim)  # (F, stack * n_mels)
            labels = torch.empty(cfg.num_codebooks, batch * targets, dtype=torch.long,
                                 device=x.device)
            chunk = max(1, max_elements // (cfg.num_codebooks * cfg.codebook_size))
            for start in range(0, flat.shape[0], chunk):
                part = flat[start:start + chunk]
                proj = torch.einsum("fi,nid->nfd", part, self.projection)  # (N, f, code_dim)
                proj = proj / proj.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                sim = torch.bmm(proj, self.codebooks.transpose(1, 2))  # (N, f, codebook_size)
                labels[:, start:start + chunk] = sim.argmax(dim=-1)
        return labels.reshape(cfg.num_codebooks, batch, targets).transpose(0, 1)  # (batch, N, T)
