import math

import pytest
import torch

from bestrq.schedule import lr_lambda


def test_inverse_sqrt_warms_up_linearly_then_decays_as_inverse_sqrt():
    f = lr_lambda("inverse_sqrt", warmup_steps=4, max_steps=100)
    # update n = s + 1
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(15) == pytest.approx(math.sqrt(4 / 16)) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.2)


def test_inverse_sqrt_floor_at_min_ratio():
    f = lr_lambda("inverse_sqrt", warmup_steps=4, max_steps=100, min_ratio=0.3)
    assert f(99) == pytest.approx(0.3)
    assert f(15) == pytest.approx(0.5)


def test_cosine_reaches_min_ratio_at_max_steps():
    f = lr_lambda("cosine", warmup_steps=2, max_steps=12, min_ratio=0.1)
    assert f(0) == 0.5 and f(1) == 1.0
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # n = 7: halfway through the decay
    assert f(11) == pytest.approx(0.1)
    assert f(50) == pytest.approx(0.1)  # beyond max_steps it stays at the floor


def test_constant_and_no_warmup():
    f = lr_lambda("constant", warmup_steps=0, max_steps=10)
    assert [f(s) for s in (0, 5, 20)] == [1.0, 1.0, 1.0]
    g = lr_lambda("cosine", warmup_steps=0, max_steps=11)
    assert g(0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 11)))


def test_drives_lambdalr_once_per_update():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("inverse_sqrt", 2, 10))
    rates = []
    for _ in range(4):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([1.0, 2.0, 2.0 * math.sqrt(2 / 3), 2.0 * math.sqrt(2 / 4)])


@pytest.mark.parametrize("args, name", [(("linear", 1, 10), "lr_schedule"),
                                        (("cosine", -1, 10), "warmup_steps"),
                                        (("inverse_sqrt", 0, 10), "warmup_steps"),
                                        (("cosine", 1, 0), "max_steps"),
                                        (("cosine", 1, 10, 1.5), "min_lr_ratio")])
def test_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        lr_lambda(*args)


def test_lengths_in_updates_or_as_a_share_of_the_run():
    from bestrq.schedule import updates

    assert updates(5, 20, "w") == 5 and updates(0.25, 20, "w") == 5
    assert updates(0.25, 100_000, "w") == 25_000  # BEST-RQ's warm-up at 100k updates
    assert updates(0.1, 4, "w") == 0 and updates(0.1, 5, "w") == 1  # half rounds up
    assert updates(0, 10, "w") == 0
    with pytest.raises(ValueError, match="heads_only_steps"):
        updates(2.5, 10, "heads_only_steps")


def test_train_config_schedules_with_a_heads_only_phase():
    from bestrq.train import TrainConfig

    cfg = TrainConfig(lr_schedule="inverse_sqrt", warmup_steps=0.2, heads_only_steps=0.1,
                      max_steps=20)
    assert (cfg.warmup, cfg.heads_only) == (4, 2)
    vectors, heads = cfg.schedules([False, True])
    # heads: warm-up over updates 1..4, then sqrt(4 / n)
    assert [heads(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, math.sqrt(4 / 5)])
    # IA^3 vectors: nothing for updates 1-2, then the same schedule from update 3 on
    assert [vectors(s) for s in range(7)] == pytest.approx(
        [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, math.sqrt(4 / 5)])
    assert vectors(19) == pytest.approx(math.sqrt(4 / 18))
    # an objective without a leading group (fine-tuning) has no phase, however many groups
    (only,) = cfg.schedules([False])
    assert only(0) == 0.25
    assert [f(2) for f in cfg.schedules([False, False])] == [0.75, 0.75]
    # cosine: the vectors' decay ends at max_steps as the heads' does
    cos = TrainConfig(lr_schedule="cosine", warmup_steps=2, heads_only_steps=4, max_steps=12,
                      min_lr_ratio=0.1)
    v, h = cos.schedules([False, True])
    assert v(3) == 0.0 and v(4) == 0.5 and v(5) == 1.0 and v(11) == pytest.approx(0.1)
    assert h(11) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="heads_only_steps"):
        TrainConfig(heads_only_steps=12, max_steps=12).validate()


def test_a_tiny_warmup_in_a_long_run_is_pointed_out():
    from bestrq.train import TrainConfig

    (note,) = TrainConfig(warmup_steps=5, max_steps=100_000).advice()
    assert "warmup_steps is 5 of 100000" in note and "0.007x" in note
    assert TrainConfig(warmup_steps=0.25, max_steps=100_000).advice() == []
    assert TrainConfig(warmup_steps=5, max_steps=20).advice() == []


def test_rates_per_group_through_lambdalr_in_the_engine(tiny_whisper):
    from bestrq.masking import MaskingConfig
    from bestrq.model import BestRQModel
    from bestrq.pretraining import BEST_RQ
    from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
    from bestrq.train import TrainConfig, make_optimizer

    model = BestRQModel(tiny_whisper.encoder,
                        RandomProjectionQuantizer(QuantizerConfig(codebook_size=16)),
                        MaskingConfig())
    cfg = TrainConfig(learning_rate=1.0, lr_schedule="constant", warmup_steps=0,
                      heads_only_steps=2, max_steps=10)
    groups = BEST_RQ.groups(model)
    assert [(g.name, g.decays, g.leads) for g in groups] == [("", False, False),
                                                            ("heads", True, True)]
    assert {id(p) for p in groups[1].params} == {id(p) for p in model.heads.parameters()}
    assert len(groups[0].params) + len(groups[1].params) == len(model.trainable_parameters())
    opt = make_optimizer(groups, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, cfg.weight_decay]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.schedules([g.leads for g in groups]))
    rates = []
    for _ in range(4):
        rates.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert rates == [[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
