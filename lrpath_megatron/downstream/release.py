"""Scores a plan's release (or a baseline path such as ``ptfs/v2``) on ``plan.evaluate``'s tasks, applies the
gate against the previous release, and writes ``RUN/<path>/downstream.json`` (atomically) and the scores
as metrics at the release step (``downstream/<task>/<metric>`` in metrics.jsonl and TensorBoard)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lrpath_megatron.checkpoint.layout import is_complete, write_json_atomic
from lrpath_megatron.downstream.gate import RECORD, read_record, verdict
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.plan import Plan
from lrpath_megatron.run_layout import RunLayout


def checkpoint_of(plan: Plan, run_dir: Path, name: str) -> tuple[Path, int]:
    """(checkpoint, step) that ``name`` stands for: a version's released weights or a path's last checkpoint."""
    from lrpath_megatron.status import release_status

    if name in {v.name for v in plan.versions}:
        status = release_status(plan, run_dir, name)
        if not status.released:
            raise LrpathError(f"version {name!r} is not released under {run_dir} yet ({status.method} to step "
                              f"{status.step}); evaluate it once its release job has finished")
        return Path(status.checkpoint), status.step
    spec = plan.path(name)
    ckpt = RunLayout(run_dir).checkpoint(name, spec.end_step)
    if not is_complete(ckpt):
        raise LrpathError(f"path {name!r} has no complete checkpoint at its end step {spec.end_step} ({ckpt}); "
                          f"train it first (lrpath train PLAN --path {name})")
    return ckpt, spec.end_step


def previous_release(plan: Plan, run_dir: Path, version: str) -> Optional[tuple[str, dict]]:
    """(name, task scores) of the latest earlier release that was evaluated and not held: what a release
    is compared with (a held release never shipped)."""
    index = next(v.index for v in plan.versions if v.name == version)
    for v in reversed(plan.versions[:index]):
        record = read_record(RunLayout(run_dir).path(v.name).root)
        if record is not None and not record.get("held"):
            return v.name, record["tasks"]
    return None


def evaluate_path(plan: Plan, run_dir: Path, name: str) -> dict:
    """The record written to ``RUN/<name>/downstream.json``: ``{"path", "checkpoint", "step", "tasks",
    "held", "gate"}`` (``gate``: the verdict with its evidence; None where no gate applies)."""
    from lrpath_megatron.downstream.run import evaluate_tasks
    from lrpath_megatron.metrics import MetricsLogger

    settings = plan.config.evaluate
    if settings is None:
        raise LrpathError(f"{plan.source}: the plan has no evaluate: section; add plan.evaluate.tasks (see "
                          f"docs/evaluation.md) or score checkpoints with `lrpath eval CONFIG CKPT --tasks ...`")
    run_dir = Path(run_dir)
    ckpt, step = checkpoint_of(plan, run_dir, name)
    result = evaluate_tasks(plan.train_config, [ckpt], settings.tokenizer_path(plan.config.export.tokenizer),
                            [str(t) for t in settings.tasks], settings.limit)[str(ckpt)]
    is_release = name in {v.name for v in plan.versions}
    gate = (verdict(settings.gate, name, result["tasks"], previous_release(plan, run_dir, name))
            if settings.gate is not None and is_release else None)
    record = {"path": name, "checkpoint": str(ckpt), "step": step, "tasks": result["tasks"],
              "held": bool(gate and gate["held"]), "gate": gate}
    dirs = RunLayout(run_dir).path(name)
    write_json_atomic(Path(dirs.root) / RECORD, record)
    # At the release step: a rerun replaces the scores logged there before (training logs steps below it).
    logger = MetricsLogger(dirs, True, plan.train_config.logging.tensorboard, resume_step=step)
    scores = {task: {m: s["value"] for m, s in r["metrics"].items()} for task, r in result["tasks"].items()}
    logger.log({"step": step, "path": name, "downstream": scores}, echo=False)
    logger.close()
    return record
