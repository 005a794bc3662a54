"""`distill_cache`: the stock encoder's outputs of each training clip computed once and read
back (float16) in later epochs."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from _train_worker import SMALL_DIMS, RandomClips

from bestrq.adapters.ia3 import ia3_state_dict
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.pretraining import BEST_RQ, MaskedClips
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.stock_cache import CacheSpaceError, StockCache, cache_bytes
from bestrq.train import TrainConfig, train
from bestrq.whisper_model import random_whisper
from stages.common import friendly_errors


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


def open_files(folder: Path) -> list[str]:
    """This process's descriptors open on a file in `folder` (the cache's is unlinked: its
    space is held as long as one is open)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/"):
                found.append(fd)
        except FileNotFoundError:  # the listing's own descriptor, closed since
            pass
    return found


@pytest.mark.parametrize("fallocate", [True, False])
def test_the_cache_reserves_every_block_of_its_file_when_made(monkeypatch, tmp_path, fallocate):
    """A sparse file would be given blocks as pages are written, and a disk that filled by then
    would end the run with SIGBUS: all blocks exist once the cache does, where posix_fallocate
    works and where the file system refuses it (zeros written)."""
    if not fallocate:
        def unsupported(*_):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        monkeypatch.setattr("bestrq.stock_cache.os.posix_fallocate", unsupported)
    cache = StockCache(5, (2, 1500, 8), folder=str(tmp_path))
    need = cache_bytes(5, 2, 1500, 8)
    fds = open_files(tmp_path)  # the file's and the map's (mmap holds a copy)
    stat = os.stat(f"/proc/self/fd/{fds[0]}")
    assert stat.st_size == need == 240_000
    assert stat.st_blocks * 512 >= need
    cache.put(torch.tensor([4]), torch.full((1, 2, 1500, 8), 0.5))
    assert torch.equal(cache.get(torch.tensor([4])), torch.full((1, 2, 1500, 8), 0.5).half())
    cache.close()
    assert open_files(tmp_path) == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM])
def test_a_disk_error_of_the_cache_is_one_line_naming_knob_size_and_folder(
        monkeypatch, tmp_path, capsys, code):
    """The reservation (ENOSPC, EDQUOT, EFBIG) or the map (ENOMEM) fails: one line through a
    stage's friendly_errors, and the file's space is given back at once."""
    def fail(*_, **__):
        raise OSError(code, os.strerror(code))
    where = "numpy.memmap" if code == errno.ENOMEM else "bestrq.stock_cache.os.posix_fallocate"
    monkeypatch.setattr(where, fail)
    with pytest.raises(CacheSpaceError) as caught:
        StockCache(1000, (1, 1500, 384), folder=str(tmp_path))
    assert caught.value.errno == code and isinstance(caught.value, OSError)
    assert str(caught.value).startswith(
        f"distill_cache: the stock outputs of 1000 clips need 1.07 GiB in {tmp_path} (TMPDIR), "
        f"where its file could not be made: {os.strerror(code)} ({errno.errorcode[code]}): ")
    assert str(caught.value).endswith("set distill_cache: false")
    assert open_files(tmp_path) == [] and list(tmp_path.iterdir()) == []
    capsys.readouterr()
    with pytest.raises(typer.Exit) as ended, friendly_errors():
        StockCache(1000, (1, 1500, 384), folder=str(tmp_path))
    assert ended.value.exit_code == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"error: {caught.value}\n"


def test_a_missing_folder_and_a_disk_too_small_are_one_line_through_a_stage(tmp_path, capsys,
                                                                             monkeypatch):
    with pytest.raises(typer.Exit), friendly_errors():
        StockCache(10, (1, 1500, 384), folder=str(tmp_path / "gone"))
    assert capsys.readouterr().err == (
        f"error: distill_cache: the stock outputs of 10 clips need 10.99 MiB in "
        f"{tmp_path / 'gone'} (TMPDIR), where its file could not be made: No such file or "
        "directory (ENOENT): free space, point TMPDIR elsewhere or set distill_cache: false\n")
    usage = type("Usage", (), {"free": 10 * 2**20})()
    monkeypatch.setattr("bestrq.stock_cache.shutil.disk_usage", lambda _: usage)
    with pytest.raises(typer.Exit), friendly_errors():
        StockCache(1000, (1, 1500, 384), folder=str(tmp_path))
    err = capsys.readouterr().err
    assert err.startswith("error: distill_cache: the stock outputs of 1000 clips need 1.07 GiB")
    assert err.count("\n") == 1


FILE_SIZE_LIMIT = """
import os, resource, signal, sys
from bestrq.stock_cache import StockCache
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that the write or fallocate says EFBIG
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # ulimit -f 1024
for fallocate in (True, False):
    if not fallocate:
        del os.posix_fallocate  # zeros written instead
    try:
        StockCache(100, (1, 1500, 384), folder=sys.argv[1])
    except RuntimeError as err:
        print(err.errno, err)
"""


def test_a_file_size_limit_is_one_line_whether_the_space_is_fallocated_or_written(tmp_path):
    """`ulimit -f` below the cache's size: EFBIG named, not an OSError traceback."""
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stderr == "", done.stderr
    line = (f"{errno.EFBIG} distill_cache: the stock outputs of 100 clips need 109.86 MiB in "
            f"{tmp_path} (TMPDIR), where its file could not be made: File too large (EFBIG): "
            "raise the file-size limit (ulimit -f) or point TMPDIR elsewhere or set "
            "distill_cache: false")
    assert done.stdout.splitlines() == [line, line]
    assert list(tmp_path.iterdir()) == []
