"""BEST-RQ's random-projection quantizer (arXiv 2202.01855 sec. 2.1; USM's multi-codebook
variant, arXiv 2303.01037 sec. 3.2).

Log-mel frames are normalised per mel bin, stacked to the encoder's frame rate, projected by a
frozen random matrix and labelled with the index of the nearest frozen random code (cosine
similarity). Nothing here is trained: the quantizer only makes targets.

Normalisation (`quantizer_norm`): "global" uses the train split's per-bin statistics, as the
paper does; "utterance" each clip's own per-bin statistics over its real frames, as NeMo NEST
(`per_feature`) and SpeechBrain (`sentence`) do. Whisper's log-mel turns a gain into a shift of
every bin, so global statistics keep the recording level in the targets and per-utterance ones
remove it (README: "Label agreement under gain").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, get_args

import torch
from torch import Tensor, nn

from bestrq.knobs import check, from_file, knob, to_file

# Statistics of the quantizer's input: each clip's own, or the train split's.
Norm = Literal["utterance", "global"]
NORMS: tuple[str, ...] = get_args(Norm)
# Names in an adapter file's description (format 1), kept as first written (`masking.FILE_NAMES`).
FILE_NAMES = {"quantizer_norm": "norm"}


@dataclass
class QuantizerConfig:
    # n_mels and seed are the run's (top-level n_mels and seed), not knobs of their own.
    n_mels: int = 80
    num_codebooks: Annotated[int, knob(
        "codebooks N (1: BEST-RQ; >1: USM multi-softmax)", ge=1, le=64)] = 1
    codebook_size: Annotated[int, knob("codes per codebook (paper: 8192)", ge=1, le=2**20)] = 8192
    code_dim: Annotated[int, knob(
        "dimension of the random projection and codes (paper: 16)", ge=1, le=4096)] = 16
    # Even: a target spans whole encoder frames (Whisper's conv stem halves the frame rate), so
    # the heads read stack_frames / 2 encoder frames per target.
    stack_frames: Annotated[int, knob(
        "10 ms log-mel frames stacked per target: even, as Whisper's 20 ms encoder frame is two "
        "of them (2: one encoder frame a target)", ge=2, le=64, multiple_of=2)] = 2
    seed: int = 0
    quantizer_norm: Annotated[Norm, knob(
        "statistics of the quantizer's input: utterance (each clip's own: targets do not follow "
        "the recording level) | global (the train split's)")] = "utterance"

    def validate(self) -> None:
        check(self)
        if self.n_mels < 1:
            raise ValueError(f"n_mels must be >= 1, got {self.n_mels}")

    def buffer_bytes(self) -> int:
        """Bytes of the quantizer's frozen fp32 buffers: projections, codebooks, statistics."""
        n, d = self.num_codebooks, self.code_dim
        return 4 * (n * self.n_mels * self.stack_frames * d + n * self.codebook_size * d
                    + 2 * self.n_mels)

    def to_dict(self) -> dict[str, Any]:
        """What an adapter file records (`FILE_NAMES`)."""
        return to_file(asdict(self), FILE_NAMES)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantizerConfig:
        """A config saved in an adapter; files written before `norm` existed used "global"."""
        return cls(**from_file({"norm": "global", **values}, FILE_NAMES))


def utterance_normalize(mel: Tensor, num_valid: Tensor, eps: float = 1e-5) -> Tensor:
    """Each clip's log-mel (batch, n_mels, frames) less its own per-bin mean over its first
    `num_valid` (batch,) frames, over their std (floored at `eps`); padding frames are
    normalised with the same statistics but never enter them. A clip without a valid frame
    is left as it is."""
    frames = mel.shape[-1]
    valid = (torch.arange(frames, device=mel.device)[None] < num_valid[:, None])  # (batch, T)
    w = valid[:, None, :].to(mel.dtype)  # (batch, 1, frames)
    count = w.sum(-1, keepdim=True).clamp_min(1.0)  # (batch, 1, 1)
    mean = (mel * w).sum(-1, keepdim=True) / count  # (batch, n_mels, 1)
    var = ((mel - mean).pow(2) * w).sum(-1, keepdim=True) / count
    std = var.sqrt().clamp_min(eps)  # (batch, n_mels, 1)
    empty = (num_valid <= 0)[:, None, None]
    return torch.where(empty, mel, (mel - mean) / std)


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

    def label_input(self, mel: Tensor, num_valid: Tensor) -> Tensor:
        """What the quantizer labels: Whisper log-mel (batch, n_mels, frames) normalised by
        `norm`'s statistics (num_valid (batch,): real frames per clip), same shape."""
        if self.config.quantizer_norm == "utterance":
            return utterance_normalize(mel.float(), num_valid)
        return self.normalize(mel.float())

    @torch.no_grad()
    def forward(self, normalized: Tensor, where: Tensor | None = None,
                max_elements: int = 1 << 26) -> Tensor:
        """Labels of normalised features (batch, n_mels, frames) -> (batch, N, frames // stack).

        With `where` (batch, frames // stack) boolean, only those targets are labelled (the
        others are -1): training needs the masked targets' labels only, and with 16 codebooks
        labelling every frame is a tenth of a step. The similarity matrix (N, frames,
        codebook_size) is built in chunks of frames so that it never exceeds `max_elements`
        floats (256 MiB by default), whatever the batch.
        """
        cfg = self.config
        with torch.autocast(device_type=normalized.device.type, enabled=False):
            x = stack_frames(normalized.float(), cfg.stack_frames)  # (batch, T, stack * n_mels)
            batch, targets, dim = x.shape
            if where is None:
                flat = x.reshape(batch * targets, dim)  # (F, stack * n_mels)
            else:
                where = where[:, :targets]
                flat = x[where]  # (F, stack * n_mels): the wanted targets only
            labels = torch.empty(cfg.num_codebooks, flat.shape[0], dtype=torch.long,
                                 device=x.device)  # (N, F)
            chunk = max(1, max_elements // (cfg.num_codebooks * cfg.codebook_size))
            for start in range(0, flat.shape[0], chunk):
                part = flat[start:start + chunk]
                # Codes are unit vectors, so the nearest by cosine is the argmax of the dot
                # product with the projection: its norm scales a row and never changes which.
                proj = torch.einsum("fi,nid->nfd", part, self.projection)  # (N, f, code_dim)
                sim = torch.bmm(proj, self.codebooks.transpose(1, 2))  # (N, f, codebook_size)
                labels[:, start:start + chunk] = sim.argmax(dim=-1)
        if where is None:
            return labels.reshape(cfg.num_codebooks, batch, targets).transpose(0, 1)
        out = torch.full((batch, targets, cfg.num_codebooks), -1, dtype=torch.long,
                         device=x.device)  # (batch, T, N)
        out[where] = labels.t()
        return out.transpose(1, 2)  # (batch, N, T)
