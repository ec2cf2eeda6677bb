"""The release gate: a release whose score on the gate's task falls more than the bound below the previous
release's is held (its Hugging Face export does not run), with the numbers that decided it."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from lrpath_megatron.plan.evaluation import GateConfig
from lrpath_megatron.errors import LrpathError

RECORD = "downstream.json"  # RUN/<path>/downstream.json: the path's task scores and, for a release, the verdict


def score(tasks: dict, task: str, metric: str, where: str) -> dict:
    """``{"value", "stderr"}`` of ``task``'s ``metric`` in a result's ``tasks``."""
    metrics = tasks.get(task, {}).get("metrics", {})
    if metric not in metrics:
        raise LrpathError(f"{where}: no {metric!r} for task {task!r} (scored: "
                          f"{', '.join(f'{t}/{m}' for t, r in tasks.items() for m in r['metrics']) or 'nothing'}); "
                          f"name a metric the task reports in plan.evaluate.gate.metric")
    return metrics[metric]


def verdict(gate: GateConfig, version: str, tasks: dict, previous: Optional[tuple[str, dict]]) -> dict:
    """``{"held": bool, "evidence": {...}}`` for release ``version`` with task scores ``tasks`` against
    ``previous`` = (release name, its task scores), None for the first release (nothing to fall below)."""
    new = score(tasks, gate.task, gate.metric, version)
    if previous is None:
        return {"held": False, "evidence": {"text": f"{version}: the first release evaluated, nothing to compare with"}}
    name, prev_tasks = previous
    old = score(prev_tasks, gate.task, gate.metric, name)
    drop = old["value"] - new["value"]
    if gate.max_drop_stderr is not None:
        se = math.sqrt((old["stderr"] or 0.0) ** 2 + (new["stderr"] or 0.0) ** 2)
        bound, rule = gate.max_drop_stderr * se, f"{gate.max_drop_stderr:g} standard errors of the difference ({se:.4f})"
    else:
        bound, rule = gate.max_drop_points / 100, f"{gate.max_drop_points:g} points"
    held = drop > bound
    text = (f"{version} {gate.task}/{gate.metric} {new['value']:.4f} ± {new['stderr'] or 0:.4f} vs {name} "
            f"{old['value']:.4f} ± {old['stderr'] or 0:.4f}: drop {drop:+.4f}, bound {bound:.4f} ({rule}): "
            f"{'held' if held else 'passes'}")
    return {"held": held, "evidence": {"task": gate.task, "metric": gate.metric, "previous": name,
                                       "previous_score": old, "score": new, "drop": drop, "bound": bound,
                                       "text": text}}


def read_record(path_dir: Path) -> Optional[dict]:
    """The downstream record of a path directory, None if it was not evaluated."""
    f = Path(path_dir) / RECORD
    return json.loads(f.read_text()) if f.is_file() else None


def is_held(path_dir: Path) -> bool:
    record = read_record(path_dir)
    return bool(record and record.get("held"))
