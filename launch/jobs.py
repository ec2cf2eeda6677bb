"""The plan as SLURM jobs: main-path segments that end at fork steps, and one job per branch.

The main path is split into segment jobs chained with ``afterok``: segment i runs ``--stop-at-step
fork_i`` (the trainer saves there and exits 0), the last segment runs to the path's end. A branch forking
at step f depends ``afterok`` on the segment that ends at f, so SLURM itself starts it the moment that
checkpoint exists - no polling job, no helper process. Every segment resumes from the main path's latest
checkpoint, so the chain is exactly one main-path run cut at the fork points.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from lrpath_megatron.config import ConfigError, TrainConfig

from launch.profile import ClusterProfile, parse_time

MAIN = "main"


class PathLike(Protocol):
    name: str
    parent: Optional[str]
    fork_step: int
    end_step: int
    save_steps: set


@dataclass(frozen=True)
class Job:
    key: str  # unique in the plan: "main@40" for a segment, else the path name
    path: str
    start_step: int
    end_step: int
    stop_at_step: Optional[int]  # passed as --stop-at-step (main-path segments); None = to the path's end
    after: Optional[str]  # key of the job this one waits for (afterok)


def build_jobs(paths: Sequence[PathLike]) -> list[Job]:
    """Jobs in submission order (every job after the one it depends on)."""
    by_name = {p.name: p for p in paths}
    if MAIN not in by_name:
        raise ConfigError(f"the plan has no '{MAIN}' path (paths: {', '.join(by_name) or 'none'})")
    main = by_name[MAIN]
    branches = [p for p in paths if p.name != MAIN]
    for b in branches:
        if b.parent != MAIN:
            raise ConfigError(f"path {b.name!r} has parent {b.parent!r}; only branches of '{MAIN}' can be launched")
        if not main.fork_step < b.fork_step <= main.end_step:
            raise ConfigError(
                f"path {b.name!r} forks at step {b.fork_step}, outside the main path's steps "
                f"({main.fork_step}, {main.end_step}]; move the fork point inside the main path"
            )

    jobs: list[Job] = []
    segment_of: dict[int, str] = {}
    start, prev = main.fork_step, None
    for stop in sorted({b.fork_step for b in branches} - {main.end_step}):
        key = f"{MAIN}@{stop}"
        jobs.append(Job(key, MAIN, start, stop, stop, prev))
        segment_of[stop] = key
        start, prev = stop, key
    jobs.append(Job(MAIN, MAIN, start, main.end_step, None, prev))
    segment_of[main.end_step] = MAIN
    for b in branches:
        jobs.append(Job(b.name, b.name, b.fork_step, b.end_step, None, segment_of[b.fork_step]))
    return jobs


def checkpoint_gap(job: Job, save_interval: int, save_steps: set) -> int:
    """Most steps the job trains between two checkpoints (scheduled saves, forced saves, its end)."""
    points = {job.start_step, job.end_step}
    points |= {s for s in save_steps if job.start_step < s < job.end_step}
    if save_interval > 0:
        first = (job.start_step // save_interval + 1) * save_interval
        points |= set(range(first, job.end_step, save_interval))
    ordered = sorted(points)
    return max(b - a for a, b in zip(ordered, ordered[1:])) if len(ordered) > 1 else 0


def check_profile(profile: ClusterProfile, where: str, jobs: Sequence[Job], paths: Sequence[PathLike],
                  train: TrainConfig) -> None:
    """Everything that would make a submitted job fail or loop, raised before anything is written."""
    names = {p.name for p in paths}
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
        nodes, time_text = profile.resources(job.path)
        try:
            train.parallel.data_parallel(nodes * gpn)
        except ConfigError as exc:
            raise ConfigError(f"{where}: job {job.key} on {nodes} node(s) x {gpn} GPUs: {exc}") from None
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
