"""``decay_steps: auto``, as arithmetic on the resolved plan: the decay lengths a release may take, where each
one's branch forks and ends, which lengths are left out and why, and where the main path waits for a choice.

A length is a candidate only if the release forecast can choose it from what exists when the choice is made
(release_forecast.choose_decay reads the run up to the earliest candidate fork): its branch must fork after
the main path's warmup and after the main path has evaluated the version twice on schedule (the law needs two
points of a stretch of data before a decay). Default bounds leave such lengths out (``AutoDecay.dropped``);
written bounds that include one are refused naming the longest that fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lrpath_megatron.config import ConfigError

# The decay lengths decay_steps: auto chooses among, as fractions of the version's steps (with its bounds):
# the main path saves at each one's fork, so whichever the forecast chooses, its fork checkpoint exists.
AUTO_DECAY_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
# Scheduled validation losses of a version the main path must have made before a branch may fork.
VERSION_POINTS = 2
# The merge a method: auto release may take where its release.merge names no other weights or count.
AUTO_MERGE = {"weights": "1-sqrt", "num_checkpoints": 4}
AUTO_METHODS = ("decay", "merge")


@dataclass(frozen=True)
class AutoDecay:
    """A decay_steps: auto release, or a method: auto one (decay lengths and merge windows): the decay
    lengths it may take and, per length, where its branch forks and ends; per merge window the main-path
    checkpoints it merges; ``choice`` is the recorded choice (plan_decisions) once it chose."""

    candidates: tuple  # decay lengths in steps, shortest first
    forks: dict  # decay length -> (fork step, branch end step)
    nominal_forks: dict  # decay length -> the fork its settings give (before plan.fork: effective moves it)
    dropped: tuple = ()  # ({"decay_steps" or "window_steps", "fork_step", "why"}, ...): candidates left out
    reads: tuple = ()  # the earlier branches whose finished curves the choice reads (Plan.choice_reads)
    choice: Optional[dict] = None
    # method: auto: merge window (steps) -> the main-path steps it merges, oldest first (the last ends the
    # version's segment); the merge weights; the choice is the cheapest candidate forecast within tolerance of
    # the lowest (a merge trains nothing beyond the main path), where decay_steps: auto takes the shortest
    # decay within tolerance of the longest
    merges: dict = field(default_factory=dict)
    merge_weights: Optional[str] = None
    method_auto: bool = False

    @property
    def bounds(self) -> tuple:
        return self.candidates[0], self.candidates[-1]

    def spans(self) -> list:
        """(the main-path step the candidate needs, the step its release is at) per candidate: a decay's fork
        and branch end; a merge's last checkpoint twice (it trains nothing)."""
        return list(self.forks.values()) + [(steps[-1], steps[-1]) for steps in self.merges.values()]

    @property
    def fork_span(self) -> tuple:
        """The main-path step the choice reads up to (the earliest a candidate leaves the main path: a fork or
        a merge window's first checkpoint) and the latest step a candidate needs: the release starts only once
        the main path has saved that one (for a tail branch forking where its decay fits, the shortest decay's;
        for a merge, the version's end)."""
        starts = [f for f, _ in self.forks.values()] + [steps[0] for steps in self.merges.values()]
        return min(starts), max(f for f, _ in self.spans())

    @property
    def choice_step(self) -> int:
        """The main-path step the choice reads the run up to: the earliest candidate fork; with merge
        candidates, the version's end, where every window's checkpoints exist and each merge is measured
        (a decay chosen there trains its branch from its saved fork)."""
        return self.fork_span[1] if self.merges else self.fork_span[0]

    def own_steps(self) -> tuple:
        """The fewest and the most steps the release trains beyond the main path, over the candidates."""
        own = [end - fork for fork, end in self.spans()]
        return min(own), max(own)

    def end_span(self) -> tuple:
        ends = [end for _, end in self.spans()]
        return min(ends), max(ends)

    def merge_steps(self) -> set:
        """Every main-path step a merge candidate reads."""
        return {s for steps in self.merges.values() for s in steps}


@dataclass(frozen=True)
class MainPause:
    """Where the main path waits for a decay_steps: auto release (or a method: auto one without merge
    candidates) to choose: at its earliest candidate fork,
    when that release alone decides how far the main path trains (its latest candidate fork lies past every
    other release's). Choosing there, from what its choice reads (the main path up to that step and the
    branches ``needs``, which end by then), the main path stops at the chosen fork instead of the latest."""

    version: str
    step: int
    needs: tuple  # branches whose finished curves the choice reads
    others_end: int  # the last main-path step another release needs

    def describe(self) -> str:
        after = f" and branches {', '.join(self.needs)} have finished" if self.needs else ""
        return (f"the main path stops at step {self.step} until version {self.version} chooses its decay length "
                f"(decay_steps: auto) from the run up to there{after}; it then ends at the chosen fork")


def candidate_lengths(bounds, seg_steps: int, where: str) -> list:
    """The decay lengths within ``bounds`` (written [min, max], or None: every candidate fraction)."""
    if bounds is None:
        return sorted({max(2, round(f * seg_steps)) for f in AUTO_DECAY_FRACTIONS})
    if (not isinstance(bounds, list) or len(bounds) != 2 or any(isinstance(b, bool) or not isinstance(b, int)
                                                                 for b in bounds) or not 2 <= bounds[0] <= bounds[1]):
        raise ConfigError(f"{where}.decay_bounds={bounds!r} must be [min, max] steps with 2 <= min <= max")
    lo, hi = bounds
    return sorted({lo, hi} | {round(f * seg_steps) for f in AUTO_DECAY_FRACTIONS if lo <= round(f * seg_steps) <= hi})


def merge_windows(seg_steps: int, num_checkpoints: int, fractions=AUTO_DECAY_FRACTIONS) -> list:
    """The merge windows (steps) of ``fractions`` of a version's steps, each a multiple of the spacing of
    ``num_checkpoints`` equally spaced checkpoints."""
    k = num_checkpoints - 1
    return sorted({max(k, round(f * seg_steps / k) * k) for f in fractions})


def auto_methods(methods, where: str) -> tuple:
    """The methods a method: auto release chooses among (written ``methods``, default both)."""
    if methods is None:
        return AUTO_METHODS
    if (not isinstance(methods, list) or not methods or len(set(methods)) != len(methods)
            or any(m not in AUTO_METHODS for m in methods)):
        raise ConfigError(f"{where}.methods={methods!r} must be a non-empty list of {', '.join(AUTO_METHODS)}, "
                          "each at most once")
    if "decay" not in methods:
        raise ConfigError(f"{where}.methods={methods!r}: method: auto chooses among decay lengths and, with merge, "
                          "merge windows; a merge alone takes a written window: use method: merge with "
                          "merge.window_steps, or add decay")
    return tuple(methods)


def first_forecastable_step(start: int, eval_interval: int) -> int:
    """The main-path step by which it has evaluated the version starting at ``start`` VERSION_POINTS times
    on schedule (evaluations at other steps depend on how the run was cut into jobs, so no choice reads them)."""
    return (start // eval_interval + VERSION_POINTS) * eval_interval


def why_not(fork: int, warmup_steps: int, forecastable: int, eval_interval: int,
            leaves: str = "forks") -> Optional[str]:
    """Why a branch forking at main-path step ``fork`` (``leaves``: "starts" for a merge window's first
    checkpoint) cannot be a candidate, or None (``forecastable`` 0: the warmup alone is checked)."""
    if fork < warmup_steps:
        return f"{leaves} at step {fork}, inside the main path's warmup (steps 0..{warmup_steps})"
    if fork < forecastable:
        return (f"{leaves} at step {fork}, before the main path has evaluated the version {VERSION_POINTS} times "
                f"(at step {forecastable} with logging.eval_interval={eval_interval}), so no forecast could choose it")
    return None


def keep_usable(lengths: list, forks: dict, why: dict, written_bounds, where: str) -> tuple:
    """(the usable lengths, the dropped ones as dicts). ``why``: length -> reason or None. Written bounds
    with a length that is not usable are refused naming the longest that is."""
    dropped = tuple({"decay_steps": n, "fork_step": forks[n], "why": why[n]} for n in lengths if why[n])
    usable = [n for n in lengths if not why[n]]
    if dropped and written_bounds is not None:
        first = dropped[0]
        if not usable:
            fits = "no length fits: fork later, evaluate more often (logging.eval_interval) or give decay_steps"
        elif all(d["decay_steps"] > usable[-1] for d in dropped):
            fits = f"the longest that fits is {usable[-1]}: lower decay_bounds' maximum to at most {usable[-1]}"
        elif all(d["decay_steps"] < usable[0] for d in dropped):
            fits = f"the shortest that fits is {usable[0]}: raise decay_bounds' minimum to at least {usable[0]}"
        else:
            fits = f"the lengths that fit are {usable}: give bounds within them"
        raise ConfigError(f"{where}.decay_bounds={written_bounds}: a decay of {first['decay_steps']} steps "
                          f"{first['why']}; {fits}")
    if not usable:
        raise ConfigError(f"{where}: decay_steps: auto has no length to choose from: every candidate "
                          f"{dropped[0]['why'] if dropped else 'is missing'}; fork later, evaluate more often "
                          "(logging.eval_interval) or give decay_steps")
    return usable, dropped


def main_pause(ends: list, undecided: dict) -> Optional[MainPause]:
    """The pause of the main path, if one undecided release alone decides where it ends. ``ends``: (last
    main-path step a release needs, version) per release (an undecided one: its latest candidate fork);
    ``undecided``: version -> AutoDecay."""
    ends = sorted(ends)
    if not undecided or ends[-1][1] not in undecided or (len(ends) > 1 and ends[-2][0] == ends[-1][0]):
        return None
    name = ends[-1][1]
    first, last = undecided[name].fork_span
    if first == last or undecided[name].merges:  # merge candidates: the choice is made at the version's end
        return None
    return MainPause(name, first, undecided[name].reads, ends[-2][0] if len(ends) > 1 else 0)
