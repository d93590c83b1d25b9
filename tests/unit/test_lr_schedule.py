"""Learning-rate schedule: warmup, the three decay styles, param groups, resume."""
import math

import pytest

from megatron_lsh.config import ConfigError, OptimizerConfig
from megatron_lsh.training.lr_schedule import OptimizerParamScheduler


class FakeOptimizer:
    """Anything with param_groups (a list of dicts) is enough."""

    def __init__(self, *groups):
        self.param_groups = [dict(g) for g in groups] or [{}]


def lrs(style, steps, **kwargs):
    opt = FakeOptimizer()
    sched = OptimizerParamScheduler(opt, max_lr=1.0, min_lr=0.1, lr_decay_style=style, **kwargs)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def test_linear_warmup_then_cosine_decay_to_min_lr():
    out = lrs("cosine", 14, lr_warmup_iters=2, lr_decay_iters=12)
    assert out[:3] == [0.0, 0.5, 1.0]
    # Half-way through the decay the cosine is at the midpoint.
    assert out[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert out[12] == pytest.approx(0.1)
    assert out[13:] == [0.1, 0.1]
    assert all(a >= b for a, b in zip(out[2:], out[3:]))


def test_linear_decay_and_constant():
    out = lrs("linear", 11, lr_decay_iters=10)
    assert out[0] == 1.0 and out[5] == pytest.approx(0.55) and out[10] == pytest.approx(0.1)
    assert lrs("constant", 5, lr_warmup_iters=2, lr_decay_iters=4) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_from_config_uses_train_iters_and_warmup_fraction():
    opt = FakeOptimizer()
    cfg = OptimizerConfig(lr=2.0, min_lr=0.0, lr_decay_style="linear", lr_warmup_fraction=0.1,
                          weight_decay=0.05)
    sched = OptimizerParamScheduler.from_config(opt, cfg, train_iters=40)
    assert (sched.lr_warmup_iters, sched.lr_decay_iters) == (4.0, 40)
    sched.step(2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_group_multipliers_and_overrides():
    opt = FakeOptimizer({"wd_mult": 0.0}, {"lr_mult": 0.5}, {"max_lr": 4.0, "min_lr": 4.0})
    OptimizerParamScheduler(opt, max_lr=1.0, lr_decay_iters=10, lr_decay_style="constant",
                            weight_decay=0.1)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5, 4.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1, 0.1]


def test_state_dict_round_trip_resumes_the_same_lr():
    opt_a, opt_b = FakeOptimizer(), FakeOptimizer()
    kwargs = dict(max_lr=1.0, min_lr=0.1, lr_warmup_iters=3, lr_decay_iters=20)
    a = OptimizerParamScheduler(opt_a, **kwargs)
    a.step(7)
    b = OptimizerParamScheduler(opt_b, **kwargs)
    assert b.load_state_dict(a.state_dict()) == []
    assert b.num_steps == 7 and opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    a.step()
    b.step()
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]


def test_load_reports_changed_hyperparameters_and_can_take_the_saved_ones():
    saved = OptimizerParamScheduler(FakeOptimizer(), max_lr=1.0, lr_decay_iters=20)
    saved.step(5)
    opt = FakeOptimizer()
    new = OptimizerParamScheduler(opt, max_lr=2.0, lr_decay_iters=40)
    assert new.load_state_dict(saved.state_dict()) == ["max_lr", "lr_decay_iters"]
    assert new.max_lr == 2.0
    new.load_state_dict(saved.state_dict(), use_checkpoint_values=True)
    assert (new.max_lr, new.lr_decay_iters) == (1.0, 20)
    assert opt.param_groups[0]["lr"] == saved.get_lr()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr_warmup_iters=10, lr_decay_iters=10), r"learning-rate warmup \(10 iterations\) must end before"),
    (dict(lr_decay_iters=0), "lr_decay_iters must be positive"),
    (dict(lr_decay_iters=5, lr_decay_style="step"), "lr_decay_style must be"),
    (dict(lr_decay_iters=5, min_lr=2.0), r"min_lr \(2.0\) must be in \[0, max_lr \(1.0\)\]"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerParamScheduler(FakeOptimizer(), max_lr=1.0, **kwargs)
