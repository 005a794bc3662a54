"""Global batches that do not depend on how they are split: the clip order of an epoch is a
permutation seeded by (seed, epoch), every optimiser update takes the next global batch of
batch_size * accumulate_gradients * world_size (epoch, clip) keys of that order, and rank r's
micro-batch m is a fixed slice of it. A `DataPosition` says where the next global batch starts,
so a resumed run reads the same keys as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Sampler

from bestrq.seeding import ORDER_STREAM, generator


def epoch_order(num_clips: int, seed: int, epoch: int) -> Tensor:
    """The global clip order of `epoch`: a permutation (num_clips,) seeded by (seed, epoch)."""
    return torch.randperm(num_clips, generator=generator(seed, epoch, ORDER_STREAM))


@dataclass
class DataPosition:
    """Where the next global batch starts: epoch and clips of that epoch already consumed."""
    epoch: int = 0
    position: int = 0


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless micro-batches of (epoch, clip) keys for one rank, from a data position on.

    Global batch g of an epoch covers order[g * G:(g + 1) * G] with G = batch * accumulate *
    world; its micro-batch m of rank r is the slice starting at (m * world + r) * batch. An
    epoch's tail shorter than G is dropped so that every update sees a full global batch.

    A dataset of fewer than G clips is cycled within an update instead: the clip orders of
    consecutive epochs are read as one stream and each global batch takes the next G keys of
    it, so a clip recurs about G / N times per update, each time as another (epoch, clip) key
    (another mask); `epochs_per_update` says how many.
    """

    def __init__(self, num_clips: int, batch_size: int, accumulate: int, world_size: int,
                 rank: int, seed: int, start: DataPosition) -> None:
        if num_clips < 1:
            raise ValueError("the dataset has no clips")
        self.num_clips, self.batch_size, self.accumulate = num_clips, batch_size, accumulate
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_batch = batch_size * accumulate * world_size
        self.cycles = num_clips < self.global_batch
        self.start = self.normalise(start)

    @property
    def epochs_per_update(self) -> float:
        return self.global_batch / self.num_clips

    def normalise(self, pos: DataPosition) -> DataPosition:
        if self.cycles:
            extra, position = divmod(pos.position, self.num_clips)
            return DataPosition(pos.epoch + extra, position)
        if pos.position + self.global_batch > self.num_clips:
            return DataPosition(pos.epoch + 1, 0)
        return pos

    def advance(self, pos: DataPosition) -> DataPosition:
        """The position after one global batch."""
        return self.normalise(DataPosition(pos.epoch, pos.position + self.global_batch))

    def _keys(self, pos: DataPosition, first: int, count: int,
              orders: dict[int, Tensor]) -> list[tuple[int, int]]:
        """`count` keys of the stream from `first` places after `pos`."""
        keys = []
        for offset in range(pos.position + first, pos.position + first + count):
            epoch, index = pos.epoch + offset // self.num_clips, offset % self.num_clips
            if epoch not in orders:
                orders[epoch] = epoch_order(self.num_clips, self.seed, epoch)
            keys.append((epoch, int(orders[epoch][index])))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pos = self.start
        orders: dict[int, Tensor] = {}
        while True:
            for epoch in [e for e in orders if e < pos.epoch]:
                del orders[epoch]
            for m in range(self.accumulate):
                first = (m * self.world_size + self.rank) * self.batch_size
                yield self._keys(pos, first, self.batch_size, orders)
            pos = self.advance(pos)
