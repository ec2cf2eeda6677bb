"""A path of a plan as the trainer runs it in a run directory: where it starts (a fork checkpoint, imported
weights or scratch), its lineage, and for decay_steps: auto and method: auto releases the recorded choice, made
here when the release (or the main path at its pause) is the first to need it."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from lrpath_megatron import plan_decisions
from lrpath_megatron.checkpoint.layout import find_latest, read_manifest
from lrpath_megatron.distributed import read_env
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.path import FORK, WEIGHTS, PathRun, Start
from lrpath_megatron.plan import Plan
from lrpath_megatron.release_forecast import choose_decay
from lrpath_megatron.run_layout import PathDirs, RunLayout

# How long the other ranks wait for global rank 0 to record a choice (megatron-core's default collective
# timeout: a rank 0 that failed has ended the job by then).
CHOICE_WAIT_S = 600


@dataclass(frozen=True)
class MergeRun:
    """A method: auto release whose choice is a merge: what its job does instead of training a branch."""

    version: str
    checkpoints: tuple  # the main-path checkpoints it merges, oldest first
    weights: str  # merge weights spec
    step: int  # the release's step: its last checkpoint's
    dirs: PathDirs  # RUN/<version>: the merge goes to its checkpoint at ``step``, its validation loss to its metrics
    choice: dict

    @property
    def out(self) -> Path:
        return self.dirs.checkpoint(self.step)


@dataclass(frozen=True)
class MergeCandidates:
    """A method: auto release about to choose: the merge windows its job measures first (each window's merge
    of main-path checkpoints, evaluated on the held-out batches; plan_decisions.record_measured_merge)."""

    plan: Plan
    version: str
    run_dir: Path
    windows: dict  # window steps -> the main-path checkpoints it merges, oldest first (the unmeasured ones)
    weights: str
    dirs: PathDirs


def run_for(plan: Plan, name: str, run_dir: Path) -> PathRun | MergeRun | MergeCandidates:
    """Path ``name`` as the trainer runs it in ``run_dir``: a path with a parent starts from the parent's
    checkpoint at its fork step (optimizer state and data position included). The branch of a decay_steps:
    auto or method: auto version takes the release forecast's choice (recorded in ``run_dir`` and in its
    checkpoints' manifests: the same metrics give the same choice, a resume reuses it); a method: auto
    version that chose a merge is the merge to make (:class:`MergeRun`); one with merge windows not measured
    yet, the measurements to make first (:class:`MergeCandidates`)."""
    run_dir = Path(run_dir)
    if name in plan.decay_candidates:
        todo = _unmeasured(plan, name, run_dir)
        if todo is not None:
            return todo
        choice = _choice(plan, name, run_dir)
        decided = plan_decisions.with_choices(plan, run_dir)
        release = next(v.release for v in decided.versions if v.name == name)
        if release.method == "merge":
            layout = RunLayout(run_dir)
            return MergeRun(name, tuple(layout.checkpoint("main", s) for s in release.merge["save_steps"]),
                            str(release.merge["weights"]), release.step, layout.path(name), choice)
        run = _path_run(decided, name, run_dir)
        return dataclasses.replace(run, lineage={**run.lineage, "decay_choice": choice})
    if name == "main" and plan.decay_candidates:
        return _main_run(plan, run_dir)
    return _path_run(plan, name, run_dir)


def _unmeasured(plan: Plan, name: str, run_dir: Path) -> MergeCandidates | None:
    """The merge windows undecided method: auto release ``name`` has still to measure, once everything else
    its choice reads exists (before that, the choice refuses naming what is missing)."""
    base = plan_decisions.with_choices(plan, run_dir)
    if name not in base.decay_candidates or not base.auto_decays[name].merges:
        return None
    inputs = plan_decisions.choice_inputs(base, run_dir, name)
    if inputs.missing or not inputs.unmeasured:
        return None
    layout, auto = RunLayout(run_dir), base.auto_decays[name]
    windows = {w: tuple(layout.checkpoint("main", s) for s in auto.merges[w]) for w in inputs.unmeasured}
    return MergeCandidates(base, name, run_dir, windows, str(auto.merge_weights), layout.path(name))


def _path_run(plan: Plan, name: str, run_dir: Path) -> PathRun:
    spec, layout = plan.path(name), RunLayout(run_dir)
    origin = Start()
    if spec.parent is not None:
        origin = Start(FORK, layout.checkpoint(spec.parent, spec.fork_step))
    elif name == "main" and plan.config.main.init_from is not None:
        origin = Start(WEIGHTS, Path(plan.config.main.init_from))
    lineage = {"plan_hash": plan.plan_hash(), "parent_path": spec.parent, "fork_step": spec.fork_step,
               "release": dataclasses.asdict(spec.release) if spec.release else None}
    return PathRun(spec, layout.path(name), origin, lineage=lineage, source="plan")


def _main_run(plan: Plan, run_dir: Path) -> PathRun:
    """The main path of a plan with undecided decay_steps: auto releases: it trains to the forks they
    chose; before the choice that ends it (plan.MainPause) it stops at that release's earliest candidate
    fork, and once there the choice is made here (refused, naming them, until the branches it reads have
    finished)."""
    decided = plan_decisions.with_choices(plan, run_dir)
    pause = decided.main_pause
    latest = find_latest(RunLayout(run_dir).path("main").checkpoints) if pause else None
    if pause and latest is not None and read_manifest(latest)["step"] >= pause.step:
        _choice(plan, pause.version, run_dir)
        decided, pause = plan_decisions.with_choices(plan, run_dir), None
    return dataclasses.replace(_path_run(decided, "main", run_dir),
                               pause=(pause.step, pause.describe()) if pause else None)


def _choice(plan: Plan, name: str, run_dir: Path) -> dict:
    """The choice of auto release ``name``: made and recorded by global rank 0 alone (one fit, one writer);
    the other ranks of the job read its record."""
    if read_env().rank == 0:
        return choose_decay(plan, name, run_dir)
    record, deadline = plan_decisions.record_file(run_dir, name), time.monotonic() + CHOICE_WAIT_S
    while not record.is_file():
        if time.monotonic() > deadline:
            raise LrpathError(f"rank 0 recorded no decay_steps: auto choice for version {name} at {record} within "
                              f"{CHOICE_WAIT_S} s; its log says why")
        time.sleep(0.5)
    return plan_decisions.with_choices(plan, run_dir).auto_decays[name].choice
