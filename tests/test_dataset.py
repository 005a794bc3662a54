"""Tests for bestrq.dataset: reading back the shards written by compute_features."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper
from torch.utils.data import DataLoader
from whisper.audio import N_FRAMES, SAMPLE_RATE

from bestrq.dataset import FeatureDataset, collate
from bestrq.features import FeatureConfig, compute_features

DURATIONS = [2.0, 0.7, 30.0, 5.25, 1.5]


def _write_segments(root: Path, durations: list[float]) -> list[np.ndarray]:
    """A train split of noise clips of the given lengths; returns the audio as read back."""
    (root / "audio").mkdir(parents=True)
    rng = np.random.default_rng(0)
    waves = []
    with (root / "train.jsonl").open("w") as f:
        for k, seconds in enumerate(durations):
            wave = (0.2 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
            sf.write(root / f"audio/{k}.flac", wave, SAMPLE_RATE)
            waves.append(sf.read(root / f"audio/{k}.flac", dtype="float32")[0])
            row = {
                "id": f"clip-{k}",
                "path": f"audio/{k}.flac",
                "duration": seconds,
                "transcript": f"text {k}" if k != 1 else None,
                "sources": [],
            }
            f.write(json.dumps(row) + "\n")
    return waves


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("dataset")
    waves = _write_segments(root / "segments", DURATIONS)
    # shard_size 2 with 5 clips: shards of 2, 2, 1 rows.
    cfg = FeatureConfig(batch_size=2, shard_size=2, dtype="float16", device="cpu")
    compute_features(root / "segments", root / "features", 80, cfg)
    return root / "features" / "train", waves


def _stored_rows(split_dir: Path) -> np.ndarray:
    index = json.loads((split_dir / "index.json").read_text())
    return np.concatenate([np.load(split_dir / s["mel"]) for s in index["shards"]])


def test_length_metadata_and_values(features: tuple[Path, list[np.ndarray]]) -> None:
    split_dir, waves = features
    ds = FeatureDataset(split_dir)

    assert len(ds) == 5
    assert ds.n_mels == 80
    assert ds.ids == [f"clip-{k}" for k in range(5)]
    assert ds.transcripts == ["text 0", None, "text 2", "text 3", "text 4"]
    stored = _stored_rows(split_dir)
    # Items 1, 2 and 4 sit in shards 0, 1 and 2: rows are found across shard boundaries.
    for i in range(len(ds)):
        mel, frames = ds[i]
        assert mel.shape == (80, N_FRAMES) and mel.dtype == torch.float32
        assert frames.dtype == torch.int64 and frames.ndim == 0
        assert int(frames) == len(waves[i]) // 160
        # Exactly the stored float16 values, widened to float32.
        np.testing.assert_array_equal(mel.numpy(), stored[i].astype(np.float32))
        # And whisper's own features up to float16 rounding.
        reference = whisper.log_mel_spectrogram(whisper.pad_or_trim(waves[i]), 80).numpy()
        np.testing.assert_allclose(mel.numpy(), reference, atol=2e-3, rtol=0)
    np.testing.assert_array_equal(ds[-1][0].numpy(), ds[4][0].numpy())


def test_index_out_of_range(features: tuple[Path, list[np.ndarray]]) -> None:
    ds = FeatureDataset(features[0])
    with pytest.raises(IndexError, match="5"):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]


def test_pickles_without_open_maps(features: tuple[Path, list[np.ndarray]]) -> None:
    ds = FeatureDataset(features[0])
    expected = ds[3][0]  # opens a map in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert all(m is None for m in clone._maps)
    torch.testing.assert_close(clone[3][0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_with_workers(features: tuple[Path, list[np.ndarray]], context: str) -> None:
    split_dir, _ = features
    ds = FeatureDataset(split_dir)
    ds[0]  # a map opened in the parent must not leak into the workers
    loader = DataLoader(
        ds, batch_size=2, num_workers=2, collate_fn=collate, multiprocessing_context=context
    )

    batches = list(loader)

    assert [tuple(b[0].shape) for b in batches] == [(2, 80, N_FRAMES)] * 2 + [(1, 80, N_FRAMES)]
    mels = torch.cat([b[0] for b in batches])
    frames = torch.cat([b[1] for b in batches])
    assert mels.dtype == torch.float32 and frames.dtype == torch.int64
    np.testing.assert_array_equal(mels.numpy(), _stored_rows(split_dir).astype(np.float32))
    assert frames.tolist() == [int(round(d * 100)) for d in DURATIONS]


def test_collate_shapes() -> None:
    items = [(torch.full((80, N_FRAMES), float(k)), torch.tensor(k + 10)) for k in range(3)]
    mels, frames = collate(items)
    assert mels.shape == (3, 80, N_FRAMES)
    assert frames.tolist() == [10, 11, 12] and frames.dtype == torch.int64
    assert mels[:, 0, 0].tolist() == [0.0, 1.0, 2.0]


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        FeatureDataset(tmp_path)
