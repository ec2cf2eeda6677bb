"""WSM merge weights: the coefficients that make a merge of constant-LR checkpoints emulate an LR decay.

Checkpoints theta_0 .. theta_k are taken at equal spacing along a constant-LR path, u_i being the updates
between theta_{i-1} and theta_i. For coefficients c_0..c_k summing to 1,

    sum_j c_j theta_j = theta_0 - sum_i w_i u_i,     w_i = sum_{j >= i} c_j   (i = 1..k),

so a merge equals training the same updates with LR multipliers w_i. Given a decay curve f on [0, 1] with
f(0) = 1 we sample w_i = f(i / (k + 1)): the window is k + 1 equal segments, segment 0 (the main path up
to theta_0) at f(0) = 1 and segment i at f(i / (k + 1)). With this sampling the plain mean of k + 1
checkpoints is exactly linear decay. Then c_k = w_k, c_j = w_j - w_{j+1}, c_0 = 1 - w_1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from lrpath_megatron.config import ConfigError
from lrpath_megatron.schedules import DECAY_CURVES

# Coefficients must sum to 1 to this tolerance (user-typed decimals such as 0.1,0.2,0.7).
SUM_TOLERANCE = 1e-6

SPEC_HELP = (
    "linear | cosine | 1-sqrt | mean | ema:BETA (0<BETA<1) | points:X:Y,X:Y,... (a decay curve through "
    "the points, from 0:1 to 1:Y, non-increasing) | C0,C1,...,Ck (explicit coefficients, oldest first, sum 1)"
)


@dataclass(frozen=True)
class MergeWeights:
    """How k + 1 checkpoints (oldest first) are merged, and the decay that merge emulates."""

    method: str  # linear | cosine | 1-sqrt | points | mean | ema | explicit
    spec: str  # the text it was parsed from
    coefficients: tuple[float, ...]  # c_0..c_k, one per checkpoint, oldest first; sum 1
    multipliers: tuple[float, ...]  # w_1..w_k: LR multiplier each interval's updates get in the emulation

    @property
    def num_checkpoints(self) -> int:
        return len(self.coefficients)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "spec": self.spec,
            "coefficients": list(self.coefficients),
            "emulated_lr_multipliers": list(self.multipliers),
        }

    def table(self, labels: Sequence[str] | None = None) -> str:
        """Human-readable table: one row per checkpoint with its coefficient and the multiplier of the
        updates that lead to it."""
        labels = list(labels) if labels else [f"checkpoint {j}" for j in range(self.num_checkpoints)]
        width = max(len(s) for s in labels)
        rows = [f"merge weights: {self.spec} ({self.num_checkpoints} checkpoints)",
                f"{'j':>3}  {'checkpoint':<{width}}  {'coefficient':>12}  LR multiplier of the updates into it"]
        for j, (label, c) in enumerate(zip(labels, self.coefficients)):
            mult = "(main path, 1)" if j == 0 else f"{self.multipliers[j - 1]:.6f}"
            rows.append(f"{j:>3}  {label:<{width}}  {c:>12.6f}  {mult}")
        return "\n".join(rows)


def coefficients_from_multipliers(multipliers: Sequence[float]) -> list[float]:
    """c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_k = w_k (the identity solved for c)."""
    w = list(multipliers)
    if not w:
        return [1.0]
    return [1.0 - w[0]] + [w[i] - w[i + 1] for i in range(len(w) - 1)] + [w[-1]]


def multipliers_from_coefficients(coefficients: Sequence[float]) -> list[float]:
    """w_i = sum_{j >= i} c_j for i = 1..k."""
    c = list(coefficients)
    return [math.fsum(c[i:]) for i in range(1, len(c))]


def curve_multipliers(curve: Callable[[float], float], num_checkpoints: int) -> list[float]:
    k = num_checkpoints - 1
    return [float(curve(i / (k + 1))) for i in range(1, k + 1)]


def points_curve(points: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """A piecewise-linear decay curve through user points; checked to start at (0, 1), end at x = 1,
    and never increase (an increasing curve would need negative coefficients)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 2 or xs[0] != 0.0 or xs[-1] != 1.0 or ys[0] != 1.0:
        raise ConfigError(
            f"merge weights points {list(points)}: need at least two points, the first 0:1 and the last at "
            "x=1 (e.g. points:0:1,0.5:0.4,1:0)"
        )
    for i in range(1, len(points)):
        if xs[i] <= xs[i - 1]:
            raise ConfigError(f"merge weights points: x must increase strictly, got {xs[i - 1]} then {xs[i]}")
        if not 0.0 <= ys[i] <= ys[i - 1]:
            raise ConfigError(
                f"merge weights points: y must stay in [0, 1] and never increase (a decay), got "
                f"{ys[i - 1]} then {ys[i]} at x={xs[i]}"
            )

    def curve(x: float) -> float:
        for i in range(1, len(xs)):
            if x <= xs[i]:
                t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        return ys[-1]

    return curve


def ema_coefficients(beta: float, num_checkpoints: int) -> list[float]:
    """e_0 = theta_0, e_j = beta e_{j-1} + (1 - beta) theta_j, written as coefficients of theta_j."""
    k = num_checkpoints - 1
    return [beta**k] + [(1.0 - beta) * beta ** (k - j) for j in range(1, k + 1)]


def merge_weights(spec: str, num_checkpoints: int) -> MergeWeights:
    """Parse a weights spec (see :data:`SPEC_HELP`) for ``num_checkpoints`` checkpoints."""
    spec = spec.strip()
    if num_checkpoints < 2:
        raise ConfigError(
            f"a merge needs at least 2 checkpoints, got {num_checkpoints}; pass more checkpoints "
            "(or --num-checkpoints N with --print)"
        )
    name, _, arg = spec.partition(":")
    if spec in DECAY_CURVES:
        return _from_multipliers(spec, spec, curve_multipliers(DECAY_CURVES[spec], num_checkpoints))
    if name == "points":
        return _from_multipliers("points", spec, curve_multipliers(points_curve(_parse_points(arg)), num_checkpoints))
    if spec == "mean":
        return _from_coefficients("mean", spec, [1.0 / num_checkpoints] * num_checkpoints)
    if name == "ema":
        beta = _number(arg, "ema:BETA")
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"merge weights {spec!r}: BETA must be in (0, 1), e.g. ema:0.5")
        return _from_coefficients("ema", spec, ema_coefficients(beta, num_checkpoints))
    return explicit_weights([_number(x, "coefficient") for x in spec.split(",")], num_checkpoints, spec)


def explicit_weights(coefficients: Sequence[float], num_checkpoints: int, spec: str | None = None) -> MergeWeights:
    """User-given coefficients: one per checkpoint, oldest first, non-negative, summing to 1."""
    c = [float(x) for x in coefficients]
    spec = spec or ",".join(f"{x:g}" for x in c)
    if len(c) != num_checkpoints:
        raise ConfigError(
            f"merge weights {spec!r} give {len(c)} coefficients for {num_checkpoints} checkpoints; "
            "give exactly one coefficient per checkpoint, oldest first"
        )
    if any(x < 0 for x in c):
        raise ConfigError(f"merge weights {spec!r}: coefficients must be >= 0")
    total = math.fsum(c)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ConfigError(
            f"merge weights {spec!r} sum to {total:.9g}, not 1; scale them so they sum to 1 "
            "(a merge that does not sum to 1 rescales the model)"
        )
    return _from_coefficients("explicit", spec, c)


def merge_save_steps(end_step: int, window_steps: int, num_checkpoints: int,
                     warmup_steps: int = 0) -> list[int]:
    """Main-path steps to checkpoint for a merge of ``num_checkpoints`` equally spaced checkpoints whose
    window (first to last) spans ``window_steps`` and ends at ``end_step``. The window must start after
    the ``warmup_steps``: the merge describes a decay only when every update it weighs was taken at the
    constant peak LR."""
    k = num_checkpoints - 1
    if k < 1 or window_steps <= 0 or window_steps % k:
        raise ConfigError(
            f"merge window of {window_steps} steps cannot hold {num_checkpoints} equally spaced checkpoints; "
            f"choose a window that is a positive multiple of num_checkpoints - 1 = {k} steps"
        )
    first = end_step - window_steps
    if first < 0:
        raise ConfigError(f"merge window of {window_steps} steps starts before step 0 (it ends at step {end_step})")
    if first < warmup_steps:
        raise ConfigError(
            f"merge window of {window_steps} steps starts at step {first}, inside the warmup (steps "
            f"0..{warmup_steps - 1}): its checkpoints were not all taken at the constant peak LR, so the merge "
            f"would not emulate the decay its weights describe; shorten the window to at most "
            f"{end_step - warmup_steps} steps or release later"
        )
    spacing = window_steps // k
    return [end_step - window_steps + j * spacing for j in range(k + 1)]


def _from_multipliers(method: str, spec: str, multipliers: list[float]) -> MergeWeights:
    return MergeWeights(method, spec, tuple(coefficients_from_multipliers(multipliers)), tuple(multipliers))


def _from_coefficients(method: str, spec: str, coefficients: list[float]) -> MergeWeights:
    return MergeWeights(method, spec, tuple(coefficients), tuple(multipliers_from_coefficients(coefficients)))


def _parse_points(text: str) -> list[tuple[float, float]]:
    points = []
    for pair in text.split(","):
        x, sep, y = pair.partition(":")
        if not sep:
            raise ConfigError(f"merge weights points: {pair!r} is not X:Y; write e.g. points:0:1,0.5:0.4,1:0")
        points.append((_number(x, "points X"), _number(y, "points Y")))
    return points


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"merge weights: {what} {text!r} is not a number; valid specs: {SPEC_HELP}") from None
    if not math.isfinite(value):
        raise ConfigError(f"merge weights: {what} {text!r} is not finite")
    return value


@dataclass(frozen=True)
class MergeRelease:
    """``release: {method: merge, merge: {...}}`` of a plan version: merge ``num_checkpoints`` main-path
    checkpoints spread evenly over the last ``window_tokens`` (or ``window_steps``) before the release."""

    num_checkpoints: int = 8
    weights: str = "1-sqrt"  # any merge weights spec
    window_tokens: int | None = None
    window_steps: int | None = None

    def resolved_window_steps(self, tokens_per_step: int) -> int:
        """Tokens round UP to steps, then up to a multiple of num_checkpoints - 1 (equal spacing)."""
        k = self.num_checkpoints - 1
        steps = self.window_steps if self.window_steps is not None else -(-self.window_tokens // tokens_per_step)
        return -(-steps // k) * k

    def save_steps(self, release_step: int, tokens_per_step: int, warmup_steps: int = 0) -> list[int]:
        """The main-path steps to checkpoint; the last one is ``release_step``, the first one at or after
        the main path's ``warmup_steps``."""
        return merge_save_steps(release_step, self.resolved_window_steps(tokens_per_step), self.num_checkpoints,
                                warmup_steps)


def merge_release(settings: dict, where: str) -> MergeRelease:
    """Validate a plan's ``release.merge`` mapping (``where`` names it in errors)."""
    from lrpath_megatron.config import from_dict

    release = from_dict(MergeRelease, settings, where)
    if (release.window_tokens is None) == (release.window_steps is None):
        raise ConfigError(f"{where}: give exactly one of window_tokens or window_steps")
    window = release.window_tokens if release.window_steps is None else release.window_steps
    if window <= 0:
        raise ConfigError(f"{where}: the merge window must be > 0")
    merge_weights(release.weights, release.num_checkpoints)  # raises with the spec's own message
    return release
