"""`distill_cache`: the stock encoder's outputs of each training clip computed once and read
back (float16) in later epochs."""

import pytest
import torch
from _train_worker import SMALL_DIMS, RandomClips

from bestrq.adapters.ia3 import ia3_state_dict
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.pretraining import BEST_RQ, MaskedClips
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.stock_cache import StockCache, cache_bytes
from bestrq.train import TrainConfig, train
from bestrq.whisper_model import random_whisper


def cached_model(distill_cache: bool = True, distill_weight: float = 1.0) -> BestRQModel:
    """A small model whose IA^3 vectors are moved off 1, so that the guard's term is not 0."""
    q = RandomProjectionQuantizer(QuantizerConfig(codebook_size=64))
    model = BestRQModel(random_whisper(SMALL_DIMS, seed=0).encoder, q,
                        MaskingConfig(mask_prob=0.05, mask_span_ms=100.0),
                        distill_weight=distill_weight, distill_layers=[0, -1],
                        distill_cache=distill_cache)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for v in ia3_state_dict(model.encoder).values():
            v.copy_(1 + 0.3 * torch.randn(v.shape, generator=gen))
    return model


def batch_of(clips: list[int], data: RandomClips) -> tuple[torch.Tensor, torch.Tensor]:
    mel, frames = zip(*(data[i] for i in clips), strict=True)
    return torch.stack(mel), torch.stack(frames)  # (batch, n_mels, frames), (batch,)


def recording(cache: StockCache, puts: list[list[int]]):
    """`cache.put`, recording the clips of every call in `puts`."""
    put = cache.put
    return lambda clips, outputs: (puts.append(clips.tolist()), put(clips, outputs))[1]


def test_each_clip_runs_the_stock_encoder_once_and_reads_back_its_float16_outputs():
    data = RandomClips(6)
    model = cached_model()
    assert model.cache_stock_outputs(len(data)) is True
    puts: list[list[int]] = []
    model.stock_cache.put = recording(model.stock_cache, puts)

    first = [0, 1, 2, 3]
    mel, frames = batch_of(first, data)
    uncached = model.stock_states(mel)  # no clip indices: the cache is not used
    cached = model.stock_states(mel, torch.tensor(first))
    assert puts == [first]
    assert sorted(cached) == [0, 1] and cached[1].shape == (4, 100, 64)
    for layer in (0, 1):  # the stored values are the stock outputs rounded to float16
        assert cached[layer].dtype == torch.float16
        assert torch.equal(cached[layer], uncached[layer].half())

    second = [2, 3, 4, 5]  # two clips seen, two new: only the new ones run the stock encoder
    mel2, _ = batch_of(second, data)
    again = model.stock_states(mel2, torch.tensor(second))
    assert puts == [first, [4, 5]]
    for layer in (0, 1):
        assert torch.equal(again[layer][:2], cached[layer][2:])
        assert torch.equal(again[layer][2:], model.stock_states(mel2[2:])[layer].half())
    assert model.stock_cache.bytes_in_use == cache_bytes(6, 2, 100, 64) == 6 * 2 * 100 * 64 * 2

    # The guard's term with cached targets differs from the exact one by float16 rounding only.
    with torch.no_grad():
        plain = model.distillation(mel, frames)[0]
        with_cache = model.distillation(mel, frames, clips=torch.tensor(first))[0]
    assert float(plain) > 1e-3
    assert float(with_cache) == pytest.approx(float(plain), rel=1e-3)
    assert float(with_cache) != float(plain)


@pytest.mark.parametrize("distill_cache, distill_weight", [(False, 1.0), (True, 0.0)])
def test_no_cache_without_the_knob_or_the_guard(distill_cache, distill_weight):
    model = cached_model(distill_cache, distill_weight)
    assert model.cache_stock_outputs(4) is False and model.stock_cache is None
    item = BEST_RQ.items(model, RandomClips(4), 0)[(0, 3)]
    assert len(item) == 4  # mel, frames, mask, noise: no clip index


def test_the_training_items_carry_the_clip_index_when_the_model_caches():
    model = cached_model()
    items = BEST_RQ.items(model, RandomClips(4), 0)
    plain = MaskedClips(RandomClips(4), model.masking, 0)
    mel, frames, mask, noise, clip = items[(1, 3)]
    assert int(clip) == 3 and clip.dtype == torch.int64
    for a, b in zip((mel, frames, mask, noise), plain[(1, 3)], strict=True):
        assert torch.equal(a, b)
    assert model.stock_cache is not None and model.stock_cache.num_clips == 4


def test_a_run_with_the_cache_runs_each_clip_once_and_follows_the_uncached_run(tmp_path):
    """Three epochs of 6 clips: each clip's stock outputs are computed once, and the losses
    follow the uncached run's to float16 rounding."""
    # fp32: under bf16 autocast (what `auto` picks on CPUs with bf16 hardware) the cache's
    # float16 rounding is below the precision of the loss and the two curves are equal.
    config = TrainConfig(batch_size=2, max_steps=9, warmup_steps=2, checkpoint_every=100,
                         num_workers=0, learning_rate=1e-2, precision="fp32")
    losses: dict[bool, list[float]] = {}
    puts: list[list[int]] = []
    for cache in (False, True):
        model = cached_model(distill_cache=cache)
        if cache:  # the engine starts the cache through the objective; record its writes
            start = model.cache_stock_outputs

            def started(n: int, model: BestRQModel = model, start=start) -> bool:
                ok = start(n)
                model.stock_cache.put = recording(model.stock_cache, puts)
                return ok

            model.cache_stock_outputs = started
        curve: list[float] = []
        train(model, RandomClips(6), config, tmp_path / str(cache),
              log=lambda step, m, curve=curve: curve.append(m["distill_loss"]),
              objective=BEST_RQ)
        losses[cache] = curve
    assert sorted(c for put in puts for c in put) == list(range(6))  # each clip once
    assert len(losses[True]) == len(losses[False]) == 9
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
    assert losses[True] != losses[False]


def test_the_cache_refuses_a_disk_too_small_before_any_work_and_names_the_knob(monkeypatch,
                                                                              tmp_path):
    usage = type("Usage", (), {"free": 10 * 2**20})()
    monkeypatch.setattr("bestrq.stock_cache.shutil.disk_usage", lambda _: usage)
    with pytest.raises(OSError, match=r"distill_cache: the stock outputs of 1000 clips need "
                                      r"1\.07 GiB in .* which has 0\.01 GiB free"):
        StockCache(1000, (1, 1500, 384), folder=str(tmp_path))
    # The engine starts the cache as it builds the training items, before the first step.
    model = cached_model()
    with pytest.raises(OSError, match="distill_cache"):
        BEST_RQ.items(model, RandomClips(10**5), 0)
    assert model.stock_cache is None
    assert list(tmp_path.iterdir()) == []  # nothing was made in the folder


def test_the_cache_refuses_values_beyond_float16_and_reads_only_what_it_holds(tmp_path):
    cache = StockCache(3, (1, 4, 2), folder=str(tmp_path))
    with pytest.raises(KeyError, match="distill_cache"):
        cache.get(torch.tensor([0]))
    with pytest.raises(ValueError, match="not finite in float16"):
        cache.put(torch.tensor([0]), torch.full((1, 1, 4, 2), 1e5))
    with pytest.raises(ValueError, match=r"rows of shape \(1, 4, 2\)"):
        cache.put(torch.tensor([0]), torch.zeros(1, 1, 3, 2))
    cache.put(torch.tensor([2, 0]), torch.arange(16.0).reshape(2, 1, 4, 2))
    assert cache.missing(torch.tensor([0, 1, 2])).tolist() == [False, True, False]
    assert torch.equal(cache.get(torch.tensor([0])), torch.arange(8.0, 16.0).half().reshape(
        1, 1, 4, 2))
    assert cache.bytes_in_use == 2 * 8 * 2
    with pytest.raises(KeyError):
        cache.get(torch.tensor([1]))
    cache.close()
    assert cache.bytes_in_use == 0 and bool(cache.missing(torch.tensor([0])).all())
    with pytest.raises(ValueError, match="at least one clip"):
        StockCache(0, (1, 4, 2))
