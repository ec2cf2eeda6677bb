"""A version's release resolved to main-path steps: where it leaves the main path, how long it decays, what a
merge reads. Written settings are checked here, once, with the place they were written in every message."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from lrpath_megatron import schedules
from lrpath_megatron.config import ConfigError
from lrpath_megatron.merge_weights import merge_release
from lrpath_megatron.plan.auto_decay import auto_methods, candidate_lengths
from lrpath_megatron.plan.schema import (BRANCH_DATA, FORK_SETTINGS, RELEASE_METHODS, ReleaseConfig, one_of,
                                         refuse_unused_settings)


@dataclass(frozen=True)
class ReleaseInfo:
    """How a version is released. ``step``: the main-path step the release starts from (the fork step
    of a decay branch; for a merge, the last main-path step it uses). A decay branch decays over
    ``decay_steps`` from ``nominal_step`` (where its settings fork it); it starts at ``step``, its
    effective fork, when the steps between are the main path's own (``plan.fork``)."""

    version: str
    method: str
    step: int
    shape: Optional[str] = None
    data: Optional[str] = None
    decay_steps: int = 0
    merge: dict = field(default_factory=dict)
    nominal_step: Optional[int] = None  # decay releases only

    @property
    def shared_steps(self) -> int:
        """Steps of the configured decay that the main path trains (identical LR and data)."""
        return self.step - self.nominal_step if self.nominal_step is not None else 0


@dataclass(frozen=True)
class ResolvedVersion:
    index: int
    name: str
    corpora: dict  # corpus -> share within the version
    start_step: int  # the version's segment of the main path: start_step .. end_step-1
    end_step: int
    release: ReleaseInfo
    branch_end: int  # == release.step for merges (no branch)

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step

    def merge_input_steps(self) -> set:
        """Main-path steps a merge release reads before its last one (which ends a main-path segment)."""
        return set(self.release.merge.get("save_steps", ())) - {self.release.step}


@dataclass(frozen=True)
class Grid:
    """What turns written quantities into main-path steps."""

    tokens_per_step: int
    warmup_steps: int

    def steps(self, tokens: float) -> int:
        # Round up (no data is left unseen, a decay is never shorter than asked); the epsilon keeps float
        # fractions like 0.6 * 1000 from becoming 601.
        return math.ceil(tokens / self.tokens_per_step - 1e-9)


def moves_with_decay(r: ReleaseConfig) -> bool:
    """A tail branch without a written fork forks where its decay ends the version's data: its fork moves
    with its length."""
    return r.data == "tail" and all(getattr(r, k) is None for k in FORK_SETTINGS)


def resolve_release(i: int, written: ReleaseConfig, r: ReleaseConfig, name: str, segment: tuple, data_end: int,
                    previous_fork: int, grid: Grid) -> tuple[ReleaseInfo, Optional[list]]:
    """Version ``i``'s release (``written`` as written, ``r`` with defaults) on its ``segment`` (start, end)
    of the main path, and for decay_steps: auto the lengths within its bounds (the release is resolved at
    the shortest; plan.auto_decay screens them)."""
    where = f"plan.versions[{i}].release"
    start, end = segment
    if r.method not in RELEASE_METHODS:
        raise ConfigError(f"{where}.method={r.method!r} is not one of {', '.join(RELEASE_METHODS)}")
    # A merge's shape is refused below as a decay setting, not as an unknown shape.
    if r.method != "merge" and r.shape not in schedules.BRANCH_SHAPES:
        raise ConfigError(f"{where}.shape={r.shape!r} is not one of {', '.join(schedules.BRANCH_SHAPES)}")
    refuse_unused_settings(written, r.shape, where)
    if r.method == "auto":
        # Resolved as decay_steps: auto; the plan adds the merge windows to its candidates (Plan._screen).
        auto_methods(r.methods, where)
        r = dataclasses.replace(r, method="decay", decay_steps="auto", merge=None, methods=None)
    if r.data not in BRANCH_DATA:
        raise ConfigError(f"{where}.data={r.data!r} is not one of {', '.join(BRANCH_DATA)}")
    seg_steps = end - start
    decay, candidates = 0, None
    if r.method == "decay":
        kind, value = one_of(r, where, ["decay_steps", "decay_tokens", "decay_fraction"], required=True)
        if kind == "decay_fraction" and not 0 < value <= 1:
            raise ConfigError(f"{where}.decay_fraction={value} must be in (0, 1] (of the version's steps)")
        if value == "auto":
            # Resolved at the shortest until the plan has screened every candidate (plan.auto_decay).
            candidates = candidate_lengths(r.decay_bounds, seg_steps, where)
            value = candidates[0]
        elif r.decay_bounds is not None:
            raise ConfigError(f"{where}.decay_bounds applies to decay_steps: auto only; remove it or set "
                              "decay_steps: auto")
        if kind == "decay_steps" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.decay_steps={value!r} must be a number of steps or auto")
        decay = {"decay_steps": lambda x: x, "decay_tokens": grid.steps,
                 "decay_fraction": lambda x: grid.steps(x * seg_steps * grid.tokens_per_step)}[kind](value)
        if decay < 2:
            raise ConfigError(f"{where}.{kind}={value} resolves to {decay} step(s); a decay needs >= 2 steps "
                              "(the first at eta_max, the last at eta_min)")
    fork = one_of(r, where, list(FORK_SETTINGS), required=False)
    if fork is None:
        fork_step = end - decay if (r.method == "decay" and r.data == "tail") else end
        fork_field = "fork"
    else:
        fork_field, value = fork
        if fork_field == "fork_fraction" and not 0 <= value <= 1:
            raise ConfigError(f"{where}.fork_fraction={value} must be in [0, 1] (of the version's segment)")
        fork_step = {"fork_step": lambda x: x, "fork_tokens": grid.steps,
                     "fork_fraction": lambda x: start + grid.steps(x * seg_steps * grid.tokens_per_step)}[
            fork_field](value)
    # An auto release's forks are checked against the warmup per candidate (plan.auto_decay says which).
    _check_fork(f"{where}.{fork_field} (step {fork_step})", fork_step, name, segment, data_end, previous_fork,
                grid.warmup_steps if candidates is None else 0)
    if candidates is not None and fork is not None and r.data == "tail" and fork_step + candidates[-1] > end:
        # A fixed fork leaves a tail branch end - fork steps of the version's data: the default bounds stop
        # there; written bounds that run past it are refused like a fixed decay that does.
        room = end - fork_step
        if r.decay_bounds is not None:
            raise ConfigError(
                f"{where}: decay_bounds up to {candidates[-1]} steps from fork step {fork_step} run past the end "
                f"of {name}'s data at step {end} (data: tail trains only the rest of the version's segment, {room} "
                f"steps); lower decay_bounds to at most {room}, fork earlier, or use data: replay")
        candidates = sorted({n for n in candidates if n <= room} | {room})
    if r.method == "merge":
        release = merge_release(r.merge, f"{where}.merge")
        try:
            save_steps = release.save_steps(fork_step, grid.tokens_per_step, grid.warmup_steps)
        except ConfigError as exc:
            raise ConfigError(f"{where}.merge: {exc}") from None
        return ReleaseInfo(name, r.method, fork_step, merge={**dataclasses.asdict(release),
                                                               "save_steps": save_steps}), None
    if r.data == "tail" and fork_step + decay > end:
        raise ConfigError(
            f"{where}: a decay of {decay} steps from fork step {fork_step} runs past the end of {name}'s data at "
            f"step {end} (data: tail trains only the rest of the version's segment, {end - fork_step} steps); "
            "shorten the decay, fork earlier, or use data: replay")
    if r.data == "replay" and decay > end:
        raise ConfigError(f"{where}: a decay of {decay} steps is longer than all data so far ({end} steps of "
                          f"D_1..D_{i + 1}) that a replay branch draws from; shorten the decay")
    return ReleaseInfo(name, r.method, fork_step, r.shape, r.data, decay, nominal_step=fork_step), candidates


def _check_fork(shown: str, fork_step: int, name: str, segment: tuple, data_end: int, previous_fork: int,
                warmup_steps: int) -> None:
    start, end = segment
    if fork_step > data_end:
        raise ConfigError(f"{shown} is after the main path ends at step {data_end} (the sum of the versions' "
                          "steps); fork inside the version's data")
    if fork_step < previous_fork:
        raise ConfigError(
            f"{shown} comes before the previous version's release at step {previous_fork}: versions must be "
            "listed in the order their data arrives, and each releases at or after the one before")
    if not start <= fork_step <= end:
        raise ConfigError(
            f"{shown} lies outside {name}'s segment of the main path (steps {start}..{end}); a version is "
            "released from the main path while or right after it trains that version's data")
    if fork_step < warmup_steps:
        raise ConfigError(f"{shown} is inside the main path's warmup (steps 0..{warmup_steps}); fork after warmup")
