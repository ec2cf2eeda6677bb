"""The resolved plan: versions on main-path steps, one release each, the paths that train them. Pure and
immutable once built (no file is read; a run directory's recorded choices are applied by
:mod:`lrpath_megatron.plan_decisions`), so every command that loads the same plan sees the same paths."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

from lrpath_megatron import schedules
from lrpath_megatron.config import (ConfigError, MixConfig, TrainConfig, apply_overrides, config_source, from_dict,
                                    read_yaml)
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mix_policy import MixSchedule, normalize_weights, resolve_stages
from lrpath_megatron.path import PathSpec
from lrpath_megatron.plan import costs, identity
from lrpath_megatron.merge_weights import merge_release, merge_save_steps
from lrpath_megatron.plan.auto_decay import AUTO_MERGE, AutoDecay, MainPause, auto_methods, first_forecastable_step, \
    keep_usable, main_pause, merge_windows, why_not
from lrpath_megatron.plan.releases import Grid, ReleaseInfo, ResolvedVersion, moves_with_decay, resolve_release
from lrpath_megatron.plan.schema import (BASELINES, DECAY_SETTINGS, FORK_RULES, PlanConfig, ReleaseConfig,
                                         corpus_names, one_of, with_defaults)


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
                "(plan.versions[i].release.mix); remove data.mix")
        self.warmup_steps = self._validate_main()
        self._grid = Grid(self.tokens_per_step, self.warmup_steps)
        # The releases with unwritten settings at their defaults (the written ones are checked against them).
        self._releases = [with_defaults(v.release) for v in config.versions]
        self.main_lr = schedules.WarmupConstant(self.eta_max, self.warmup_steps)
        if config.fork not in FORK_RULES:
            raise ConfigError(f"plan.fork={config.fork!r} is not one of {', '.join(FORK_RULES)}")
        if config.export.tokenizer is not None and not config.export.hf:
            raise ConfigError("plan.export.tokenizer goes with the Hugging Face exports; set plan.export.hf: true "
                              "or remove it")
        if config.evaluate is not None:
            config.evaluate.validate(config.export.tokenizer)
        config.forecast.validate()
        candidates = self._resolve_versions()
        if config.fork == "effective":  # an auto release's forks are its candidates' (_screen)
            self.versions = [v if v.name in candidates else self._fork_effectively(v, r)
                             for v, r in zip(self.versions, self._releases)]
        # Every decay_steps: auto release, undecided (its candidates) or fixed at its choice (``decided``).
        self.auto_decays: dict[str, AutoDecay] = {}
        for i, (v, r) in enumerate(zip(self.versions, self._releases)):
            if v.name in candidates:
                self.auto_decays[v.name] = self._screen(v, r, candidates[v.name])
                self.versions[i] = self._at_length(v, self.auto_decays[v.name], self.auto_decays[v.name].candidates[0])
        self.decay_candidates = {n: list(d.candidates) for n, d in self.auto_decays.items()}
        self._auto_names = set(self.auto_decays) | set(decided or {})
        self.auto_decays = {n: dataclasses.replace(d, reads=self.choice_reads(n)) for n, d in self.auto_decays.items()}
        self.auto_decays.update({k: d for k, d in (decided or {}).items() if k not in self.auto_decays})
        undecided = [v.name for v in self.versions if v.name in candidates]
        # The main path trains to the last fork a release may take; a chosen decay forks at its choice.
        ends = [(v.release.step, v.name) for v in self.versions if v.name not in undecided]
        ends += [(self.auto_decays[n].fork_span[1], n) for n in undecided]
        self.main_end = max(step for step, _ in ends)
        # What a written save step may name: every fork a release may take, chosen or not.
        self._reach = max([self.main_end] + [f for d in self.auto_decays.values() for f, _ in d.spans()])
        self._validate_save_steps()
        self._paths = self._build_paths()
        self.main_pause: Optional[MainPause] = main_pause(
            ends, {n: self.auto_decays[n] for n in undecided})

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "Plan":
        data = copy.deepcopy(data)
        if "schedule" in data:
            raise ConfigError("schedule: is not used in a plan (the plan: section defines every path's LR); remove it")
        if "plan" not in data:
            raise ConfigError("plan: section is missing; a plan needs plan.main and plan.versions")
        plan_cfg = from_dict(PlanConfig, data.pop("plan"), "plan")
        return cls(from_dict(TrainConfig, data), plan_cfg, source)

    def new_share(self, index: int) -> float:
        """The share of version ``index``'s main-path segment drawn from its own corpora (the rest replays
        the older versions; the first version has nothing to replay)."""
        return 1.0 - self.config.main.replay if index > 0 else 1.0

    def _check_lrs(self) -> None:
        main = self.config.main
        if self.eta_max <= 0:
            where = "plan.main.eta_max" if main.eta_max is not None else "optimizer.lr (plan.main.eta_max unset)"
            raise ConfigError(f"{where}={self.eta_max} must be > 0")
        if not 0 <= self.eta_min <= self.eta_max:
            where = "plan.main.eta_min" if main.eta_min is not None else "optimizer.min_lr (plan.main.eta_min unset)"
            raise ConfigError(f"{where}={self.eta_min} is negative or greater than plan.main.eta_max={self.eta_max}; "
                              f"a decay goes from eta_max down to eta_min >= 0")

    def _validate_main(self) -> int:
        """Check plan.main and return the warmup in steps."""
        main = self.config.main
        if not 0.0 <= main.replay < 1.0:
            raise ConfigError(f"plan.main.replay={main.replay} must be in [0, 1): the share of older data")
        if not self.config.versions:
            raise ConfigError("plan.versions is empty; list the versions in the order their data arrives")
        warmup = one_of(main, "plan.main", ["warmup_steps", "warmup_tokens"], required=False)
        if warmup and warmup[1] < 0:
            raise ConfigError(f"plan.main.{warmup[0]}={warmup[1]} must be >= 0")
        if warmup is None:
            return 0
        return warmup[1] if warmup[0] == "warmup_steps" else Grid(self.tokens_per_step, 0).steps(warmup[1])

    def _validate_save_steps(self) -> None:
        for key in ("save_steps", "weights_only_steps"):
            steps = getattr(self.config.main, key)
            if not isinstance(steps, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps):
                raise ConfigError(f"plan.main.{key}={steps!r} must be a list of main-path steps (integers)")
            outside = [x for x in steps if not 0 < x <= self._reach]
            if outside:
                raise ConfigError(f"plan.main.{key}: {outside} outside the main path's steps 1..{self._reach}; "
                                  f"the main path trains up to its last release")

    def _resolve_versions(self) -> dict:
        """Resolve ``self.versions``; return the decay lengths of each decay_steps: auto version."""
        names: set[str] = set()
        total, segments = 0, []
        for i, v in enumerate(self.config.versions):
            where = f"plan.versions[{i}]"
            if not v.name or v.name == "main":
                raise ConfigError(f"{where}.name={v.name!r}: give each version a unique name other than 'main'")
            if v.name in names:
                raise ConfigError(f"{where}.name={v.name!r} is used twice")
            names.add(v.name)
            size = one_of(v, where, ["tokens", "steps", "new_tokens"], required=True)
            if size[1] <= 0:
                raise ConfigError(f"{where}.{size[0]}={size[1]} must be > 0")
            steps = {"steps": lambda x: x, "tokens": self._grid.steps,
                     "new_tokens": lambda x: self._grid.steps(x / self.new_share(i))}[size[0]](size[1])
            if v.corpora is None or v.corpora == [] or v.corpora == {}:
                raise ConfigError(f"{where}.corpora is missing: name the corpora (from data.corpora) of this version")
            corpora = v.corpora if isinstance(v.corpora, dict) else {n: 1.0 for n in corpus_names(v.corpora, where)}
            segments.append((v.name, normalize_weights(corpora, self.corpus_names, f"{where}.corpora"),
                             total, total + steps))
            total += steps
        self.data_end = total
        self.versions: list[ResolvedVersion] = []
        previous_fork, candidates = 0, {}
        for i, (v, (name, corpora, start, end)) in enumerate(zip(self.config.versions, segments)):
            release, lengths = resolve_release(i, v.release, self._releases[i], name, (start, end), self.data_end,
                                               previous_fork, self._grid)
            if lengths is not None:
                candidates[name] = lengths
            previous_fork = release.step
            self.versions.append(ResolvedVersion(i, name, corpora, start, end, release,
                                                 release.step + release.decay_steps))
        return candidates

    # ---------------------------------------------------------------- decay_steps: auto
    def _screen(self, v: ResolvedVersion, r: ReleaseConfig, lengths: list) -> AutoDecay:
        """The candidates of auto release ``v`` whose branch the forecast can choose, with their forks."""
        where = f"plan.versions[{v.index}].release"
        interval = self.train_config.logging.eval_interval
        if not interval:
            raise ConfigError(f"{where}.decay_steps: auto chooses from validation losses, but logging.eval_interval "
                              "is 0; set it (e.g. a tenth of a version's steps) or give decay_steps")
        # With merge candidates the choice is made at the version's end (AutoDecay.choice_step), when the law
        # has every evaluation of the version: only the warmup rules a fork out.
        at_end = r.method == "auto" and "merge" in auto_methods(r.methods, where)
        forecastable = 0 if at_end else first_forecastable_step(v.start_step, interval)
        forks, nominal_forks, why = {}, {}, {}
        for n in lengths:
            nominal_forks[n] = nominal = v.end_step - n if moves_with_decay(r) else v.release.nominal_step
            variant = self._variant(v, r, n)
            if isinstance(variant, str):
                forks[n], why[n] = (nominal, nominal + n), variant
            else:
                forks[n], why[n] = variant[:2], why_not(variant[0], self.warmup_steps, forecastable, interval)
        usable, dropped = keep_usable(lengths, {n: f for n, (f, _) in forks.items()}, why, r.decay_bounds, where)
        auto = AutoDecay(tuple(usable), {n: forks[n] for n in usable}, {n: nominal_forks[n] for n in usable}, dropped)
        if r.method != "auto":
            return auto
        merges, merge_dropped, weights = {}, (), None
        if at_end:
            merges, merge_dropped, weights = self._merge_candidates(v, r.merge, f"{where}.merge")
        return dataclasses.replace(auto, merges=merges, merge_weights=weights, dropped=dropped + merge_dropped,
                                   method_auto=True)

    def _merge_candidates(self, v: ResolvedVersion, written: dict, where: str) -> tuple:
        """The merge windows of method: auto release ``v`` (each measured when the choice is made, at the
        version's end), each with the main-path steps it merges (ending the version's segment); the windows
        left out (starting inside the warmup); the weights."""
        settings = merge_release({**AUTO_MERGE, **written, "window_steps": 1}, where)  # weights and count checked
        merges, dropped = {}, []
        for window in merge_windows(v.steps, settings.num_checkpoints):
            try:
                steps = merge_save_steps(v.end_step, window, settings.num_checkpoints, self.warmup_steps)
                why = why_not(steps[0], self.warmup_steps, 0, 1, leaves="starts")
            except ConfigError as exc:
                steps, why = [v.end_step - window], f"cannot be merged: {exc}"
            if why:
                dropped.append({"window_steps": window, "fork_step": steps[0], "why": why})
            else:
                merges[window] = tuple(steps)
        return merges, tuple(dropped), settings.weights

    def decay_variant(self, name: str, decay_steps: int, shape: Optional[str] = None) -> Optional[tuple]:
        """Version ``name``'s branch decaying over ``decay_steps`` (in ``shape``: another shape than its own
        drops the settings of its own) as (fork, end, LR): the fork where it first differs from the main path
        (plan.fork), the LR of the branch from its nominal fork. None where the plan does not allow that decay:
        past the version's data on the tail, longer than all data so far, or forking inside the warmup."""
        v = next(v for v in self.versions if v.name == name)
        r = self._releases[v.index]
        if shape is not None and shape != r.shape:
            r = dataclasses.replace(r, shape=shape, stable_fraction=None, drop_points=list(schedules.MULTISTEP_POINTS),
                                    drop_factors=None)
        variant = self._variant(v, r, decay_steps)
        return None if isinstance(variant, str) else variant

    def _variant(self, v: ResolvedVersion, r: ReleaseConfig, n: int):
        """(fork, end, LR) of ``v``'s branch decaying over ``n`` steps with settings ``r``, or why it cannot."""
        nominal = v.end_step - n if moves_with_decay(r) else v.release.nominal_step
        if n < 2:
            return "is shorter than 2 steps (the first at eta_max, the last at eta_min)"
        if r.data == "tail" and nominal < v.start_step:
            return f"is longer than the version's {v.steps} steps of data (data: tail)"
        if r.data == "tail" and nominal + n > v.end_step:
            return f"runs past the end of the version's data at step {v.end_step} (data: tail)"
        if r.data != "tail" and n > v.end_step:
            return f"is longer than all data so far ({v.end_step} steps)"
        if nominal < self.warmup_steps:
            return why_not(nominal, self.warmup_steps, 0, 1)
        alt = dataclasses.replace(v, release=dataclasses.replace(v.release, step=nominal, nominal_step=nominal,
                                                                 decay_steps=n, shape=r.shape),
                                  branch_end=nominal + n)
        lr = self._branch_lr(alt, r)
        fork = self._fork_effectively(alt, r).release.step if self.config.fork == "effective" else nominal
        return fork, nominal + n, lr

    @staticmethod
    def _at_length(v: ResolvedVersion, auto: AutoDecay, n: int) -> ResolvedVersion:
        fork, end = auto.forks[n]
        return dataclasses.replace(v, release=dataclasses.replace(
            v.release, step=fork, nominal_step=auto.nominal_forks[n], decay_steps=n), branch_end=end)

    def with_decay(self, name: str, decay_steps: int, choice: Optional[dict] = None) -> "Plan":
        """This plan with version ``name`` decaying over ``decay_steps`` (a decay_steps: auto or method: auto
        choice, recorded as ``choice`` when it was made). The main path keeps saving every candidate of the
        auto releases up to where it ends, which a chosen decay may move earlier."""
        if name in self.decay_candidates and decay_steps not in self.decay_candidates[name]:
            raise LrpathError(f"version {name}: decay_steps: auto takes one of {self.decay_candidates[name]}, "
                              f"not {decay_steps}")
        return self._decided(name, {"method": "decay", "decay_steps": decay_steps, "decay_tokens": None,
                                    "decay_fraction": None, "decay_bounds": None, "merge": None},
                             choice or {"decay_steps": decay_steps})

    def with_merge(self, name: str, window_steps: int, choice: Optional[dict] = None) -> "Plan":
        """This plan with method: auto version ``name`` released by a merge over the window ``window_steps``
        ending its segment (its choice, recorded as ``choice``)."""
        auto = self.auto_decays.get(name)
        if auto is None or window_steps not in auto.merges:
            raise LrpathError(f"version {name}: a merge of window {window_steps} steps is not one of its method: "
                              f"auto candidates {sorted(auto.merges) if auto else []}")
        merge = {"weights": auto.merge_weights, "num_checkpoints": len(auto.merges[window_steps]),
                 "window_steps": window_steps}
        return self._decided(name, {"method": "merge", "merge": merge, **{k: None for k in DECAY_SETTINGS}},
                             choice or {"method": "merge", "window_steps": window_steps})

    def _decided(self, name: str, release: dict, choice: dict) -> "Plan":
        """This plan with version ``name``'s written release settings replaced by ``release`` (its auto
        release's choice, ``choice``), keeping this plan's hash."""
        versions = [dataclasses.replace(v, release=dataclasses.replace(v.release, methods=None, **release))
                    if v.name == name else v for v in self.config.versions]
        decided = {k: d for k, d in self.auto_decays.items() if k not in self.decay_candidates}
        if name in self.decay_candidates:
            decided[name] = dataclasses.replace(self.auto_decays[name], choice=choice)
        return Plan(self.train_config, dataclasses.replace(self.config, versions=versions), self.source, decided,
                    self.plan_hash())

    def choice_reads(self, name: str) -> tuple:
        """The releases whose finished curves the choice of auto release ``name`` reads: every earlier decay
        branch that ends by the step it chooses at (``AutoDecay.choice_step``; an undecided one: that may end by
        then; a method: auto one that then merges: its measured merge)."""
        first = self.auto_decays[name].choice_step
        index = next(v.index for v in self.versions if v.name == name)
        return tuple(v.name for v in self.versions[:index]
                     if (v.release.method == "decay" or v.name in self._auto_names) and
                     (self.auto_decays[v.name].end_span()[0] if v.name in self.decay_candidates else v.branch_end)
                     <= first)

    # ---------------------------------------------------------------- paths
    def _segment(self, step: int) -> ResolvedVersion:
        for v in self.versions:
            if v.start_step <= step < v.end_step:
                return v
        raise ValueError(f"step {step} is beyond the plan's data (steps 0..{self.data_end - 1})")

    def cumulative_blend(self, upto: int) -> dict:
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
        for name, share in self.cumulative_blend(v.index).items() if replay else ():
            blend[name] = blend.get(name, 0.0) + replay * share
        return f"main:{v.name}", {n: w for n, w in blend.items() if w > 0}

    def _build_paths(self) -> dict[str, PathSpec]:
        # A release's own step is a full checkpoint: branches fork there and launch ends a main segment there.
        save = set(self.config.main.save_steps) | {v.release.step for v in self.versions}
        weights_only = set(self.config.main.weights_only_steps)
        for d in self.auto_decays.values():  # every candidate's, chosen or not: a choice never lacks its inputs
            save |= {f for f, _ in d.spans()}
            weights_only |= d.merge_steps()
        for v in self.versions:
            weights_only |= v.merge_input_steps()
        # Past a chosen decay's fork the main path no longer trains (with_decay shortened it).
        save, weights_only = {s for s in save if s <= self.main_end}, {s for s in weights_only if s <= self.main_end}
        paths = {"main": PathSpec("main", self.main_end, self.main_lr, self.main_weights, save_steps=frozenset(save),
                                  weights_only_steps=frozenset(weights_only - save),
                                  tokens_per_step=self.tokens_per_step)}
        for v, release in zip(self.versions, self._releases):
            if v.release.method == "decay":
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
            blend = self.cumulative_blend(v.index + 1)
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
            blend = self.cumulative_blend(v.index + 1)
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

    def used_corpora(self) -> set:
        """The corpora some path of the plan reads."""
        used = {name for v in self.versions for name in v.corpora}
        for r in self.config.versions:
            if r.release.mix is not None:
                used |= {name for s in r.release.mix.stages for name in s.weights}
        return used

    # ---------------------------------------------------------------- costs, identity
    def flops_per_token(self) -> float:
        return self.train_config.model.flops_per_token()

    def costs(self) -> dict:
        """Tokens and FLOPs of every path against PTFS and CPT (:func:`plan.costs.plan_costs`)."""
        return costs.plan_costs(self)

    def resolved(self) -> dict:
        """Everything that determines what trains (:func:`plan.identity.resolved`)."""
        return identity.resolved(self, [dataclasses.replace(v, release=r)
                                        for v, r in zip(self.config.versions, self._releases)])

    def plan_hash(self) -> str:
        """The plan's identity in its run's manifests; a plan fixed at its decay_steps: auto choices
        (:meth:`with_decay`) is the written plan and keeps its hash."""
        return self._written_hash if self._written_hash is not None else identity.digest(self.resolved())


def load_plan(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read, override (``--set a.b=c``, e.g. ``plan.main.eta_max=1e-3``) and validate a plan YAML."""
    data = read_yaml(path)
    apply_overrides(data, overrides or [])
    with config_source(path, overrides):
        return Plan.from_dict(data, str(path))
