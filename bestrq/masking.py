"""Span masking with noise, as in BEST-RQ (arXiv 2202.01855 sec. 2.2).

Every valid feature frame starts a masked span with probability `mask_prob`; a span covers
`mask_span_ms` of audio (400 ms = 40 frames at Whisper's 10 ms hop) and overlapping spans merge.
Masked frames are replaced by noise drawn from N(0, mask_noise_std) in the normalised feature
space. Padding frames are never masked. A target (`stack` frames, one encoder frame) is
predicted when at least `mask_target_share` of its frames are masked: the default 1.0 predicts
only targets whose own frames are all noise (NeMo NEST thresholds the stacked frames the same
way, at 0.8); 0.5 with two stacked frames predicts a target that still shows one of its own
frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.audio import HOP_LENGTH, SAMPLE_RATE

from bestrq.knobs import check, from_file, knob, to_file

FRAME_MS = 1000.0 * HOP_LENGTH / SAMPLE_RATE  # 10 ms


# Names of the knobs in an adapter file's description (format 1): files keep the names they
# were first written with, so every adapter made before still loads and a run's bytes do not
# change with a rename in the code.
FILE_NAMES = {"mask_span_ms": "span_ms", "mask_noise_std": "noise_std",
              "mask_target_share": "target_share"}


@dataclass
class MaskingConfig:
    mask_prob: Annotated[float, knob(
        "probability that a frame starts a masked span (paper: 0.01)", gt=0, le=1)] = 0.01
    mask_span_ms: Annotated[float, knob(
        "masked span length in ms (paper: 400 ms = 40 frames)", ge=FRAME_MS, le=30_000)] = 400.0
    mask_noise_std: Annotated[float, knob(
        "std of the noise replacing masked frames, normalised space (paper: 0.1)",
        ge=0, le=100)] = 0.1
    mask_target_share: Annotated[float, knob(
        "share of a target's stacked frames that must be masked for it to be predicted (1.0: "
        "all; 0.5 with 2 stacked frames: any one)", gt=0, le=1)] = 1.0

    def validate(self) -> None:
        check(self)

    @property
    def span_frames(self) -> int:
        return int(round(self.mask_span_ms / FRAME_MS))

    def to_dict(self) -> dict[str, float]:
        """What an adapter file records (`FILE_NAMES`)."""
        return to_file(asdict(self), FILE_NAMES)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MaskingConfig:
        """A config saved in an adapter; files written before `target_share` existed predicted
        a target when any of its frames was masked (0.5 of two frames)."""
        return cls(**from_file({"target_share": 0.5, **values}, FILE_NAMES))


def span_mask(num_valid: Tensor, num_frames: int, mask_prob: float, span: int,
              generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask (batch, num_frames) of merged spans that start inside the valid frames.

    num_valid: (batch,) count of non-padding frames per clip; spans are clipped at that count.
    """
    device = num_valid.device
    batch = num_valid.shape[0]
    frame = torch.arange(num_frames, device=device)  # (frames,)
    valid = frame[None, :] < num_valid[:, None]  # (batch, frames)
    u = torch.rand(batch, num_frames, generator=generator,
                   device=generator.device if generator is not None else device).to(device)
    starts = (u < mask_prob) & valid  # (batch, frames)
    # A frame is masked when a span started in the `span` frames up to and including it:
    # a causal running max over a window of `span` starts.
    covered = F.max_pool1d(F.pad(starts.float()[:, None, :], (span - 1, 0)), span, stride=1)
    return (covered[:, 0, :] > 0) & valid


def target_mask(frame_mask: Tensor, stack: int, share: float = 1.0) -> Tensor:
    """(batch, frames) frame mask -> (batch, frames // stack): a target is predicted when at
    least `share` of its `stack` frames are masked (any one frame: share <= 1 / stack)."""
    batch, frames = frame_mask.shape
    usable = frames // stack * stack
    masked = frame_mask[:, :usable].reshape(batch, usable // stack, stack).sum(dim=-1)
    # ceil(share * stack) frames, with a tolerance so that e.g. 0.5 * 2 is exactly one
    needed = max(1, math.ceil(share * stack - 1e-9))
    return masked >= needed


def target_valid(num_valid: Tensor, num_targets: int, stack: int) -> Tensor:
    """(batch,) valid frames -> (batch, num_targets): targets made only of real audio."""
    target = torch.arange(num_targets, device=num_valid.device)
    return target[None, :] < (num_valid // stack)[:, None]


def draw_noise(shape: tuple[int, ...], noise_std: float,
               generator: torch.Generator | None = None) -> Tensor:
    """N(0, noise_std) noise of `shape`, on the generator's device (CPU without one)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device) * noise_std


def apply_noise(normalized: Tensor, frame_mask: Tensor, noise: Tensor) -> Tensor:
    """Replace masked frames of (batch, n_mels, frames) normalised features with `noise` (same
    shape, drawn by `draw_noise`)."""
    noise = noise.to(device=normalized.device, dtype=normalized.dtype)
    return torch.where(frame_mask[:, None, :], noise, normalized)


def draw_sample_mask(num_valid: int, num_frames: int, n_mels: int, config: MaskingConfig,
                     seed: int) -> tuple[Tensor, Tensor]:
    """Mask (frames,) and noise (n_mels, frames) of one clip, from its own seed.

    Drawing per clip from a seed derived from (run seed, epoch, clip index) makes a run's masks
    independent of batch size, world size, data-loader workers and where a run was resumed.
    """
    generator = torch.Generator().manual_seed(seed)
    mask = span_mask(torch.tensor([num_valid]), num_frames, config.mask_prob, config.span_frames,
                     generator)[0]
    return mask, draw_noise((n_mels, num_frames), config.mask_noise_std, generator)


def expected_mask_fraction(num_frames: int, mask_prob: float, span: int) -> float:
    """Analytic expected share of masked frames among `num_frames` valid frames (no padding).

    Frame t is unmasked iff none of the min(t + 1, span) frames that could start a span
    covering it did, so P(masked) = 1 - (1 - p) ** min(t + 1, span).
    """
    q = 1.0 - mask_prob
    total = sum(1.0 - q ** min(t + 1, span) for t in range(num_frames))
    return total / num_frames


# Whisper's conv stem (two kernel-3 convolutions, the second with stride 2) lets encoder frame t
# see input frames 2t - 2 ... 2t + 2.
CONV_STEM_REACH = 2


def target_exposure(frame_mask: Tensor, num_valid: Tensor, stack: int, share: float
                    ) -> dict[str, float]:
    """How much of its own input a predicted target still sees, under the rule `share`.

    frame_mask (batch, frames), num_valid (batch,). Returns, over the predicted valid targets:
    `own_frame`, the share with an unmasked frame among their own `stack` frames, and
    `receptive_field`, the share with an unmasked valid frame within the conv stem's reach of
    them (frames j * stack - 2 ... (j + 1) * stack); and `targets`, how many were predicted.
    """
    batch, frames = frame_mask.shape
    targets = frames // stack
    valid_frames = torch.arange(frames, device=frame_mask.device)[None] < num_valid[:, None]
    predicted = target_mask(frame_mask, stack, share) & target_valid(num_valid, targets, stack)
    open_frame = (~frame_mask & valid_frames).float()[:, None, :]  # (batch, 1, frames)
    own = F.max_pool1d(open_frame[..., :targets * stack], stack, stride=stack)[:, 0] > 0
    # Window of stack + 2 * reach frames starting at j * stack - reach, for every target j.
    reach = CONV_STEM_REACH
    padded = F.pad(open_frame, (reach, reach))  # (batch, 1, frames + 2 reach)
    seen = F.max_pool1d(padded, stack + 1 + reach, stride=stack)[:, 0, :targets] > 0
    count = int(predicted.sum())
    return {"targets": float(count),
            "own_frame": float((own & predicted).sum()) / max(count, 1),
            "receptive_field": float((seen & predicted).sum()) / max(count, 1)}
