"""Whisper log-mel features: batched computation, sharded storage and train-split statistics.

The segment stage writes 16 kHz mono clips of at most 30 s; this module turns them into
exactly what Whisper's encoder sees (``pad_or_trim`` to 30 s, then Whisper's own log-mel),
stored as memory-mapped ``.npy`` shards so a corpus larger than RAM can be read back lazily.
With ``store: false`` no log-mel is stored: each split's index names its clips' audio files,
and the readers (``bestrq.dataset``) compute the same values batch by batch on the model's
device; the train-split statistics are computed here all the same.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm
from whisper.audio import (
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    mel_filters,
    pad_or_trim,
)

from bestrq.atomic import atomic_write_text
from bestrq.device import resolve_device
from bestrq.jsonl import dumps, read_jsonl
from bestrq.knobs import BatchSize, Text, check, knob

SPLITS: tuple[str, ...] = ("train", "dev", "test")  # segment's
SUPPORTED_N_MELS: frozenset[int] = frozenset({80, 128})
Dtype = Literal["float16", "float32"]
SUPPORTED_DTYPES: frozenset[str] = frozenset(get_args(Dtype))
STD_EPSILON = 1e-5
MEL_SHARD = "mel-{:05d}.npy"
FRAMES_SHARD = "frames-{:05d}.npy"
INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
TORCH_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class FeatureConfig:
    batch_size: Annotated[BatchSize, knob("clips per log-mel batch")] = 16
    shard_size: Annotated[int, knob(
        "clips per memory-mapped shard file", ge=1, le=10**8)] = 2048
    dtype: Annotated[Dtype, knob(
        "storage dtype of the log-mels")] = "float16"
    device: Annotated[Text, knob("auto (cuda if available, else cpu) | cpu | cuda[:N]",
                                 speed_only=True)] = "auto"
    store: Annotated[bool, knob(
        "keep the log-mels on disk (true) or only the statistics and an index of the segments' "
        "audio, the log-mels computed again batch by batch on the training device (false)")
    ] = True


@dataclass(frozen=True)
class Clip:
    """One manifest row: the audio file to read plus what the index keeps about it."""

    id: str
    path: Path
    transcript: str | None
    group: str | None = None  # the speaker or recording (segment's split and bootstrap unit)


def validate(cfg: FeatureConfig) -> None:
    """Raise ValueError naming the offending parameter if ``cfg`` cannot work."""
    check(cfg, "features.")
    if cfg.device == "auto":
        return
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"features.device must be 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}"
        ) from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"features.device must be 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"features.device={cfg.device!r} but CUDA is not available")


def _validate_n_mels(n_mels: int) -> None:
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"n_mels must be one of {sorted(SUPPORTED_N_MELS)}, got {n_mels!r}")


def num_valid_frames(num_samples: int) -> int:
    """Mel frames that come from real audio (not padding) for a clip of ``num_samples``."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    # Whisper drops the last STFT frame, so frames 0 .. num_samples // HOP_LENGTH - 1 are
    # the ones whose centre lies inside the audio.
    return min(num_samples // HOP_LENGTH, N_FRAMES)


def log_mel_batch(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Whisper's log-mel of each 30 s clip in a batch, on the device of ``audio``.

    Equals ``whisper.log_mel_spectrogram(clip, n_mels)`` clip by clip: the dynamic-range
    clamp (max - 8) is taken per clip, not over the whole batch as whisper would do.
    """
    _validate_n_mels(n_mels)
    if audio.ndim != 2 or audio.shape[1] != N_SAMPLES:
        raise ValueError(
            f"audio must have shape (batch, {N_SAMPLES}), got {tuple(audio.shape)}; "
            "pad or trim it with whisper.pad_or_trim first"
        )
    if audio.dtype != torch.float32:
        raise ValueError(f"audio must be float32, got {audio.dtype}")
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    # (batch, n_fft // 2 + 1, N_FRAMES + 1) -> drop the last frame as whisper does
    magnitudes = stft[..., :-1].abs() ** 2  # (batch, n_freq, N_FRAMES)
    filters = mel_filters(audio.device, n_mels)  # (n_mels, n_freq)
    mel_spec = filters @ magnitudes  # (batch, n_mels, N_FRAMES)
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    clip_max = log_spec.amax(dim=(1, 2), keepdim=True)  # (batch, 1, 1)
    log_spec = torch.maximum(log_spec, clip_max - 8.0)
    return (log_spec + 4.0) / 4.0  # (batch, n_mels, N_FRAMES)


def as_stored(mel: torch.Tensor, dtype: str) -> torch.Tensor:
    """``mel`` rounded to the storage ``dtype``: the values the features hold, whether stored
    or computed again on the fly (``bestrq.dataset``)."""
    return mel.to(TORCH_DTYPES[dtype])


def read_manifest(path: Path) -> list[Clip]:
    """Parse a segment manifest (JSON lines); audio paths are resolved against its folder."""
    clips: list[Clip] = []
    for line_no, row in read_jsonl(path):
        try:
            group = row.get("group")
            clip = Clip(id=str(row["id"]), path=path.parent / row["path"],
                        transcript=row.get("transcript"),
                        group=None if group is None else str(group))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}:{line_no}: bad manifest row ({e!r})") from e
        clips.append(clip)
    return clips


def load_clip(path: Path) -> np.ndarray:
    """Read one 16 kHz mono clip as float32 (num_samples,); errors name the file."""
    try:
        audio, sample_rate = sf.read(os.fsencode(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read audio ({e})") from e
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate is {sample_rate} Hz, expected {SAMPLE_RATE} Hz")
    if audio.shape[1] != 1:
        raise ValueError(f"{path}: has {audio.shape[1]} channels, expected mono")
    return audio[:, 0]


class _RunningStats:
    """Per-mel-bin mean and variance over masked frames, merged batch by batch (Chan et al.).

    Accumulated in float64 so millions of frames do not lose precision.
    """

    def __init__(self, n_mels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(n_mels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_mels, dtype=torch.float64, device=device)

    def update(self, mel: torch.Tensor, frames: torch.Tensor) -> None:
        """Add the first ``frames[b]`` frames of each clip ``mel[b]`` (batch, n_mels, T)."""
        x = mel.to(torch.float64)  # (batch, n_mels, T)
        positions = torch.arange(x.shape[-1], device=x.device)
        mask = (positions[None, :] < frames[:, None]).to(torch.float64)[:, None, :]  # (b, 1, T)
        n_b = int(frames.sum().item())
        if n_b == 0:
            return
        mean_b = (x * mask).sum(dim=(0, 2)) / n_b  # (n_mels,)
        m2_b = (((x - mean_b[None, :, None]) ** 2) * mask).sum(dim=(0, 2))  # (n_mels,)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta**2 * (n_a * n_b / n)
        self.count = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float64 numpy arrays; std is the population std floored at epsilon."""
        if self.count == 0:
            raise ValueError("no valid frames to compute statistics from")
        var = (self.m2 / self.count).clamp(min=0.0)
        std = var.sqrt().clamp(min=STD_EPSILON)
        return self.mean.cpu().numpy(), std.cpu().numpy()


def _batches(clips: list[Clip], batch_size: int) -> Iterator[list[Clip]]:
    for start in range(0, len(clips), batch_size):
        yield clips[start : start + batch_size]


def _clear_shards(split_dir: Path) -> None:
    # A previous run with more clips may have left extra shards; they would not be in the
    # new index, but stale files next to it only confuse.
    for pattern in ("mel-*.npy", "frames-*.npy", INDEX_FILE):
        for stale in split_dir.glob(pattern):
            stale.unlink()


def _write_split(
    clips: list[Clip],
    split_dir: Path,
    n_mels: int,
    cfg: FeatureConfig,
    device: torch.device,
    pool: ThreadPoolExecutor,
    stats: _RunningStats | None,
    desc: str,
) -> int:
    """Compute and store one split (with ``cfg.store`` false: its frame counts, and the
    log-mels only for ``stats``); returns its total number of valid frames."""
    split_dir.mkdir(parents=True, exist_ok=True)
    _clear_shards(split_dir)
    storage_dtype = np.dtype(cfg.dtype)
    n = len(clips)
    shard_counts = [min(cfg.shard_size, n - s) for s in range(0, n, cfg.shard_size)]
    mel_maps: dict[int, np.memmap] = {}
    frame_arrays = [np.zeros(count, dtype=np.int32) for count in shard_counts]

    def shard_map(shard: int) -> np.memmap:
        # Open each shard on first use and flush/close the previous one, so only one
        # memmap is live at a time whatever the corpus size.
        if shard not in mel_maps:
            for old in list(mel_maps):
                mel_maps.pop(old).flush()
            mel_maps[shard] = np.lib.format.open_memmap(
                split_dir / MEL_SHARD.format(shard),
                mode="w+",
                dtype=storage_dtype,
                shape=(shard_counts[shard], n_mels, N_FRAMES),
            )
        return mel_maps[shard]

    def submit(batch: list[Clip]) -> list[Future[np.ndarray]]:
        return [pool.submit(load_clip, clip.path) for clip in batch]

    total_frames = 0
    row = 0
    batches = list(_batches(clips, cfg.batch_size))
    # Decode the next batch on worker threads while this one is on the device.
    pending = submit(batches[0]) if batches else []
    with tqdm(total=n, desc=desc, unit="clip") as progress:
        for i in range(len(batches)):
            waves = [future.result() for future in pending]
            if i + 1 < len(batches):
                pending = submit(batches[i + 1])
            frames_np = np.array([num_valid_frames(len(w)) for w in waves], dtype=np.int64)
            mel_np = None
            if cfg.store or stats is not None:
                padded = np.stack([pad_or_trim(w) for w in waves])  # (batch, N_SAMPLES)
                audio = torch.from_numpy(padded).to(device)
                with torch.no_grad():
                    # (batch, n_mels, N_FRAMES) in the storage dtype
                    mel = as_stored(log_mel_batch(audio, n_mels), cfg.dtype)
                if stats is not None:
                    # Statistics of the values as stored, i.e. what training will normalise.
                    stats.update(mel, torch.from_numpy(frames_np).to(device))
                if cfg.store:
                    mel_np = mel.cpu().numpy()
            # A batch may straddle a shard boundary: write it in contiguous pieces.
            offset = 0
            while offset < len(waves):
                shard, local = divmod(row, cfg.shard_size)
                take = min(len(waves) - offset, shard_counts[shard] - local)
                if mel_np is not None:
                    shard_map(shard)[local : local + take] = mel_np[offset : offset + take]
                frame_arrays[shard][local : local + take] = frames_np[offset : offset + take]
                offset += take
                row += take
            total_frames += int(frames_np.sum())
            progress.update(len(waves))
    for shard in list(mel_maps):
        mel_maps.pop(shard).flush()

    for shard, frames in enumerate(frame_arrays):
        np.save(split_dir / FRAMES_SHARD.format(shard), frames)
    index: dict[str, Any] = {
        "n_mels": n_mels,
        "num_frames": N_FRAMES,
        "dtype": cfg.dtype,
        "shards": [
            {"mel": MEL_SHARD.format(s), "frames": FRAMES_SHARD.format(s), "count": count}
            if cfg.store else {"frames": FRAMES_SHARD.format(s), "count": count}
            for s, count in enumerate(shard_counts)
        ],
        "ids": [clip.id for clip in clips],
        "transcripts": [clip.transcript for clip in clips],
        "groups": [clip.group for clip in clips],
    }
    if not cfg.store:
        index["store"] = False
        # Relative to the split's folder, so the project may move as a whole; abspath, not
        # resolve: segment files may be links into DVC's cache, whose names are not theirs.
        here = os.path.abspath(split_dir)
        index["audio"] = [Path(os.path.relpath(os.path.abspath(clip.path), here)).as_posix()
                          for clip in clips]
    # The index is written last: its presence marks a complete split.
    (split_dir / INDEX_FILE).write_text(dumps(index), encoding="utf-8")
    return total_frames


def compute_features(
    segments_dir: Path, out_dir: Path, n_mels: int, cfg: FeatureConfig
) -> dict[str, float]:
    """Write log-mel shards for each split present and the train-split statistics.

    Layout: ``out_dir/<split>/{mel,frames}-NNNNN.npy`` + ``index.json``, and
    ``out_dir/stats.json`` with per-mel-bin mean/std over the train split's valid frames.
    With ``cfg.store`` false, no ``mel-*.npy``: the index has ``"store": false`` and the
    clips' audio files (``"audio"``, relative to the split's folder), from which the readers
    compute the log-mels on the fly.
    Returns run statistics (clip counts, frames, padding share, timing).
    """
    validate(cfg)
    _validate_n_mels(n_mels)
    segments_dir, out_dir = Path(segments_dir), Path(out_dir)
    manifests = {split: segments_dir / f"{split}.jsonl" for split in SPLITS}
    if not manifests["train"].is_file():
        raise FileNotFoundError(f"{manifests['train']}: train manifest not found")
    # Parse every manifest and check every file exists before computing anything.
    splits = {split: read_manifest(path) for split, path in manifests.items() if path.is_file()}
    if not splits["train"]:
        raise ValueError(f"{manifests['train']}: train manifest has no clips")
    for split, clips in splits.items():
        for clip in clips:
            if not clip.path.is_file():
                raise FileNotFoundError(
                    f"{clip.path}: audio file of {split} clip {clip.id!r} not found"
                )

    # stats.json is written last, atomically: while it is absent the features are incomplete
    # (a run killed part-way), and every reader of them stops (load_stats). Splits of an earlier
    # run that this one has no manifest for are removed, not left to be mistaken for its own.
    (out_dir / STATS_FILE).unlink(missing_ok=True)
    for split in SPLITS + ("eval",):  # "eval": the two-split layout of earlier versions
        if split not in splits and (out_dir / split).is_dir():
            shutil.rmtree(out_dir / split)
    device = resolve_device(cfg.device)
    stats = _RunningStats(n_mels, device)
    start = time.perf_counter()
    frames_per_split: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for split, clips in splits.items():
            frames_per_split[split] = _write_split(
                clips,
                out_dir / split,
                n_mels,
                cfg,
                device,
                pool,
                stats if split == "train" else None,
                desc=f"log-mel {split}" if cfg.store or split == "train" else f"index {split}",
            )
    seconds = time.perf_counter() - start

    mean, std = stats.result()
    stats_json = {"mean": mean.tolist(), "std": std.tolist(), "num_frames": stats.count}
    atomic_write_text(out_dir / STATS_FILE, json.dumps(stats_json))

    num_train = len(splits["train"])
    train_frames = frames_per_split["train"]
    return {
        **{f"num_{split}_clips": len(splits.get(split, [])) for split in SPLITS},
        "train_frames": train_frames,
        "padding_fraction_train": 1.0 - train_frames / (num_train * N_FRAMES),
        "seconds": seconds,
        "clips_per_second": sum(map(len, splits.values())) / max(seconds, 1e-9),
    }


def load_stats(features_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 (n_mels,) from ``features_dir/stats.json``."""
    path = Path(features_dir) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature statistics not found: the features in "
                                f"{path.parent} are missing or incomplete (a features run that "
                                "did not finish); run `dvc repro features`")
    data = json.loads(path.read_text(encoding="utf-8"))
    mean = torch.tensor(data["mean"], dtype=torch.float32)
    std = torch.tensor(data["std"], dtype=torch.float32)
    if mean.shape != std.shape or mean.ndim != 1:
        raise ValueError(f"{path}: mean and std must be 1-D of equal length")
    return mean, std
