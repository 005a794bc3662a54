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
