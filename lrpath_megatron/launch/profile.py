"""Cluster profile: what a site needs in its sbatch scripts (partition, account, time, GPUs, container).

A profile is a YAML mapping of :class:`ClusterProfile` fields (see ``examples/cluster_h100.yaml``),
overridable with ``--cluster-set key=value``. Validation here covers the profile alone; checks that need
the plan (parallel layout, time per checkpoint interval) are in :mod:`lrpath_megatron.launch.jobs`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lrpath_megatron.config import ConfigError, apply_overrides, from_dict, read_yaml


@dataclass
class ContainerConfig:
    """Pyxis/enroot container for the ``srun`` step; no container when ``image`` is None."""

    image: Optional[str] = None
    mounts: list = field(default_factory=list)  # "host_dir:container_dir" entries
    workdir: Optional[str] = None


@dataclass
class PathResources:
    """Per-path overrides of the profile's defaults (e.g. fewer nodes for the branches)."""

    nodes: Optional[int] = None
    time: Optional[str] = None


@dataclass
class ClusterProfile:
    partition: str = ""
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = ""  # SLURM time limit per job: MM, HH:MM:SS or D-HH:MM:SS
    nodes: int = 1
    gpus_per_node: int = 8  # one srun task (= one rank) per GPU
    request_gpus: bool = True  # false on CPU-only clusters: no --gpus-per-node, tasks only
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # e.g. "0" (all of the node's memory) or "480G"
    exclusive: bool = False
    constraint: Optional[str] = None
    seconds_per_step: float = 0.0  # estimated wall time of one optimizer step (checks the time limit)
    # Memory of one GPU; set, every training job's predicted peak memory per GPU (lrpath_megatron.memory_model)
    # must fit in it less memory_headroom, unless memory_check is false. null = not checked.
    gpu_memory_gib: Optional[float] = None
    memory_headroom: float = 0.1  # fraction kept free: CUDA context, allocator fragmentation, NCCL buffers
    memory_check: bool = True
    startup_seconds: float = 120.0  # imports, rendezvous, checkpoint load before the first step
    signal_grace: int = 300  # seconds: --signal=USR1@grace, time to finish a step and save
    # Requeues per job after a hang or a dead rank (preemptions and time-limit saves are not counted).
    max_restarts: int = 3
    # Seconds srun waits, after the first rank exits, before it ends the others (srun --wait): time for
    # every rank to finish a signal-triggered save, or to time out on a lost peer and write its fault record.
    rank_exit_wait: int = 120
    lrpath: str = "lrpath"  # the command each rank runs (an absolute path when PATH differs on nodes)
    setup: list = field(default_factory=list)  # bash lines before srun: module load, venv activate
    env: dict = field(default_factory=dict)  # exported after (and overriding) the NCCL/CUDA defaults
    container: ContainerConfig = field(default_factory=ContainerConfig)
    sbatch_extra: list = field(default_factory=list)  # extra "#SBATCH" options, e.g. "--mail-type=END"
    srun_extra: list = field(default_factory=list)  # extra srun options, e.g. "--cpu-bind=none"
    branches: PathResources = field(default_factory=PathResources)  # defaults for every branch path
    paths: dict = field(default_factory=dict)  # path name -> PathResources (wins over `branches`)

    def resources(self, path: str) -> tuple[int, str]:
        """(nodes, time) of a path: its `paths` entry, else `branches` (for a branch), else the top level."""
        own = self.paths.get(path) or PathResources()
        branch = self.branches if path != "main" else PathResources()
        return own.nodes or branch.nodes or self.nodes, own.time or branch.time or self.time

    def validate(self, where: str) -> "ClusterProfile":
        if not self.partition:
            raise ConfigError(
                f"{where}: partition is not set; add `partition: <name>` (`sinfo -s` lists the partitions)"
            )
        if not self.time:
            raise ConfigError(f"{where}: time is not set; add the job time limit, e.g. `time: \"04:00:00\"`")
        parse_time(self.time, f"{where}: time")
        for name in ("nodes", "gpus_per_node", "signal_grace", "rank_exit_wait"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be > 0, got {getattr(self, name)}")
        if self.max_restarts < 0:
            raise ConfigError(f"{where}: max_restarts must be >= 0 (0: a job that hung is not requeued), "
                              f"got {self.max_restarts}")
        if self.seconds_per_step <= 0:
            raise ConfigError(
                f"{where}: seconds_per_step is not set; give the estimated wall seconds of one training step "
                "(from a short run's log) so the time limit can be checked against the checkpoint interval"
            )
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError(f"{where}: gpu_memory_gib must be > 0 (or null: not checked), got {self.gpu_memory_gib}")
        if not 0 <= self.memory_headroom < 1:
            raise ConfigError(f"{where}: memory_headroom must be in [0, 1), got {self.memory_headroom}")
        for name in ("setup", "sbatch_extra", "srun_extra"):
            for i, item in enumerate(getattr(self, name)):
                if not isinstance(item, str):
                    raise ConfigError(
                        f"{where}: {name}[{i}] must be a string, got {item!r}; quote the line in YAML "
                        "(a ': ' inside an unquoted line makes it a mapping)"
                    )
        for key, value in self.env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
                raise ConfigError(f"{where}: env key {key!r} is not a valid environment variable name")
        named = {f"paths.{name}": over for name, over in self.paths.items()}
        for key, over in {"branches": self.branches, **named}.items():
            if over.nodes is not None and over.nodes <= 0:
                raise ConfigError(f"{where}: {key}.nodes must be > 0")
            if over.time is not None:
                parse_time(over.time, f"{where}: {key}.time")
        return self


def parse_time(text: str, where: str) -> int:
    """SLURM time limit string -> seconds (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"{where}={text!r} is not a SLURM time (use HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # MM


def load_profile(path: str | Path, overrides: list[str] | None = None) -> ClusterProfile:
    """Read, override and validate a cluster profile; every error names the file and the field."""
    data = read_yaml(path)
    apply_overrides(data, overrides or [])
    where = str(path)
    raw_paths = data.pop("paths", None) or {}
    if not isinstance(raw_paths, dict):
        raise ConfigError(f"{where}: paths must be a mapping of path name -> {{nodes, time}}")
    try:
        profile = from_dict(ClusterProfile, data)
        profile.paths = {str(k): from_dict(PathResources, v, f"paths.{k}") for k, v in raw_paths.items()}
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return profile.validate(where)
