"""Read back the features written by ``bestrq.features.compute_features``: the stored log-mel
shards, or (``features.store: false``) the clips' audio, whose log-mels `as_mel` computes batch
by batch on the model's device with the same values (see `FeatureDataset`)."""

from __future__ import annotations

import bisect
import json
import operator
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from whisper.audio import N_FRAMES, pad_or_trim

from bestrq.features import (
    INDEX_FILE,
    TORCH_DTYPES,
    as_stored,
    load_clip,
    log_mel_batch,
    num_valid_frames,
)


class FeatureDataset(Dataset):
    """One split of features: item ``i`` is (window, frames int64).

    With stored log-mels the window is the clip's log-mel, float32 (n_mels, N_FRAMES).
    Computed on the fly (the index says ``"store": false``) it is the clip's audio padded or
    trimmed to 30 s as the features stage does, float32 (N_SAMPLES,): reading it is all a
    DataLoader worker does, and `log_mel` (or `as_mel`, through wrapping datasets) turns a
    batch of them into the same log-mels on the device the batch is on.

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
            self.dtype: str = str(index["dtype"])
            self.stored: bool = bool(index.get("store", True))
            self._audio = [] if self.stored else [self.split_dir / a for a in index["audio"]]
        except KeyError as e:
            raise ValueError(f"{index_path}: missing key {e}") from e
        if num_frames != N_FRAMES:
            raise ValueError(f"{index_path}: num_frames is {num_frames}, expected {N_FRAMES}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"{index_path}: dtype {self.dtype!r}, expected one of "
                             f"{sorted(TORCH_DTYPES)}")
        self._mel_paths = [self.split_dir / shard["mel"] for shard in shards] if self.stored \
            else []
        counts = [int(shard["count"]) for shard in shards]
        # starts[k] is the global row of shard k's first clip; bisect finds an item's shard.
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._len = self._starts[-1]
        if not self.stored and len(self._audio) != self._len:
            raise ValueError(f"{index_path}: {len(self._audio)} audio files for {self._len} rows")
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
        frames = torch.tensor(self.num_frames[i], dtype=torch.int64)
        if not self.stored:
            return self._window(i), frames
        k = bisect.bisect_right(self._starts, i) - 1
        row = self._shard(k)[i - self._starts[k]]  # (n_mels, N_FRAMES), storage dtype
        mel = torch.from_numpy(np.asarray(row, dtype=np.float32))  # copies out of the map
        return mel, frames

    def _window(self, i: int) -> Tensor:
        """Clip i's audio as the features stage reads it, padded to 30 s: (N_SAMPLES,)."""
        wave = load_clip(self._audio[i])
        if num_valid_frames(len(wave)) != self.num_frames[i]:
            raise ValueError(f"{self._audio[i]}: {len(wave)} samples, but the features index "
                             f"{self.split_dir / INDEX_FILE} counted {self.num_frames[i]} "
                             "frames: the segments changed; run `dvc repro features`")
        return torch.from_numpy(pad_or_trim(wave))  # (N_SAMPLES,) float32

    def log_mel(self, windows: Tensor) -> Tensor:
        """The log-mels (batch, n_mels, N_FRAMES) float32 of a batch of this split's windows,
        on their device: as stored (float32 again, as `__getitem__` widens them), or computed
        from audio windows (batch, N_SAMPLES) as the features stage computes and stores them:
        Whisper's log-mel in float32, autocast off, rounded to the storage dtype."""
        if self.stored:
            return windows
        with torch.no_grad(), torch.autocast(windows.device.type, enabled=False):
            return as_stored(log_mel_batch(windows, self.n_mels), self.dtype).float()

    def mel_shape(self) -> tuple[int, int]:
        """(n_mels, frames) of an item's log-mel, whether stored or made on the fly."""
        return self.n_mels, N_FRAMES

    def __getstate__(self) -> dict[str, Any]:
        # Memmaps must not travel to workers: each process opens its own.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._mel_paths)
        return state


def feature_split(dataset: Dataset) -> FeatureDataset | None:
    """The FeatureDataset under ``dataset``, found through the datasets that wrap it and keep
    it as ``.dataset`` (torch's Subset, MaskedClips, LabelledClips, ByClip); None if none."""
    while not isinstance(dataset, FeatureDataset):
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return dataset


def mel_maker(dataset: Dataset) -> Callable[[Tensor], Tensor] | None:
    """What turns a batch of ``dataset``'s windows (its first tensor), once on the model's
    device, into log-mels: None when they are log-mels already (stored, or not a feature
    split), so that the stored path runs exactly as it did."""
    split = feature_split(dataset)
    return None if split is None or split.stored else split.log_mel


def as_mel(windows: Tensor, dataset: Dataset) -> Tensor:
    """A batch of ``dataset``'s windows as log-mels (batch, n_mels, N_FRAMES), on their device."""
    make = mel_maker(dataset)
    return windows if make is None else make(windows)


def mel_shape(dataset: Dataset, window: Tensor) -> tuple[int, int]:
    """(n_mels, frames) of the log-mel of ``window``, an item of ``dataset``: its own shape
    when it is a log-mel, the feature split's when it is audio to be made one on the device."""
    if window.ndim == 2:
        return int(window.shape[0]), int(window.shape[1])
    split = feature_split(dataset)
    if split is None:
        raise ValueError(f"a window of shape {tuple(window.shape)} is no log-mel, and no "
                         "feature split under the dataset says what its log-mel would be")
    return split.mel_shape()


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items into (batch, n_mels, N_FRAMES) float32 mels and (batch,) int64 frame counts."""
    mels = torch.stack([mel for mel, _ in batch])  # (batch, n_mels, N_FRAMES)
    frames = torch.stack([frames for _, frames in batch])  # (batch,)
    return mels, frames
