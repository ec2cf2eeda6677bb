"""``plan.evaluate``: downstream tasks scored on every release as soon as it is released, and the gate that
holds back a release that fell below the previous one on a named task.

    plan:
      evaluate:
        tasks: [code_next_line, docstring_match, path/to/my_tasks]   # shipped names or task directories
        tokenizer: runs/demo/data/demo_tokenizer.model               # default: plan.export.tokenizer
        limit: 50                                                    # documents per task (default: all)
        device: gpu                                                  # SLURM: one GPU (default: cpu)
        gate: {task: code_next_line, metric: acc, max_drop_stderr: 2.0}   # or max_drop_points: 3.0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lrpath_megatron.config import ConfigError


@dataclass
class GateConfig:
    task: str = ""  # a task of evaluate.tasks
    metric: str = "acc"
    # How far below the previous release the score may fall (exactly one): in standard errors of the
    # difference (sqrt(se_prev^2 + se_new^2)) or in points (percentage points of a 0..1 metric: 100 x value).
    max_drop_stderr: Optional[float] = None
    max_drop_points: Optional[float] = None


@dataclass
class EvaluateConfig:
    tasks: list = field(default_factory=list)
    tokenizer: Optional[str] = None  # the SentencePiece .model of the data; None = plan.export.tokenizer
    limit: Optional[int] = None  # the first documents of each task; None = all
    # Where a SLURM evaluation job runs: one CPU task (like the export job) or one task with one GPU.
    device: str = "cpu"  # cpu | gpu
    gate: Optional[GateConfig] = None

    def validate(self, export_tokenizer: Optional[str]) -> None:
        """Everything checkable before anything trains: the tasks exist, the gate names one of them."""
        from lrpath_megatron.task_dirs import task_configs
        from lrpath_megatron.errors import LrpathError

        where = "plan.evaluate"
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ConfigError(f"{where}.tasks: list the shipped tasks or task directories to score each release on")
        try:
            names = list(task_configs([str(t) for t in self.tasks]))
        except LrpathError as exc:
            raise ConfigError(f"{where}.tasks: {exc}") from None
        if (self.tokenizer or export_tokenizer) is None:
            raise ConfigError(f"{where}.tokenizer: give the SentencePiece .model the data was tokenized with "
                              f"(or plan.export.tokenizer)")
        if self.device not in ("cpu", "gpu"):
            raise ConfigError(f"{where}.device {self.device!r}: give cpu or gpu (where a SLURM evaluation job runs)")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"{where}.limit {self.limit}: give a positive number of documents per task")
        gate = self.gate
        if gate is None:
            return
        if gate.task not in names:
            raise ConfigError(f"{where}.gate.task {gate.task!r} is not evaluated (tasks: {', '.join(names)}); "
                              f"name one of them")
        bounds = [b for b in ("max_drop_stderr", "max_drop_points") if getattr(gate, b) is not None]
        if len(bounds) != 1:
            raise ConfigError(f"{where}.gate: give exactly one of max_drop_stderr, max_drop_points")
        if getattr(gate, bounds[0]) < 0:
            raise ConfigError(f"{where}.gate.{bounds[0]} must be >= 0")

    def tokenizer_path(self, export_tokenizer: Optional[str]) -> Path:
        return Path(self.tokenizer or export_tokenizer)
