"""BEST-RQ evaluation: metrics against a hand computation and against the label prior."""

import math

import pytest
import torch
from torch.utils.data import Dataset

from bestrq.evaluate import (
    EvaluateConfig,
    bestrq_metrics,
    evaluate_adapter,
    heldout_tracker,
    label_counts,
    prior_metrics,
    train_label_counts,
)
from bestrq.masking import MaskingConfig, target_valid
from bestrq.model import BestRQModel
from bestrq.pretraining import MaskedClips, clip_seed
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer


class Clips(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.mel = torch.randn(n, 80, 3000, generator=g) * 0.5
        self.frames = torch.tensor([3000 - 300 * i for i in range(n)])

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        return self.mel[i], self.frames[i]


def make_model(whisper_model, num_codebooks=2):
    q = RandomProjectionQuantizer(QuantizerConfig(num_codebooks=num_codebooks, codebook_size=32))
    return BestRQModel(whisper_model.encoder, q, MaskingConfig(mask_prob=0.03))


def test_metrics_equal_hand_computation(tiny_whisper):
    model = make_model(tiny_whisper)
    data = Clips(3)
    cfg = EvaluateConfig(batch_size=2, seed=5)
    got = bestrq_metrics(model, data, cfg, torch.device("cpu"), progress=False)
    clips = MaskedClips(data, model.masking, cfg.seed)
    items = [clips[(0, i)] for i in range(3)]
    assert torch.equal(items[1][2], MaskedClips(data, model.masking, 5)[(0, 1)][2])
    mel, frames, mask, noise = (torch.stack([it[k] for it in items]) for k in range(4))
    with torch.no_grad():
        out = model(mel, frames, mask, noise)
    # one batch of all three clips gives the same loss as the masked-count-weighted batches
    assert abs(got["loss"] - out.loss.item()) < 1e-4
    assert got["masked_targets"] == out.num_masked
    assert abs(got["mask_fraction"] - out.metrics["mask_fraction"]) < 1e-9
    assert abs(got["accuracy"] - out.metrics["accuracy"]) < 1e-6
    assert abs(got["accuracy_cb1"] - out.metrics["accuracy_cb1"]) < 1e-6
    assert clip_seed(5, 0, 1) != clip_seed(5, 0, 2)


def test_prior_metrics_equal_hand_computation():
    train = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])  # (N=2, K=3)
    evals = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])  # 3 masked targets per codebook
    got = prior_metrics(train, evals)
    # add-one smoothing: codebook 0 -> (4, 2, 1) / 7, codebook 1 -> (1, 1, 6) / 8
    p0, p1 = [4 / 7, 2 / 7, 1 / 7], [1 / 8, 1 / 8, 6 / 8]
    loss = -(2 * math.log(p0[0]) + math.log(p0[2])
             + math.log(p1[0]) + math.log(p1[1]) + math.log(p1[2])) / 6
    assert got["loss"] == pytest.approx(loss, rel=1e-12)
    assert got["accuracy"] == 3 / 6  # label 0 right twice in codebook 0, label 2 once in 1
    entropy = [-sum(p * math.log(p) for p in ps) for ps in (p0, p1)]
    assert got["train_entropy"] == pytest.approx(sum(entropy) / 2, rel=1e-12)
    # Ties go to the lowest label; a train label never seen keeps probability 1 / (T + K).
    tie = prior_metrics(torch.tensor([[2.0, 2.0, 0.0]]), torch.tensor([[1.0, 3.0, 1.0]]))
    assert tie["accuracy"] == 1 / 5
    assert tie["loss"] == pytest.approx(-(4 * math.log(3 / 7) + math.log(1 / 7)) / 5)


def test_label_counts_count_each_codebook():
    labels = torch.tensor([[0, 2], [1, 2], [0, 0], [3, 2]])  # (targets, N=2)
    assert label_counts(labels, 4).tolist() == [[2, 1, 0, 1], [1, 0, 3, 0]]


def test_prior_from_the_eval_clips_scores_their_label_frequencies(tiny_whisper):
    # Every valid frame masked and the train split = the eval split: the prior's accuracy is
    # the frequency of the most common label among the masked targets, its loss the smoothed
    # cross-entropy of those targets' own label distribution.
    q = RandomProjectionQuantizer(QuantizerConfig(num_codebooks=2, codebook_size=8))
    model = BestRQModel(tiny_whisper.encoder, q, MaskingConfig(mask_prob=1.0, mask_span_ms=10))
    data = Clips(3)  # 3000, 2700 and 2400 valid frames
    cfg = EvaluateConfig(batch_size=2)
    labels = q(q.label_input(data.mel, data.frames))  # (3, N, 1500)
    valid = target_valid(data.frames, 1500, 2)  # (3, 1500)
    counts = torch.stack([torch.bincount(labels[:, i][valid], minlength=8) for i in range(2)])
    assert torch.equal(train_label_counts(model, data, cfg, torch.device("cpu"), False),
                       counts.double())
    got = evaluate_adapter(model, data, data, cfg, torch.device("cpu"), progress=False)
    total = 1500 + 1350 + 1200
    assert got["adapted/masked_targets"] == total and got["adapted/mask_fraction"] == 1.0
    assert got["prior/accuracy"] == pytest.approx(float(counts.max(-1).values.sum()) / (2 * total))
    smoothed = (counts + 1.0) / (total + 8)  # (N, K)
    assert got["prior/loss"] == pytest.approx(float(-(counts * smoothed.log()).sum()) / (2 * total))
    assert got["prior/train_entropy"] == pytest.approx(
        float(-(smoothed * smoothed.log()).sum(-1).mean()))
    assert got["delta/loss_vs_prior"] == got["adapted/loss"] - got["prior/loss"]
    assert got["delta/accuracy_vs_prior"] == got["adapted/accuracy"] - got["prior/accuracy"]
    assert not any(k.startswith("stock/") or "chance" in k for k in got)


class Patterns(Dataset):
    """Clips that each hold one of a few fixed spectra (plus slight noise) for all 30 s: a
    masked target's label is told by the rest of its clip, not only by label frequencies."""

    def __init__(self, n: int, seed: int, patterns: int = 4) -> None:
        spectra = torch.randn(patterns, 80, 1, generator=torch.Generator().manual_seed(100))
        noise = torch.randn(n, 80, 3000, generator=torch.Generator().manual_seed(seed))
        self.mel = spectra[torch.arange(n) % patterns] + 0.01 * noise  # (n, 80, 3000)

    def __len__(self) -> int:
        return self.mel.shape[0]

    def __getitem__(self, i: int):
        return self.mel[i], torch.tensor(3000)


def test_trained_heads_beat_the_label_prior_on_held_out_clips(tiny_whisper):
    # Global statistics: per-utterance ones would remove each clip's constant spectrum, the
    # only thing these clips hold besides noise.
    q = RandomProjectionQuantizer(QuantizerConfig(codebook_size=16, quantizer_norm="global"))
    model = BestRQModel(tiny_whisper.encoder, q, MaskingConfig(mask_prob=0.01, mask_span_ms=100))
    train, held_out = Patterns(8, seed=1), Patterns(4, seed=2)
    cfg, cpu = EvaluateConfig(batch_size=4, seed=3), torch.device("cpu")
    before = evaluate_adapter(model, held_out, train, cfg, cpu, progress=False)
    # Random heads know less than the label frequencies.
    assert before["delta/loss_vs_prior"] > 0.5 and before["delta/accuracy_vs_prior"] < 0.0
    assert before["prior/loss"] < math.log(16) - 1.0  # far below the uniform log K

    # Train the heads on the train clips' masked targets, encoder frozen (a linear probe).
    with torch.no_grad():
        x, labels, loss_mask, _ = model.make_inputs(
            train.mel, torch.full((8,), 3000), generator=torch.Generator().manual_seed(0))
        h = model.encode(x)  # (8, 1500, 64)
    opt = torch.optim.Adam(model.heads.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        model.loss(h, labels, loss_mask).loss.backward()
        opt.step()
    # The held-out curve pre-training logs: the evaluate stage's numbers, at each point.
    curve = heldout_tracker(model, held_out, train, cfg, cpu)
    model.train()
    point = curve()
    assert model.training  # the trainer's mode is given back
    after = evaluate_adapter(model, held_out, train, cfg, cpu, progress=False)
    assert point == {"loss": after["adapted/loss"], "accuracy": after["adapted/accuracy"],
                     "prior_loss": after["prior/loss"], "prior_accuracy": after["prior/accuracy"]}
    assert point["prior_loss"] == before["prior/loss"]
    assert {k: after[k] for k in after if k.startswith("prior/")} == {
        k: before[k] for k in before if k.startswith("prior/")}  # same targets, same prior
    assert after["delta/loss_vs_prior"] < -0.3
    assert after["delta/accuracy_vs_prior"] > 0.2


def test_bootstrap_samples_are_validated():
    with pytest.raises(ValueError,
                       match=r"evaluate.bootstrap_samples: must be an integer in \[100, "):
        EvaluateConfig(bootstrap_samples=10).validate()
    EvaluateConfig(bootstrap_samples=100).validate()
