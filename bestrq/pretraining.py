"""BEST-RQ pre-training as an objective of the training engine: each clip masked and noised
with its own seed (in the data-loader workers), the adapter and the softmax heads as two
optimiser groups (the heads decayed and trained alone first), and the model FLOPs of an update.
The loss itself is `bestrq.model.BestRQModel`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from bestrq.dataset import mel_shape
from bestrq.masking import MaskingConfig, draw_sample_mask
from bestrq.objective import Objective, ParamGroup
from bestrq.seeding import MASK_STREAM, derived_seed
from bestrq.throughput import model_flops

HEADS_PREFIX = "heads."  # BestRQModel's softmax heads, among its trainable tensors


def clip_seed(seed: int, epoch: int, clip: int) -> int:
    """Seed of the mask and noise of `clip` in `epoch`."""
    return derived_seed(seed, epoch, clip, MASK_STREAM)


class MaskedClips(Dataset):
    """Items keyed by (epoch, clip): (mel, num_frames, frame mask, noise) of that clip, and its
    index with `with_clip` (for the stock-output cache).

    The mask and noise are drawn here, i.e. in the data-loader workers, from the clip's own seed.
    """

    def __init__(self, dataset: Dataset, masking: MaskingConfig, seed: int,
                 with_clip: bool = False) -> None:
        self.dataset, self.masking, self.seed = dataset, masking, seed
        self.with_clip = with_clip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, ...]:
        epoch, clip = key
        mel, num_frames = self.dataset[clip]  # (n_mels, frames) or audio (samples,), ()
        n_mels, frames = mel_shape(self.dataset, mel)
        mask, noise = draw_sample_mask(int(num_frames), frames, n_mels, self.masking,
                                       clip_seed(self.seed, epoch, clip))
        item = (mel, torch.as_tensor(num_frames, dtype=torch.int64), mask, noise)
        return (*item, torch.as_tensor(clip, dtype=torch.int64)) if self.with_clip else item


def adapter_and_heads(model: nn.Module) -> list[ParamGroup]:
    """The adapter, never decayed (decaying IA^3 scales pulls them to 0, away from identity),
    then the heads, decayed and leading: the randomly drawn heads would otherwise give the
    adapter's first updates a random target."""
    params = model.trainable_parameters()
    heads = [p for n, p in params.items() if n.startswith(HEADS_PREFIX)]
    adapter = [p for n, p in params.items() if not n.startswith(HEADS_PREFIX)]
    return [ParamGroup("", adapter)] + ([ParamGroup("heads", heads, decays=True, leads=True)]
                                        if heads else [])


def masked_clips(model: nn.Module, dataset: Dataset, seed: int) -> MaskedClips:
    """The training items; with the clips' indices when the model caches stock outputs."""
    return MaskedClips(dataset, model.masking, seed,
                       with_clip=model.cache_stock_outputs(len(dataset)))


BEST_RQ = Objective(
    name="pretrain",
    items=masked_clips,
    groups=adapter_and_heads,
    flops=lambda model, clips, count: model_flops(model, clips, count)["total"])
