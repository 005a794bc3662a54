"""Activation checkpointing (`gradient_checkpointing`): the same loss and gradients as without,
with fewer tensors kept for the backward pass."""

import pytest
import torch
from whisper.model import ModelDimensions

from bestrq.adapters import AdapterConfig
from bestrq.masking import MaskingConfig, draw_sample_mask
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.whisper_model import random_whisper

# Small, but every part of a block: 3 blocks so that a middle block can feed the heads.
DIMS = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2,
                       n_audio_layer=3, n_vocab=51864, n_text_ctx=8, n_text_state=32,
                       n_text_head=2, n_text_layer=1)
FRAMES = 1200  # mel frames of a clip: 12 s, shorter than a window to keep the test quick
LORA = AdapterConfig("lora", lora_rank=4, lora_alpha=8.0, lora_targets=("query", "value", "fc1"))
CASES = {
    "ia3": {},
    "lora": {"adapter": LORA},
    "ia3 distill clean": {"distill_weight": 10.0},
    "lora distill clean, two blocks": {"adapter": LORA, "distill_weight": 3.0,
                                       "distill_layers": (-2, -1), "bestrq_layer": 1},
    "ia3 distill masked": {"distill_weight": 10.0, "distill_input": "masked",
                           "distill_layers": (-1, 0)},
}


def batch(mask_prob: float = 0.1) -> tuple[torch.Tensor, ...]:
    """(mel (2, 80, FRAMES), valid frames (2,), frame mask (2, FRAMES), noise (2, 80, FRAMES))."""
    g = torch.Generator().manual_seed(3)
    mel = torch.randn(2, 80, FRAMES, generator=g) * 0.5
    num_valid = torch.tensor([FRAMES, FRAMES * 2 // 3])
    cfg = MaskingConfig(mask_prob=mask_prob)
    masks, noises = zip(*(draw_sample_mask(int(n), FRAMES, 80, cfg, 7 + i)
                          for i, n in enumerate(num_valid)), strict=True)
    return mel, num_valid, torch.stack(masks), torch.stack(noises)


def model(checkpointing: bool, **kwargs) -> BestRQModel:
    quantizer = RandomProjectionQuantizer(QuantizerConfig(num_codebooks=2, codebook_size=64))
    m = BestRQModel(random_whisper(DIMS, seed=1).encoder, quantizer,
                    MaskingConfig(mask_prob=0.05), gradient_checkpointing=checkpointing,
                    **kwargs)
    with torch.no_grad():  # away from identity, so that the adapter changes every pass
        for name, p in m.trainable_parameters().items():
            if not name.startswith("heads."):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(
                    len(name))))
    return m


def loss_and_grads(m: BestRQModel, inputs: tuple[torch.Tensor, ...],
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = m(*inputs, with_metrics=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in m.trainable_parameters().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_same_loss_and_gradients_with_checkpointing(case):
    inputs = batch()
    loss_off, grads_off = loss_and_grads(model(False, **CASES[case]), inputs)
    loss_on, grads_on = loss_and_grads(model(True, **CASES[case]), inputs)
    assert grads_on.keys() == grads_off.keys()
    assert float(loss_off) > 0
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    for name, grad in grads_off.items():
        # Every trainable tensor gets a gradient that is not all zero (the adapter's of every
        # block below the heads' and the distilled blocks), and the same one.
        assert grad.abs().sum() > 0 or "blocks.2" in name, name
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_same_numbers_under_bf16_autocast():
    """The recomputation runs under the autocast state of the forward (torch.utils.checkpoint
    restores it), so bf16 gives the same numbers with and without."""
    inputs = batch()
    loss_off, grads_off = loss_and_grads(model(False, distill_weight=10.0), inputs,
                                         torch.bfloat16)
    loss_on, grads_on = loss_and_grads(model(True, distill_weight=10.0), inputs, torch.bfloat16)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def saved_bytes(m: BestRQModel, inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(*inputs, with_metrics=False)
    del out
    return sum(storages.values())


def test_checkpointing_keeps_fewer_activations():
    inputs = batch()
    off = saved_bytes(model(False, distill_weight=10.0), inputs)
    on = saved_bytes(model(True, distill_weight=10.0), inputs)
    # Without: every block's attention and FFN activations, two adapted passes. With: each
    # block's input (and the stem's), one (batch, 1500, d) tensor per block and pass.
    assert on < 0.5 * off, (on, off)


def test_no_gradient_no_checkpoint():
    """Evaluation (no gradient) runs the blocks plainly: the same outputs, nothing kept."""
    inputs = batch()
    m_on, m_off = model(True), model(False)
    with torch.no_grad():
        a, b = m_on(*inputs).loss, m_off(*inputs).loss
    assert torch.equal(a, b)
