"""Learning-rate schedules against values computed by hand at chosen updates."""

from __future__ import annotations

import pytest
import torch

from mtkit.config import TrainConfig
from mtkit.errors import MtkitError
from mtkit.training.schedule import Scheduler, constant, inverse_sqrt, noam, time_factor


def optimizer(groups: int = 1) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=0.5)


# --- the plain functions -----------------------------------------------------------------------
def test_inverse_sqrt_warms_up_linearly_from_the_initial_lr():
    assert inverse_sqrt(0, 1e-3, 100, 1e-4) == pytest.approx(1e-4)
    assert inverse_sqrt(25, 1e-3, 100, 1e-4) == pytest.approx(1e-4 + 9e-4 * 0.25)  # 3.25e-4
    assert inverse_sqrt(99, 1e-3, 100, 0.0) == pytest.approx(0.99e-3)


def test_inverse_sqrt_decays_with_the_square_root_after_warmup():
    assert inverse_sqrt(100, 1e-3, 100) == pytest.approx(1e-3)  # the peak
    assert inverse_sqrt(10_000, 1e-3, 100) == pytest.approx(1e-4)  # sqrt(100 / 10000) = 0.1
    assert inverse_sqrt(2500, 2e-3, 100) == pytest.approx(4e-4)  # sqrt(100 / 2500) = 0.2


def test_inverse_sqrt_without_warmup_starts_at_the_lr():
    assert inverse_sqrt(0, 1e-3, 0) == pytest.approx(1e-3)  # t and warmup count as 1
    assert inverse_sqrt(1, 1e-3, 0) == pytest.approx(1e-3)
    assert inverse_sqrt(4, 1e-3, 0) == pytest.approx(5e-4)


def test_noam_rises_linearly_then_falls_with_the_square_root():
    # d_model 64: 64^-0.5 = 1/8; warmup 16: 16^-1.5 = 1/64
    assert noam(0, 64, 16, 1.0) == pytest.approx(1 / 8 * 1 / 64)  # t = 0 counts as 1
    assert noam(4, 64, 16, 2.0) == pytest.approx(2 * 1 / 8 * 4 / 64)  # 1/64, rising
    assert noam(8, 64, 16, 2.0) == pytest.approx(2 * noam(4, 64, 16, 2.0))  # linear in t
    assert noam(16, 64, 16, 1.0) == pytest.approx(1 / 8 * 1 / 4)  # the peak: 16^-0.5 = 16 / 64
    assert noam(64, 64, 16, 1.0) == pytest.approx(1 / 8 * 1 / 8)  # 64^-0.5, falling
    assert noam(64, 64, 16, 3.0) == pytest.approx(3 * noam(64, 64, 16, 1.0))  # the factor scales


def test_constant_after_an_optional_warmup():
    assert constant(0, 0.01, 4, 0.002) == pytest.approx(0.002)
    assert constant(3, 0.01, 4, 0.002) == pytest.approx(0.008)  # 0.002 + 0.008 * 3/4
    assert constant(4, 0.01, 4, 0.002) == 0.01
    assert constant(10**6, 0.01, 4, 0.002) == 0.01
    assert constant(0, 0.01) == 0.01  # no warmup


def test_time_factors_fall_to_zero_at_the_budget():
    assert [time_factor("linear", f) for f in (0.0, 0.25, 0.5, 1.0)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    assert time_factor("cosine", 0.0) == pytest.approx(1.0)
    assert time_factor("cosine", 1 / 3) == pytest.approx(0.75)  # (1 + cos(pi/3)) / 2
    assert time_factor("cosine", 0.5) == pytest.approx(0.5)
    assert time_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)


def test_time_factors_clamp_outside_the_budget_and_none_is_one():
    assert time_factor("linear", 1.5) == 0.0  # past the budget: stays at zero
    assert time_factor("linear", -0.5) == 1.0
    assert time_factor("cosine", 2.0) == pytest.approx(0.0, abs=1e-12)
    assert time_factor("none", 0.7) == 1.0


# --- the scheduler -----------------------------------------------------------------------------
def test_scheduler_sets_every_param_group_and_follows_the_chosen_schedule():
    opt = optimizer(groups=2)
    cfg = TrainConfig(lr=1e-3, lr_scheduler="inverse_sqrt", warmup_updates=100, warmup_init_lr=0.0)
    sched = Scheduler(opt, cfg)
    assert sched.step(50) == pytest.approx(5e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-4])
    assert sched.step(400) == pytest.approx(5e-4)  # 1e-3 * sqrt(100 / 400)
    noam_sched = Scheduler(opt, TrainConfig(lr_scheduler="noam", warmup_updates=16, noam_factor=1.0), d_model=64)
    assert noam_sched.step(16) == pytest.approx(1 / 32)
    assert opt.param_groups[1]["lr"] == pytest.approx(1 / 32)


def test_scheduler_state_is_the_update_number():
    opt = optimizer()
    cfg = TrainConfig(lr=1e-3, lr_scheduler="constant", warmup_updates=10, warmup_init_lr=0.0)
    sched = Scheduler(opt, cfg)
    sched.step(7)
    assert sched.state_dict() == {"update": 7, "name": "constant"}
    other = Scheduler(opt, cfg)
    other.load_state_dict(sched.state_dict())
    assert other.update == 7
    assert other.lr_at(7) == sched.lr_at(7) == pytest.approx(7e-4)


def test_scheduler_time_decay_multiplies_the_schedule():
    opt = optimizer()
    cfg = TrainConfig(lr=1e-3, lr_scheduler="constant", warmup_updates=10, warmup_init_lr=0.0,
                      max_time_minutes=2, time_decay="linear")
    sched = Scheduler(opt, cfg)
    assert sched.step(5, elapsed=30.0) == pytest.approx(5e-4 * 0.75)  # warmup x (1 - 30/120)
    assert sched.step(20, elapsed=90.0) == pytest.approx(1e-3 * 0.25)
    assert sched.step(30, elapsed=500.0) == 0.0  # past the budget
    assert opt.param_groups[0]["lr"] == 0.0


def test_schedules():
    assert inverse_sqrt(0, 1e-3, 100, 0.0) == 0.0
    assert inverse_sqrt(50, 1e-3, 100, 0.0) == pytest.approx(5e-4)
    assert inverse_sqrt(100, 1e-3, 100) == pytest.approx(1e-3)
    assert inverse_sqrt(400, 1e-3, 100) == pytest.approx(5e-4)
    assert noam(4000, 512, 4000, 1.0) == pytest.approx(512**-0.5 * 4000**-0.5)
    assert noam(100, 512, 4000, 2.0) == pytest.approx(2 * 512**-0.5 * 100 * 4000**-1.5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p])
    sched = Scheduler(opt, TrainConfig(lr=1e-3, lr_scheduler="constant", warmup_updates=10, warmup_init_lr=0.0))
    assert sched.step(5) == pytest.approx(5e-4) and opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert sched.step(50) == pytest.approx(1e-3)
    with pytest.raises(MtkitError, match="lr_scheduler"):
        Scheduler(opt, TrainConfig(lr_scheduler="cosine"))


def test_time_decay_reaches_zero_when_the_budget_is_spent():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    cfg = TrainConfig(lr=1e-3, lr_scheduler="constant", warmup_updates=0, max_time_minutes=10, time_decay="linear")
    sched = Scheduler(opt, cfg)
    assert sched.step(1, elapsed=0.0) == pytest.approx(1e-3)
    assert sched.step(2, elapsed=150.0) == pytest.approx(7.5e-4)
    assert sched.step(3, elapsed=600.0) == 0.0 and opt.param_groups[0]["lr"] == 0.0
    cosine = Scheduler(opt, TrainConfig(lr=1e-3, lr_scheduler="inverse_sqrt", warmup_updates=100, max_time_minutes=10,
                                        time_decay="cosine"))
    assert cosine.step(400, elapsed=300.0) == pytest.approx(5e-4 * 0.5)  # inverse_sqrt x (1 + cos(pi/2)) / 2
    with pytest.raises(MtkitError, match="max_time_minutes"):
        Scheduler(opt, TrainConfig(time_decay="linear"))
    with pytest.raises(MtkitError, match="time_decay"):
        Scheduler(opt, TrainConfig(time_decay="exp", max_time_minutes=1))
