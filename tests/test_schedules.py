"""LR functions: boundaries, closed forms, megatron-core agreement, and properties of every shape."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpath_megatron import schedules as S
from lrpath_megatron.config import ConfigError, ScheduleConfig

ETA_MAX, ETA_MIN = 3e-4, 3e-5


def test_main_path_warmup_boundaries_and_constant():
    lr = S.WarmupConstant(ETA_MAX, 10)
    assert lr(0) == 0.0
    assert lr(5) == ETA_MAX * 5 / 10
    assert lr(9) == ETA_MAX * 9 / 10
    assert lr(10) == ETA_MAX  # first step at the peak: exactly the warmup length
    assert all(lr(s) == ETA_MAX for s in range(10, 500))
    assert S.WarmupConstant(ETA_MAX, 0)(0) == ETA_MAX
    with pytest.raises(ValueError):
        lr(-1)


@pytest.mark.parametrize("shape,closed", [
    ("cosine", lambda t: ETA_MIN + (ETA_MAX - ETA_MIN) * (1 + math.cos(math.pi * t)) / 2),
    ("linear", lambda t: ETA_MIN + (ETA_MAX - ETA_MIN) * (1 - t)),
    ("1-sqrt", lambda t: ETA_MIN + (ETA_MAX - ETA_MIN) * (1 - math.sqrt(t))),
    ("knee", lambda t: ETA_MAX if t <= 0.5 else ETA_MIN + (ETA_MAX - ETA_MIN) * (1 - t) / 0.5),
])
def test_branch_shapes_match_closed_forms(shape, closed):
    fork, end = 100, 201  # 101 steps: t = (step - 100) / 100
    lr = S.BranchDecay(ETA_MAX, ETA_MIN, fork, end, shape)
    assert lr(fork) == ETA_MAX
    assert lr(end - 1) == ETA_MIN  # the last trained step is exactly eta_min
    for step in range(fork, end):
        assert lr(step) == pytest.approx(closed((step - fork) / 100), rel=1e-12, abs=1e-18)
    assert lr(150) == pytest.approx(
        {"cosine": (ETA_MAX + ETA_MIN) / 2, "linear": (ETA_MAX + ETA_MIN) / 2,
         "1-sqrt": ETA_MIN + (ETA_MAX - ETA_MIN) * (1 - math.sqrt(0.5)), "knee": ETA_MAX}[shape], rel=1e-12)
    for outside in (fork - 1, end):
        with pytest.raises(ValueError):
            lr(outside)


def test_wsd_style_stable_fraction_keeps_peak_then_decays():
    lr = S.BranchDecay(ETA_MAX, ETA_MIN, 0, 101, "1-sqrt", stable_fraction=0.8)
    assert all(lr(s) == ETA_MAX for s in range(0, 81))
    assert lr(90) == pytest.approx(ETA_MIN + (ETA_MAX - ETA_MIN) * (1 - math.sqrt(0.5)), rel=1e-12)
    assert lr(100) == ETA_MIN


def test_multistep_default_drops_are_31_6_and_10_percent():
    lr = S.BranchDecay(ETA_MAX, ETA_MIN, 0, 101, "multistep", drop_factors=S.default_drop_factors(ETA_MAX, ETA_MIN, 2))
    assert lr(79) == ETA_MAX
    assert lr(80) == pytest.approx(ETA_MAX * math.sqrt(0.1), rel=1e-12)  # 31.6%
    assert lr(80) / ETA_MAX == pytest.approx(0.316, abs=5e-4)
    assert lr(89) == lr(80)
    assert lr(90) == ETA_MIN and lr(100) == ETA_MIN


def test_multistep_custom_points_and_bad_factors():
    lr = S.BranchDecay(1.0, 0.01, 0, 11, "multistep", drop_points=(0.5, 0.7, 0.9), drop_factors=(0.5, 0.1, 0.01))
    assert [lr(s) for s in (4, 5, 7, 9, 10)] == [1.0, 0.5, 0.1, 0.01, 0.01]
    with pytest.raises(ConfigError, match="must end at eta_min"):
        S.BranchDecay(ETA_MAX, ETA_MIN, 0, 10, "multistep", drop_factors=(0.5, 0.2))
    with pytest.raises(ConfigError, match="increasing"):
        S.BranchDecay(1.0, 0.1, 0, 10, "multistep", drop_points=(0.9, 0.8), drop_factors=(0.3, 0.1))


def test_branch_rejects_bad_input():
    with pytest.raises(ConfigError, match="not one of"):
        S.BranchDecay(ETA_MAX, ETA_MIN, 0, 10, "exponential")
    with pytest.raises(ConfigError, match="at least 2 steps"):
        S.BranchDecay(ETA_MAX, ETA_MIN, 5, 6, "cosine")


def _megatron_lrs(steps, **kwargs):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = OptimizerParamScheduler(opt, start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
                                    **kwargs)
    lrs = []
    for _ in range(steps):  # the LR in param_groups is the one the next optimizer step uses
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(1)
    return lrs


@pytest.mark.parametrize("style,wsd_style", [("cosine", None), ("linear", None), ("WSD", "minus_sqrt"),
                                             ("WSD", "cosine")])
def test_agrees_with_megatron_optimizer_param_scheduler(style, wsd_style):
    ours_style = {"WSD": "wsd"}.get(style, style)
    ours_wsd = {"minus_sqrt": "1-sqrt"}.get(wsd_style, wsd_style) or "linear"
    ours = S.WarmupDecay(ETA_MAX, ETA_MIN, 100, 1000, ours_style, wsd_decay_steps=300 if wsd_style else 0,
                         wsd_decay_style=ours_wsd)
    theirs = _megatron_lrs(1000, init_lr=0.0, max_lr=ETA_MAX, min_lr=ETA_MIN, lr_warmup_steps=100,
                           lr_decay_steps=1000, lr_decay_style=style, wsd_decay_steps=300 if wsd_style else None,
                           lr_wsd_decay_style=wsd_style)
    assert max(abs(ours(s) - theirs[s]) for s in range(1000)) <= 1e-12


def test_ptfs_is_megatron_cosine_ending_at_eta_min_on_last_step():
    lr = S.ptfs(ETA_MAX, ETA_MIN, 100, 1000)
    theirs = _megatron_lrs(1000, init_lr=0.0, max_lr=ETA_MAX, min_lr=ETA_MIN, lr_warmup_steps=100,
                           lr_decay_steps=999, lr_decay_style="cosine")
    assert max(abs(lr(s) - theirs[s]) for s in range(1000)) <= 1e-12
    assert lr(100) == ETA_MAX and lr(999) == ETA_MIN


def test_cpt_rewarms_from_eta_min_and_decays_per_version():
    lr = S.cpt(ETA_MAX, ETA_MIN, 10, start_step=500, total_steps=200)
    assert lr(500) == ETA_MIN  # continues from the previous release
    assert lr(510) == ETA_MAX
    assert lr(699) == ETA_MIN
    assert lr(505) == pytest.approx((ETA_MIN + ETA_MAX) / 2, rel=1e-12)
    with pytest.raises(ValueError):
        lr(499)


def test_from_schedule_config_styles():
    const = S.from_schedule_config(ScheduleConfig(style="constant", warmup_steps=5, train_steps=50), 1.0, 0.1)
    assert const(5) == 1.0 and const(49) == 1.0
    for style in ("cosine", "linear"):
        lr = S.from_schedule_config(ScheduleConfig(style=style, warmup_steps=5, train_steps=50), 1.0, 0.1)
        assert lr(0) == 0.0 and lr(5) == 1.0 and lr(49) == 0.1
    wsd = S.from_schedule_config(ScheduleConfig(style="wsd", warmup_steps=5, train_steps=50, wsd_decay_steps=10,
                                                wsd_decay_style="1-sqrt"), 1.0, 0.1)
    assert wsd(39) == 1.0 and wsd(40) < 1.0 and wsd(49) == 0.1  # the last 10 steps decay
    with pytest.raises(ConfigError, match="schedule"):
        S.from_schedule_config(ScheduleConfig(style="cosine", warmup_steps=50, train_steps=50), 1.0, 0.1)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.sampled_from(S.BRANCH_SHAPES),
    warmup=st.integers(0, 50),
    fork_after=st.integers(0, 500),
    length=st.integers(2, 400),
    eta_max=st.floats(1e-6, 1.0),
    ratio=st.floats(0.0, 1.0),
    stable=st.one_of(st.none(), st.floats(0.0, 0.95)),
)
def test_property_branch_continuous_at_fork_and_ends_at_eta_min(shape, warmup, fork_after, length, eta_max, ratio,
                                                                stable):
    eta_min = eta_max * ratio
    main = S.WarmupConstant(eta_max, warmup)
    assert all(main(s) == eta_max for s in range(warmup, warmup + 50))  # constant after warmup
    fork = warmup + fork_after
    if shape == "multistep" and eta_min == 0:
        return  # multi-step levels are positive factors of eta_max; a drop to 0 is refused (tested above)
    factors = S.default_drop_factors(eta_max, eta_min, 2) if shape == "multistep" else ()
    lr = S.BranchDecay(main(fork), eta_min, fork, fork + length, shape,
                       stable if shape != "multistep" else None, drop_factors=factors)
    assert lr(fork) == main(fork)
    assert lr(fork + length - 1) == eta_min
    values = [lr(s) for s in range(fork, fork + length)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # a decay never goes back up
    assert all(eta_min <= v <= eta_max for v in values)
