import math

import pytest
import torch

from bestrq.ia3 import ia3_state_dict
from bestrq.masking import MaskingConfig, draw_sample_mask
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper


def make_model(whisper_model, num_codebooks=1, codebook_size=64, stack=2, mask_prob=0.05):
    q = RandomProjectionQuantizer(QuantizerConfig(num_codebooks=num_codebooks,
                                                  codebook_size=codebook_size,
                                                  stack_frames=stack))
    return BestRQModel(whisper_model.encoder, q, MaskingConfig(mask_prob=mask_prob))


def fixed_batch(num_valid=(3000, 1800), mask_prob=0.05, seed=0):
    mel = torch.randn(len(num_valid), 80, 3000) * 0.5
    nv = torch.tensor(num_valid)
    cfg = MaskingConfig(mask_prob=mask_prob)
    masks, noises = zip(*(draw_sample_mask(n, 3000, 80, cfg, seed + i)
                          for i, n in enumerate(num_valid)), strict=True)
    return mel, nv, torch.stack(masks), torch.stack(noises)


def test_only_ia3_and_heads_are_trainable(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=3)
    names = set(model.trainable_parameters())
    assert names == {n for n in names if n.endswith(".scale")} | {"heads.weight", "heads.bias"}
    assert model.heads.out_features == 3 * 64
    state = model.adapter_state_dict()
    assert "quantizer.codebooks" in state and "heads.weight" in state
    assert sum(k.startswith("ia3.encoder.") for k in state) == 3 * 2


def test_heads_come_from_the_run_seed_not_the_global_rng(tiny_whisper):
    def heads(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        torch.rand(1000)  # whatever ran before must not matter
        q = RandomProjectionQuantizer(QuantizerConfig(codebook_size=64, seed=seed))
        model = BestRQModel(random_whisper(TINY_TEST_DIMS).encoder, q, MaskingConfig())
        return torch.cat([model.heads.weight.flatten(), model.heads.bias]).detach()

    global_state = torch.get_rng_state()
    a, b, c = heads(0, 1), heads(0, 2), heads(1, 1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in distribution.
    bound = 1 / math.sqrt(64)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert abs(float(a.mean())) < 0.05 * bound
    assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    torch.set_rng_state(global_state)


def test_loss_counts_only_masked_valid_targets(tiny_whisper):
    model = make_model(tiny_whisper)
    mel, nv, mask, noise = fixed_batch()
    x, labels, loss_mask, valid = model.make_inputs(mel, nv, mask, noise)
    # unmasked frames reach the encoder exactly on Whisper's scale; masked ones are noise
    assert torch.allclose(x[0][:, ~mask[0]], mel[0][:, ~mask[0]], atol=1e-5)
    assert not torch.allclose(x[0][:, mask[0]], mel[0][:, mask[0]], atol=1e-2)
    assert valid[1, :900].all() and not valid[1, 900:].any()
    assert not loss_mask[1, 900:].any()
    expected = int((mask.reshape(2, 1500, 2).any(-1) & valid).sum())
    out = model(mel, nv, mask, noise)
    assert out.num_masked == expected
    assert out.metrics["mask_fraction"] == pytest.approx(expected / int(valid.sum()))


def test_labels_come_from_unmasked_features(tiny_whisper):
    model = make_model(tiny_whisper)
    mel, nv, mask, noise = fixed_batch()
    _, labels, _, _ = model.make_inputs(mel, nv, mask, noise)
    _, labels_other_mask, _, _ = model.make_inputs(mel, nv, torch.zeros_like(mask), noise)
    assert torch.equal(labels, labels_other_mask)
    assert torch.equal(labels, model.quantizer(model.quantizer.normalize(mel)))


def test_metrics_match_hand_computation(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=2, codebook_size=16)
    mel, nv, mask, noise = fixed_batch()
    out = model(mel, nv, mask, noise)
    _, labels, _, valid = model.make_inputs(mel, nv, mask, noise)
    per_cb = []
    for i in range(2):
        counts = torch.bincount(labels[:, i][valid], minlength=16).double()
        p = counts[counts > 0] / counts.sum()
        per_cb.append((float((counts > 0).sum()), math.exp(-(p * p.log()).sum().item())))
    assert out.metrics["distinct_labels"] == pytest.approx(sum(c[0] for c in per_cb) / 2)
    assert out.metrics["perplexity"] == pytest.approx(sum(c[1] for c in per_cb) / 2, rel=1e-5)
    assert out.metrics["accuracy"] == pytest.approx(
        (out.metrics["accuracy_cb0"] + out.metrics["accuracy_cb1"]) / 2)


def test_loss_is_fp32_under_bf16_autocast(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=2)
    mel, nv, mask, noise = fixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(mel, nv, mask, noise)
    assert out.loss.dtype == torch.float32
    # fresh heads: loss near log(K)
    assert abs(out.loss.item() - math.log(64)) < 1.5


def test_multi_codebook_loss_is_mean_over_codebooks(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=3)
    mel, nv, mask, noise = fixed_batch()
    x, labels, loss_mask, valid = model.make_inputs(mel, nv, mask, noise)
    h = model.encode(x)
    out = model.loss(h, labels, loss_mask)
    logits = model.heads(h[loss_mask]).reshape(-1, 3, 64)
    y = labels.transpose(1, 2)[loss_mask]
    per_cb = [torch.nn.functional.cross_entropy(logits[:, i], y[:, i]) for i in range(3)]
    assert out.loss.item() == pytest.approx(sum(per_cb).item() / 3, rel=1e-5)


def test_stack_4_pairs_encoder_frames(tiny_whisper):
    model = make_model(tiny_whisper, stack=4)
    mel, nv, mask, noise = fixed_batch()
    out = model(mel, nv, mask, noise)
    assert model.heads.in_features == 2 * 64 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="stack_frames"):
        make_model(tiny_whisper, stack=3)


def test_overfitting_one_batch_lowers_loss_and_beats_chance(tiny_whisper):
    torch.manual_seed(0)
    model = make_model(tiny_whisper, codebook_size=32, mask_prob=0.02)
    mel, nv, mask, noise = fixed_batch(num_valid=(1200, 1000), mask_prob=0.02)
    params = list(model.trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=2e-2)
    first = model(mel, nv, mask, noise)
    losses = []
    for _ in range(40):
        out = model(mel, nv, mask, noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    final = model(mel, nv, mask, noise)
    assert final.loss.item() < 0.5 * first.loss.item()
    assert final.metrics["accuracy"] > 5 * (1 / 32)


def test_batch_without_masked_targets_gives_zero_gradients_to_every_trainable(tiny_whisper):
    # Under DDP every rank must produce a gradient for every trainable tensor, or the ranks
    # reduce different buckets (a gloo "collective mismatch" on a rank with no masked target).
    model = make_model(tiny_whisper)
    mel, nv, masks, noises = fixed_batch()
    out = model(mel, nv, frame_mask=torch.zeros_like(masks), noise=noises)
    assert out.num_masked == 0 and float(out.loss) == 0.0
    out.loss.backward()
    for name, p in model.trainable_parameters().items():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) == 0, name


def test_distillation_guard_is_the_mse_to_the_stock_encoder_on_valid_frames(tiny_whisper):
    model = make_model(tiny_whisper)
    mel, nv, masks, noises = fixed_batch()
    plain = model(mel, nv, frame_mask=masks, noise=noises)
    model.distill_weight = 0.7
    # At init the adapted encoder is the stock one: the term is 0 and the loss unchanged.
    out = model(mel, nv, frame_mask=masks, noise=noises)
    assert out.metrics["distill_loss"] == 0.0
    assert float(out.loss) == pytest.approx(float(plain.loss), rel=1e-6)
    assert "distill_loss" not in plain.metrics

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        stock = model.encoder(mel)  # (batch, 1500, d)
        for v in ia3_state_dict(model.encoder).values():
            v.copy_(1 + 0.2 * torch.randn(v.shape, generator=gen))
        adapted = model.encoder(mel)
    out = model(mel, nv, frame_mask=masks, noise=noises)
    # Hand count: clip 0 is 3000 frames (1500 encoder frames), clip 1 is 1800 (900).
    by_hand = torch.cat([(adapted[0] - stock[0]).pow(2).flatten(),
                         (adapted[1, :900] - stock[1, :900]).pow(2).flatten()]).mean()
    assert out.metrics["distill_loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert float(out.loss) == pytest.approx(
        out.metrics["bestrq_loss"] + 0.7 * out.metrics["distill_loss"], rel=1e-6)
    # The term pulls the vectors back towards one: its gradient alone points away from them.
    model.zero_grad()
    model.distillation(mel, nv).backward()
    for v in ia3_state_dict(model.encoder).values():
        assert float((v.grad * (v.detach() - 1)).sum()) > 0
    with pytest.raises(ValueError, match="distill_weight"):
        BestRQModel(tiny_whisper.encoder, model.quantizer, MaskingConfig(), distill_weight=-1)
