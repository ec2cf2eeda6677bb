"""The validation losses a plan's run has made so far, read from its run directory: what release forecasts
fit and what a decay_steps: auto choice reads.

Observations: every validation loss in the metrics of the main path and of the branches (``val_loss_per_corpus``
records; the record of step ``s`` is after ``s + 1`` updates), plus ``lrpath eval --json`` results of their
checkpoints.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lrpath_megatron.metrics import read_metrics
from lrpath_megatron.run_layout import RunLayout


@dataclass(frozen=True)
class Observation:
    path: str  # "main" or a version's branch
    step: int  # updates done
    per_corpus: dict


def observations(plan, run_dir: Path, eval_files: list = ()) -> list[Observation]:
    """Every validation loss of the plan's paths under ``run_dir``: from the metrics and from ``lrpath eval``
    JSON files (checkpoints named by their path under the run directory, symlinks resolved)."""
    layout = RunLayout(Path(run_dir))
    # Merge releases are written under their version's name too.
    names = list(dict.fromkeys([s.name for s in plan.paths()] + [v.name for v in plan.versions]))
    found: dict = {}
    for name in names:
        for r in read_metrics(layout.path(name)):
            if r.get("val_loss_per_corpus"):
                found[(name, r["step"] + 1)] = r["val_loss_per_corpus"]
    roots = {layout.path(n).checkpoints.resolve(): n for n in names}
    for f in eval_files:
        for ckpt, r in json.loads(Path(f).read_text()).items():
            name = roots.get(Path(ckpt).resolve().parent)
            if name is not None:
                found[(name, r["step"])] = r["val_loss_per_corpus"]
    return [Observation(n, s, pc) for (n, s), pc in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def known_before(plan, obs: list[Observation], step: int, version: str | None = None) -> list[Observation]:
    """What exists when a branch forks (or a merge is made) at main-path ``step``: main-path points up to it
    and the releases that finished by then, except ``version``'s own (a merge at ``step`` is not yet made)."""
    ends = {v.name: v.branch_end for v in plan.versions}
    return [o for o in obs if (o.step <= step if o.path == "main" else ends[o.path] <= step and o.path != version)]


def on_schedule(plan, obs: list[Observation]) -> list[Observation]:
    """The main path's observations at its scheduled evaluations (every ``logging.eval_interval`` steps) and
    every branch observation: a main-path job that stops at a cut also evaluates there, so what else exists
    depends on how the run was cut into jobs."""
    interval = plan.train_config.logging.eval_interval
    return [o for o in obs if o.path != "main" or (interval and o.step % interval == 0)]


def digest(obs: list[Observation]) -> str:
    """A digest of observations, the same for the same losses at the same steps of the same paths."""
    blob = json.dumps([[o.path, o.step, o.per_corpus] for o in obs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
