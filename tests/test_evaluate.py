import pytest
import torch
from torch.utils.data import Dataset

from bestrq.evaluate import EvaluateConfig, bestrq_metrics, evaluate_adapter, with_stock_encoder
from bestrq.ia3 import ia3_state_dict
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.train import MaskedClips, clip_seed


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


def test_stock_equals_adapted_at_init_and_differs_after_change(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=1)
    data, cfg = Clips(2), EvaluateConfig(batch_size=2)
    same = evaluate_adapter(model, data, cfg, torch.device("cpu"), progress=False)
    assert same["adapted/loss"] == same["stock/loss"] and same["delta/loss"] == 0.0
    with torch.no_grad():
        for v in ia3_state_dict(model.encoder).values():
            v.mul_(1.5)
    before = {k: v.clone() for k, v in ia3_state_dict(model.encoder).items()}
    changed = evaluate_adapter(model, data, cfg, torch.device("cpu"), progress=False)
    assert changed["adapted/loss"] != changed["stock/loss"]
    assert changed["stock/loss"] == same["stock/loss"]  # same masks, same targets
    assert changed["stock/perplexity"] == changed["adapted/perplexity"]  # labels ignore IA^3
    after = ia3_state_dict(model.encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)  # vectors restored


def test_with_stock_encoder_restores_on_error(tiny_whisper):
    model = make_model(tiny_whisper)
    with torch.no_grad():
        for v in ia3_state_dict(model.encoder).values():
            v.fill_(2.0)

    def boom():
        assert all(torch.equal(v, torch.ones_like(v)) for v in
                   ia3_state_dict(model.encoder).values())
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with_stock_encoder(model, boom)
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in
               ia3_state_dict(model.encoder).values())
