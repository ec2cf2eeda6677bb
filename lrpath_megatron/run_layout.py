"""Every on-disk place of a run, in one type: nothing else joins these paths.

A plan's run directory holds one directory per path (``RUN/main``, ``RUN/v2``, ``RUN/ptfs/v2``), merge
releases under their version's name, and adapter updates under ``RUN/adapt/<method>/<version>``. A
stand-alone run's directory is itself one path directory. Inside a path directory::

    checkpoints/iter_NNNNNNN/   checkpoints (see checkpoint_layout), ``checkpoints/latest``
    fork.json                   the parent checkpoint a branch started from
    metrics.jsonl, tensorboard/ training metrics
    logs/                       SLURM job output
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lrpath_megatron.checkpoint_layout import FORK, iter_name


@dataclass(frozen=True)
class PathDirs:
    """The directory of one path and the files in it."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return Path(self.root) / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / iter_name(step)

    @property
    def fork_record(self) -> Path:
        return Path(self.root) / FORK

    @property
    def metrics(self) -> Path:
        return Path(self.root) / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return Path(self.root) / "tensorboard"

    @property
    def logs(self) -> Path:
        """SLURM job output of the path."""
        return Path(self.root) / "logs"

    def sub(self, name: str) -> "PathDirs":
        """A path directory nested in this one (the phases of LP-FT)."""
        return PathDirs(Path(self.root) / name)


@dataclass(frozen=True)
class AdaptDirs(PathDirs):
    """An adapter update: a path directory with the exported adapter, the selector and the result beside."""

    @property
    def adapter(self) -> Path:
        return Path(self.root) / "adapter"

    @property
    def selector(self) -> Path:
        return Path(self.root) / "selector.pt"

    @property
    def result(self) -> Path:
        return Path(self.root) / "result.json"


@dataclass(frozen=True)
class RunLayout:
    """A plan's run directory."""

    root: Path

    def path(self, name: str) -> PathDirs:
        """A plan path (``main``, a version, ``ptfs/v2``) or a merge release (the version's name)."""
        return PathDirs(Path(self.root) / name)

    def checkpoint(self, path: str, step: int) -> Path:
        return self.path(path).checkpoint(step)

    @property
    def slurm(self) -> Path:
        """Default place of the rendered sbatch scripts."""
        return Path(self.root) / "slurm"

    def adapt(self, method: str, version: str) -> AdaptDirs:
        """An adapter update of ``version`` by ``method``."""
        return AdaptDirs(Path(self.root) / "adapt" / method / version)
