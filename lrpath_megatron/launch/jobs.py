"""The plan as SLURM jobs: main-path segments that end at release steps, one job per branch, one per merge,
one downstream evaluation per release (plan.evaluate) and one Hugging Face export (plan.export.hf).

The main path is split into segment jobs chained with ``afterok``: segment i runs ``--stop-at-step
s_i`` (the trainer saves there and exits 0), the last segment runs to the path's end. The cut points are
the branches' fork steps and the merge releases' release steps. A branch forking at step f depends
``afterok`` on the segment that ends at f, so SLURM itself starts it the moment that checkpoint exists -
no polling job, no helper process. A merge release (WSM) is a CPU job after the segment that ends at its
release step: by then every main-path checkpoint it merges exists. Every segment resumes from the main
path's latest checkpoint, so the chain is exactly one main-path run cut at those steps.

A decay_steps: auto release chooses its decay length, and so its fork, from what is known at its earliest
candidate fork. Its branch waits for the segment that ends at the latest fork any of its candidates takes
and for the earlier branches its choice reads; the main path has saved every earlier candidate fork by then
(the plan saves them all), so whichever length it chooses, its fork checkpoint exists. When that release alone decides how far the main path trains
(plan.MainPause), the main path is cut at its earliest candidate fork and the next segment also waits for
the branches the choice reads: it chooses first, then trains only to the chosen fork. A method: auto release
with merge candidates chooses at its version's end instead (its job measures every window's merge first),
so the main path does not stop for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from lrpath_megatron.config import ConfigError, TrainConfig
from lrpath_megatron.launch.profile import ClusterProfile, parse_time
from lrpath_megatron.layout_planner import describe, layout_of
from lrpath_megatron.memory_model import GIB, peak_memory
from lrpath_megatron.path import PathSpec
from lrpath_megatron.plan import AutoDecay, ExportConfig, MainPause, ReleaseInfo
from lrpath_megatron.plan.evaluation import EvaluateConfig
from lrpath_megatron.run_layout import RunLayout

MAIN = "main"
# Time limit of a merge job unless the profile's paths.<version>.time or branches.time gives one: a
# streamed merge reads each input once.
MERGE_TIME = "01:00:00"


@dataclass(frozen=True)
class MergeSpec:
    steps: tuple  # main-path steps whose checkpoints are merged, oldest first; the last is the release step
    weights: str  # `lrpath merge --weights` spec


@dataclass(frozen=True)
class ExportSpec:
    tokenizer: Optional[str]  # `lrpath hf export --tokenizer-model`; None = the imported model's own files
    unless_held: bool = False  # after the release's downstream evaluation: nothing is exported if its gate held it


@dataclass(frozen=True)
class EvalSpec:
    """A release's downstream evaluation (plan.evaluate): `lrpath downstream`, after the previous release's."""

    gate: bool  # plan.evaluate.gate is set: the evaluation may hold the release
    gpu: bool = False  # on SLURM the job asks for one GPU (plan.evaluate.device: gpu)


@dataclass(frozen=True)
class AutoSpec:
    """The branch of a decay_steps: auto release that has not chosen its decay length yet (method: auto:
    nor between a decay and a merge)."""

    bounds: tuple  # (shortest, longest) decay steps it may take
    forks: tuple  # (earliest, latest) main-path step it may fork at; the job waits for the latest
    windows: tuple = ()  # method: auto: the merge windows (steps) it may take instead


@dataclass(frozen=True)
class Job:
    key: str  # unique in the plan: "main@40" for a segment, else the path or version name
    path: str  # the path trained, or the version a merge releases (its directory under the run dir)
    start_step: int
    end_step: int
    stop_at_step: Optional[int]  # passed as --stop-at-step (main-path segments); None = to the path's end
    after: Optional[str]  # key of the job this one waits for (afterok)
    merge: Optional[MergeSpec] = None  # set for a merge release: `lrpath merge`, no training
    export: Optional[ExportSpec] = None  # set for a release's export: `lrpath hf export`, no training
    evaluate: Optional[EvalSpec] = None  # set for a release's downstream evaluation: `lrpath downstream`
    # set for an undecided decay_steps: auto branch: start_step..end_step then span every candidate's steps
    auto: Optional[AutoSpec] = None
    # set for the main-path segment after a MainPause: it also waits for the branches the choice reads, makes
    # the choice, and ends at the chosen fork (end_step is the latest it may be)
    pause: Optional[MainPause] = None
    # an undecided auto branch also waits for the branches its choice reads: the choice is then the same
    # whichever job the scheduler starts first
    reads: tuple = ()

    @property
    def waits_for(self) -> tuple:
        """Keys of the jobs this one starts after (afterok)."""
        return tuple(dict.fromkeys(((self.after,) if self.after else ()) + (self.pause.needs if self.pause else ())
                                   + self.reads))

    @property
    def kind(self) -> str:
        return "merge" if self.merge else "export" if self.export else "evaluate" if self.evaluate else "train"

    @property
    def script(self) -> str:
        """Name of the job's script: the main path's segments share one; a release's export has its own."""
        return f"{self.path}-hf" if self.export else f"{self.path}-eval" if self.evaluate else self.path

    def describe(self) -> str:
        """What the job does, in words (``lrpath launch`` prints it; ``submit.sh`` has it as a comment)."""
        if self.merge:
            return f"merge of main steps {', '.join(map(str, self.merge.steps))}"
        if self.export:
            return f"Hugging Face export of release {self.path}" + (" unless held" if self.export.unless_held else "")
        if self.evaluate:
            return f"downstream tasks of release {self.path}" + (" and its gate" if self.evaluate.gate else "")
        if self.pause:
            return (f"path {self.path} steps {self.start_step}..{self.end_step} at most: version "
                    f"{self.pause.version} chooses its decay length first, the main path ends at its fork")
        if self.auto:
            (lo, hi), (first, last) = self.auto.bounds, self.auto.forks
            if self.auto.windows:
                return (f"path {self.path} method auto: a decay in [{lo}, {hi}] steps or a merge over a window of "
                        f"{', '.join(map(str, self.auto.windows))} steps (main-path steps {first}..{last}; each "
                        f"window merged and measured, then chosen from the run up to step {last})")
            return (f"path {self.path} decay auto in [{lo}, {hi}] steps (forks between step {first} and {last}, "
                    f"chosen from the run up to step {first})")
        return f"path {self.path} steps {self.start_step}..{self.end_step}"


def build_jobs(paths: Sequence[PathSpec], releases: Sequence[ReleaseInfo] = (),
               export: Optional[ExportConfig] = None, auto: Optional[Mapping[str, AutoDecay]] = None,
               pause: Optional[MainPause] = None) -> list[Job]:
    """Jobs in submission order (every job after the one it depends on): main-path segments, branches,
    then merge releases (``releases`` may hold every version's release; only merges make jobs), then, with
    ``export.hf``, one Hugging Face export per release after the job that writes it. ``auto``: the plan's
    decay_steps: auto releases (``Plan.auto_decays``); a branch that has not chosen waits for the segment
    that ends at its latest candidate fork. ``pause``: the plan's ``main_pause``, a cut of the main path."""
    undecided = {name: d for name, d in (auto or {}).items() if d.choice is None}
    by_name = {p.name: p for p in paths}
    if MAIN not in by_name:
        raise ConfigError(f"the plan has no '{MAIN}' path (paths: {', '.join(by_name) or 'none'})")
    main = by_name[MAIN]
    branches = [p for p in paths if p.name != MAIN]
    waits = {b.name: undecided[b.name].fork_span[1] if b.name in undecided else b.fork_step for b in branches}
    for b in branches:
        if b.parent != MAIN:
            raise ConfigError(f"path {b.name!r} has parent {b.parent!r}; only branches of '{MAIN}' can be launched")
        if b.name in undecided:
            _check_candidate_forks(b.name, undecided[b.name], main)
        elif not main.fork_step < b.fork_step <= main.end_step:
            raise ConfigError(
                f"path {b.name!r} forks at step {b.fork_step}, outside the main path's steps "
                f"({main.fork_step}, {main.end_step}]; move the fork point inside the main path"
            )
    merges = [r for r in releases if r.method == "merge"]
    for r in merges:
        if not main.fork_step < r.step <= main.end_step:
            raise ConfigError(
                f"version {r.version!r} is released by a merge at step {r.step}, outside the main path's steps "
                f"({main.fork_step}, {main.end_step}]; move the release inside the main path"
            )

    jobs: list[Job] = []
    segment_of: dict[int, str] = {}
    start, prev = main.fork_step, None
    cuts = set(waits.values()) | {r.step for r in merges} | ({pause.step} if pause else set())

    def segment(key: str, start: int, stop: Optional[int], prev: Optional[str]) -> Job:
        chooses = pause if pause and start == pause.step else None  # the segment that makes the choice
        return Job(key, MAIN, start, main.end_step if stop is None else stop, stop, prev, pause=chooses)

    for stop in sorted(cuts - {main.end_step}):
        key = f"{MAIN}@{stop}"
        jobs.append(segment(key, start, stop, prev))
        segment_of[stop] = key
        start, prev = stop, key
    jobs.append(segment(MAIN, start, None, prev))
    segment_of[main.end_step] = MAIN
    for b in branches:
        if b.name in undecided:  # spans every candidate: the time check then holds whichever it chooses
            d = undecided[b.name]
            jobs.append(Job(b.name, b.name, d.fork_span[0], d.end_span()[1], None, segment_of[waits[b.name]],
                            auto=AutoSpec(d.bounds, d.fork_span, tuple(sorted(d.merges))), reads=d.reads))
        else:
            jobs.append(Job(b.name, b.name, b.fork_step, b.end_step, None, segment_of[b.fork_step]))
    for r in merges:
        steps = tuple(r.merge["save_steps"])
        jobs.append(Job(r.version, r.version, steps[0], r.step, None, segment_of[r.step],
                        MergeSpec(steps, str(r.merge["weights"]))))
    if export is not None and export.hf:
        if export.tokenizer is not None and not Path(export.tokenizer).exists():
            # Checked at launch: the export jobs run only after their release has trained.
            raise ConfigError(f"plan.export.tokenizer {export.tokenizer} does not exist; give the tokenizer the "
                              f"data was preprocessed with (a SentencePiece .model, a tokenizer.json or its directory)")
        released = {j.key: j for j in jobs if j.key in {r.version for r in releases}}
        jobs += [Job(f"{key}-hf", key, job.end_step, job.end_step, None, key, export=ExportSpec(export.tokenizer))
                 for key, job in released.items()]
    return _in_dependency_order(jobs)


def with_evaluation(jobs: Sequence[Job], releases: Sequence[ReleaseInfo],
                    evaluate: Optional[EvaluateConfig]) -> list[Job]:
    """``jobs`` (in dependency order, from :func:`~lrpath_megatron.launch.jobs.build_jobs`) with one
    evaluation job per release, in release order, before the exports; unchanged without ``evaluate``."""
    if evaluate is None:
        return list(jobs)
    by_key = {j.key: j for j in jobs}
    evals, previous = [], None
    for r in releases:
        job = by_key[r.version]
        key = f"{r.version}-eval"
        evals.append(Job(key, r.version, job.end_step, job.end_step, None, r.version,
                         evaluate=EvalSpec(evaluate.gate is not None, evaluate.device == "gpu"),
                         reads=(previous,) if previous else ()))
        previous = key
    exports = [dataclasses.replace(j, after=f"{j.path}-eval", export=dataclasses.replace(j.export, unless_held=True))
               for j in jobs if j.kind == "export"]
    return [j for j in jobs if j.kind != "export"] + evals + exports


def plan_jobs(plan) -> list[Job]:
    """Every job of a loaded plan (with its recorded auto choices applied where the caller wants them): its
    paths, merge releases, downstream evaluations and exports, in dependency order."""
    return with_evaluation(build_jobs(plan.paths(), plan.releases(), plan.config.export, plan.auto_decays,
                                      plan.main_pause), plan.releases(), plan.config.evaluate)


def _in_dependency_order(jobs: list[Job]) -> list[Job]:
    """``jobs`` reordered so that each comes after every job it waits for, otherwise keeping their order (a
    main-path segment after a MainPause waits for branches of earlier segments)."""
    ordered: list[Job] = []
    pending = list(jobs)
    while pending:
        done = {j.key for j in ordered}
        job = next(j for j in pending if set(j.waits_for) <= done)
        ordered.append(job)
        pending.remove(job)
    return ordered


def _check_candidate_forks(name: str, auto: AutoDecay, main: PathSpec) -> None:
    """Every fork an undecided auto branch may choose lies inside the main path and has a full checkpoint by
    the time the branch starts (a scheduled save, or the main path's end)."""
    first, last = auto.fork_span
    if not (main.fork_step < first and last <= main.end_step):
        raise ConfigError(
            f"path {name!r} (decay_steps: auto) may fork between steps {first} and {last}, outside the main path's "
            f"steps ({main.fork_step}, {main.end_step}]; narrow its decay_bounds or move its fork inside the main path")
    unsaved = sorted(f for f, _ in auto.forks.values() if f not in main.save_steps and f != main.end_step)
    if unsaved:
        raise ConfigError(
            f"path {name!r} (decay_steps: auto) may fork at main-path step(s) {', '.join(map(str, unsaved))}, where "
            f"the main path saves no full checkpoint; add them to plan.main.save_steps")
    unsaved = sorted(s for s in auto.merge_steps() - main.save_steps - main.weights_only_steps if s != main.end_step)
    if unsaved:
        raise ConfigError(
            f"version {name!r} (method: auto) may merge main-path step(s) {', '.join(map(str, unsaved))}, where the "
            f"main path saves no checkpoint; add them to plan.main.weights_only_steps")


def merge_args(run_dir: Path, job: Job) -> list[str]:
    """``lrpath`` arguments of a merge job: main-path checkpoints -> ``RUN/<version>/checkpoints/iter_<step>``
    (where `lrpath status` finds the release). ``--skip-existing`` makes reruns and requeues exit 0."""
    layout = RunLayout(Path(run_dir))
    ckpts = [str(layout.checkpoint(MAIN, s)) for s in job.merge.steps]
    out = layout.checkpoint(job.path, job.end_step)
    return ["merge", *ckpts, "--weights", job.merge.weights, "--out", str(out), "--skip-existing"]


def export_args(run_dir: Path, job: Job) -> list[str]:
    """``lrpath`` arguments of an export job: the release checkpoint -> ``RUN/<version>/hf``, replaced when
    rerun (the export is written aside and renamed into place)."""
    layout = RunLayout(Path(run_dir))
    args = ["hf", "export", str(layout.checkpoint(job.path, job.end_step)), "--out", str(layout.path(job.path).hf),
            "--overwrite", "--no-progress"]
    args += ["--unless-held", str(layout.path(job.path).root)] if job.export.unless_held else []
    return args + (["--tokenizer-model", job.export.tokenizer] if job.export.tokenizer else [])


def eval_args(run_dir: Path, job: Job, plan_file: Path, overrides: Sequence[str]) -> list[str]:
    """``lrpath`` arguments of a release's downstream evaluation (writes ``RUN/<version>/downstream.json``)."""
    return ["downstream", str(plan_file), job.path, "--run-dir", str(run_dir),
            *[a for item in overrides for a in ("--set", item)]]


def merge_time(profile: ClusterProfile, version: str) -> str:
    """Time limit of a merge job: ``paths.<version>.time``, else ``branches.time``, else :data:`MERGE_TIME`."""
    own = profile.paths.get(version)
    return (own.time if own else None) or profile.branches.time or MERGE_TIME


def checkpoint_gap(job: Job, save_interval: int, save_steps: set) -> int:
    """Most steps the job trains between two checkpoints (scheduled saves, forced saves, its end)."""
    points = {job.start_step, job.end_step}
    points |= {s for s in save_steps if job.start_step < s < job.end_step}
    if save_interval > 0:
        first = (job.start_step // save_interval + 1) * save_interval
        points |= set(range(first, job.end_step, save_interval))
    ordered = sorted(points)
    return max(b - a for a, b in zip(ordered, ordered[1:])) if len(ordered) > 1 else 0


def check_profile(profile: ClusterProfile, where: str, jobs: Sequence[Job], paths: Sequence[PathSpec],
                  train: TrainConfig) -> None:
    """Everything that would make a submitted job fail or loop, raised before anything is written."""
    names = {p.name for p in paths} | {j.key for j in jobs if j.kind == "merge"}
    unknown = sorted(set(profile.paths) - names)
    if unknown:
        raise ConfigError(f"{where}: paths.{unknown[0]} is not a path of the plan (paths: {', '.join(sorted(names))})")

    tp, pp = train.parallel.tensor_parallel, train.parallel.pipeline_parallel
    gpn = profile.gpus_per_node
    if gpn % tp:
        raise ConfigError(
            f"{where}: gpus_per_node={gpn} is not divisible by parallel.tensor_parallel={tp}; a tensor-parallel "
            "group must sit inside one node - use a tensor_parallel that divides the GPUs per node"
        )
    if gpn % (tp * pp) and (tp * pp) % gpn:
        raise ConfigError(
            f"{where}: gpus_per_node={gpn} and tensor_parallel*pipeline_parallel={tp}*{pp}={tp * pp} do not divide "
            "one another, so model-parallel groups cannot tile the nodes; change gpus_per_node or the parallel layout"
        )

    save_steps = {p.name: set(p.save_steps) for p in paths}
    interval = train.checkpoint.save_interval
    for job in jobs:
        if job.kind in ("export", "evaluate"):  # one CPU task reading the release once
            continue
        if job.kind == "merge":  # one CPU task: no GPUs to fit, no checkpoint interval to outlast
            own = profile.paths.get(job.path)
            if own and own.nodes not in (None, 1):
                raise ConfigError(
                    f"{where}: paths.{job.path}.nodes={own.nodes}, but version {job.path!r} is released by a merge, "
                    f"which runs as one CPU task on one node; remove paths.{job.path}.nodes (a merge job uses "
                    f"only paths.{job.path}.time)"
                )
            continue
        nodes, time_text = profile.resources(job.path)
        try:
            train.parallel.data_parallel(nodes * gpn)
        except ConfigError as exc:
            raise ConfigError(f"{where}: job {job.key} on {nodes} node(s) x {gpn} GPUs: {exc}") from None
        check_memory(profile, where, job.key, nodes * gpn, train)
        limit = parse_time(time_text, f"{where}: time")
        gap = checkpoint_gap(job, interval, save_steps[job.path])
        need = profile.startup_seconds + gap * profile.seconds_per_step + profile.signal_grace
        if limit < need:
            raise ConfigError(
                f"{where}: time limit {time_text} ({limit}s) of job {job.key} is shorter than one checkpoint "
                f"interval: startup_seconds {profile.startup_seconds:g} + {gap} steps x seconds_per_step "
                f"{profile.seconds_per_step:g} + signal_grace {profile.signal_grace} = {need:g}s; raise the time "
                "limit or lower checkpoint.save_interval"
            )


def check_memory(profile: ClusterProfile, where: str, job: str, gpus: int, train: TrainConfig) -> None:
    """Refuse a job whose predicted peak memory per GPU (the layout planner's model) exceeds the profile's
    gpu_memory_gib less memory_headroom: it would wait in the queue only to run out of memory."""
    if profile.gpu_memory_gib is None or not profile.memory_check:
        return
    layout = layout_of(train, gpus)
    m = peak_memory(train.model, layout)
    budget = profile.gpu_memory_gib * (1 - profile.memory_headroom)
    if m.total / GIB > budget:
        g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
        raise ConfigError(
            f"{where}: job {job} ({describe(layout)}, recompute {layout.recompute}) is predicted to need "
            f"{g(m.total)} GiB per GPU (weights {g(m.weights)}, gradients {g(m.gradients)}, optimizer "
            f"{g(m.optimizer)}, activations {g(m.activations)} on pipeline stage {m.stage}), more than "
            f"gpu_memory_gib {profile.gpu_memory_gib:g} less memory_headroom {profile.memory_headroom:g} = "
            f"{budget:.1f} GiB; `lrpath plan PLAN --cluster PROFILE --layout` lists layouts that fit, or set "
            f"memory_check: false (--cluster-set memory_check=false) to submit anyway"
        )
