"""The release x task table of a run (``lrpath report``, ``lrpath status``): each release's score on each
task with its standard error, the change vs the previous release (the one the gate compares with) and vs
PTFS of the same version where ``ptfs/<version>`` was evaluated, and the gate's verdict."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lrpath_megatron.downstream.gate import read_record
from lrpath_megatron.downstream.release import previous_release
from lrpath_megatron.run_layout import RunLayout

HEAD = ["release", "task", "metric", "score ± stderr", "vs previous release", "vs PTFS", "gate"]


def _metric(scores: dict, task: str, gate) -> str:
    """The metric a task's row shows: the gate's metric for the gate's task, else acc where reported."""
    if gate is not None and gate.task == task:
        return gate.metric
    return "acc" if "acc" in scores else next(iter(scores))


def downstream_rows(plan, run_dir: Path) -> list[dict]:
    """One dict per (evaluated release, task); empty where the plan evaluates nothing."""
    settings = plan.config.evaluate
    if settings is None:
        return []
    layout, rows = RunLayout(Path(run_dir)), []
    for v in plan.versions:
        record = read_record(layout.path(v.name).root)
        if record is None:
            continue
        previous = previous_release(plan, run_dir, v.name)
        ptfs = read_record(layout.path(f"ptfs/{v.name}").root)
        gate = record.get("gate") or {}
        for task, result in record["tasks"].items():
            metric = _metric(result["metrics"], task, settings.gate)
            own = result["metrics"][metric]
            rows.append({
                "release": v.name, "task": task, "metric": metric, "value": own["value"], "stderr": own["stderr"],
                "n": result["n"], "previous": previous[0] if previous else None,
                "vs_previous": _change(own, previous[1] if previous else None, task, metric),
                "vs_ptfs": _change(own, ptfs["tasks"] if ptfs else None, task, metric),
                "held": bool(record.get("held")),
                "gate": gate["evidence"]["text"] if gate and task == settings.gate.task else None,
            })
    return rows


def _change(own: dict, other_tasks: Optional[dict], task: str, metric: str) -> Optional[float]:
    other = (other_tasks or {}).get(task, {}).get("metrics", {}).get(metric)
    return own["value"] - other["value"] if other else None


def table_cells(rows: list[dict]) -> list[list[str]]:
    """The rows as the cells of :data:`HEAD`."""
    def change(row, key, name):
        return f"{row[key]:+.4f} vs {name}" if row[key] is not None else "-"

    return [[r["release"] + (" (held)" if r["held"] else ""), r["task"], r["metric"],
             f"{r['value']:.4f} ± {r['stderr'] if r['stderr'] is not None else float('nan'):.4f} (n={r['n']})",
             change(r, "vs_previous", r["previous"]), change(r, "vs_ptfs", f"ptfs/{r['release']}"), r["gate"] or "-"]
            for r in rows]


def format_table(rows: list[dict]) -> str:
    """Plain-text table for ``lrpath status``."""
    cells = [HEAD] + table_cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD) - 1)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in cells)


def format_scores(tasks: dict) -> list[str]:
    """One line per task and metric: ``task metric value ± stderr (n documents)``."""
    return [f"  {task:<24} {metric:<10} {s['value']:.4f} ± {s['stderr'] if s['stderr'] is not None else float('nan'):.4f}"
            f"  ({r['n']} documents)" for task, r in tasks.items() for metric, s in r["metrics"].items()]
