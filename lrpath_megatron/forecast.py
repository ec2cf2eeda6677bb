"""Release forecasts from the loss-curve law of LR annealing (Tissue et al. 2024, arXiv 2408.11029).

    L(n) = L0 + A * S1(n) ** -alpha - C * S2(n)

after ``n`` updates with LRs ``lr[0..n-1]``: ``S1`` is the forward area (the sum of the LRs), ``S2`` the
annealing area (``m_i = lam * m_{i-1} + max(0, lr[i-1] - lr[i])``, ``S2 = sum m_i``). LR increases (warmup,
re-warmup) count as no annealing: the paper fits S2 on decays only.

The law is linear in (L0, A, C) for a fixed ``alpha``, so the fit scans ``alpha`` on a grid and solves a
least-squares problem for each (numpy only, deterministic). Its uncertainty comes from a residual bootstrap
with a fixed seed (the spread of the refits' forecasts): the same observations always give the same fit,
interval and choice.

A fit needs what identifies each parameter; without it :class:`ForecastError` says what is missing rather
than returning a number the data do not support.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lrpath_megatron.errors import LrpathError


class ForecastError(LrpathError):
    """Too little data for a fit (the message says what is missing)."""


@dataclass(frozen=True)
class LawConfig:
    momentum: float = 0.999  # lam of the annealing momentum (the paper's value)
    alpha_min: float = 0.02
    alpha_max: float = 2.0
    alpha_grid: int = 100  # log-spaced candidate exponents
    bootstrap: int = 200  # residual resamples for the uncertainty
    seed: int = 0
    min_points: int = 5  # 4 parameters + 1 degree of freedom for the residual scale


@dataclass(frozen=True)
class Curve:
    """Observed losses of one path: ``lrs[i]`` is the LR of update ``i`` from step 0 (the parent's updates
    included for a branch), ``losses[j]`` the loss after ``steps[j]`` updates.

    ``origin`` and ``group``: where the data blend last switched and which stretch of data the curve
    belongs to. The law describes one data distribution; a plan switches data at each version, after which
    the loss on the new blend starts a new power law. Curves of one group share (L0, A), counted from
    their ``origin``; alpha and the annealing response C are shared by all (see :func:`fit_law`)."""

    name: str
    lrs: np.ndarray
    steps: np.ndarray
    losses: np.ndarray
    origin: int = 0
    group: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", np.asarray(self.lrs, dtype=float))
        object.__setattr__(self, "steps", np.asarray(self.steps, dtype=int).reshape(-1))
        object.__setattr__(self, "losses", np.asarray(self.losses, dtype=float).reshape(-1))
        if len(self.steps) != len(self.losses):
            raise ValueError(f"curve {self.name}: {len(self.steps)} steps for {len(self.losses)} losses")
        if len(self.steps) and (self.steps.min() <= self.origin or self.steps.max() > len(self.lrs)):
            raise ValueError(f"curve {self.name}: observations outside its updates {self.origin + 1}..{len(self.lrs)}")

    def areas(self, momentum: float) -> tuple[np.ndarray, np.ndarray]:
        """(S1, S2) at the observations, counted from ``origin``."""
        s1, s2 = areas(self.lrs[self.origin:], momentum)
        return s1[self.steps - self.origin], s2[self.steps - self.origin]


def areas(lrs: Sequence[float], momentum: float = LawConfig.momentum) -> tuple[np.ndarray, np.ndarray]:
    """``(S1, S2)`` after 0..n updates (arrays of n + 1)."""
    lrs = np.asarray(lrs, dtype=float)
    s1 = np.concatenate([[0.0], np.cumsum(lrs)])
    drops = np.maximum(0.0, -np.diff(lrs, prepend=lrs[:1] if len(lrs) else lrs))
    m, s2 = 0.0, np.zeros(len(lrs) + 1)
    for i, d in enumerate(drops):
        m = momentum * m + d
        s2[i + 1] = s2[i] + m
    return s1, s2


@dataclass(frozen=True)
class LawFit:
    """Fitted parameters: ``groups[g] = (L0, A)``; ``alpha`` and ``C`` are shared."""

    groups: dict
    alpha: float
    C: float
    rmse: float  # of the fit's residuals (per degree of freedom)
    points: int
    config: LawConfig = field(repr=False)
    # Bootstrap refits, one row each: L0 and A of every group (in ``groups`` order), alpha, C.
    samples: np.ndarray = field(repr=False, default=None)

    def _at(self, curve_lrs: Sequence[float], origin: int, group: str, params: np.ndarray) -> np.ndarray:
        s1, s2 = areas(np.asarray(curve_lrs, dtype=float)[origin:], self.config.momentum)
        g = list(self.groups).index(group)
        L0, A, alpha, C = params[:, 2 * g], params[:, 2 * g + 1], params[:, -2], params[:, -1]
        return L0 + A * s1[-1] ** -alpha - C * s2[-1]

    def predict(self, lrs: Sequence[float], origin: int = 0, group: str = "") -> tuple[float, float]:
        """(loss, standard deviation) after the updates ``lrs`` (from step 0) of a path in ``group``. The
        deviation is the spread of the bootstrap refits' forecasts: the residuals (misfit and evaluation noise
        alike) enter through the parameters. Adding the residual scale once more made the backtests' +- 1 sd
        cover 97% of the releases (docs/forecast.md): honest intervals, not wide ones."""
        if group not in self.groups:
            raise ForecastError(f"no observations of {group or 'the data'} to forecast it from")
        best = np.array([[x for g in self.groups.values() for x in g] + [self.alpha, self.C]])
        mean = float(self._at(lrs, origin, group, best)[0])
        spread = float(np.std(self._at(lrs, origin, group, self.samples))) if self.samples is not None else 0.0
        return mean, spread

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "C": self.C, "rmse": self.rmse, "points": self.points,
                "momentum": self.config.momentum,
                "groups": {g or "all": {"L0": l0, "A": a} for g, (l0, a) in self.groups.items()}}


def check_identifiable(curves: Sequence[Curve], config: LawConfig = LawConfig()) -> None:
    """Raise :class:`ForecastError` naming everything missing for a fit: per group two observations at
    different steps before any decay (its L0 and A), in one group three (alpha), an observation after a
    decay (C), and one more observation than parameters (the noise)."""
    groups: dict[str, set] = {}
    decayed = 0
    n = 0
    for c in curves:
        s1, s2 = c.areas(config.momentum)
        groups.setdefault(c.group, set()).update(np.round(s1[s2 <= 0], 12))
        decayed += int(np.sum(s2 > 0))
        n += len(s1)
    missing = []
    params = 2 * len(groups) + 2
    if n < max(config.min_points, params + 1):
        missing.append(f"{max(config.min_points, params + 1)} loss observations (have {n})")
    for g, s in groups.items():
        if len(s) < 2:
            missing.append(f"2 observations at different steps before a decay in {g or 'the data'} (have {len(s)})")
    if not groups or max(len(s) for s in groups.values()) < 3:
        missing.append("3 observations at different steps before a decay in one stretch of data (to fit alpha)")
    if not decayed:
        missing.append("an observation after an LR decay (a finished branch) to fit the annealing term C")
    if missing:
        raise ForecastError("too little data for the annealing law: missing " + "; ".join(missing))


def fit_law(curves: Sequence[Curve], config: LawConfig = LawConfig()) -> LawFit:
    """Least-squares fit of the law to every observation of ``curves``: (L0, A) per group, alpha and C
    shared. A and C are kept >= 0: a loss that rises with training or with annealing is not the law."""
    check_identifiable(curves, config)
    names = list(dict.fromkeys(c.group for c in curves))
    parts = [(c.areas(config.momentum), names.index(c.group), c.losses) for c in curves]
    s1 = np.concatenate([p[0][0] for p in parts])
    s2 = np.concatenate([p[0][1] for p in parts])
    gid = np.concatenate([np.full(len(p[2]), p[1]) for p in parts])
    y = np.concatenate([p[2] for p in parts])
    alphas = np.geomspace(config.alpha_min, config.alpha_max, config.alpha_grid)
    best = _solve(s1, s2, gid, len(names), y[None, :], alphas)[0]
    fitted = _design(s1, s2, gid, len(names), best[-2]) @ _coef(best)
    residuals = y - fitted
    rmse = float(np.sqrt(np.sum(residuals ** 2) / max(1, len(y) - len(best))))
    rng = np.random.default_rng(config.seed)
    resampled = fitted[None, :] + rng.choice(residuals, size=(config.bootstrap, len(y)), replace=True)
    samples = _solve(s1, s2, gid, len(names), resampled, alphas)
    groups = {g: (float(best[2 * i]), float(best[2 * i + 1])) for i, g in enumerate(names)}
    return LawFit(groups, float(best[-2]), float(best[-1]), rmse, len(y), config, samples)


def _design(s1: np.ndarray, s2: np.ndarray, gid: np.ndarray, n_groups: int, alpha: float) -> np.ndarray:
    """Columns: per group its indicator (L0) and S1^-alpha (A), then -S2 (C)."""
    cols = []
    for g in range(n_groups):
        on = (gid == g).astype(float)
        cols += [on, on * s1 ** -alpha]
    return np.stack(cols + [-s2], axis=1)


def _coef(params: np.ndarray) -> np.ndarray:
    """The linear coefficients of a parameter row (L0, A per group, alpha, C): alpha left out."""
    return np.concatenate([params[:-2], params[-1:]])


def _solve(s1, s2, gid, n_groups: int, ys: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Per row of ``ys``: the parameters (L0, A per group, alpha, C) of the best alpha on the grid. A
    negative A or C is held at 0 and the rest refitted (an active set that only grows: it ends)."""
    n_coef = 2 * n_groups + 1
    nonneg = [2 * g + 1 for g in range(n_groups)] + [n_coef - 1]
    best = np.zeros((len(ys), n_coef + 1))
    best_sse = np.full(len(ys), np.inf)
    for alpha in alphas:
        x = _design(s1, s2, gid, n_groups, alpha)
        coef = np.linalg.lstsq(x, ys.T, rcond=None)[0].T  # (rows, n_coef)
        held = coef[:, nonneg] < 0
        pending = held.any(axis=1)
        bits = 1 << np.arange(len(nonneg))
        while pending.any():  # rows with the same held set (as a bit pattern) are solved together
            keys = held @ bits
            for key in np.unique(keys[pending]):
                rows = pending & (keys == key)
                free = [j for j in range(n_coef) if not any(key & b and j == nonneg[i] for i, b in enumerate(bits))]
                solved = np.zeros((rows.sum(), n_coef))
                solved[:, free] = np.linalg.lstsq(x[:, free], ys[rows].T, rcond=None)[0].T
                coef[rows] = solved
            negative = coef[:, nonneg] < 0
            pending = negative.any(axis=1)
            held |= negative
        sse = np.sum((ys - coef @ x.T) ** 2, axis=1)
        better = sse < best_sse
        best_sse[better] = sse[better]
        best[better, :-2] = coef[better, :-1]
        best[better, -2] = alpha
        best[better, -1] = coef[better, -1]
    return best
