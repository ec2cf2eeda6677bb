"""The version plan: corpora per version, the main path, one release per version; resolved to paths.

A plan YAML holds the sections of :class:`config.TrainConfig` (without ``schedule:``) plus ``plan:``::

    plan:
      main: {eta_max: 3e-4, eta_min: 3e-5, warmup_steps: 20, replay: 0.2}
      versions:
        - name: v1
          corpora: [docs]          # names from data.corpora (or {name: weight})
          tokens: 65536            # the increment's main-path training budget (or steps:)
          release: {method: decay, shape: cosine, decay_fraction: 0.6, data: tail}

Token quantities become steps of ``parallel.global_batch_size * model.seq_length`` tokens, rounded UP
(no data is left unseen and a decay is never shorter than asked); the resolved steps are what runs and
what ``lrpath plan`` prints. Validation never touches the data files (see :meth:`Plan.check_data`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lrpath_megatron import schedules
from lrpath_megatron.config import (
    ConfigError,
    MixConfig,
    TrainConfig,
    apply_overrides,
    config_source,
    from_dict,
    hashed_model,
    read_yaml,
    register_list_item_type,
    to_dict,
)
from lrpath_megatron.corpus_shards import check_shards
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.merge_weights import merge_release
from lrpath_megatron.mix_policy import MixSchedule, normalize_weights, resolve_stages
from lrpath_megatron.path import FORK, WEIGHTS, PathRun, PathSpec, Start
from lrpath_megatron.run_layout import RunLayout

RELEASE_METHODS = ("decay", "merge")
BRANCH_DATA = ("tail", "replay")
# Reference methods a plan can also train on the same data, as paths named "<method>/<version>".
BASELINES = ("ptfs", "cpt")


# --------------------------------------------------------------------------------------------------
# The ``plan:`` section as written
# --------------------------------------------------------------------------------------------------
@dataclass
class MainPathConfig:
    eta_max: Optional[float] = None  # None = optimizer.lr
    eta_min: Optional[float] = None  # None = optimizer.min_lr
    warmup_steps: Optional[int] = None  # give steps or tokens (neither = no warmup)
    warmup_tokens: Optional[int] = None
    replay: float = 0.0  # share of each main-path segment drawn from the older versions' corpora
    # Extra main-path checkpoints beyond those the releases need: places to fork or merge from later.
    save_steps: list = field(default_factory=list)
    # Extra main-path checkpoints of the weights only (no optimizer state): inputs of merges defined later.
    weights_only_steps: list = field(default_factory=list)
    # Continue these weights (an lrpath checkpoint, e.g. from `lrpath hf import`) instead of random ones:
    # the main path starts at step 0 with them, a fresh optimizer and its own data and LR path.
    init_from: Optional[str] = None


@dataclass
class ReleaseConfig:
    """A version's release as written. Settings default to None (= not written) so that one written where
    it does not apply (a decay setting on a merge, a multistep setting on a cosine) is refused rather than
    ignored; :data:`RELEASE_DEFAULTS` holds the defaults of those the plan reads."""

    method: str = "decay"  # decay | merge
    shape: Optional[str] = None  # cosine (default) | linear | 1-sqrt | knee | multistep
    stable_fraction: Optional[float] = None  # not for multistep; None = 0.5 for knee, 0 otherwise
    drop_points: Optional[list] = None  # multistep only; None = schedules.MULTISTEP_POINTS
    drop_factors: Optional[list] = None  # multistep only; None = geometric drops ending at eta_min
    # Where the branch leaves the main path (at most one; default: tail -> end - decay, replay -> end).
    fork_step: Optional[int] = None  # global main-path step
    fork_tokens: Optional[int] = None  # global main-path token position
    fork_fraction: Optional[float] = None  # position inside the version's own main-path segment, 0..1
    # How long the branch decays (exactly one for method=decay). decay_steps: auto takes the length the release
    # forecast chooses from what is known at its earliest candidate fork (release_forecast.choose_decay), within
    # decay_bounds: [min, max] steps (default: 10% .. 100% of the version's steps).
    decay_steps: Any = None  # steps, or "auto"
    decay_bounds: Optional[list] = None
    decay_tokens: Optional[int] = None
    decay_fraction: Optional[float] = None  # of the version's own steps
    # tail (default): the rest of the version's segment (no extra data) | replay: D_1..D_v blend
    data: Optional[str] = None
    mix: Optional[MixConfig] = None  # LR-triggered blend on the branch (replaces the data blend)
    merge: Optional[dict] = None  # method=merge settings (WSM), read by the merge module


# What the plan reads for release settings left unwritten (None in ReleaseConfig).
RELEASE_DEFAULTS = {"shape": "cosine", "data": "tail", "drop_points": list(schedules.MULTISTEP_POINTS), "merge": {}}
# Settings of a decay release (all but method, merge and the fork position): a merge trains no branch.
DECAY_SETTINGS = ("shape", "stable_fraction", "drop_points", "drop_factors", "decay_steps", "decay_tokens",
                  "decay_fraction", "decay_bounds", "data", "mix")
# The decay lengths decay_steps: auto chooses among, as fractions of the version's steps (with its bounds):
# the main path saves at each one's fork, so whichever the forecast chooses, its fork checkpoint exists.
AUTO_DECAY_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def _with_defaults(release: ReleaseConfig) -> ReleaseConfig:
    """``release`` with its unwritten settings at their defaults."""
    return dataclasses.replace(release, **{k: copy.deepcopy(v) for k, v in RELEASE_DEFAULTS.items()
                                           if getattr(release, k) is None})


@dataclass
class VersionConfig:
    name: str = ""
    corpora: Any = None  # list of corpus names (equal weights) or {name: weight}
    # The segment's size, exactly one of: its tokens or steps (the replay share included), or the tokens of
    # the version's own data it must train (new_tokens; the segment is then larger by the replay share).
    tokens: Optional[int] = None
    steps: Optional[int] = None
    new_tokens: Optional[int] = None
    release: ReleaseConfig = field(default_factory=ReleaseConfig)


@dataclass
class ExportConfig:
    """What is written beside each release as soon as it is released."""

    hf: bool = False  # a Hugging Face model directory, RUN/<version>/hf (``lrpath hf export``)
    # The tokenizer the data was tokenized with, shipped with the model: a SentencePiece .model or a Hugging
    # Face tokenizer.json (or its directory). None:
    # an imported model's own tokenizer files (plan.main.init_from), else none.
    tokenizer: Optional[str] = None


@dataclass
class PlanConfig:
    main: MainPathConfig = field(default_factory=MainPathConfig)
    versions: list = field(default_factory=list)  # list[VersionConfig]
    # Where a decay branch leaves the main path: "effective", the first step at which its LR or data differ
    # from the main path's (the steps before are the main path's own, bit for bit, so they are trained
    # once); "nominal", where its fork settings put it (each branch retrains those steps).
    fork: str = "effective"
    export: ExportConfig = field(default_factory=ExportConfig)


FORK_RULES = ("effective", "nominal")


register_list_item_type(PlanConfig, "versions", VersionConfig)


# --------------------------------------------------------------------------------------------------
# Resolved plan
# --------------------------------------------------------------------------------------------------
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
class AutoDecay:
    """A decay_steps: auto release: the decay lengths it may take and, per length, where its branch forks
    and ends; ``choice`` is the recorded choice (``RUN/<version>/decay_choice.json``) once its branch chose."""

    candidates: tuple  # decay lengths in steps, shortest first
    forks: dict  # decay length -> (fork step, branch end step)
    nominal_forks: dict  # decay length -> the fork its settings give (before plan.fork: effective moves it)
    choice: Optional[dict] = None

    @property
    def bounds(self) -> tuple:
        return self.candidates[0], self.candidates[-1]

    @property
    def fork_span(self) -> tuple:
        """The earliest and the latest main-path step the branch may fork at: it can start only once the main
        path has saved the latest (for a tail branch forking where its decay fits, the shortest decay's)."""
        forks = [f for f, _ in self.forks.values()]
        return min(forks), max(forks)

    def own_steps(self) -> tuple:
        """The fewest and the most steps the branch trains beyond the main path, over the candidates."""
        own = [end - fork for fork, end in self.forks.values()]
        return min(own), max(own)


@dataclass(frozen=True)
class MainPause:
    """Where the main path waits for a decay_steps: auto release to choose: at its earliest candidate fork,
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


class Plan:
    """A validated plan; build with :func:`load_plan` or :meth:`Plan.from_dict`."""

    def __init__(self, written: TrainConfig, config: PlanConfig, source: str = "", decided: Optional[dict] = None,
                 written_hash: Optional[str] = None):
        """``written``: the plan's training sections as written; optimizer.lr / min_lr stand in for an
        unwritten plan.main.eta_max / eta_min. ``decided``: version -> :class:`AutoDecay` of decay_steps: auto
        releases this plan fixes at their choice (:meth:`with_decay`): the main path saves every candidate
        fork of theirs up to where it ends (a choice may end it earlier: MainPause); ``written_hash`` is then
        the hash of the plan as written, which such a plan keeps (:meth:`plan_hash`)."""
        self.config = config
        self._written_hash = written_hash
        self.source = source
        main = config.main
        self.eta_max = main.eta_max if main.eta_max is not None else written.optimizer.lr
        self.eta_min = main.eta_min if main.eta_min is not None else written.optimizer.min_lr
        self._check_lrs()
        # The config the paths train with holds the plan's LRs (what its checkpoints' manifests record);
        # each path sets the LR of every step itself.
        self.train_config = dataclasses.replace(
            written, optimizer=dataclasses.replace(written.optimizer, lr=self.eta_max, min_lr=self.eta_min)).validate()
        train_config = self.train_config
        self.tokens_per_step = train_config.parallel.global_batch_size * train_config.model.seq_length
        self.corpus_names = [c.name for c in train_config.data.corpora]
        if train_config.checkpoint.init_from is not None:
            raise ConfigError("checkpoint.init_from starts a stand-alone run; a plan's main path starts from "
                              "plan.main.init_from (its branches fork from the main path); move it there")
        if train_config.data.mix != MixConfig():
            raise ConfigError(
                "data.mix is not used in a plan (it blends stand-alone runs); blend a plan's data with "
                "plan.main.replay, the versions' corpora weights and a release's mix: "
                "(plan.versions[i].release.mix); remove data.mix"
            )
        self._validate_main()
        # The releases with unwritten settings at their defaults (the written ones are checked against them).
        self._releases = [_with_defaults(v.release) for v in config.versions]
        self.main_lr = schedules.WarmupConstant(self.eta_max, self.warmup_steps)
        if config.fork not in FORK_RULES:
            raise ConfigError(f"plan.fork={config.fork!r} is not one of {', '.join(FORK_RULES)}")
        if config.export.tokenizer is not None and not config.export.hf:
            raise ConfigError("plan.export.tokenizer goes with the Hugging Face exports; set plan.export.hf: true "
                              "or remove it")
        self.versions: list[ResolvedVersion] = self._resolve_versions()
        if config.fork == "effective":
            self.versions = [self._fork_effectively(v, r) for v, r in zip(self.versions, self._releases)]
        # Every decay_steps: auto release, undecided (its candidates) or fixed at its choice (``decided``).
        self.auto_decays: dict[str, AutoDecay] = {
            v.name: AutoDecay(tuple(self.decay_candidates[v.name]), *self._candidate_forks(v, r))
            for v, r in zip(self.versions, self._releases) if v.name in self.decay_candidates}
        self.auto_decays.update({k: d for k, d in (decided or {}).items() if k not in self.auto_decays})
        undecided = [v.name for v in self.versions if v.name in self.decay_candidates]
        # The main path trains to the last fork a release may take; a chosen decay forks at its choice.
        self.main_end = max([v.release.step for v in self.versions if v.name not in undecided]
                            + [self.auto_decays[n].fork_span[1] for n in undecided])
        # What a written save step may name: every fork a release may take, chosen or not.
        self._reach = max([self.main_end] + [f for d in self.auto_decays.values() for f, _ in d.forks.values()])
        self._validate_save_steps()
        self._paths = self._build_paths()
        self.main_pause = self._main_pause(undecided)

    def _main_pause(self, undecided: list) -> Optional[MainPause]:
        ends = [(v.release.step, v.name) for v in self.versions if v.name not in undecided]
        ends += [(self.auto_decays[n].fork_span[1], n) for n in undecided]
        ends.sort()
        if not undecided or ends[-1][1] not in undecided or (len(ends) > 1 and ends[-2][0] == ends[-1][0]):
            return None
        name = ends[-1][1]
        first, last = self.auto_decays[name].fork_span
        if first == last:
            return None
        branch_ends = {p.name: max(e for _, e in self.auto_decays[p.name].forks.values()) if p.name in undecided
                       else p.end_step for p in self._paths.values() if p.name not in ("main", name)}
        return MainPause(name, first, tuple(n for n, end in branch_ends.items() if end <= first),
                         ends[-2][0] if len(ends) > 1 else 0)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "Plan":
        data = copy.deepcopy(data)
        if "schedule" in data:
            raise ConfigError(
                "schedule: is not used in a plan (the plan: section defines every path's LR); remove it"
            )
        if "plan" not in data:
            raise ConfigError("plan: section is missing; a plan needs plan.main and plan.versions")
        plan_cfg = from_dict(PlanConfig, data.pop("plan"), "plan")
        return cls(from_dict(TrainConfig, data), plan_cfg, source)

    def _steps(self, tokens: float) -> int:
        # Round up; the epsilon keeps float fractions like 0.6 * 1000 from becoming 601.
        return math.ceil(tokens / self.tokens_per_step - 1e-9)

    def _new_share(self, index: int) -> float:
        """The share of version ``index``'s main-path segment drawn from its own corpora (the rest replays
        the older versions; the first version has nothing to replay)."""
        return 1.0 - self.config.main.replay if index > 0 else 1.0

    def _one_of(self, obj: Any, where: str, names: list[str], required: bool) -> Optional[tuple[str, Any]]:
        given = [(n, getattr(obj, n)) for n in names if getattr(obj, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"{where}: give only one of {', '.join(n for n, _ in given)}")
        if not given and required:
            raise ConfigError(f"{where}: give one of {', '.join(names)}")
        return given[0] if given else None

    def _check_lrs(self) -> None:
        main = self.config.main
        if self.eta_max <= 0:
            where = "plan.main.eta_max" if main.eta_max is not None else "optimizer.lr (plan.main.eta_max unset)"
            raise ConfigError(f"{where}={self.eta_max} must be > 0")
        if not 0 <= self.eta_min <= self.eta_max:
            where = "plan.main.eta_min" if main.eta_min is not None else "optimizer.min_lr (plan.main.eta_min unset)"
            raise ConfigError(f"{where}={self.eta_min} is negative or greater than plan.main.eta_max={self.eta_max}; "
                              f"a decay goes from eta_max down to eta_min >= 0")

    def _validate_main(self) -> None:
        main = self.config.main
        if not 0.0 <= main.replay < 1.0:
            raise ConfigError(f"plan.main.replay={main.replay} must be in [0, 1): the share of older data")
        warmup = self._one_of(main, "plan.main", ["warmup_steps", "warmup_tokens"], required=False)
        if warmup and warmup[1] < 0:
            raise ConfigError(f"plan.main.{warmup[0]}={warmup[1]} must be >= 0")
        if warmup is None:
            self.warmup_steps = 0
        else:
            self.warmup_steps = warmup[1] if warmup[0] == "warmup_steps" else self._steps(warmup[1])
        if not self.config.versions:
            raise ConfigError("plan.versions is empty; list the versions in the order their data arrives")

    def _validate_save_steps(self) -> None:
        for key in ("save_steps", "weights_only_steps"):
            steps = getattr(self.config.main, key)
            if not isinstance(steps, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps):
                raise ConfigError(f"plan.main.{key}={steps!r} must be a list of main-path steps (integers)")
            outside = [x for x in steps if not 0 < x <= self._reach]
            if outside:
                raise ConfigError(f"plan.main.{key}: {outside} outside the main path's steps 1..{self._reach}; "
                                  f"the main path trains up to its last release")

    def _resolve_versions(self) -> list[ResolvedVersion]:
        resolved: list[ResolvedVersion] = []
        names: set[str] = set()
        self.decay_candidates: dict[str, list] = {}  # per decay_steps: auto version, the lengths it may take
        total = 0
        segments = []
        for i, v in enumerate(self.config.versions):
            where = f"plan.versions[{i}]"
            if not v.name or v.name == "main":
                raise ConfigError(f"{where}.name={v.name!r}: give each version a unique name other than 'main'")
            if v.name in names:
                raise ConfigError(f"{where}.name={v.name!r} is used twice")
            names.add(v.name)
            size = self._one_of(v, where, ["tokens", "steps", "new_tokens"], required=True)
            if size[1] <= 0:
                raise ConfigError(f"{where}.{size[0]}={size[1]} must be > 0")
            steps = {"steps": lambda x: x, "tokens": self._steps,
                     "new_tokens": lambda x: self._steps(x / self._new_share(i))}[size[0]](size[1])
            if v.corpora is None or v.corpora == [] or v.corpora == {}:
                raise ConfigError(f"{where}.corpora is missing: name the corpora (from data.corpora) of this version")
            corpora = v.corpora if isinstance(v.corpora, dict) else {name: 1.0 for name in _as_list(v.corpora, where)}
            segments.append((v.name, normalize_weights(corpora, self.corpus_names, f"{where}.corpora"),
                             total, total + steps))
            total += steps
        self.data_end = total
        previous_fork = 0
        for i, (v, (name, corpora, start, end)) in enumerate(zip(self.config.versions, segments)):
            release = self._resolve_release(i, v.release, name, start, end, previous_fork)
            previous_fork = release.step
            resolved.append(ResolvedVersion(i, name, corpora, start, end, release,
                                            release.step + release.decay_steps))
        return resolved

    def _resolve_release(self, i: int, r: ReleaseConfig, name: str, start: int, end: int,
                         previous_fork: int) -> ReleaseInfo:
        where = f"plan.versions[{i}].release"
        if r.method not in RELEASE_METHODS:
            raise ConfigError(f"{where}.method={r.method!r} is not one of {', '.join(RELEASE_METHODS)}")
        written, r = r, self._releases[i]
        # A merge's shape is refused below as a decay setting, not as an unknown shape.
        if r.method == "decay" and r.shape not in schedules.BRANCH_SHAPES:
            raise ConfigError(f"{where}.shape={r.shape!r} is not one of {', '.join(schedules.BRANCH_SHAPES)}")
        _refuse_unused_settings(written, r.shape, where)
        if r.data not in BRANCH_DATA:
            raise ConfigError(f"{where}.data={r.data!r} is not one of {', '.join(BRANCH_DATA)}")
        seg_steps = end - start
        decay = 0
        if r.method == "decay":
            kind, value = self._one_of(r, where, ["decay_steps", "decay_tokens", "decay_fraction"], required=True)
            if kind == "decay_fraction" and not 0 < value <= 1:
                raise ConfigError(f"{where}.decay_fraction={value} must be in (0, 1] (of the version's steps)")
            if value == "auto":
                # Resolved at the shortest candidate until the choice is recorded (Plan.with_decay): the main
                # path saves at every candidate fork (Plan.auto_decays) and trains to the latest, or stops
                # for the choice (MainPause).
                self.decay_candidates[name] = self._auto_candidates(r, seg_steps, where)
                value = self.decay_candidates[name][0]
            elif r.decay_bounds is not None:
                raise ConfigError(f"{where}.decay_bounds applies to decay_steps: auto only; remove it or set "
                                  "decay_steps: auto")
            if kind == "decay_steps" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{where}.decay_steps={value!r} must be a number of steps or auto")
            decay = {"decay_steps": lambda x: x, "decay_tokens": self._steps,
                     "decay_fraction": lambda x: self._steps(x * seg_steps * self.tokens_per_step)}[kind](value)
            if decay < 2:
                raise ConfigError(
                    f"{where}.{kind}={value} resolves to {decay} step(s); a decay needs >= 2 steps "
                    "(the first at eta_max, the last at eta_min)"
                )
        fork = self._one_of(r, where, ["fork_step", "fork_tokens", "fork_fraction"], required=False)
        if fork is None:
            fork_step = end - decay if (r.method == "decay" and r.data == "tail") else end
            fork_field = "fork"
        else:
            fork_field, value = fork
            if fork_field == "fork_fraction" and not 0 <= value <= 1:
                raise ConfigError(f"{where}.fork_fraction={value} must be in [0, 1] (of the version's segment)")
            fork_step = {"fork_step": lambda x: x, "fork_tokens": self._steps,
                         "fork_fraction": lambda x: start + self._steps(x * seg_steps * self.tokens_per_step)}[
                fork_field](value)
        shown = f"{where}.{fork_field} (step {fork_step})"
        if fork_step > self.data_end:
            raise ConfigError(
                f"{shown} is after the main path ends at step {self.data_end} (the sum of the versions' "
                "steps); fork inside the version's data"
            )
        if fork_step < previous_fork:
            raise ConfigError(
                f"{shown} comes before the previous version's release at step {previous_fork}: versions must "
                "be listed in the order their data arrives, and each releases at or after the one before"
            )
        if not start <= fork_step <= end:
            raise ConfigError(
                f"{shown} lies outside {name}'s segment of the main path (steps {start}..{end}); a version "
                "is released from the main path while or right after it trains that version's data"
            )
        if fork_step < self.warmup_steps:
            raise ConfigError(
                f"{shown} is inside the main path's warmup (steps 0..{self.warmup_steps}); fork after warmup"
            )
        if name in self.decay_candidates and fork is not None and r.data == "tail" \
                and fork_step + self.decay_candidates[name][-1] > end:
            # A fixed fork leaves a tail branch end - fork steps of the version's data: the default bounds stop
            # there; written bounds that run past it are refused like a fixed decay that does.
            room = end - fork_step
            if r.decay_bounds is not None:
                raise ConfigError(
                    f"{where}: decay_bounds up to {self.decay_candidates[name][-1]} steps from fork step {fork_step} "
                    f"run past the end of {name}'s data at step {end} (data: tail trains only the rest of the "
                    f"version's segment, {room} steps); lower decay_bounds to at most {room}, fork earlier, or "
                    "use data: replay")
            self.decay_candidates[name] = sorted({n for n in self.decay_candidates[name] if n <= room} | {room})
        if r.method == "decay":
            if r.data == "tail" and fork_step + decay > end:
                raise ConfigError(
                    f"{where}: a decay of {decay} steps from fork step {fork_step} runs past the end of "
                    f"{name}'s data at step {end} (data: tail trains only the rest of the version's segment, "
                    f"{end - fork_step} steps); shorten the decay, fork earlier, or use data: replay"
                )
            if r.data == "replay" and decay > end:
                raise ConfigError(
                    f"{where}: a decay of {decay} steps is longer than all data so far ({end} steps of "
                    f"D_1..D_{i + 1}) that a replay branch draws from; shorten the decay"
                )
        merge = {}
        if r.method == "merge":
            release = merge_release(r.merge, f"{where}.merge")
            try:
                save_steps = release.save_steps(fork_step, self.tokens_per_step, self.warmup_steps)
            except ConfigError as exc:
                raise ConfigError(f"{where}.merge: {exc}") from None
            merge = {**dataclasses.asdict(release), "save_steps": save_steps}
        if r.method == "merge":
            return ReleaseInfo(name, r.method, fork_step, merge=merge)
        return ReleaseInfo(name, r.method, fork_step, r.shape, r.data, decay, nominal_step=fork_step)

    def _auto_candidates(self, r: ReleaseConfig, seg_steps: int, where: str) -> list:
        lo, hi = r.decay_bounds if r.decay_bounds is not None else (max(2, round(0.1 * seg_steps)), seg_steps)
        if (not isinstance(r.decay_bounds, (list, type(None))) or isinstance(lo, bool) or isinstance(hi, bool)
                or not isinstance(lo, int) or not isinstance(hi, int) or not 2 <= lo <= hi):
            raise ConfigError(f"{where}.decay_bounds={r.decay_bounds!r} must be [min, max] steps with 2 <= min <= max")
        return sorted({lo, hi} | {round(f * seg_steps) for f in AUTO_DECAY_FRACTIONS if lo <= round(f * seg_steps) <= hi})

    def _candidate_forks(self, v: ResolvedVersion, r: ReleaseConfig) -> dict:
        """Per decay length a decay_steps: auto version may take, the main-path step its branch forks at (after
        the plan's fork rule) and the step it ends at. A tail branch without a fixed fork forks where its decay
        ends the version's data, so the shortest decay forks last; with a fixed fork, the stable part of a knee
        (or stable_fraction) moves the effective fork later for longer decays; replay and mixed branches keep
        their fork. Returns ({length: (fork, end)}, {length: nominal fork})."""
        forks, nominal_forks = {}, {}
        moves = r.data == "tail" and all(getattr(r, k) is None for k in ("fork_step", "fork_tokens", "fork_fraction"))
        for n in self.decay_candidates[v.name]:
            nominal = v.end_step - n if moves else v.release.nominal_step
            alt = dataclasses.replace(v, release=dataclasses.replace(v.release, step=nominal, nominal_step=nominal,
                                                                     decay_steps=n), branch_end=nominal + n)
            alt = self._fork_effectively(alt, r) if self.config.fork == "effective" else alt
            forks[n], nominal_forks[n] = (alt.release.step, alt.branch_end), nominal
        return forks, nominal_forks

    def with_decay(self, name: str, decay_steps: int, choice: Optional[dict] = None) -> "Plan":
        """This plan with version ``name`` decaying over ``decay_steps`` (a decay_steps: auto choice, recorded as
        ``choice`` when it was made). The main path keeps saving every candidate fork of the auto releases
        up to where it ends, which a chosen decay may move earlier."""
        versions = [dataclasses.replace(v, release=dataclasses.replace(
            v.release, decay_steps=decay_steps, decay_tokens=None, decay_fraction=None, decay_bounds=None))
                    if v.name == name else v for v in self.config.versions]
        decided = {k: d for k, d in self.auto_decays.items() if k not in self.decay_candidates}
        if name in self.decay_candidates:
            decided[name] = dataclasses.replace(self.auto_decays[name], choice=choice or {"decay_steps": decay_steps})
        return Plan(self.train_config, dataclasses.replace(self.config, versions=versions), self.source, decided,
                    self.plan_hash())

    def with_choices(self, run_dir: Path) -> "Plan":
        """This plan with the decay lengths its decay_steps: auto branches chose in ``run_dir`` (the releases
        as trained: their steps and costs)."""
        plan = self
        for name in self.decay_candidates:
            record = RunLayout(Path(run_dir)).path(name).decay_choice
            if record.is_file():
                choice = json.loads(record.read_text())
                plan = plan.with_decay(name, choice["decay_steps"], choice)
        return plan

    # ---------------------------------------------------------------- paths
    def _segment(self, step: int) -> ResolvedVersion:
        for v in self.versions:
            if v.start_step <= step < v.end_step:
                return v
        raise ValueError(f"step {step} is beyond the plan's data (steps 0..{self.data_end - 1})")

    def _cumulative_blend(self, upto: int) -> dict:
        """Corpus shares of D_1..D_upto (versions weighted by their steps)."""
        blend: dict[str, float] = {}
        total = sum(v.steps for v in self.versions[:upto])
        for v in self.versions[:upto]:
            for name, share in v.corpora.items():
                blend[name] = blend.get(name, 0.0) + share * v.steps / total
        return blend

    def main_weights(self, step: int) -> tuple[str, dict]:
        v = self._segment(step)
        replay = self.config.main.replay if v.index > 0 else 0.0
        blend = {name: (1 - replay) * share for name, share in v.corpora.items()}
        for name, share in self._cumulative_blend(v.index).items() if replay else ():
            blend[name] = blend.get(name, 0.0) + replay * share
        return f"main:{v.name}", {n: w for n, w in blend.items() if w > 0}

    def _build_paths(self) -> dict[str, PathSpec]:
        # A release's own step is a full checkpoint: branches fork there and launch ends a main segment there.
        save = set(self.config.main.save_steps) | {v.release.step for v in self.versions}
        for d in self.auto_decays.values():
            save |= {f for f, _ in d.forks.values()}
        weights_only = set(self.config.main.weights_only_steps)
        for v in self.versions:
            weights_only |= v.merge_input_steps()
        # Past a chosen decay's fork the main path no longer trains (with_decay shortened it).
        save, weights_only = {s for s in save if s <= self.main_end}, {s for s in weights_only if s <= self.main_end}
        paths = {"main": PathSpec("main", self.main_end, self.main_lr, self.main_weights, save_steps=frozenset(save),
                                  weights_only_steps=frozenset(weights_only - save),
                                  tokens_per_step=self.tokens_per_step)}
        for v, release in zip(self.versions, self._releases):
            if v.release.method != "decay":
                continue
            paths[v.name] = self._branch(v, release)
        return paths

    def _fork_effectively(self, v: ResolvedVersion, r: ReleaseConfig) -> ResolvedVersion:
        """``v`` forked where its branch first differs from the main path. A branch on the version's own
        data (tail, no mix of its own) trains the main path's batches, so it differs where its LR first
        differs: after the stable part of knee (or of a decay with stable_fraction), at the first drop of
        multistep. Replay and mixed branches differ at once. Every decay's first step is its t = 0 point,
        at the main path's LR too; a decay without a stable part keeps the fork its settings give rather
        than moving by that one step."""
        release = v.release
        if release.method != "decay" or r.data != "tail" or r.mix is not None:
            return v
        lr, step = self._branch_lr(v, r), release.step
        while step < v.branch_end - 1 and lr(step) == self.main_lr(step):
            step += 1
        if step == release.step + 1:
            return v
        return dataclasses.replace(v, release=dataclasses.replace(release, step=step))

    def _branch_lr(self, v: ResolvedVersion, r: ReleaseConfig) -> schedules.BranchDecay:
        """The LR of ``v``'s branch, a decay over the configured steps from its nominal fork."""
        fork, end = v.release.nominal_step, v.branch_end
        if r.shape == "multistep":
            points = tuple(r.drop_points)
            factors = tuple(r.drop_factors) if r.drop_factors is not None else \
                schedules.default_drop_factors(self.eta_max, self.eta_min, len(points))
        else:
            points, factors = schedules.MULTISTEP_POINTS, ()
        try:
            return schedules.BranchDecay(self.main_lr(fork), self.eta_min, fork, end, r.shape,
                                         r.stable_fraction, points, factors)
        except ConfigError as exc:
            raise ConfigError(f"plan.versions[{v.index}].release: {exc}") from None

    def _branch(self, v: ResolvedVersion, r: ReleaseConfig) -> PathSpec:
        where = f"plan.versions[{v.index}].release"
        fork, end = v.release.step, v.branch_end
        lr = self._branch_lr(v, r)
        switch_steps: list = []
        if r.mix is not None:
            policy = MixSchedule(resolve_stages(r.mix, self.corpus_names, self.eta_max, f"{where}.mix"),
                                 r.mix.ramp_steps, lr, fork, end)
            weights, switch_steps = policy.weights_at_step, policy.switch_steps
        elif r.data == "tail":
            weights = lambda step: ("tail", self.main_weights(step)[1])  # noqa: E731 - same data as main
        else:
            blend = self._cumulative_blend(v.index + 1)
            weights = lambda step: ("replay", dict(blend))  # noqa: E731
        return PathSpec(v.name, end, lr, weights, parent="main", fork_step=fork, release=v.release,
                        tokens_per_step=self.tokens_per_step, switch_steps=switch_steps)

    def path(self, name: str) -> PathSpec:
        """A plan path (``main`` or a version with a decay release) or a baseline ``ptfs/<version>``,
        ``cpt/<version>``."""
        if name in self._paths:
            return self._paths[name]
        if "/" in name:
            return self._baseline(*name.split("/", 1))
        for v in self.versions:
            if v.name == name:
                raise LrpathError(f"version {name!r} is released by {v.release.method}; it has no training path")
        raise LrpathError(f"no path {name!r} in the plan; paths: {', '.join(self._paths)}")

    def _baseline(self, method: str, version: str) -> PathSpec:
        """The reference a plan is measured against, trained on the same data with the same LRs:
        - ``ptfs/<v>``: from scratch on the cumulative blend of D_1..D_v for all their steps (one pass),
          warmup then cosine to eta_min on the last step;
        - ``cpt/<v>``: from ``cpt/<v-1>``'s last checkpoint (optimizer state included) on D_v only for the
          version's steps, re-warmup from eta_min to eta_max then cosine to eta_min. ``cpt/<v1>`` is PTFS
          of the first version."""
        if method not in BASELINES:
            raise LrpathError(f"no path {method + '/' + version!r}: baselines are "
                              f"{', '.join(b + '/<version>' for b in BASELINES)}")
        by_name = {v.name: v for v in self.versions}
        if version not in by_name:
            raise LrpathError(f"no version {version!r} in the plan for {method}/{version}; versions: "
                              f"{', '.join(by_name)}")
        v, name = by_name[version], f"{method}/{version}"
        scratch = method == "ptfs" or v.index == 0
        try:
            lr = (schedules.ptfs(self.eta_max, self.eta_min, self.warmup_steps, v.end_step) if scratch else
                  schedules.cpt(self.eta_max, self.eta_min, self.warmup_steps, v.start_step, v.steps))
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc} (plan.main.warmup_steps is too long for version {version!r})") from None
        if scratch:
            blend = self._cumulative_blend(v.index + 1)
            return PathSpec(name, v.end_step, lr, lambda step: (method, dict(blend)),
                            tokens_per_step=self.tokens_per_step)
        parent = f"cpt/{self.versions[v.index - 1].name}"
        return PathSpec(name, v.end_step, lr, lambda step: ("cpt", dict(v.corpora)), parent=parent,
                        fork_step=v.start_step, tokens_per_step=self.tokens_per_step)

    def paths(self) -> list[PathSpec]:
        """Every trainable path, main first, then the branches in version order."""
        return list(self._paths.values())

    def releases(self) -> list[ReleaseInfo]:
        """How each version is released, in version order."""
        return [v.release for v in self.versions]

    def run_for(self, name: str, run_dir: Path) -> PathRun:
        """Path ``name`` as the trainer runs it in ``run_dir``: a path with a parent starts from the parent's
        checkpoint at its fork step (optimizer state and data position included). The branch of a
        decay_steps: auto version takes the release forecast's choice (recorded in ``run_dir`` and in its
        checkpoints' manifests: the same metrics give the same choice, a resume reuses it)."""
        if name in self.decay_candidates:
            from lrpath_megatron.release_forecast import choose_decay

            choice = choose_decay(self, name, Path(run_dir))
            run = self.with_decay(name, choice["decay_steps"]).run_for(name, run_dir)
            return dataclasses.replace(run, lineage={**run.lineage, "decay_choice": choice})
        if name == "main" and self.decay_candidates:
            return self._main_run(Path(run_dir))
        return self._path_run(name, run_dir)

    def _path_run(self, name: str, run_dir: Path) -> PathRun:
        spec, layout = self.path(name), RunLayout(Path(run_dir))
        origin = Start()
        if spec.parent is not None:
            origin = Start(FORK, layout.checkpoint(spec.parent, spec.fork_step))
        elif name == "main" and self.config.main.init_from is not None:
            origin = Start(WEIGHTS, Path(self.config.main.init_from))
        lineage = {"plan_hash": self.plan_hash(), "parent_path": spec.parent, "fork_step": spec.fork_step,
                   "release": dataclasses.asdict(spec.release) if spec.release else None}
        return PathRun(spec, layout.path(name), origin, lineage=lineage, source="plan")

    def _main_run(self, run_dir: Path) -> PathRun:
        """The main path of a plan with undecided decay_steps: auto releases: it trains to the forks they
        chose; before the choice that ends it (:class:`MainPause`) it stops at that release's earliest
        candidate fork, and past it the choice is made here."""
        from lrpath_megatron.checkpoint_layout import checkpoint_at, find_latest, read_manifest
        from lrpath_megatron.release_forecast import choose_decay

        plan, layout = self.with_choices(run_dir), RunLayout(run_dir)
        pause = plan.main_pause
        latest = find_latest(layout.path("main").checkpoints) if pause else None
        if pause and latest is not None and read_manifest(latest)["step"] >= pause.step:
            missing = [n for n in pause.needs
                       if checkpoint_at(layout.path(n).checkpoints, plan.path(n).end_step) is None]
            if missing:
                raise LrpathError(
                    f"the main path is at step {pause.step}, where version {pause.version} chooses its decay length "
                    f"(decay_steps: auto) from the finished branches {', '.join(pause.needs)}; "
                    f"{', '.join(missing)} have not finished in {run_dir}: train them first "
                    f"(`lrpath train PLAN --path NAME`), then the main path again")
            choose_decay(self, pause.version, run_dir)
            plan, pause = self.with_choices(run_dir), None
        return dataclasses.replace(plan._path_run("main", run_dir),
                                   pause=(pause.step, pause.describe()) if pause else None)

    # ---------------------------------------------------------------- costs, identity, data
    def flops_per_token(self) -> float:
        return self.train_config.model.flops_per_token()

    def costs(self) -> dict:
        """Tokens and FLOPs of the main path, each branch and the total, beside PTFS and CPT for the
        same versions (PTFS: version v trains D_1..D_v from scratch; CPT: version v trains D_v from the
        previous release). This is what ``lrpath plan --json`` prints.

        A decay_steps: auto release that has not chosen yet (``undecided``) costs between its shortest and its
        longest candidate: its row and the totals then carry ``*_range`` [fewest, most] beside the single
        numbers, which are the fewest (every undecided release at its shortest decay). The main path counts
        to the latest fork an auto release may take (its branch waits for it), but not past the main path's
        end: the release that ends the main path chooses where the main path waits for it (MainPause), and the
        main path then ends at the chosen fork."""
        tps, fpt = self.tokens_per_step, self.flops_per_token()
        rows, ptfs, cpt, branches, main_steps = [], 0, 0, 0, 0
        most = 0  # branch steps with every undecided release at its longest decay
        undecided = [v.name for v in self.versions if v.name in self.decay_candidates]
        nominal_main = nominal_branches = 0  # the same releases with every branch at its nominal fork
        for v in self.versions:
            ptfs += v.end_step  # D_1..D_v
            cpt += v.steps
            own = v.branch_end - v.release.step  # the steps only the branch trains (0 for a merge)
            auto = self.auto_decays.get(v.name)
            own_range = auto.own_steps() if v.name in undecided else (own, own)
            own = own_range[0]
            branches += own
            most += own_range[1]
            # An auto branch waits for the main path's latest candidate fork, unless the main path ends before
            # it (it stopped at that release's choice: MainPause).
            main_steps = max(main_steps, v.release.step, min(auto.fork_span[1], self.main_end) if auto else 0)
            nominal = v.release.nominal_step if v.release.nominal_step is not None else v.release.step
            nominal_main = max(nominal_main, nominal,
                               min(max(auto.nominal_forks.values()), self.main_end) if auto else 0)
            nominal_branches += v.branch_end - nominal
            spent = main_steps + branches
            path = self._paths.get(v.name)
            rows.append({
                "name": v.name,
                "method": v.release.method,
                "corpora": v.corpora,
                "data_steps": v.steps,
                "data_tokens": v.steps * tps,  # the main-path segment, replay included
                "new_data_tokens": round(v.steps * tps * self._new_share(v.index)),  # of the version's own corpora
                "segment": [v.start_step, v.end_step],
                "fork_step": v.release.step,
                "fork_tokens": v.release.step * tps,
                "nominal_fork_step": v.release.nominal_step,
                "shared_steps": v.release.shared_steps,  # decay steps the main path trains for the branch
                "shape": v.release.shape,
                "branch_data": v.release.data,
                "decay_steps": v.release.decay_steps,
                "decay_tokens": v.release.decay_steps * tps,
                # decay_steps: auto: the lengths the forecast chooses among (decay_steps is the shortest until
                # the branch records its choice, Plan.with_choices)
                "decay_candidates": self.decay_candidates.get(v.name),
                "release_step": v.branch_end,
                "branch_steps": own,
                "tokens": own * tps,  # training this release adds beyond the main path
                "mix_switch_steps": path.switch_steps if path else [],
                "cumulative_tokens": spent * tps,
                "ptfs_cumulative_tokens": ptfs * tps,
                "cpt_cumulative_tokens": cpt * tps,
                "cumulative_ratio_vs_ptfs": spent / ptfs,
                "cumulative_ratio_vs_cpt": spent / cpt,
                # decay_steps: auto: the bounds, the forks the candidates take, and the choice once recorded
                "decay_auto": None if auto is None else {
                    "bounds": list(auto.bounds), "candidates": list(auto.candidates),
                    "fork_steps": list(auto.fork_span), "chosen": None if v.name in undecided else v.release.decay_steps,
                    "choice": auto.choice},
            })
            if undecided:
                spent_most = main_steps + most
                rows[-1].update({
                    "branch_steps_range": list(own_range), "tokens_range": [own_range[0] * tps, own_range[1] * tps],
                    "cumulative_tokens_range": [spent * tps, spent_most * tps],
                    "cumulative_ratio_vs_ptfs_range": [spent / ptfs, spent_most / ptfs],
                    "cumulative_ratio_vs_cpt_range": [spent / cpt, spent_most / cpt]})
        # The release the main path waits for (MainPause) ends it at its chosen fork: its candidates cost the
        # main path to there plus their own steps, not the main path to the latest fork plus their own steps.
        pause, delta = self.main_pause, (0, 0)
        if pause:
            index = next(i for i, r in enumerate(rows) if r["name"] == pause.version)
            auto = self.auto_decays[pause.version]
            costs = [max(pause.others_end, fork) + end - fork for fork, end in auto.forks.values()]
            fewest, most_ = (self.main_end + o for o in auto.own_steps())
            delta = (min(costs) - fewest, max(costs) - most_)
            for r in rows[index:]:
                r["cumulative_tokens"] += delta[0] * tps
                r["cumulative_ratio_vs_ptfs"] += delta[0] / (r["ptfs_cumulative_tokens"] / tps)
                r["cumulative_ratio_vs_cpt"] += delta[0] / (r["cpt_cumulative_tokens"] / tps)
                for key, base in (("cumulative_tokens_range", tps), ("cumulative_ratio_vs_ptfs_range",
                                  tps / r["ptfs_cumulative_tokens"]), ("cumulative_ratio_vs_cpt_range",
                                                                       tps / r["cpt_cumulative_tokens"])):
                    r[key] = [r[key][0] + delta[0] * base, r[key][1] + delta[1] * base]
        total, total_most = self.main_end + branches + delta[0], self.main_end + most + delta[1]
        return {
            "fork_rule": self.config.fork,
            "tokens_saved_by_effective_forks": (nominal_main + nominal_branches - total) * tps,
            "plan": self.source,
            "plan_hash": self.plan_hash(),
            "tokens_per_step": tps,
            "flops_per_token": fpt,
            "eta_max": self.eta_max,
            "eta_min": self.eta_min,
            "warmup_steps": self.warmup_steps,
            "main": {"steps": self.main_end, "tokens": self.main_end * tps, "flops": self.main_end * tps * fpt,
                     "save_steps": sorted(self._paths["main"].save_steps),
                     "weights_only_steps": sorted(self._paths["main"].weights_only_steps)},
            "versions": rows,
            "branch_tokens": branches * tps,
            "total_steps": total,
            "total_tokens": total * tps,
            "total_flops": total * tps * fpt,
            "ptfs_tokens": ptfs * tps,
            "ptfs_flops": ptfs * tps * fpt,
            "cpt_tokens": cpt * tps,
            "cpt_flops": cpt * tps * fpt,
            "cost_ratio_vs_ptfs": total / ptfs,
            "cost_ratio_vs_cpt": total / cpt,
            "undecided": undecided,
            **({} if not undecided else {
                "branch_tokens_range": [branches * tps, most * tps],
                "total_tokens_range": [total * tps, total_most * tps],
                "total_flops_range": [total * tps * fpt, total_most * tps * fpt],
                "cost_ratio_vs_ptfs_range": [total / ptfs, total_most / ptfs],
                "cost_ratio_vs_cpt_range": [total / cpt, total_most / cpt]}),
            # the main path stops there until that release chose; it then ends at the chosen fork
            "main_pause": dataclasses.asdict(pause) if pause else None,
        }

    def resolved(self) -> dict:
        """Everything that determines what trains: the base config and the resolved plan."""
        # Unwritten release settings count as their defaults: writing a default out keeps the hash.
        plan = dataclasses.replace(self.config, versions=[dataclasses.replace(v, release=r)
                                                          for v, r in zip(self.config.versions, self._releases)])
        return {
            "train_config": self._hashed_train_config(),
            "plan": _hashed_plan(plan),
            "resolved": {
                "tokens_per_step": self.tokens_per_step, "warmup_steps": self.warmup_steps,
                "eta_max": self.eta_max, "eta_min": self.eta_min, "main_end": self.main_end,
                "versions": [{"name": v.name, "segment": [v.start_step, v.end_step], "fork": v.release.step,
                              "decay_steps": v.release.decay_steps} for v in self.versions],
            },
        }

    def _hashed_train_config(self) -> dict:
        # Performance levers and logging change how fast and what is reported, not what trains.
        cfg = {k: v for k, v in to_dict(self.train_config).items() if k not in ("performance", "logging")}
        del cfg["checkpoint"]["init_from"]  # plans start from plan.main.init_from
        # How and when checkpoints are written does not change what trains.
        for key in ("async_save", "save_interval_minutes"):
            del cfg["checkpoint"][key]
        # Layout levers added later hash only when set, so plans written before them keep their hash.
        for key, default in (("virtual_pipeline", None), ("sequence_parallel", False), ("context_parallel", 1)):
            if cfg["parallel"][key] == default:
                del cfg["parallel"][key]
        cfg["model"] = hashed_model(self.train_config.model)
        return cfg

    def plan_hash(self) -> str:
        """The plan's identity in its run's manifests; a plan fixed at its decay_steps: auto choices (
        :meth:`with_decay`, :meth:`with_choices`) is the written plan and keeps its hash."""
        if self._written_hash is not None:
            return self._written_hash
        blob = json.dumps(self.resolved(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_data(self) -> None:
        """Raise unless every shard of every corpus the plan uses is a consistent ``PREFIX.bin``/``PREFIX.idx``
        pair whose tokenizer and sampled token ids fit ``model.vocab_size`` (the checks training runs when it
        opens the data)."""
        used = {name for v in self.versions for name in v.corpora}
        for r in self.config.versions:
            if r.release.mix is not None:
                used |= {name for s in r.release.mix.stages for name in s.weights}
        problems = []
        for corpus in self.train_config.data.corpora:
            if corpus.name in used:
                where = f"corpus {corpus.name!r}"
                try:
                    check_shards(corpus.prefix, where, self.train_config.model.vocab_size)
                except LrpathError as exc:
                    problems.append(str(exc))
        if problems:
            raise LrpathError("\n".join(problems))  # one line per corpus


def _hashed_plan(plan: PlanConfig) -> dict:
    """The plan section as hashed: settings added since plans were first hashed are left out at their
    defaults, so an existing plan keeps its hash (the resolved forks and sizes are hashed beside it)."""
    data = to_dict(plan)
    del data["export"]  # what is written beside the releases changes nothing that trains
    if data["fork"] == PlanConfig.fork:
        del data["fork"]
    if data["main"]["init_from"] is None:
        del data["main"]["init_from"]
    for v in data["versions"]:
        if v["new_tokens"] is None:
            del v["new_tokens"]
        if v["release"]["decay_bounds"] is None:
            del v["release"]["decay_bounds"]
    return data


def _refuse_unused_settings(written: ReleaseConfig, shape: str, where: str) -> None:
    """Refuse release settings written where they do not apply (``shape``: the decay's shape, default
    included): ignoring them would release something other than what the plan says."""
    if written.method == "merge":
        unused = [f"{where}.{k}" for k in DECAY_SETTINGS if getattr(written, k) is not None]
        if unused:
            raise ConfigError(
                f"{', '.join(unused)}: decay settings do not apply to method: merge (a merge averages main-path "
                f"checkpoints and trains no branch; its settings go under {where}.merge); remove "
                f"{'them' if len(unused) > 1 else 'it'}, or use method: decay"
            )
        return
    if written.merge is not None:
        raise ConfigError(
            f"{where}.merge: merge settings do not apply to method: decay (the release trains a decay branch); "
            "remove merge:, or use method: merge"
        )
    if shape == "multistep" and written.stable_fraction is not None:
        raise ConfigError(
            f"{where}.stable_fraction does not apply to shape: multistep (its LR steps down at drop_points); "
            "remove it, or use a shape that holds eta_max first: knee, cosine, linear or 1-sqrt"
        )
    unused = [f"{where}.{k}" for k in ("drop_points", "drop_factors") if getattr(written, k) is not None]
    if shape != "multistep" and unused:
        raise ConfigError(
            f"{', '.join(unused)}: drop settings apply to shape: multistep only, not {shape}; remove "
            f"{'them' if len(unused) > 1 else 'it'}, or use shape: multistep"
        )


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{where}.corpora must be a list of corpus names or a mapping name -> weight")
    return value


def load_plan(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read, override (``--set a.b=c``, e.g. ``plan.main.eta_max=1e-3``) and validate a plan YAML."""
    data = read_yaml(path)
    apply_overrides(data, overrides or [])
    with config_source(path, overrides):
        return Plan.from_dict(data, str(path))
