"""Learning-rate paths as pure functions of the global step (and of the tokens seen).

Conventions (the same as megatron-core's ``OptimizerParamScheduler``, so results compare 1:1):
- ``lr(step)`` is the LR of the optimizer update at 0-based global step ``step``, i.e. after ``step``
  updates have been completed.
- Linear warmup over ``W`` steps: ``lr(s) = init + (peak - init) * s / W`` for ``s <= W``, so step 0 uses
  ``init`` (0 by default) and step ``W`` is the first at the peak.
- A branch decays over the steps it trains, ``fork .. end-1``: its first step is at the main path's LR and
  its LAST trained step is exactly at ``eta_min`` (a complete decay before the release).

Every schedule is a small frozen dataclass with ``__call__(step) -> float``; nothing here needs an
optimizer or torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from lrpath_megatron.config import ConfigError, ScheduleConfig

# Decay curves f(t) on t in [0, 1] with f(0) = 1 and f(1) = 0; the LR is eta_min + (peak - eta_min) * f(t).
DECAY_CURVES: dict[str, Callable[[float], float]] = {
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "linear": lambda t: 1.0 - t,
    "1-sqrt": lambda t: 1.0 - math.sqrt(t),
}
BRANCH_SHAPES = ("cosine", "linear", "1-sqrt", "knee", "multistep")
# The knee schedule's default: half the branch at the peak, then linear decay.
KNEE_STABLE_FRACTION = 0.5
# The common multi-step recipe: drops at 80% and 90% of the branch (to 31.6% and 10% when eta_min/eta_max = 0.1).
MULTISTEP_POINTS = (0.8, 0.9)


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


# --------------------------------------------------------------------------------------------------
# Main path
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupConstant:
    """The main path: linear warmup from 0 to ``eta_max`` over ``warmup_steps``, then constant."""

    eta_max: float
    warmup_steps: int

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return self.eta_max * step / self.warmup_steps
        return self.eta_max  # exact from step warmup_steps on (eta_max * W / W may round)


# --------------------------------------------------------------------------------------------------
# Branch decays
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BranchDecay:
    """A branch trained on steps ``fork_step .. end_step-1`` that decays from ``start_lr`` to ``eta_min``.

    ``t = (step - fork_step) / (end_step - 1 - fork_step)`` runs from 0 at the fork to 1 at the last step.
    ``shape``: cosine | linear | 1-sqrt (a decay over the whole branch; with ``stable_fraction`` > 0 the
    branch first stays at ``start_lr``, WSD-style), knee (stable, then linear; default stable fraction 0.5),
    multistep (piecewise constant: at ``t >= drop_points[i]`` the LR is ``start_lr * drop_factors[i]``;
    the last factor must land on ``eta_min``).
    """

    start_lr: float
    eta_min: float
    fork_step: int
    end_step: int
    shape: str = "cosine"
    stable_fraction: Optional[float] = None  # None: 0.5 for knee, 0 for the others
    drop_points: tuple = MULTISTEP_POINTS
    drop_factors: tuple = ()

    def __post_init__(self) -> None:
        if self.shape not in BRANCH_SHAPES:
            raise ConfigError(f"shape={self.shape!r} is not one of {', '.join(BRANCH_SHAPES)}")
        if self.end_step - self.fork_step < 2:
            raise ConfigError(
                f"a branch needs at least 2 steps to decay (fork {self.fork_step}, end {self.end_step}): "
                "its first step is at the main path's LR and its last at eta_min"
            )
        if self.stable_fraction is None:
            object.__setattr__(self, "stable_fraction", KNEE_STABLE_FRACTION if self.shape == "knee" else 0.0)
        if not 0.0 <= self.stable_fraction < 1.0:
            raise ConfigError(f"stable_fraction={self.stable_fraction} must be in [0, 1)")
        assert 0.0 <= self.eta_min <= self.start_lr, "plans validate eta_min <= eta_max"
        if self.shape == "multistep":
            check_multistep(self.drop_points, self.drop_factors, self.start_lr, self.eta_min)

    def fraction(self, step: int) -> float:
        """Progress t in [0, 1] of ``step`` through the branch."""
        if not self.fork_step <= step < self.end_step:
            raise ValueError(f"step {step} is outside the branch's steps {self.fork_step}..{self.end_step - 1}")
        return (step - self.fork_step) / (self.end_step - 1 - self.fork_step)

    def __call__(self, step: int) -> float:
        t = self.fraction(step)
        # Both ends exact, whatever rounding the curve has: continuous at the fork, complete at the end.
        if t == 0.0:
            return self.start_lr
        if t == 1.0:
            return self.eta_min
        if self.shape == "multistep":
            lr = self.start_lr
            for point, factor in zip(self.drop_points, self.drop_factors):
                if t >= point:
                    lr = self.start_lr * factor
            return self.eta_min if t >= self.drop_points[-1] else lr
        stable = self.stable_fraction
        if t <= stable:
            return self.start_lr
        curve = DECAY_CURVES["linear" if self.shape == "knee" else self.shape]
        return self.eta_min + (self.start_lr - self.eta_min) * curve((t - stable) / (1.0 - stable))


def default_drop_factors(eta_max: float, eta_min: float, n_points: int) -> tuple:
    """Geometric drops ending at eta_min: with eta_min/eta_max = 0.1 and 2 points, 31.6% then 10%."""
    ratio = eta_min / eta_max
    return tuple(ratio ** ((i + 1) / n_points) for i in range(n_points))


def check_multistep(points: tuple, factors: tuple, eta_max: float, eta_min: float) -> None:
    if not points or len(points) != len(factors):
        raise ConfigError(
            f"multistep needs as many drop_factors as drop_points (got {len(factors)} factors for "
            f"{len(points)} points)"
        )
    if any(not 0.0 < p < 1.0 for p in points) or list(points) != sorted(set(points)):
        raise ConfigError(f"drop_points={list(points)} must be increasing fractions of the branch in (0, 1)")
    if any(not 0.0 < f <= 1.0 for f in factors) or list(factors) != sorted(factors, reverse=True):
        raise ConfigError(f"drop_factors={list(factors)} must be non-increasing factors of eta_max in (0, 1]")
    if not math.isclose(factors[-1] * eta_max, eta_min, rel_tol=1e-9, abs_tol=1e-15):
        raise ConfigError(
            f"the last multistep drop factor {factors[-1]} gives LR {factors[-1] * eta_max:.6g} but the branch "
            f"must end at eta_min={eta_min:.6g}: set the last factor to eta_min/eta_max="
            f"{eta_min / eta_max:.6g} or leave drop_factors out (geometric drops to eta_min)"
        )


# --------------------------------------------------------------------------------------------------
# Single-run schedules (Megatron semantics)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupDecay:
    """Megatron's warmup + decay, parameter for parameter (``OptimizerParamScheduler`` with ``init_lr``,
    ``max_lr``, ``min_lr``, ``lr_warmup_steps``, ``lr_decay_steps``, ``lr_decay_style`` in constant |
    linear | cosine | WSD, ``wsd_decay_steps``, ``lr_wsd_decay_style`` in linear | cosine | 1-sqrt).
    The LR reaches ``min_lr`` at step ``decay_steps`` and stays there."""

    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    style: str = "cosine"
    init_lr: float = 0.0
    wsd_decay_steps: int = 0
    wsd_decay_style: str = "linear"

    def __post_init__(self) -> None:
        if self.style not in ("constant", "linear", "cosine", "wsd"):
            raise ConfigError(f"style={self.style!r} is not one of constant, linear, cosine, wsd")
        if self.style == "wsd" and self.wsd_decay_style not in DECAY_CURVES:
            raise ConfigError(f"wsd_decay_style={self.wsd_decay_style!r} is not one of {', '.join(DECAY_CURVES)}")
        if not 0 <= self.warmup_steps < self.decay_steps and self.style != "constant":
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be in [0, decay_steps={self.decay_steps})")
        # +1: the decay may start right at the warmup's peak step (schedule.wsd_decay_steps = train - warmup).
        if self.style == "wsd" and not 0 < self.wsd_decay_steps <= self.decay_steps - self.warmup_steps + 1:
            raise ConfigError(
                f"wsd_decay_steps={self.wsd_decay_steps} must be in (0, decay_steps - warmup_steps + 1]"
            )

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * step / self.warmup_steps
        if step == self.warmup_steps or self.style == "constant":
            return self.max_lr  # Megatron computes this step as init + (max - init) * W / W
        if step > self.decay_steps:
            return self.min_lr
        if self.style == "wsd":
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if step <= anneal_start:
                return self.max_lr
            coeff = DECAY_CURVES[self.wsd_decay_style]((step - anneal_start) / self.wsd_decay_steps)
        else:
            ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
            coeff = DECAY_CURVES[self.style](ratio)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


def ptfs(eta_max: float, eta_min: float, warmup_steps: int, total_steps: int, style: str = "cosine") -> WarmupDecay:
    """Pre-training from scratch for one version: warmup, then a full decay that reaches ``eta_min`` on
    the last of ``total_steps`` steps (step ``total_steps - 1``)."""
    return WarmupDecay(eta_max, eta_min, warmup_steps, total_steps - 1, style)


@dataclass(frozen=True)
class Shifted:
    """A schedule that starts at global step ``offset`` (its own step 0)."""

    inner: Callable[[int], float]
    offset: int

    def __call__(self, step: int) -> float:
        if step < self.offset:
            raise ValueError(f"step {step} is before this schedule's first step {self.offset}")
        return self.inner(step - self.offset)


def cpt(eta_max: float, eta_min: float, warmup_steps: int, start_step: int, total_steps: int,
        style: str = "cosine") -> Shifted:
    """Continual pre-training of one version from the previous release: re-warmup from ``eta_min`` (where
    the previous release ended) to ``eta_max``, then decay to ``eta_min`` on the version's last step.
    Steps are global: the version trains ``start_step .. start_step + total_steps - 1``."""
    return Shifted(WarmupDecay(eta_max, eta_min, warmup_steps, total_steps - 1, style, init_lr=eta_min), start_step)


def from_schedule_config(cfg: ScheduleConfig, lr_max: float, lr_min: float) -> Callable[[int], float]:
    """The LR function of a stand-alone run (``lrpath train CONFIG.yaml``). Decaying styles reach
    ``lr_min`` on the last step, ``train_steps - 1``."""
    cfg.validate()
    if cfg.style == "constant":
        return WarmupConstant(lr_max, cfg.warmup_steps)
    try:
        return WarmupDecay(lr_max, lr_min, cfg.warmup_steps, cfg.train_steps - 1, cfg.style,
                           wsd_decay_steps=cfg.wsd_decay_steps, wsd_decay_style=cfg.wsd_decay_style)
    except ConfigError as exc:
        raise ConfigError(
            f"schedule: {exc} (a {cfg.style} decay needs schedule.train_steps > schedule.warmup_steps + 1)"
        ) from None
