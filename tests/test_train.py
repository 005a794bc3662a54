import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _train_worker import SMALL_DIMS, RandomClips, small_model
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from whisper.model import MultiHeadAttention

from bestrq.batching import DataPosition, GlobalBatchSampler, epoch_order
from bestrq.checkpoint import list_checkpoints, load_latest
from bestrq.masking import draw_sample_mask
from bestrq.precision import describe_precision
from bestrq.pretraining import BEST_RQ, MaskedClips, clip_seed
from bestrq.throughput import encoder_flops, linear_flops, model_flops
from bestrq.train import (
    TrainConfig,
    TrainResult,
    accumulate_gradients,
    autocast_dtype,
    finish_gradients,
)
from bestrq.train import train as engine_train


def train(*args: Any, **kwargs: Any) -> TrainResult:
    """The engine with BEST-RQ's objective, as the pretrain stage runs it."""
    return engine_train(*args, objective=BEST_RQ, **kwargs)


WORKER = Path(__file__).with_name("_train_worker.py")
CPU = torch.device("cpu")


def fast_config(**kw) -> TrainConfig:
    base = dict(batch_size=2, max_steps=4, warmup_steps=2, checkpoint_every=2, num_workers=0,
                learning_rate=1e-2, weight_decay=0.01)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- config, data


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("accumulate_gradients", 0),
                                          ("learning_rate", 0.0), ("lr_schedule", "step"),
                                          ("precision", "fp16"), ("grad_clip", -1.0),
                                          ("adam_beta2", 1.0), ("max_nonfinite", 0),
                                          ("min_lr_ratio", 2.0)])
def test_config_validate_names_the_parameter(field, value):
    with pytest.raises(ValueError, match=field.replace("min_lr_ratio", "min_lr_ratio")):
        TrainConfig(**{field: value}).validate()
    TrainConfig().validate()


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    def updates(batch, accumulate, world, n_updates=5):
        samplers = [iter(GlobalBatchSampler(10, batch, accumulate, world, r, seed=3,
                                            start=DataPosition())) for r in range(world)]
        out = []
        for _ in range(n_updates):
            keys = [k for s in samplers for _ in range(accumulate) for k in next(s)]
            out.append(sorted(keys))
        return out

    single = updates(4, 1, 1)
    assert updates(2, 1, 2) == single == updates(1, 2, 2) == updates(2, 2, 1)
    # 10 clips, global batch 4: two updates per epoch, the last 2 clips of an epoch dropped
    order0 = epoch_order(10, 3, 0).tolist()
    assert [c for _, c in single[0]] == sorted(order0[:4])
    assert [c for _, c in single[1]] == sorted(order0[4:8])
    assert {e for e, _ in single[2]} == {1}
    assert sorted(epoch_order(10, 3, 1).tolist()) == list(range(10))
    assert epoch_order(10, 3, 1).tolist() != order0


def test_sampler_resumes_from_a_data_position():
    full = iter(GlobalBatchSampler(10, 2, 1, 1, 0, seed=0, start=DataPosition()))
    batches = [next(full) for _ in range(7)]
    sampler = GlobalBatchSampler(10, 2, 1, 1, 0, seed=0, start=DataPosition(0, 6))
    resumed = iter(sampler)
    assert [next(resumed) for _ in range(4)] == batches[3:]
    assert sampler.advance(DataPosition(0, 8)) == DataPosition(1, 0)


def test_a_dataset_smaller_than_a_global_batch_is_cycled_within_an_update():
    # The seed's command line on a small corpus: 3 clips, global batch 8 (2 x 2 x 2 ranks).
    samplers = [GlobalBatchSampler(3, 2, 2, 2, r, seed=5, start=DataPosition()) for r in (0, 1)]
    assert samplers[0].cycles and samplers[0].epochs_per_update == pytest.approx(8 / 3)
    streams = [iter(s) for s in samplers]
    updates = [[k for _ in range(2) for s in streams for k in next(s)] for _ in range(3)]
    # The stream is the epochs' orders one after another: update u takes keys 8u .. 8u + 7.
    stream = [(e, int(c)) for e in range(9) for c in epoch_order(3, 5, e)]
    for u, keys in enumerate(updates):
        assert sorted(keys) == sorted(stream[8 * u:8 * u + 8])
        assert len(set(keys)) == 8  # a clip recurs only as another (epoch, clip): a new mask
    assert samplers[0].advance(DataPosition()) == DataPosition(2, 2)
    # Resuming from a checkpointed position continues the same stream.
    resumed = [iter(GlobalBatchSampler(3, 2, 2, 2, r, seed=5, start=DataPosition(2, 2)))
               for r in (0, 1)]
    again = [k for _ in range(2) for s in resumed for k in next(s)]
    assert sorted(again) == sorted(updates[1])


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_is_bf16_on_cuda_and_on_cpus_with_bf16_hardware(monkeypatch, has_bf16):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    auto = TrainConfig(precision="auto")
    assert autocast_dtype(auto, CPU) == (torch.bfloat16 if has_bf16 else None)
    assert autocast_dtype(auto, torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype(TrainConfig(precision="fp32"), CPU) is None
    assert autocast_dtype(TrainConfig(precision="bf16"), CPU) == torch.bfloat16
    line = describe_precision(autocast_dtype(auto, CPU), CPU)
    assert line == ("bf16 autocast (CPU with AVX-512 BF16 / AMX)" if has_bf16 else "fp32")
    # AMX alone counts too.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert autocast_dtype(auto, CPU) == torch.bfloat16


def test_loss_and_gradients_stay_fp32_under_cpu_bf16_autocast():
    model = small_model(num_codebooks=2)
    model.distill_weight = 1.0  # the stock forward and the MSE too
    clips = MaskedClips(RandomClips(4), model.masking, seed=0)
    batch = batch_of(clips, [(0, i) for i in range(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*batch, with_metrics=True)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.trainable_parameters().items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, \
            name
    # bf16 matmuls change the loss only in its last digits of a fp32 run's.
    with torch.no_grad():
        reference = model(*batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(*batch).loss
    assert float(low) == pytest.approx(float(reference), rel=2e-2)
    assert float(low) != float(reference)


def test_masks_come_from_the_clip_seed():
    data = RandomClips(4)
    clips = MaskedClips(data, small_model().masking, seed=7)
    mel, frames, mask, noise = clips[(2, 3)]
    ref_mask, ref_noise = draw_sample_mask(int(frames), 200, 80, clips.masking, clip_seed(7, 2, 3))
    assert torch.equal(mask, ref_mask) and torch.equal(noise, ref_noise)
    assert torch.equal(mel, data[3][0])
    # Another epoch of the same clip: its own seed's draw, and a new noise.
    _, _, mask1, noise1 = clips[(1, 3)]
    ref_mask1, ref_noise1 = draw_sample_mask(int(frames), 200, 80, clips.masking,
                                             clip_seed(7, 1, 3))
    assert torch.equal(mask1, ref_mask1) and torch.equal(noise1, ref_noise1)
    assert (noise1 - noise).abs().mean() > 0.05
    assert mask[int(frames):].sum() == 0  # padding is never masked


# ----------------------------------------------------------------------------- gradients


def batch_of(clips, keys):
    return next(iter(DataLoader(clips, batch_size=len(keys), sampler=keys)))


def gradients(model, micro):
    model.zero_grad(set_to_none=True)
    params = list(model.trainable_parameters().values())
    stats = accumulate_gradients(model, micro, CPU, None, with_metrics=False)
    finish_gradients(params, stats, world_size=1)
    return [p.grad.clone() for p in params], stats


def test_accumulated_micro_batches_equal_one_large_batch():
    model = small_model()
    clips = MaskedClips(RandomClips(8), model.masking, seed=0)
    keys = [(0, i) for i in range(4)]
    whole, stats = gradients(model, [batch_of(clips, keys)])
    halves, stats2 = gradients(model, [batch_of(clips, keys[:2]), batch_of(clips, keys[2:])])
    uneven, _ = gradients(model, [batch_of(clips, keys[:1]), batch_of(clips, keys[1:])])
    assert stats.count == stats2.count > 0
    assert float(stats.loss_sum) == pytest.approx(float(stats2.loss_sum), rel=1e-6)
    for a, b, c in zip(whole, halves, uneven, strict=True):
        atol = 1e-5 * float(a.abs().max())  # float rounding on entries that nearly cancel
        torch.testing.assert_close(b, a, rtol=1e-5, atol=atol)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=atol)
    # The naive mean of micro-batch means differs: the masked-count weighting matters.
    model.zero_grad(set_to_none=True)
    for micro in ([batch_of(clips, keys[:1])], [batch_of(clips, keys[1:])]):
        mel, nv, mask, noise = micro[0]
        (model(mel, nv, mask, noise, with_metrics=False).loss / 2).backward()
    naive = model.heads.weight.grad
    assert not torch.allclose(naive, whole[-2], rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- the loop


def test_the_seeds_command_line_runs_on_a_corpus_smaller_than_its_global_batch(tmp_path,
                                                                             capsys):
    # `train --batch_size 4 --num_codebooks 16 --accumulate_gradients 256` on 5 clips: one
    # update of 1,024 clip passes, every clip about 205 times, each with its own mask.
    model = small_model(num_codebooks=16)
    start = {n: p.detach().clone() for n, p in model.trainable_parameters().items()}
    result = train(model, RandomClips(5), fast_config(batch_size=4, accumulate_gradients=256,
                                                      max_steps=1, warmup_steps=1), tmp_path)
    assert result.step == 1 and result.skipped == 0
    assert all(not torch.equal(p, start[n]) for n, p in model.trainable_parameters().items())
    note = capsys.readouterr()
    assert "5 clips, fewer than one global batch of 1024" in note.out + note.err
    assert "cycles through the data 204.8 times" in note.out + note.err


def test_train_updates_only_the_adapter_and_logs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model = small_model(num_codebooks=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.trainable_parameters().items()}
    logged = []
    result = train(model, RandomClips(12), fast_config(max_steps=3, log_every=2), tmp_path,
                   lambda s, m: logged.append((s, m)))
    assert result.step == 3 and result.skipped == 0
    assert [s for s, _ in logged] == [2]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(p, start[n]) for n, p in model.trainable_parameters().items())
    metrics = logged[0][1]
    for key in ("loss", "accuracy", "accuracy_cb0", "accuracy_cb1", "mask_fraction",
                "distinct_labels", "perplexity", "learning_rate", "grad_norm",
                "nonfinite_skipped", "clips_per_second", "frames_per_second", "step_time",
                "data_wait_fraction", "peak_memory_gb"):
        assert key in metrics, key
    assert metrics["learning_rate"] == pytest.approx(1e-2)  # update 2 = end of warm-up
    assert 0 < metrics["mask_fraction"] < 1 and metrics["loss"] > 0
    assert metrics["frames_per_second"] > metrics["clips_per_second"] * 100  # >= 100 frames/clip
    assert result.metrics is metrics
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    bar = capsys.readouterr().err.split("\r")[-1]  # the progress bar's last state
    assert "pretrain" in bar and "3/3" in bar and f"loss={metrics['loss']:.3f}" in bar


def test_gradient_clipping_bounds_the_gradient_the_optimiser_steps_with(tmp_path, monkeypatch):
    seen = []  # the total gradient norm at each optimiser step
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    for clip, folder in ((1e-3, "clipped"), (1e6, "free")):
        logged = []
        train(small_model(), RandomClips(8), fast_config(max_steps=2, grad_clip=clip),
              tmp_path / folder, lambda s, m, out=logged: out.append(m))
        reported = [m["grad_norm"] for m in logged]
        if clip < 1:
            assert all(r > 1e-2 for r in reported)  # the norm is reported before clipping
            assert seen == pytest.approx([1e-3] * 2, rel=1e-4)  # the step sees the clipped one
        else:
            assert seen[2:] == pytest.approx(reported, rel=1e-4)  # unclipped: as reported


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path):
    # Batch size 4 over 8 clips: each update draws a random half; NaN clips spoil some updates.
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.trainable_parameters().items()}
    with pytest.warns(UserWarning, match="non-finite"):
        result = train(model, RandomClips(8, nan_clips=frozenset({0})),
                       fast_config(batch_size=4, max_steps=4), tmp_path / "a")
    assert result.step == 4 and result.skipped >= 1
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters().values())
    model = small_model()
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="3 updates in a row"):
        train(model, RandomClips(8, nan_clips=frozenset(range(8))),
              fast_config(max_nonfinite=3), tmp_path / "b")
    assert all(torch.equal(p, before[n]) for n, p in model.trainable_parameters().items())


class Crash(Exception):
    pass


def crash_at(step):
    def log(s, m):
        if s == step:
            raise Crash
    return log


def adapter(model):
    return model.adapter_state_dict()


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_crash_and_corrupt_checkpoint_is_bitwise(tmp_path):
    data, cfg = RandomClips(10), fast_config(max_steps=6, batch_size=2, accumulate_gradients=2)
    reference = small_model()
    train(reference, data, cfg, tmp_path / "ref")

    ck = tmp_path / "ck"
    with pytest.raises(Crash):
        train(small_model(), data, cfg, ck, crash_at(5))  # checkpoints at 2 and 4
    assert load_latest(ck)[0] == 4
    newest = list_checkpoints(ck)[-1][1]
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: resume from step 2 instead
    resumed = small_model()
    with pytest.warns(UserWarning, match=newest.name):
        result = train(resumed, data, cfg, ck)
    assert result.step == 6
    assert_bitwise(adapter(resumed), adapter(reference))
    # A finished run has nothing left to do.
    again = small_model()
    assert train(again, data, cfg, ck).step == 6
    assert_bitwise(adapter(again), adapter(reference))


# ----------------------------------------------------------------------------- SIGKILL


def run_worker(out: Path, ckpt: Path, *extra: str, env: dict | None = None,
               kill_on: str | None = None) -> int:
    cmd = [sys.executable, str(WORKER), "--ckpt", str(ckpt), "--out", str(out), *extra]
    full_env = {**os.environ, "PYTHONPATH": str(WORKER.parent), **(env or {})}
    if kill_on is None:
        return subprocess.run(cmd, env=full_env, capture_output=True).returncode
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(kill_on):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait()


def test_sigkill_at_any_point_then_resume_matches_uninterrupted_run(tmp_path):
    args = ("--steps", "7", "--checkpoint-every", "2")
    assert run_worker(tmp_path / "ref", tmp_path / "ref_ck", *args) == 0
    out, ck = tmp_path / "out", tmp_path / "ck"
    kills = [dict(env={"BESTRQ_CHECKPOINT_KILL": "2:partial"}),  # torn write of the first one
             dict(extra=("--kill-after-step", "3")),  # between checkpoints
             dict(env={"BESTRQ_CHECKPOINT_KILL": "4:written"}),  # written, not yet renamed
             dict(kill_on="step 6")]  # whenever the parent gets to it
    for kill in kills:
        code = run_worker(out, ck, *args, *kill.get("extra", ()), env=kill.get("env"),
                          kill_on=kill.get("kill_on"))
        assert code == -signal.SIGKILL, kill
    assert run_worker(out, ck, *args) == 0
    assert_bitwise(load_file(out / "rank0.safetensors"), load_file(tmp_path / "ref" /
                                                                   "rank0.safetensors"))


# ----------------------------------------------------------------------------- FLOPs


def test_linear_flops_match_the_hand_count_and_torch():
    assert linear_flops(10, 3, 5, weight_grad=True, input_grad=False) == (300, 300)
    assert linear_flops(10, 3, 5, weight_grad=True, input_grad=True) == (300, 600)
    for weight_grad in (False, True):
        layer = torch.nn.Linear(3, 5, bias=False).requires_grad_(weight_grad)
        x = torch.randn(10, 3, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            layer(x).sum().backward()
        assert counter.get_total_flops() == sum(linear_flops(10, 3, 5, weight_grad, True))


@pytest.mark.parametrize("distill_weight", [0.0, 0.5])
def test_training_step_flops_match_torch_flop_counter(monkeypatch, distill_weight):
    # The math attention path makes QK^T and AV visible to the flop counter.
    monkeypatch.setattr(MultiHeadAttention, "use_sdpa", False)
    model = small_model(num_codebooks=2)
    model.distill_weight = distill_weight  # two more encoder forwards, one more backward
    clips = MaskedClips(RandomClips(3), model.masking, seed=0)
    mel, nv, mask, noise = batch_of(clips, [(0, 0), (0, 1), (0, 2)])
    with FlopCounterMode(display=False) as counter:
        out = model(mel, nv, mask, noise, with_metrics=False)
        out.loss.backward()
    assert model_flops(model, 3, out.num_masked)["total"] == counter.get_total_flops()


def test_flops_scale_linearly_with_batch():
    one = encoder_flops(SMALL_DIMS, 1, masked_targets=40, head_outputs=8192)
    four = encoder_flops(SMALL_DIMS, 4, masked_targets=160, head_outputs=8192)
    assert all(four[k] == 4 * one[k] for k in one)
    assert one["backward"] < 2 * one["forward"]  # frozen weights: no weight gradients


def test_peak_flops_and_mfu(monkeypatch):
    import bestrq.throughput as throughput

    assert throughput.peak_flops("cpu") is None and throughput.mfu(1e12, 1.0, "cpu") is None
    monkeypatch.setattr(throughput, "peak_flops", lambda device, dtype=None: 1e12)
    assert throughput.mfu(5e11, 2.0, "cuda") == pytest.approx(0.25)


def test_deterministic_switches_torch_to_deterministic_kernels_same_result_on_cpu(tmp_path,
                                                                                   monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        runs = []
        for deterministic in (False, True):
            model = small_model()
            train(model, RandomClips(8), fast_config(max_steps=2, deterministic=deterministic),
                  tmp_path / str(deterministic))
            runs.append({n: p.detach().clone() for n, p in
                         model.trainable_parameters().items()})
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        # On the CPU every kernel already is deterministic: the flag changes no bit.
        assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    finally:
        torch.use_deterministic_algorithms(before)


def test_every_seed_stream_is_named_once_and_distinct():
    from bestrq import asr, batching, finetune, model, pretraining, seeding

    assert len(set(seeding.STREAMS.values())) == len(seeding.STREAMS)
    # The values spell the names (part of every committed result: they must not change).
    spelled = {name: bytes.fromhex(f"{value:x}").decode() for name, value in
               seeding.STREAMS.items()}
    assert spelled == {"mask": "mask", "order": "order", "heads": "heads", "labels": "label",
                       "fallback": "fall"}
    assert (asr.FALLBACK_STREAM, finetune.LABELS_STREAM, model.HEADS_STREAM,
            pretraining.MASK_STREAM, batching.ORDER_STREAM) == (
        seeding.FALLBACK_STREAM, seeding.LABELS_STREAM, seeding.HEADS_STREAM,
        seeding.MASK_STREAM, seeding.ORDER_STREAM)
