"""The peak-memory estimate printed before pre-training: its count of what autograd keeps, and
its total against the CPU allocator's measured peak."""

import gc

import pytest
import torch
from whisper.model import ModelDimensions

from bestrq.adapters import AdapterConfig
from bestrq.masking import MaskingConfig, draw_sample_mask
from bestrq.memory import estimate_peak_memory, measured_cpu_peak_bytes
from bestrq.model import BestRQModel
from bestrq.pretraining import BEST_RQ
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.train import TrainConfig, make_optimizer
from bestrq.whisper_model import random_whisper

SMALL = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                        n_audio_layer=3, n_vocab=51864, n_text_ctx=8, n_text_state=64,
                        n_text_head=2, n_text_layer=1)
# Whisper tiny's shape, random weights (no download).
TINY = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6,
                       n_audio_layer=4, n_vocab=51864, n_text_ctx=448, n_text_state=384,
                       n_text_head=6, n_text_layer=4)
FRAMES = 1200
ALL = ("query", "key", "value", "out", "fc1", "fc2")


def clips(batch: int, frames: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(batch, 80, frames, generator=g) * 0.5
    num_valid = torch.full((batch,), frames)
    masks, noises = zip(*(draw_sample_mask(frames, frames, 80, MaskingConfig(), i)
                          for i in range(batch)), strict=True)
    return mel, num_valid, torch.stack(masks), torch.stack(noises)


def make(dims: ModelDimensions, **kwargs) -> BestRQModel:
    quantizer = RandomProjectionQuantizer(QuantizerConfig())
    return BestRQModel(random_whisper(dims).encoder, quantizer, MaskingConfig(), **kwargs)


def saved_bytes(model: BestRQModel, inputs: tuple[torch.Tensor, ...],
                dtype: torch.dtype | None) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, parameters aside."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs, with_metrics=False)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adapter,kwargs", [
    (AdapterConfig(), {}),
    (AdapterConfig("lora", lora_rank=8), {}),
    (AdapterConfig("lora", lora_rank=8, lora_targets=("fc1", "fc2")), {}),
    (AdapterConfig("lora", lora_rank=8, lora_targets=ALL), {}),
    (AdapterConfig("lora", lora_rank=8, lora_targets=("out",)), {}),
    (AdapterConfig(), {"distill_weight": 1.0}),
    (AdapterConfig(), {"distill_weight": 1.0, "distill_input": "masked",
                       "distill_layers": [-2, -1], "bestrq_layer": 0}),
    (AdapterConfig(), {"distill_weight": 1.0, "gradient_checkpointing": True}),
    (AdapterConfig("lora", lora_rank=8), {"gradient_checkpointing": True}),
], ids=["ia3", "lora", "lora-ffn", "lora-all", "lora-out", "distill", "distill-masked",
        "checkpointed", "lora-checkpointed"])
def test_the_estimate_counts_what_autograd_keeps(adapter, kwargs, dtype):
    """One clip: what the estimate says autograd keeps (the adapted passes' blocks, or their
    inputs with checkpointing, the read layer norms, the bf16 weight copies) is what
    saved_tensors_hooks sees, within 3%."""
    model = make(SMALL, adapter=adapter, **kwargs)
    estimate = estimate_peak_memory(model, 1, dtype, frames=FRAMES)
    kept = saved_bytes(model, clips(1, FRAMES), dtype)
    counted = estimate.saved_per_clip + (0 if model.gradient_checkpointing
                                         else estimate.weight_copies)
    assert counted == pytest.approx(kept, rel=0.03)


def test_checkpointing_estimate_and_line():
    model = make(TINY, distill_weight=10.0)
    off = estimate_peak_memory(model, 8, None)
    on = estimate_peak_memory(model, 8, None, checkpointing=True)
    assert not off.checkpointing and on.checkpointing
    assert off.weights == on.weights == sum(
        t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    # grads and two AdamW moments of IA^3's 9,216 numbers and the 8192-way head on 384
    assert off.trainable_state == 12 * (9216 + 8192 * 385)
    assert off.weight_copies == 0  # fp32: autocast makes none
    assert on.activations < 0.4 * off.activations
    line = off.line()
    assert line.startswith(f"peak memory estimate {off.total / 2**20:,.0f} MiB: weights ")
    assert "x 8; gradient_checkpointing off)" in line and "\n" not in line


def one_step_peak(checkpointing: bool, batch: int, dtype: torch.dtype | None) -> tuple[int, int]:
    """(estimated, measured) peak bytes of a training step of tiny's shape with the
    distillation guard (params.yaml's default), everything built inside the measurement."""
    estimate: list[int] = []

    def step() -> None:
        model = make(TINY, distill_weight=10.0, gradient_checkpointing=checkpointing)
        optimizer = make_optimizer(BEST_RQ.groups(model), TrainConfig())
        params = list(model.trainable_parameters().values())
        for p in params:  # AdamW's moments made as after a first update; nothing moves
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        estimate.append(estimate_peak_memory(model, batch, dtype).total)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(*clips(batch, 3000), with_metrics=False)
        (out.loss * out.count).backward()
        optimizer.step()

    gc.collect()
    measured = measured_cpu_peak_bytes(step)
    return estimate[0], measured


@pytest.mark.parametrize("checkpointing", [False, True], ids=["off", "on"])
def test_estimate_within_25_percent_of_the_measured_cpu_peak(checkpointing):
    """tiny's shape at batch 8, fp32 (what every CPU runs alike), whole 30 s windows."""
    estimated, measured = one_step_peak(checkpointing, 8, None)
    assert estimated == pytest.approx(measured, rel=0.25), (estimated, measured)


def test_the_measurement_measures():
    """measured_cpu_peak_bytes sees tensors made and freed inside, not those made before."""
    before = torch.ones(2**20)  # 4 MiB held throughout

    def make_and_free() -> None:
        a = torch.ones(3 * 2**20)  # 12 MiB
        b = torch.ones(2**20)  # 4 MiB: peak 16 MiB
        del a, b
        c = torch.ones(2**20)  # 4 MiB
        del c

    assert measured_cpu_peak_bytes(make_and_free) == 16 * 2**20
    assert before.numel() == 2**20


def test_pretrain_prints_the_estimate_before_training(tmp_path, monkeypatch):
    import bestrq.recipes.pretrain as recipe
    from bestrq.distributed import current
    from bestrq.features import FeatureConfig, compute_features
    from tests.test_features import write_segments
    from tests.test_params_fit import load_params, params_file

    write_segments(tmp_path / "segments", {"train": [2.0, 3.0], "dev": [2.0]})
    features = tmp_path / "features"
    compute_features(tmp_path / "segments", features, 80, FeatureConfig(device="cpu"))
    monkeypatch.setattr(recipe, "load_whisper", lambda *_: random_whisper(SMALL))
    said: list[str] = []

    class Log:
        def say(self, message: str) -> None:
            said.append(message)

        def steps(self):
            return lambda *_: None

    def no_training(*_, **__):
        said.append("training started")
        raise RuntimeError("training started")

    monkeypatch.setattr(recipe, "train", no_training)
    p = load_params(params_file(tmp_path, batch_size="2", gradient_checkpointing="true"))
    with pytest.raises(RuntimeError, match="training started"):
        recipe.pretrain(p, current(), features, tmp_path / "a.safetensors", "a-only.safetensors",
                        tmp_path / "ckpt", lambda *_: 0, lambda _: Log())
    lines = [line for line in said if "peak memory" in line]
    assert len(lines) == 1 and said.index(lines[0]) < said.index("training started")
    assert lines[0].startswith("pretrain: peak memory estimate ")
    assert lines[0].endswith("x 2; gradient_checkpointing on)")
