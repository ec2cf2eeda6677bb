"""Every on-disk place of a run, in one type: nothing else joins these paths.

A plan's run directory holds one directory per path (``RUN/main``, ``RUN/v2``, ``RUN/ptfs/v2``), merge
releases under their version's name, and adapter updates under ``RUN/adapt/<method>/<version>``. A
stand-alone run's directory is itself one path directory. Inside a path directory::

    checkpoints/iter_NNNNNNN/   checkpoints (see checkpoint.layout), ``checkpoints/latest``
    fork.json                   the parent checkpoint a branch started from
    hf_import/                  the Hugging Face model an init_from names, imported once
    hf/                         a release exported as a Hugging Face model (plan.export.hf)
    metrics.jsonl, tensorboard/ training metrics
    logs/                       SLURM job output
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FORK = "fork.json"  # in a branch's directory: the parent checkpoint it started from


def iter_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` steps."""
    return f"iter_{step:07d}"


def _entry(name: str, doc: str) -> property:
    """A file or directory of a path directory, by its fixed name."""
    return property(lambda self: Path(self.root) / name, doc=doc)


@dataclass(frozen=True)
class PathDirs:
    """The directory of one path and the files in it."""

    root: Path

    checkpoints = _entry("checkpoints", "the path's checkpoints (iter_NNNNNNN/, latest)")
    fork_record = _entry(FORK, "the checkpoint the path started from")
    metrics = _entry("metrics.jsonl", "one JSON line per logged step")
    tensorboard = _entry("tensorboard", "TensorBoard scalars")
    logs = _entry("logs", "SLURM job output of the path")
    decay_choice = _entry("decay_choice.json", "the decay length a release forecast chose (decay_steps: auto)")
    merge_candidates = _entry("merge_candidates.json", "the merge windows a method: auto release measured to choose")
    candidate_merge = _entry("candidate_merge", "a merge window being measured (removed once measured)")
    hf_import = _entry("hf_import", "the Hugging Face model the path starts from (init_from), imported")
    hf = _entry("hf", "the release as a Hugging Face model directory (plan.export.hf)")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / iter_name(step)

    def sub(self, name: str) -> "PathDirs":
        """A path directory nested in this one (the phases of LP-FT)."""
        return PathDirs(Path(self.root) / name)


@dataclass(frozen=True)
class AdaptDirs(PathDirs):
    """An adapter update: a path directory with the exported adapter, the selector and the result beside."""

    adapter = _entry("adapter", "the exported adapter (adapter_config.json + weights/)")
    selector = _entry("selector.pt", "dynamic ConPET's selector")
    result = _entry("result.json", "parameter counts, losses before and after, selector accuracy")


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
