"""The multi-power law (Luo et al. 2025, arXiv 2503.12811) as a second law for release forecasts:

    L(t) = L0 + A * S1(t) ** -alpha - B * sum_k (lr[k-1] - lr[k]) * G(lr[k] ** -gamma * S_k(t)),
    G(x) = 1 - (C * x + 1) ** -beta,      S_k(t) = lr[k] + ... + lr[t-1]

Each LR drop's contribution to the loss saturates as training goes on at the lower LR (the annealing law
instead counts every drop with one momentum). Fitted like :mod:`lrpath_megatron.forecast`: (L0, A) per
stretch of data from its origin, the rest shared; linear in (L0, A, B) for fixed (alpha, C, beta, gamma),
which a grid scans. Its uncertainty is the linear parameters' spread at the best grid point (a bootstrap
of the whole grid would cost 100 x more).

Kept beside the annealing law to compare them by backtest (``benchmarks/forecast_accuracy.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lrpath_megatron.forecast import Curve, check_identifiable

ALPHAS = np.geomspace(0.05, 1.5, 15)
CS = np.geomspace(0.01, 100.0, 9)
BETAS = np.geomspace(0.2, 2.0, 6)
GAMMAS = (0.3, 0.45, 0.6, 0.75)


def _drop_terms(lrs: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(drop lr[k-1] - lr[k], lr[k], S_k(t)) of every LR drop k < t (updates from 0)."""
    lrs = np.asarray(lrs[:t], dtype=float)
    drops = np.maximum(0.0, -np.diff(lrs, prepend=lrs[:1]))
    k = np.nonzero(drops > 0)[0]
    tail = np.cumsum(lrs[::-1])[::-1]  # tail[k] = lr[k] + ... + lr[t-1]
    return drops[k], lrs[k], tail[k]


@dataclass(frozen=True)
class MplFit:
    groups: dict  # group -> (L0, A)
    alpha: float
    B: float
    C: float
    beta: float
    gamma: float
    rmse: float
    cov: np.ndarray  # covariance of the linear coefficients (L0, A per group, B)

    def _row(self, lrs: np.ndarray, origin: int, group: str) -> np.ndarray:
        lrs = np.asarray(lrs, dtype=float)
        g = list(self.groups).index(group)
        d, eta, s = _drop_terms(lrs[origin:], len(lrs) - origin)
        ld = float(np.sum(d * (1 - (self.C * eta ** -self.gamma * s + 1) ** -self.beta)))
        row = np.zeros(2 * len(self.groups) + 1)
        row[2 * g], row[2 * g + 1], row[-1] = 1.0, np.sum(lrs[origin:]) ** -self.alpha, -ld
        return row

    def predict(self, lrs: Sequence[float], origin: int = 0, group: str = "") -> tuple[float, float]:
        row = self._row(np.asarray(lrs, dtype=float), origin, group)
        coef = np.array([x for g in self.groups.values() for x in g] + [self.B])
        return float(row @ coef), float(np.sqrt(max(0.0, row @ self.cov @ row)))


def fit_mpl(curves: Sequence[Curve]) -> MplFit:
    """Least squares over the grid of (alpha, C, beta, gamma), A and B >= 0 (grid points where the best
    linear fit has either negative are passed over). Refuses as the annealing law does."""
    check_identifiable(curves)
    names = list(dict.fromkeys(c.group for c in curves))
    obs_id, d_all, eta_all, s_all, s1, gid, y = [], [], [], [], [], [], []
    for c in curves:
        lrs = c.lrs[c.origin:]
        for t, loss in zip(c.steps - c.origin, c.losses):
            d, eta, s = _drop_terms(lrs, t)
            obs_id.append(np.full(len(d), len(y)))
            d_all.append(d), eta_all.append(eta), s_all.append(s)
            s1.append(np.sum(lrs[:t])), gid.append(names.index(c.group)), y.append(loss)
    obs_id, d_all, eta_all, s_all = map(np.concatenate, (obs_id, d_all, eta_all, s_all))
    s1, gid, y = np.array(s1), np.array(gid), np.array(y)
    n, n_groups = len(y), len(names)
    best = (np.inf, None)
    for gamma in GAMMAS:
        scaled = eta_all ** -gamma * s_all
        for C in CS:
            for beta in BETAS:
                ld = np.bincount(obs_id, d_all * (1 - (C * scaled + 1) ** -beta), minlength=n)
                for alpha in ALPHAS:
                    x = _design(s1, gid, n_groups, alpha, ld)
                    coef = np.linalg.lstsq(x, y, rcond=None)[0]
                    if np.any(coef[1:2 * n_groups:2] < 0) or coef[-1] < 0:
                        continue
                    sse = float(np.sum((y - x @ coef) ** 2))
                    if sse < best[0]:
                        best = (sse, (alpha, C, beta, gamma, coef, x))
    if best[1] is None:
        raise ValueError("no grid point of the multi-power law fits with A, B >= 0")
    sse, (alpha, C, beta, gamma, coef, x) = best
    dof = max(1, n - len(coef) - 4)
    rmse = float(np.sqrt(sse / dof))
    cov = rmse ** 2 * np.linalg.pinv(x.T @ x)
    groups = {g: (float(coef[2 * i]), float(coef[2 * i + 1])) for i, g in enumerate(names)}
    return MplFit(groups, float(alpha), float(coef[-1]), float(C), float(beta), float(gamma), rmse, cov)


def _design(s1: np.ndarray, gid: np.ndarray, n_groups: int, alpha: float, ld: np.ndarray) -> np.ndarray:
    cols = []
    for g in range(n_groups):
        on = (gid == g).astype(float)
        cols += [on, on * s1 ** -alpha]
    return np.stack(cols + [-ld], axis=1)
