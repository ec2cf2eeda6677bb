"""LR-triggered data blends: which corpora a step samples from, as a function of that step's LR.

A policy is a list of stages (``config.MixStage``): the first is active from the start, each later one
has a threshold ``lr_below`` (a number, or relative to the path's peak such as ``"eta_max/5"``). A stage is
labelled in logs and metrics by its ``name``, or else by what triggers it (:func:`trigger_label`). The
active stage at a step is the last whose threshold the LR has come down to (``lr <= threshold``, counted
from the path's peak so that a warmup does not trigger it; a multi-step drop may land exactly on the
threshold). With ``ramp_steps`` > 1 the weights move linearly over that many steps, starting at the
switch step, from the blend in force just before the switch (the previous stage's weights, or where a
ramp still running had got to) to the new stage's.

Weights are normalised here, once, when the policy is validated; every blend a policy hands out sums to 1
(up to rounding), which the sampler asserts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from lrpath_megatron.config import ConfigError, MixConfig

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_RELATIVE = re.compile(rf"^\s*(?:(?P<pre>{_NUM})\s*\*\s*)?eta_max\s*(?:(?P<op>[*/])\s*(?P<post>{_NUM}))?\s*$")


@dataclass(frozen=True)
class Stage:
    label: str
    threshold: Optional[float]  # None for the first stage
    weights: dict  # corpus -> weight, normalized to sum 1, zero weights dropped


def parse_threshold(value, eta_max: float, where: str) -> float:
    """A number, or ``eta_max``, ``eta_max/5``, ``eta_max*0.2``, ``0.2*eta_max``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} must be a number or an expression like 'eta_max/5'")
    if isinstance(value, (int, float)):
        threshold = float(value)
    elif isinstance(value, str) and (m := _RELATIVE.match(value)):
        threshold = eta_max * float(m["pre"] or 1.0)
        if m["op"] == "*":
            threshold *= float(m["post"])
        elif m["op"] == "/":
            if float(m["post"]) == 0:
                raise ConfigError(f"{where}={value!r} divides by zero")
            threshold /= float(m["post"])
    else:
        raise ConfigError(
            f"{where}={value!r} is not a number or an expression of eta_max "
            "(write e.g. 3e-5, 'eta_max/5', 'eta_max*0.2' or '0.2*eta_max')"
        )
    if not threshold > 0 or math.isinf(threshold):
        raise ConfigError(f"{where}={value!r} must be a positive, finite LR")
    return threshold


def normalize_weights(weights, corpora: list[str], where: str) -> dict:
    """Validate a corpus -> weight mapping and scale it to sum 1."""
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"{where} must be a non-empty mapping corpus -> weight, e.g. {{docs: 0.7, code_a: 0.3}}")
    for name, weight in weights.items():
        if name not in corpora:
            raise ConfigError(f"{where}.{name}: unknown corpus; known corpora: {', '.join(corpora)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{where}.{name}={weight!r} must be a finite number")
        if weight < 0:
            raise ConfigError(f"{where}.{name}={weight} is negative; weights must be >= 0")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ConfigError(f"{where}: all weights are zero; give at least one corpus a positive weight")
    return {name: w / total for name, w in weights.items() if w > 0}


def resolve_stages(mix: MixConfig, corpora: list[str], eta_max: float, where: str) -> list[Stage]:
    """Validate a ``MixConfig`` against the known corpora and resolve its thresholds."""
    if not mix.stages:
        raise ConfigError(f"{where}.stages is empty; give at least one stage (or leave {where} out)")
    if mix.ramp_steps < 0:
        raise ConfigError(f"{where}.ramp_steps={mix.ramp_steps} must be >= 0")
    thresholds: list[Optional[float]] = []
    weights: list[dict] = []
    for i, stage in enumerate(mix.stages):
        here = f"{where}.stages[{i}]"
        if i == 0 and stage.lr_below is not None:
            raise ConfigError(f"{here}.lr_below must be left out: the first stage is active from the start")
        if i > 0 and stage.lr_below is None:
            raise ConfigError(f"{here}.lr_below is missing: every stage after the first needs an LR threshold")
        threshold = None if i == 0 else parse_threshold(stage.lr_below, eta_max, f"{here}.lr_below")
        if i > 1 and threshold >= thresholds[-1]:
            raise ConfigError(
                f"{here}.lr_below={stage.lr_below!r} ({threshold:.6g}) must be below the previous stage's "
                f"threshold ({thresholds[-1]:.6g}): the LR decays, so thresholds must decrease"
            )
        thresholds.append(threshold)
        weights.append(normalize_weights(stage.weights, corpora, f"{here}.weights"))
        if stage.name is not None and not stage.name.strip():
            raise ConfigError(f"{here}.name is empty; give the stage a name, or leave name out to label it by "
                              f"what triggers it")
    labels = [stage.name or trigger_label(i, thresholds) for i, stage in enumerate(mix.stages)]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise ConfigError(f"{where}.stages[{labels.index(label)}] and {where}.stages[{i}] are both labelled "
                              f"{label!r}; give them distinct names")
    return [Stage(label, threshold, w) for label, threshold, w in zip(labels, thresholds, weights)]


def trigger_label(index: int, thresholds: list[Optional[float]]) -> str:
    """The label of an unnamed stage: the LR that makes it active (the first stage: the LR above the next
    stage's threshold, counted from the peak; a stage alone is active on all steps)."""
    if index > 0:
        return f"lr<={thresholds[index]:g}"
    return f"lr>{thresholds[1]:g}" if len(thresholds) > 1 else "all"


class MixSchedule:
    """A resolved policy on one path: ``weights_at_step(step) -> (label, {corpus: weight})``.

    ``lr`` must be non-increasing on ``peak_step .. end_step-1`` (true for every path of a plan and every
    stand-alone schedule after warmup); switch steps are found by bisection.
    """

    def __init__(self, stages: list[Stage], ramp_steps: int, lr: Callable[[int], float], peak_step: int,
                 end_step: int):
        self.stages = stages
        self.ramp_steps = ramp_steps
        # (switch step, stage index) of every stage that becomes active before end_step, in order.
        self.switches: list[tuple[int, int]] = [(peak_step, 0)]
        for index, stage in enumerate(stages[1:], start=1):
            step = _first_step_at_or_below(lr, stage.threshold, peak_step, end_step)
            if step is None:
                break
            if step == self.switches[-1][0]:
                self.switches[-1] = (step, index)  # two thresholds crossed in one step: the later wins
            else:
                self.switches.append((step, index))
        # Where each later switch's ramp starts: the blend of the step before it (in switch order).
        self._origins: dict[int, dict] = {}
        for position, (switch, _) in enumerate(self.switches[1:], start=1):
            self._origins[position] = self._blend(position - 1, switch - 1)

    @property
    def switch_steps(self) -> list[tuple[int, str]]:
        """(step, stage label) of every switch after the first stage (for plots and logs)."""
        return [(step, self.stages[i].label) for step, i in self.switches[1:]]

    def weights_at_step(self, step: int) -> tuple[str, dict]:
        position = 0
        for k, (switch, _) in enumerate(self.switches):
            if step >= switch:
                position = k
        return self.stages[self.switches[position][1]].label, self._blend(position, step)

    def _blend(self, position: int, step: int) -> dict:
        """The weights at ``step`` while switch ``position`` is the latest."""
        switch, index = self.switches[position]
        weights = self.stages[index].weights
        done = step - switch + 1
        if position == 0 or self.ramp_steps <= 1 or done >= self.ramp_steps:
            return dict(weights)
        origin = self._origins[position]
        a = done / self.ramp_steps
        names = list(dict.fromkeys([*origin, *weights]))
        blend = {n: (1 - a) * origin.get(n, 0.0) + a * weights.get(n, 0.0) for n in names}
        return {n: w for n, w in blend.items() if w > 0}


def _first_step_at_or_below(lr: Callable[[int], float], threshold: float, lo: int, hi: int) -> Optional[int]:
    """First step in [lo, hi) with lr(step) <= threshold, for lr non-increasing on that range."""
    if hi <= lo or lr(hi - 1) > threshold:
        return None
    while lo < hi - 1:
        mid = (lo + hi - 1) // 2
        if lr(mid) <= threshold:
            hi = mid + 1
        else:
            lo = mid + 1
    return lo
