import math

import pytest
import torch

from bestrq.adapters.ia3 import ia3_state_dict
from bestrq.masking import MaskingConfig, draw_sample_mask
from bestrq.model import LOGITS_BUDGET_BYTES, BestRQModel, chunk_shape, encoder_states
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
    expected = int((mask.reshape(2, 1500, 2).all(-1) & valid).sum())  # default: both frames
    out = model(mel, nv, mask, noise)
    assert out.num_masked == expected
    assert out.metrics["mask_fraction"] == pytest.approx(expected / int(valid.sum()))


def test_labels_come_from_unmasked_features(tiny_whisper):
    model = make_model(tiny_whisper)
    mel, nv, mask, noise = fixed_batch()
    _, labels, loss_mask, _ = model.make_inputs(mel, nv, mask, noise)
    _, everywhere, _, _ = model.make_inputs(mel, nv, torch.zeros_like(mask), noise,
                                            all_labels=True)
    full = model.quantizer(model.quantizer.label_input(mel, nv))  # (batch, N, targets)
    assert torch.equal(everywhere, full)
    # only the predicted targets are labelled, with the labels of the unmasked features
    picked = loss_mask[:, None, :].expand_as(labels)
    assert loss_mask.sum() > 100 and torch.equal(labels[picked], full[picked])
    assert (labels[~picked] == -1).all()


def test_metrics_match_hand_computation(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=2, codebook_size=16)
    mel, nv, mask, noise = fixed_batch()
    out = model(mel, nv, mask, noise)
    _, labels, loss_mask, _ = model.make_inputs(mel, nv, mask, noise)
    per_cb = []
    for i in range(2):
        counts = torch.bincount(labels[:, i][loss_mask], minlength=16).double()
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
    model.distillation(mel, nv)[0].backward()
    for v in ia3_state_dict(model.encoder).values():
        assert float((v.grad * (v.detach() - 1)).sum()) > 0
    with pytest.raises(ValueError, match="distill_weight"):
        BestRQModel(tiny_whisper.encoder, model.quantizer, MaskingConfig(), distill_weight=-1)


def reference_loss(model, h, labels, loss_mask):
    """Today's unfused computation: full (M, N, K) logits, F.cross_entropy, argmax accuracy."""
    n, k = model.quantizer.config.num_codebooks, model.quantizer.config.codebook_size
    targets = min(h.shape[1], labels.shape[-1])
    selected = h[:, :targets][loss_mask[:, :targets]]
    y = labels[:, :, :targets].transpose(1, 2)[loss_mask[:, :targets]]  # (M, N)
    logits = model.heads(selected).reshape(-1, n, k).float()  # (M, N, K)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, k), y.reshape(-1))
    return loss, (logits.argmax(-1) == y).float().mean(0)


def heads_inputs(model, num_valid):
    mel, nv, mask, noise = fixed_batch(num_valid=num_valid)
    x, labels, loss_mask, valid = model.make_inputs(mel, nv, mask, noise)
    with torch.no_grad():
        h = model.encode(x)  # (batch, targets, d)
    return h.requires_grad_(), labels, loss_mask, valid


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def test_chunk_shape_keeps_fp32_logits_within_the_budget():
    # All targets and as many whole codebooks as fit (128 MiB / (4 B x 8192 x 1525) = 2) ...
    assert chunk_shape(1525, 16, 8192) == (1525, 2)
    assert chunk_shape(1525, 1, 8192) == (1525, 1)
    assert chunk_shape(1525, 16, 8192, 256 * 2**20) == (1525, 5)
    # ... else one codebook and as many targets as fit: 128 MiB / (4 B x 8192) rows.
    assert chunk_shape(32768, 16, 8192) == (4096, 1)
    assert chunk_shape(32768, 16, 8192, 64 * 2**20) == (2048, 1)
    assert chunk_shape(5, 16, 8192, 1000) == (1, 1)  # never empty
    assert chunk_shape(100, 3, 10, 4 * 10 * 100 * 2 + 3) == (100, 2)


@pytest.mark.parametrize("tiles", ["37_rows", "5_codebooks"])
@pytest.mark.parametrize("num_codebooks", [1, 16])
@pytest.mark.parametrize("num_valid", [(3000, 3000), (3000, 1800)], ids=["full", "padded"])
def test_chunked_loss_and_gradients_equal_full_logits_cross_entropy(tiny_whisper, num_codebooks,
                                                                     num_valid, tiles):
    model = make_model(tiny_whisper, num_codebooks=num_codebooks)
    h, labels, loss_mask, valid = heads_inputs(model, num_valid)
    masked = int(loss_mask.sum())
    if tiles == "37_rows":  # 37 targets, 1 codebook per tile: a ragged last row chunk
        model.logits_budget = 4 * 64 * 37
        assert chunk_shape(masked, num_codebooks, 64, model.logits_budget) == (37, 1)
        assert masked > 5 * 37 and masked % 37 != 0
    else:  # every target, 5 codebooks per tile: groups of 5, 5, 5, 1 at N = 16
        model.logits_budget = 4 * 64 * masked * 5
        assert chunk_shape(masked, num_codebooks, 64, model.logits_budget) == (
            masked, min(5, num_codebooks))
    params = [model.heads.weight, model.heads.bias, h]
    out = model.loss(h, labels, loss_mask, valid)
    assert out.num_masked == masked
    # Weighted by the count as the training loop does: backward scales the stored gradients.
    got = grads_of(out.loss * out.num_masked, params)
    ref_loss, ref_acc = reference_loss(model, h, labels, loss_mask)
    want = grads_of(ref_loss * out.num_masked, params)
    assert out.loss.dtype == torch.float32
    assert float(out.loss) == pytest.approx(float(ref_loss), rel=2e-6)
    for name, g, w in zip(("weight", "bias", "h"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()),
                                   msg=name)
    assert float(got[2][~loss_mask].abs().max()) == 0.0  # unmasked frames get no gradient
    for i in range(num_codebooks):
        assert out.metrics[f"accuracy_cb{i}"] == pytest.approx(float(ref_acc[i]), abs=1e-7)
    assert out.metrics["accuracy"] == pytest.approx(float(ref_acc.mean()), abs=1e-7)

    # One tile (the default budget) and no gradient (evaluation) give the same numbers.
    model.logits_budget = LOGITS_BUDGET_BYTES
    whole = model.loss(h, labels, loss_mask, valid)
    with torch.no_grad():
        evaluated = model.loss(h, labels, loss_mask, valid)
    assert float(whole.loss) == pytest.approx(float(out.loss), rel=2e-6)
    assert float(evaluated.loss) == float(whole.loss) and not evaluated.loss.requires_grad
    assert evaluated.metrics == whole.metrics
    assert whole.metrics == pytest.approx(out.metrics, abs=1e-7)


def test_metrics_keys_and_values_match_a_reference_computation(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=3, codebook_size=16)
    h, labels, loss_mask, valid = heads_inputs(model, (3000, 1800))
    model.logits_budget = 4 * 16 * 10  # tiles of 10 targets x 1 codebook
    out = model.loss(h, labels, loss_mask, valid)
    _, ref_acc = reference_loss(model, h, labels, loss_mask)
    expected = {f"accuracy_cb{i}": float(ref_acc[i]) for i in range(3)}
    expected["accuracy"] = float(ref_acc.mean())
    expected["mask_fraction"] = int(loss_mask.sum()) / int(valid.sum())
    picked = labels.transpose(1, 2)[loss_mask]  # (M, 3): utilisation of the masked targets
    counts = [torch.bincount(picked[:, i], minlength=16).double() for i in range(3)]
    expected["distinct_labels"] = sum(float((c > 0).sum()) for c in counts) / 3
    probs = [c[c > 0] / c.sum() for c in counts]
    expected["perplexity"] = sum(math.exp(-float((p * p.log()).sum())) for p in probs) / 3
    assert set(out.metrics) == set(expected)
    assert out.metrics == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert 0.0 < out.metrics["accuracy"] < 1.0


def test_loss_never_holds_the_logits_of_all_masked_targets(tiny_whisper):
    # Every tensor that the loss's forward and backward create (seen at the dispatcher) stays
    # below the logits of all masked targets, M x N x K: the largest are one tile's logits,
    # the heads' weight gradient and h's gradient.
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    model = make_model(tiny_whisper, num_codebooks=16)
    h, labels, loss_mask, valid = heads_inputs(model, (3000, 3000))
    model.logits_budget = 4 * 64 * 8  # tiles of 8 targets x 1 codebook
    mode = LargestOutput()
    with mode:
        out = model.loss(h, labels, loss_mask, valid)
        out.loss.backward()
    full_logits = out.num_masked * 16 * 64
    bound = max(8 * 64, model.heads.weight.numel(), h.numel())
    assert full_logits > 5 * bound  # the check can tell
    assert mode.largest <= bound
    # The unfused reference does hold them.
    with mode:
        reference_loss(model, h, labels, loss_mask)[0].backward()
    assert mode.largest >= full_logits


@pytest.mark.parametrize("tiles", ["50_rows", "5_codebooks"])
def test_bf16_autocast_loss_is_fp32_and_equals_the_unfused_bf16_heads(tiny_whisper, tiles):
    model = make_model(tiny_whisper, num_codebooks=16)
    h, labels, loss_mask, valid = heads_inputs(model, (3000, 1800))
    # Tiles of 50 targets x 1 codebook, or of every target x 5 codebooks.
    model.logits_budget = 4 * 64 * (50 if tiles == "50_rows" else 5 * int(loss_mask.sum()))
    params = [model.heads.weight, model.heads.bias, h]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(h, labels, loss_mask, valid)
        ref_loss, ref_acc = reference_loss(model, h, labels, loss_mask)
    assert out.loss.dtype == torch.float32 and ref_loss.dtype == torch.float32
    assert out.num_masked > 50
    # The same bf16 logits (rows of a matmul do not depend on the other rows), fp32 softmax.
    assert float(out.loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert [out.metrics[f"accuracy_cb{i}"] for i in range(16)] == pytest.approx(
        ref_acc.tolist(), abs=1.5 / out.num_masked)
    got, want = grads_of(out.loss, params), grads_of(ref_loss, params)
    for name, g, w in zip(("weight", "bias", "h"), got, want, strict=True):
        assert g.dtype == w.dtype == torch.float32, name
        # bf16 matmuls on both sides, summed in a different order: bf16 rounding apart.
        assert float((g - w).norm() / w.norm()) < 5e-3, name


def test_fused_loss_backward_runs_once(tiny_whisper):
    model = make_model(tiny_whisper, num_codebooks=2)
    h, labels, loss_mask, _ = heads_inputs(model, (3000, 1800))
    out = model.loss(h, labels, loss_mask)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


def _layered(dims_layers: int = 4, **kwargs):
    dims = TINY_TEST_DIMS.__class__(**{**TINY_TEST_DIMS.__dict__, "n_audio_layer": dims_layers})
    q = RandomProjectionQuantizer(QuantizerConfig(codebook_size=64))
    return BestRQModel(random_whisper(dims).encoder, q, MaskingConfig(mask_prob=0.05), **kwargs)


def test_the_last_blocks_state_is_the_encoders_output_bit_for_bit():
    model = _layered()
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = encoder_states(model.encoder, mel, [1, 3])
        assert torch.equal(states[3], model.encoder(mel))  # the default path is unchanged
        # A lower block: its residual stream, layer-normed without parameters.
        h = model.encoder.conv2(torch.nn.functional.gelu(model.encoder.conv1(mel)))
        h = torch.nn.functional.gelu(h).permute(0, 2, 1) + model.encoder.positional_embedding
        for block in model.encoder.blocks[:2]:
            h = block(h)
        assert torch.allclose(states[1], torch.nn.functional.layer_norm(h, (64,)), atol=1e-6)


def test_bestrq_layer_feeds_the_heads_and_blocks_above_learn_only_from_distillation():
    mel, nv, masks, noises = fixed_batch(mask_prob=0.2)
    model = _layered(bestrq_layer=1, distill_weight=0.5, distill_layers=[-1, 2])
    assert model.layers() == {"bestrq_layer": 1, "distill_layers": [2, 3],
                              "distill_padding": False, "distill_input": "clean"}
    out = model(mel, nv, frame_mask=masks, noise=noises)
    assert set(out.metrics) >= {"distill_loss_l2", "distill_loss_l3"}
    out.loss.backward()
    full = {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.distillation(mel, nv)[0].mul(0.5).backward()
    distill = {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.requires_grad}
    above = [n for n in full if n.startswith(("blocks.2.", "blocks.3."))]
    below = [n for n in full if n.startswith(("blocks.0.", "blocks.1."))]
    assert above and below
    for name in above:  # no BEST-RQ gradient above its block
        assert torch.allclose(full[name], distill[name], atol=1e-7), name
    assert any(not torch.allclose(full[n], distill[n], atol=1e-6) for n in below)
    # The heads read block 1: the encoder's output (block 3) does not change the loss.
    model.zero_grad()
    with torch.no_grad():
        x, labels, loss_mask, _ = model.make_inputs(mel, nv, masks, noises)
        h = encoder_states(model.encoder, x, [1])[1]
        expected = model.loss(h.reshape(2, 1500, 64), labels, loss_mask).loss
        assert float(model.loss(model.encode(x), labels, loss_mask).loss) == float(expected)


def test_distill_padding_counts_the_padded_frames():
    mel, nv, _, _ = fixed_batch()  # clip 1 has 900 of 1500 encoder frames
    terms = {}
    for padding in (False, True):
        model = _layered(distill_weight=1.0, distill_padding=padding)
        with torch.no_grad():
            for v in ia3_state_dict(model.encoder).values():
                v.copy_(1 + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)))
            stock_model = _layered()
            stock = stock_model.encoder(mel)
            adapted = model.encoder(mel)
            terms[padding] = float(model.distillation(mel, nv)[0])
    by_hand = {False: torch.cat([(adapted[0] - stock[0]).pow(2).flatten(),
                                 (adapted[1, :900] - stock[1, :900]).pow(2).flatten()]).mean(),
               True: (adapted - stock).pow(2).mean()}
    for padding, value in terms.items():
        assert value == pytest.approx(float(by_hand[padding]), rel=1e-5)
    assert terms[True] != pytest.approx(terms[False], rel=1e-3)


def test_distill_input_masked_distils_the_bestrq_pass_on_its_unmasked_frames():
    """`distill_input: masked`: the adapted block outputs of the BEST-RQ pass itself (on the
    masked input) are distilled to the stock encoder's on the clean input, over the valid encoder
    frames none of whose two mel frames is masked; the BEST-RQ term is the one of `clean`, and
    the adapted encoder runs once a step instead of twice."""
    mel, nv, masks, noises = fixed_batch(mask_prob=0.05)
    gen = torch.Generator().manual_seed(3)
    models = {}
    for how in ("clean", "masked"):
        models[how] = _layered(distill_weight=0.5, distill_input=how)
        with torch.no_grad():
            for v in ia3_state_dict(models[how].encoder).values():
                v.copy_(1 + 0.2 * torch.randn(v.shape, generator=gen.manual_seed(3)))
    out = {how: m(mel, nv, frame_mask=masks, noise=noises) for how, m in models.items()}
    assert out["masked"].metrics["bestrq_loss"] == pytest.approx(
        out["clean"].metrics["bestrq_loss"], rel=1e-6)
    model = models["masked"]
    with torch.no_grad():
        x, _, _, _ = model.make_inputs(mel, nv, masks, noises)
        adapted = encoder_states(model.encoder, x, [3])[3]  # (2, 1500, 64), masked input
        stock = _layered().encoder(mel)  # clean input, no adapter
    hidden = masks.reshape(2, 1500, 2).any(-1)  # (2, 1500) encoder frames touching a mask
    keep = torch.arange(1500)[None] < torch.tensor([1500, 900])[:, None]
    keep &= ~hidden
    assert int(hidden.sum()) > 0 and int(keep.sum()) < 1500 + 900
    by_hand = (adapted - stock)[keep].pow(2).mean()
    assert out["masked"].metrics["distill_loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert out["masked"].metrics["distill_loss"] != pytest.approx(
        out["clean"].metrics["distill_loss"], rel=1e-3)

    calls = {"clean": 0, "masked": 0}
    for how, m in models.items():
        first = m.encoder.blocks[0]
        handle = first.register_forward_hook(lambda *_, how=how: calls.__setitem__(
            how, calls[how] + 1))
        m(mel, nv, frame_mask=masks, noise=noises)
        handle.remove()
    assert calls == {"clean": 3, "masked": 2}  # masked pass (+ clean adapted) + stock


@pytest.mark.parametrize("kwargs, message", [
    ({"bestrq_layer": 4}, r"bestrq_layer: must be a block of this encoder, an integer in "
                          r"\[-4, 3\]"),
    ({"bestrq_layer": -5}, "bestrq_layer"),
    ({"distill_layers": [0, 7]}, r"distill_layers: .*\[-4, 3\]"),
    ({"distill_layers": []}, "distill_layers: must be a non-empty list"),
    ({"distill_layers": [-1, 3]}, "distinct"),
])
def test_layers_outside_the_encoder_are_refused_naming_the_key_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _layered(**kwargs)
