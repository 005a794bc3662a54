"""Read back the log-mel shards written by ``bestrq.features.compute_features``."""

from __future__ import annotations

import bisect
import json
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from whisper.audio import N_FRAMES

from bestrq.features import INDEX_FILE


class FeatureDataset(Dataset):
    """One split of stored log-mels: item ``i`` is (mel float32 (n_mels, N_FRAMES), frames int64).

    ``frames`` is the number of leading mel frames that come from real audio; the rest is
    Whisper's zero-padding. Shards are memory-mapped lazily by the process that first reads,
    so each DataLoader worker opens its own maps and the corpus need not fit in RAM.
    """

    def __init__(self, split_dir: Path) -> None:
        self.split_dir = Path(split_dir)
        index_path = self.split_dir / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: feature index not found")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        try:
            self.n_mels: int = int(index["n_mels"])
            num_frames = int(index["num_frames"])
            shards = index["shards"]
            self.ids: list[str] = list(index["ids"])
            self.transcripts: list[str | None] = list(index["transcripts"])
            # Each clip's speaker or recording; indexes written before groups were kept: None.
            self.groups: list[str | None] = list(index.get("groups") or [None] * len(self.ids))
        except KeyError as e:
            raise ValueError(f"{index_path}: missing key {e}") from e
        if num_frames != N_FRAMES:
            raise ValueError(f"{index_path}: num_frames is {num_frames}, expected {N_FRAMES}")
        self._mel_paths = [self.split_dir / shard["mel"] for shard in shards]
        counts = [int(shard["count"]) for shard in shards]
        # starts[k] is the global row of shard k's first clip; bisect finds an item's shard.
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._len = self._starts[-1]
        if not (len(self.ids) == len(self.transcripts) == len(self.groups) == self._len):
            raise ValueError(
                f"{index_path}: {len(self.ids)} ids and {len(self.transcripts)} transcripts "
                f"for {self._len} rows"
            )
        # Valid-frame counts are small (4 bytes per clip): keep them in memory.
        frames = [np.load(self.split_dir / shard["frames"]) for shard in shards]
        for shard, arr in zip(shards, frames, strict=True):
            if arr.shape != (int(shard["count"]),):
                raise ValueError(
                    f"{self.split_dir / shard['frames']}: shape {arr.shape}, "
                    f"expected ({shard['count']},)"
                )
        self.num_frames: np.ndarray = (
            np.concatenate(frames).astype(np.int64) if frames else np.zeros(0, dtype=np.int64)
        )
        self._maps: list[np.ndarray | None] = [None] * len(self._mel_paths)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._len

    def _shard(self, k: int) -> np.ndarray:
        # Maps inherited through fork would share file offsets/state with the parent;
        # reopen them in any process other than the one that opened them.
        if self._pid != os.getpid():
            self._maps = [None] * len(self._mel_paths)
            self._pid = os.getpid()
        mel = self._maps[k]
        if mel is None:
            mel = np.load(self._mel_paths[k], mmap_mode="r")
            expected = (self._starts[k + 1] - self._starts[k], self.n_mels, N_FRAMES)
            if mel.shape != expected:
                raise ValueError(f"{self._mel_paths[k]}: shape {mel.shape}, expected {expected}")
            self._maps[k] = mel
        return mel

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        requested = operator.index(i)
        i = requested + self._len if requested < 0 else requested
        if not 0 <= i < self._len:
            raise IndexError(
                f"index {requested} out of range for {self._len} clips in {self.split_dir}"
            )
        k = bisect.bisect_right(self._starts, i) - 1
        row = self._shard(k)[i - self._starts[k]]  # (n_mels, N_FRAMES), storage dtype
        mel = torch.from_numpy(np.asarray(row, dtype=np.float32))  # copies out of the map
        return mel, torch.tensor(self.num_frames[i], dtype=torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        # Memmaps must not travel to workers: each process opens its own.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._mel_paths)
        return state


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items into (batch, n_mels, N_FRAMES) float32 mels and (batch,) int64 frame counts."""
    mels = torch.stack([mel for mel, _ in batch])  # (batch, n_mels, N_FRAMES)
    frames = torch.stack([frames for _, frames in batch])  # (batch,)
    return mels, frames
