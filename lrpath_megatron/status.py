"""Where a plan's run stands: per path its last checkpoint, losses and state; which versions are released.

Pure reading of ``RUN/<path>/checkpoints`` and ``RUN/<path>/metrics.jsonl``: no torch, no megatron-core,
so it is fast and safe to run next to a training job (a checkpoint counts once its manifest exists,
which the trainer writes last).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from lrpath_megatron.checkpoint.layout import find_resumable, is_complete
from lrpath_megatron.metrics import read_metrics
from lrpath_megatron.path import PathSpec
from lrpath_megatron.plan import Plan
from lrpath_megatron.plan_decisions import with_choices
from lrpath_megatron.run_layout import RunLayout, iter_name

DONE, PARTIAL, READY, WAITING, NOT_STARTED = "done", "partial", "ready", "waiting", "not started"


def _checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (temporaries of running saves are skipped)."""
    steps = []
    for p in root.glob("iter_*"):
        suffix = p.name[len("iter_"):]
        if suffix.isdigit() and is_complete(p):
            steps.append(int(suffix))
    return sorted(steps)


@dataclass
class PathStatus:
    name: str
    parent: Optional[str]
    fork_step: int
    end_step: int
    state: str  # done | partial | ready | waiting | not started
    note: str  # one readable line on what the state means / what to do next
    step: Optional[int]  # last checkpointed (global) step
    checkpoint: Optional[str]
    tokens: Optional[int]  # global token position of that checkpoint
    progress: float  # fraction of the path's own steps checkpointed
    last_logged_step: Optional[int]
    loss: Optional[float]  # last train loss in metrics.jsonl
    val_loss: Optional[float]  # last validation loss in metrics.jsonl
    val_step: Optional[int]
    # the slowest rank at the last logged step of a multi-rank run: its rank, mean step time, lag behind the median
    straggler: Optional[dict] = None


@dataclass
class ReleaseStatus:
    version: str
    method: str  # decay | merge
    step: int  # decay: the branch's end step; merge: the release step on the main path
    released: bool
    checkpoint: Optional[str]  # where the released weights are (when released)


@dataclass
class RunStatus:
    plan: str
    run_dir: str
    plan_hash: str
    tokens_per_step: int
    paths: list[PathStatus]
    releases: list[ReleaseStatus]

    def to_dict(self) -> dict:
        return asdict(self)


def path_status(spec: PathSpec, layout: RunLayout, tokens_per_step: int) -> PathStatus:
    dirs = layout.path(spec.name)
    root = dirs.checkpoints
    steps = _checkpoint_steps(root)
    step = steps[-1] if steps else None
    records = read_metrics(dirs)
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    if step is not None and step >= spec.end_step:
        state, note = DONE, DONE
    elif step is not None or records:
        where = f"step {step}" if step is not None else "no checkpoint yet"
        state, note = PARTIAL, f"running or stopped at {where}; rerun its train command to continue"
        resumable = find_resumable(root) if step is not None else None
        if resumable is not None and resumable.name != iter_name(step):
            note += f" (from {resumable.name}: the newer checkpoints hold weights only)"
    elif spec.parent is None:
        state, note = NOT_STARTED, NOT_STARTED
    elif is_complete(layout.checkpoint(spec.parent, spec.fork_step)):
        state, note = READY, f"can start: {spec.parent} has its step-{spec.fork_step} checkpoint"
    else:
        state, note = WAITING, f"waiting for {spec.parent} to reach step {spec.fork_step}"
    done_steps = (step - spec.fork_step) if step is not None else 0
    return PathStatus(
        name=spec.name, parent=spec.parent, fork_step=spec.fork_step, end_step=spec.end_step,
        state=state, note=note, step=step,
        checkpoint=str(dirs.checkpoint(step)) if step is not None else None,
        tokens=step * tokens_per_step if step is not None else None,
        progress=min(1.0, done_steps / spec.steps) if spec.steps else 1.0,
        last_logged_step=records[-1]["step"] if records else None,
        loss=train[-1]["loss"] if train else None,
        val_loss=val[-1]["val_loss"] if val else None,
        val_step=val[-1]["step"] if val else None,
        straggler=next(({k: r[k] for k in ("step", "slowest_rank", "slowest_step_s", "straggler_lag_s")}
                        for r in reversed(records) if "slowest_rank" in r), None),
    )


def release_status(plan: Plan, run_dir: Path, version: str) -> ReleaseStatus:
    """Whether ``version`` is released under ``run_dir`` and where its weights are: a decay release is its
    branch's last checkpoint once the branch is done; a merge writes its output as the version's checkpoint
    at the release step (``RUN/<version>/checkpoints/iter_<step>``)."""
    r = next(v.release for v in plan.versions if v.name == version)
    dirs = RunLayout(Path(run_dir)).path(version)
    if r.method == "decay":
        step = plan.path(version).end_step
        steps = _checkpoint_steps(dirs.checkpoints)
        target = dirs.checkpoint(steps[-1]) if steps else None
        released = bool(steps) and steps[-1] >= step
    else:
        step = r.step
        target = dirs.checkpoint(step)
        released = is_complete(target)
    return ReleaseStatus(version, r.method, step, released, str(target) if released else None)


def run_status(plan: Plan, run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    trained = with_choices(plan, run_dir)  # decay_steps: auto branches at the lengths they chose
    paths = [path_status(spec, RunLayout(run_dir), plan.tokens_per_step) for spec in trained.paths()]
    releases = [release_status(trained, run_dir, v.name) for v in plan.versions]
    return RunStatus(plan.source, str(run_dir), plan.plan_hash(), plan.tokens_per_step, paths, releases)


def format_status(status: RunStatus) -> str:
    """A readable table: the version tree (branches indented under main), then the releases."""
    lines = [f"plan {status.plan} (hash {status.plan_hash}), run dir {status.run_dir}", ""]
    header = ("path", "steps", "checkpoint", "progress", "tokens", "loss", "val_loss", "state")
    rows = [header]
    for p in status.paths:
        name = p.name if p.parent is None else f"  └ {p.name} (from {p.parent}@{p.fork_step})"
        rows.append((
            name,
            f"{p.fork_step}..{p.end_step}",
            iter_name(p.step) if p.step is not None else "-",
            f"{p.progress:.0%}",
            _human(p.tokens) if p.tokens is not None else "-",
            f"{p.loss:.4f}" if p.loss is not None else "-",
            f"{p.val_loss:.4f}" if p.val_loss is not None else "-",
            f"{p.state}: {p.note}" if p.note != p.state else p.state,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    stragglers = [f"  {p.name}: slowest rank {s['slowest_rank']} at step {s['step']}: {s['slowest_step_s']:.3f} s/step, "
                  f"{s['straggler_lag_s']:.3f} s behind the median" for p in status.paths if (s := p.straggler)]
    if stragglers:
        lines += ["", "stragglers (last logged step):", *stragglers]
    lines += ["", "releases:"]
    for r in status.releases:
        how = "decay branch" if r.method == "decay" else "merge"
        where = r.checkpoint if r.released else f"not yet ({how} to step {r.step})"
        lines.append(f"  {r.version:<8} {'released' if r.released else 'pending':<9} {where}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def to_json(status: RunStatus) -> str:
    return json.dumps(status.to_dict(), indent=1)
