"""Tests for bestrq.features: whisper-exact batched log-mels, sharded storage, train stats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE

from bestrq.features import (
    FeatureConfig,
    compute_features,
    load_stats,
    log_mel_batch,
    num_valid_frames,
    validate,
)


def _clip(seconds: float, seed: int, amplitude: float = 0.3) -> np.ndarray:
    """A sine sweep plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 100.0 + 50.0 * seed
    sweep = np.sin(2 * np.pi * (f0 + 400.0 * t) * t)
    return (amplitude * (0.7 * sweep + 0.3 * rng.standard_normal(t.size))).astype(np.float32)


def write_segments(
    root: Path, splits: dict[str, list[float]], sample_rate: int = SAMPLE_RATE
) -> dict[str, list[np.ndarray]]:
    """Write a segment-stage folder: <split>.jsonl plus FLACs; returns the audio per split."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    audio: dict[str, list[np.ndarray]] = {}
    seed = 0
    for split, durations in splits.items():
        audio[split] = []
        with (root / f"{split}.jsonl").open("w") as f:
            for k, seconds in enumerate(durations):
                wave = _clip(seconds, seed)
                seed += 1
                rel = f"audio/{split}-{k}.flac"
                sf.write(root / rel, wave, sample_rate, subtype="PCM_16")
                # What the pipeline will read back is the 16-bit quantised signal.
                wave, _ = sf.read(root / rel, dtype="float32")
                audio[split].append(wave)
                transcript = None if k % 2 else f"{split} words {k}"
                row = {
                    "id": f"{split}-{k}",
                    "path": rel,
                    "duration": seconds,
                    "transcript": transcript,
                    "sources": ["test"],
                }
                f.write(json.dumps(row) + "\n")
    return audio


def _read_split(split_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    index = json.loads((split_dir / "index.json").read_text())
    mels = np.concatenate([np.load(split_dir / s["mel"]) for s in index["shards"]])
    frames = np.concatenate([np.load(split_dir / s["frames"]) for s in index["shards"]])
    return index, mels, frames


def _reference_mel(wave: np.ndarray, n_mels: int) -> np.ndarray:
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(wave), n_mels).numpy()


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_batch_equals_whisper_per_clip(n_mels: int) -> None:
    loud = whisper.pad_or_trim(torch.from_numpy(_clip(30.0, 1, amplitude=0.9)))
    quiet = whisper.pad_or_trim(torch.from_numpy(_clip(7.3, 2, amplitude=1e-4)))
    batch = torch.stack([loud, quiet])  # (2, N_SAMPLES)

    out = log_mel_batch(batch, n_mels)

    assert out.shape == (2, n_mels, N_FRAMES)
    assert out.dtype == torch.float32
    for k in range(2):
        expected = whisper.log_mel_spectrogram(batch[k], n_mels)
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=0)
    # The batch-wide clamp whisper would apply is genuinely different for the quiet clip.
    batch_wide = whisper.log_mel_spectrogram(batch, n_mels)
    assert (batch_wide[1] - out[1]).abs().max() > 0.1


def test_log_mel_batch_rejects_unpadded_audio() -> None:
    with pytest.raises(ValueError, match="pad_or_trim"):
        log_mel_batch(torch.zeros(2, N_SAMPLES - 1), 80)
    with pytest.raises(ValueError, match="n_mels"):
        log_mel_batch(torch.zeros(1, N_SAMPLES), 64)


def test_num_valid_frames() -> None:
    assert num_valid_frames(0) == 0
    assert num_valid_frames(HOP_LENGTH - 1) == 0
    assert num_valid_frames(HOP_LENGTH) == 1
    assert num_valid_frames(SAMPLE_RATE) == 100
    assert num_valid_frames(N_SAMPLES) == N_FRAMES
    assert num_valid_frames(2 * N_SAMPLES) == N_FRAMES


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("shard_size", -1), ("dtype", "bfloat16"), ("device", "tpu9"),
     ("store", "false")],
)
def test_validate_names_bad_parameter(field: str, value: object) -> None:
    cfg = FeatureConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        validate(cfg)


def test_compute_features_float32_matches_whisper_and_stats(tmp_path: Path) -> None:
    segments = tmp_path / "segments"
    audio = write_segments(segments, {"train": [3.0, 30.0, 1.01, 12.5], "test": [2.0, 5.5],
                                        "dev": [4.0]})
    out = tmp_path / "features"
    cfg = FeatureConfig(batch_size=3, shard_size=2, dtype="float32", device="cpu")

    result = compute_features(segments, out, 80, cfg)

    expected_frames = [num_valid_frames(len(w)) for w in audio["train"]]
    assert expected_frames == [300, 3000, 101, 1250]
    assert result["num_train_clips"] == 4
    assert result["num_test_clips"] == 2 and result["num_dev_clips"] == 1
    assert result["train_frames"] == sum(expected_frames)
    assert result["padding_fraction_train"] == pytest.approx(1 - sum(expected_frames) / 12000)
    assert result["seconds"] > 0 and result["clips_per_second"] > 0

    # Row order is kept across shards (shard_size 2 < 4 clips, batches straddle shards).
    index, mels, frames = _read_split(out / "train")
    assert [s["count"] for s in index["shards"]] == [2, 2]
    assert index["n_mels"] == 80 and index["num_frames"] == N_FRAMES
    assert index["dtype"] == "float32"
    assert index["ids"] == ["train-0", "train-1", "train-2", "train-3"]
    assert index["transcripts"] == ["train words 0", None, "train words 2", None]
    assert mels.shape == (4, 80, N_FRAMES) and mels.dtype == np.float32
    assert frames.dtype == np.int32 and frames.tolist() == expected_frames
    references = [_reference_mel(w, 80) for w in audio["train"]]
    for k, reference in enumerate(references):
        np.testing.assert_allclose(mels[k], reference, atol=1e-5, rtol=0)

    # Stats are those of the valid frames, computed directly with numpy.
    valid = np.concatenate(
        [ref[:, :n] for ref, n in zip(references, expected_frames, strict=True)], axis=1
    ).astype(np.float64)  # (n_mels, total valid frames)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_frames"] == sum(expected_frames)
    np.testing.assert_allclose(stats["mean"], valid.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(stats["std"], valid.std(axis=1), atol=1e-5)
    mean, std = load_stats(out)
    assert mean.dtype == torch.float32 and mean.shape == (80,) and std.shape == (80,)
    np.testing.assert_allclose(mean.numpy(), valid.mean(axis=1), atol=1e-5)

    # Padding frames are excluded: including them would move the statistics a lot.
    everything = np.concatenate(references, axis=1).astype(np.float64)
    assert np.abs(everything.mean(axis=1) - np.asarray(stats["mean"])).max() > 0.05

    # The test and dev splits are written too, and do not feed the statistics.
    eval_index, eval_mels, eval_frames = _read_split(out / "test")
    assert eval_index["ids"] == ["test-0", "test-1"]
    assert eval_frames.tolist() == [200, 550]
    for k, wave in enumerate(audio["test"]):
        np.testing.assert_allclose(eval_mels[k], _reference_mel(wave, 80), atol=1e-5, rtol=0)
    assert _read_split(out / "dev")[2].tolist() == [400]


def test_compute_features_float16_stats_of_stored_values(tmp_path: Path) -> None:
    segments = tmp_path / "segments"
    audio = write_segments(segments, {"train": [4.0, 0.5, 9.0]})
    out = tmp_path / "features"

    result = compute_features(segments, out, 80, FeatureConfig(batch_size=2, device="cpu"))

    assert result["num_test_clips"] == result["num_dev_clips"] == 0
    assert not (out / "test").exists() and not (out / "dev").exists()
    index, mels, frames = _read_split(out / "train")
    assert mels.dtype == np.float16 and index["dtype"] == "float16"
    assert len(index["shards"]) == 1 and index["shards"][0]["count"] == 3
    for k, wave in enumerate(audio["train"]):
        # float16 keeps ~11 bits: values within [-1.5, 2] round by at most ~1e-3.
        np.testing.assert_allclose(mels[k], _reference_mel(wave, 80), atol=2e-3, rtol=0)
    valid = np.concatenate(
        [m[:, :n].astype(np.float64) for m, n in zip(mels, frames, strict=True)], axis=1
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_frames"] == 400 + 50 + 900
    np.testing.assert_allclose(stats["mean"], valid.mean(axis=1), atol=1e-9)
    np.testing.assert_allclose(stats["std"], valid.std(axis=1), atol=1e-9)


def test_std_floored_for_constant_bins(tmp_path: Path) -> None:
    segments = tmp_path / "segments"
    (segments / "audio").mkdir(parents=True)
    # Digital silence: every bin is clamped to the same value, so the raw std is 0.
    sf.write(segments / "audio/silence.flac", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    row = {"id": "s", "path": "audio/silence.flac", "duration": 1.0, "transcript": None}
    (segments / "train.jsonl").write_text(json.dumps(row) + "\n")

    compute_features(segments, tmp_path / "out", 80, FeatureConfig(device="cpu"))

    _, std = load_stats(tmp_path / "out")
    np.testing.assert_allclose(std.numpy(), 1e-5, rtol=1e-6)


def test_bad_sample_rate_names_file(tmp_path: Path) -> None:
    segments = tmp_path / "segments"
    write_segments(segments, {"train": [1.0]}, sample_rate=8000)
    with pytest.raises(ValueError, match=r"train-0\.flac.*8000"):
        compute_features(segments, tmp_path / "out", 80, FeatureConfig(device="cpu"))


def test_stereo_rejected(tmp_path: Path) -> None:
    segments = tmp_path / "segments"
    write_segments(segments, {"train": [1.0]})
    stereo = np.zeros((SAMPLE_RATE, 2), np.float32)
    sf.write(segments / "audio/train-0.flac", stereo, SAMPLE_RATE)
    with pytest.raises(ValueError, match=r"train-0\.flac.*mono"):
        compute_features(segments, tmp_path / "out", 80, FeatureConfig(device="cpu"))


def test_bad_parameters_fail_before_any_work(tmp_path: Path) -> None:
    segments = tmp_path / "segments"
    write_segments(segments, {"train": [1.0]})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="n_mels"):
        compute_features(segments, out, 64, FeatureConfig(device="cpu"))
    with pytest.raises(ValueError, match="dtype"):
        compute_features(segments, out, 80, FeatureConfig(dtype="int8"))
    (segments / "audio/train-0.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-0\.flac"):
        compute_features(segments, out, 80, FeatureConfig(device="cpu"))
    assert not out.exists()


def test_missing_train_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        compute_features(tmp_path, tmp_path / "out", 80, FeatureConfig(device="cpu"))


def test_bad_manifest_row_names_line(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"id": "a", "path": "a.flac"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2"):
        compute_features(tmp_path, tmp_path / "out", 80, FeatureConfig(device="cpu"))


def test_a_features_run_killed_part_way_leaves_features_no_reader_accepts(tmp_path: Path,
                                                                         monkeypatch) -> None:
    # A complete run on 2 clips, then a run on 3 clips killed while writing its test split: the
    # new train index sits beside nothing of the old run's statistics, so pretraining (which
    # reads them first) stops, naming the folder, instead of training on a mix.
    import bestrq.features as features

    segments, out = tmp_path / "segments", tmp_path / "features"
    write_segments(segments, {"train": [2.0, 3.0], "test": [2.0]})
    (out / "eval").mkdir(parents=True)  # a split of the old two-split layout
    compute_features(segments, out, 80, FeatureConfig(device="cpu"))
    assert not (out / "eval").exists()  # no manifest for it: not left to be mistaken for data
    assert load_stats(out)[0].shape == (80,)
    write_segments(segments, {"train": [2.0, 3.0, 4.0], "test": [2.0]})
    real = features._write_split

    def killed(clips, split_dir, *args, **kwargs):
        if split_dir.name == "test":
            raise KeyboardInterrupt  # as a kill would stop it, after train was written
        return real(clips, split_dir, *args, **kwargs)

    monkeypatch.setattr(features, "_write_split", killed)
    with pytest.raises(KeyboardInterrupt):
        compute_features(segments, out, 80, FeatureConfig(device="cpu"))
    assert len(_read_split(out / "train")[0]["ids"]) == 3  # the new train split is there ...
    with pytest.raises(FileNotFoundError, match=r"stats.json.*incomplete.*dvc repro features"):
        load_stats(out)  # ... but not accepted

    from bestrq.params import load_params
    from stages.pretrain import run_pretrain

    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    with pytest.raises(FileNotFoundError, match=str(out)):
        run_pretrain(p, features_dir=out, adapter_path=tmp_path / "a.safetensors",
                     checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "a.safetensors").exists()
