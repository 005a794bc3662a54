"""features.store: false (issue 34 item 3): no log-mels on disk, the loaders read the segments'
audio and the log-mel is computed on the model's device, batch by batch. These tests hold it to
the stored path: the same statistics, and the same batches through the real training,
evaluation and decoding paths (on one device the two paths give exactly equal numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader
from whisper.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE

from bestrq.asr import AsrConfig, transcribe
from bestrq.batching import DataPosition, GlobalBatchSampler
from bestrq.dataset import FeatureDataset, as_mel, mel_maker, mel_shape
from bestrq.evaluate import EvaluateConfig, evaluate_adapter, probe_encoders
from bestrq.features import FeatureConfig, compute_features, load_stats
from bestrq.finetune import FINETUNE, FinetuneModel, LabelledClips, tokenizer_for
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.pretraining import BEST_RQ, MaskedClips
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.train import TrainConfig, train
from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint
from tests.test_features import write_segments

CPU = torch.device("cpu")
# Clips shorter and longer than a window (31 s is trimmed), and a batch straddling shards.
SPLITS = {"train": [3.0, 30.0, 1.01, 12.5, 31.0, 7.25], "dev": [4.0, 2.5], "test": [2.0, 5.5]}


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One segments folder, featurised twice: data/stored (store true), data/fly (false)."""
    root = tmp_path_factory.mktemp("on_the_fly")
    write_segments(root / "segments", SPLITS)
    for name, store in (("stored", True), ("fly", False)):
        cfg = FeatureConfig(batch_size=4, shard_size=4, device="cpu", store=store)
        compute_features(root / "segments", root / name, 80, cfg)
    return root


def splits(root: Path, split: str) -> tuple[FeatureDataset, FeatureDataset]:
    return FeatureDataset(root / "stored" / split), FeatureDataset(root / "fly" / split)


def test_store_false_writes_statistics_and_an_index_of_the_audio(both: Path) -> None:
    stored, fly = both / "stored", both / "fly"
    # The statistics are those of the stored values, byte for byte.
    assert (fly / "stats.json").read_bytes() == (stored / "stats.json").read_bytes()
    for split, durations in SPLITS.items():
        assert not list((fly / split).glob("mel-*.npy"))
        assert list((stored / split).glob("mel-*.npy"))
        index = json.loads((fly / split / "index.json").read_text())
        assert index["store"] is False
        # Paths relative to the split's folder, to the segments' own files.
        assert index["audio"] == [f"../../segments/audio/{split}-{k}.flac"
                                  for k in range(len(durations))]
        assert "store" not in json.loads((stored / split / "index.json").read_text())
        s, f = splits(both, split)
        assert (s.ids, s.transcripts, s.groups) == (f.ids, f.transcripts, f.groups)
        np.testing.assert_array_equal(s.num_frames, f.num_frames)
        assert f.stored is False and s.stored is True
    # The loader's items are the audio, padded or trimmed to 30 s: no log-mel in the workers.
    window, frames = splits(both, "train")[1][4]
    assert window.shape == (N_SAMPLES,) and window.dtype == torch.float32
    assert int(frames) == N_FRAMES


def test_on_the_fly_mels_equal_the_stored_float16_mels(both: Path) -> None:
    for split in SPLITS:
        stored, fly = splits(both, split)
        mels = torch.stack([stored[i][0] for i in range(len(stored))])
        windows = torch.stack([fly[i][0] for i in range(len(fly))])  # (clips, N_SAMPLES)
        made = as_mel(windows, fly)  # (clips, 80, N_FRAMES)
        assert made.dtype == torch.float32 and made.shape == mels.shape
        # Exactly: the same function on the same device, rounded to float16 alike.
        assert torch.equal(made, mels)
        assert torch.equal(made, made.half().float())  # really float16 values
    # The stored path is left exactly as it was: no transform at all.
    assert mel_maker(stored) is None and as_mel(mels, stored) is mels


def test_training_batches_through_the_loader_workers_are_the_same(both: Path) -> None:
    stored, fly = splits(both, "train")
    masking = MaskingConfig(mask_prob=0.05)

    def batches(dataset: FeatureDataset) -> list[tuple[torch.Tensor, ...]]:
        sampler = GlobalBatchSampler(len(dataset), 4, 1, 1, 0, 7, DataPosition())
        loader = DataLoader(MaskedClips(dataset, masking, 7), batch_sampler=sampler,
                            num_workers=2, multiprocessing_context="fork")
        out, it = [], iter(loader)
        for _ in range(3):  # more than an epoch of 6 clips
            out.append(next(it))
        del it
        return out

    to_mel = mel_maker(MaskedClips(fly, masking, 7))  # found through the wrapper
    assert to_mel is not None
    for a, b in zip(batches(stored), batches(fly), strict=True):
        assert b[0].shape == (4, N_SAMPLES)
        assert torch.equal(to_mel(b[0]), a[0])
        for x, y in zip(a[1:], b[1:], strict=True):  # frames, masks and noise
            assert torch.equal(x, y)


def bestrq_model(root: Path) -> BestRQModel:
    mean, std = load_stats(root / "stored")
    quantizer = RandomProjectionQuantizer(QuantizerConfig(codebook_size=32), mean, std)
    return BestRQModel(random_whisper(TINY_TEST_DIMS, seed=0).encoder, quantizer,
                       MaskingConfig(mask_prob=0.05), distill_weight=1.0)


def test_pretraining_on_the_fly_trains_the_same_adapter(both: Path, tmp_path: Path) -> None:
    config = TrainConfig(batch_size=2, accumulate_gradients=2, max_steps=2, warmup_steps=1,
                         checkpoint_every=2, num_workers=1, precision="fp32", device="cpu")
    trained = {}
    for name, dataset in zip(("stored", "fly"), splits(both, "train"), strict=True):
        model = bestrq_model(both)
        result = train(model, dataset, config, tmp_path / name, objective=BEST_RQ)
        assert result.step == 2
        trained[name] = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}
    start = bestrq_model(both).trainable_parameters()
    assert any(not torch.equal(trained["fly"][k], start[k]) for k in start)  # it trained
    for key, value in trained["stored"].items():
        assert torch.equal(trained["fly"][key], value), key


def test_finetuning_on_the_fly_trains_the_same_adapter(both: Path, tmp_path: Path) -> None:
    config = TrainConfig(batch_size=2, max_steps=2, warmup_steps=1, checkpoint_every=2,
                         num_workers=0, precision="fp32", device="cpu", learning_rate=1e-2)
    trained = {}
    for name, split in zip(("stored", "fly"), splits(both, "train"), strict=True):
        stock = random_whisper(TINY_TEST_DIMS, seed=0)
        data = LabelledClips(split, [0, 2, 4], tokenizer_for(stock, "en"), 8)
        model = FinetuneModel(stock)
        train(model, data, config, tmp_path / name, objective=FINETUNE)
        trained[name] = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}
    for key, value in trained["stored"].items():
        assert torch.equal(trained["fly"][key], value), key


def test_evaluation_and_decoding_batches_are_the_same(both: Path) -> None:
    model = bestrq_model(both)
    config = EvaluateConfig(batch_size=3, seed=5, num_workers=1)
    found = {}
    for name in ("stored", "fly"):
        train_split = FeatureDataset(both / name / "train")
        dev = FeatureDataset(both / name / "dev")
        found[name] = {**evaluate_adapter(model, dev, train_split, config, CPU, progress=False),
                       **probe_encoders(model, dev, EvaluateConfig(batch_size=2, max_clips=2),
                                        CPU, progress=False)}
    assert found["fly"] == found["stored"]
    assert found["fly"]["adapted/masked_targets"] > 0

    stock = random_whisper(TINY_TEST_DIMS, seed=0)
    texts = {name: transcribe(stock, FeatureDataset(both / name / "test"), [0, 1],
                              AsrConfig(batch_size=2, decoding="greedy"), CPU)
             for name in ("stored", "fly")}
    assert texts["fly"] == texts["stored"]


def test_mel_shape_of_audio_windows_comes_from_the_split(both: Path) -> None:
    stored, fly = splits(both, "dev")
    assert mel_shape(fly, fly[0][0]) == (80, N_FRAMES) == mel_shape(stored, stored[0][0])
    with pytest.raises(ValueError, match="no log-mel"):
        mel_shape([], torch.zeros(N_SAMPLES))


def test_segments_changed_after_features_are_named(tmp_path: Path) -> None:
    write_segments(tmp_path / "segments", {"train": [3.0, 4.0]})
    compute_features(tmp_path / "segments", tmp_path / "features", 80,
                     FeatureConfig(device="cpu", store=False))
    split = FeatureDataset(tmp_path / "features" / "train")
    assert split[1][1] == 400
    sf.write(tmp_path / "segments" / "audio" / "train-1.flac", np.zeros(SAMPLE_RATE, np.float32),
             SAMPLE_RATE)
    with pytest.raises(ValueError, match="train-1.flac.*16000 samples.*400 frames.*features"):
        split[1]


def test_store_false_then_true_leaves_no_stale_files(tmp_path: Path) -> None:
    write_segments(tmp_path / "segments", {"train": [3.0]})
    out = tmp_path / "features"
    compute_features(tmp_path / "segments", out, 80, FeatureConfig(device="cpu"))
    assert list((out / "train").glob("mel-*.npy"))
    compute_features(tmp_path / "segments", out, 80, FeatureConfig(device="cpu", store=False))
    assert not list((out / "train").glob("mel-*.npy"))  # a stale shard would only confuse
    assert FeatureDataset(out / "train")[0][0].shape == (N_SAMPLES,)


@pytest.mark.slow
def test_dvc_repro_trains_with_log_mels_on_the_fly(tmp_path: Path) -> None:
    from tests.test_pipeline import SMALL, make_project, ran_stages, run

    project = make_project(tmp_path, "w.pt", {**SMALL, "features": {"store": False}})
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), project / "w.pt")
    out = run(["dvc", "repro"], project)
    assert {"features", "pretrain", "evaluate", "finetune", "report"} <= ran_stages(out)
    features = project / "data" / "features"
    assert not list(features.rglob("mel-*.npy")) and (features / "stats.json").is_file()
    assert json.loads((features / "train" / "index.json").read_text())["store"] is False
    info = json.loads((project / "data" / "adapters" / "adapter.json").read_text())
    assert info["step"] == 2
    evaluation = json.loads((project / "dvclive" / "evaluate" / "metrics.json").read_text())
    assert set(evaluation) == {"test", "dev"}
    assert 0.0 < evaluation["test"]["adapted"]["mask_fraction"] < 1.0
    assert "wer" in evaluation["test"]["adapted"]
    # Both fine-tunes trained on the on-the-fly log-mels and decoded test with them.
    finetune = json.loads((project / "dvclive" / "finetune" / "metrics.json").read_text())
    assert finetune["labelled_clips"] >= 1 and finetune["steps"] == 2
    assert "wer" in finetune["test"]["adapted"] and "wer" in finetune["test"]["stock"]
