"""A path: the one description of a training run that every layer shares.

:class:`PathSpec` is a path of a plan (or a stand-alone config) as steps, LR and data blend: what
``lrpath plan``, ``lrpath status`` and the launcher read. :class:`PathRun` binds it to a directory and
says where it starts (:class:`Start`); the trainer runs exactly that. A plan's resolved paths are specs
(:meth:`lrpath_megatron.plan.Plan.path`), bound to a run directory by
:func:`lrpath_megatron.plan_runs.run_for`; stand-alone configs through :func:`standalone_run`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lrpath_megatron.run_layout import PathDirs


@dataclass(frozen=True)
class PathSpec:
    """Steps are global: a path trains ``fork_step .. end_step-1``; a branch starts from its parent's
    checkpoint after ``fork_step`` steps (see docs/architecture.md)."""

    name: str
    end_step: int
    lr: Callable[[int], float] = field(repr=False)
    blend: Callable[[int], tuple] = field(repr=False)  # step -> (stage label, {corpus: weight})
    parent: Optional[str] = None  # None for main, a stand-alone run and PTFS; "main" for a branch
    fork_step: int = 0
    save_steps: frozenset = frozenset()  # checkpoints with optimizer state: fork points, segment ends
    weights_only_steps: frozenset = frozenset()  # checkpoints only merged: no optimizer state
    release: Any = None  # the plan's ReleaseInfo of a branch
    tokens_per_step: int = 0
    switch_steps: list = field(default_factory=list)  # [(step, stage label)] of LR-triggered blends

    def _check(self, step: int) -> None:
        # A path without a parent is open-ended (the main path continues at eta_max when versions are
        # added): its LR is defined past end_step, e.g. at the fork step of its last branch.
        if self.parent is None and self.fork_step <= step:
            return
        if not self.fork_step <= step < self.end_step:
            raise ValueError(f"step {step} is outside path {self.name!r} (steps {self.fork_step}..{self.end_step - 1})")

    def lr_at_step(self, step: int) -> float:
        self._check(step)
        return self.lr(step)

    def lr_at_tokens(self, tokens: int) -> float:
        """LR of the step that trains global token position ``tokens``."""
        return self.lr_at_step(int(tokens) // self.tokens_per_step)

    def weights_at_step(self, step: int) -> tuple[str, dict]:
        """(stage label, {corpus: weight}) of the step; weights sum to 1, zero weights left out."""
        self._check(step)
        return self.blend(step)

    @property
    def steps(self) -> int:
        return self.end_step - self.fork_step


SCRATCH, RESUME, FORK, WEIGHTS = "scratch", "resume", "fork", "weights"


@dataclass(frozen=True)
class Start:
    """Where training starts:

    - ``scratch``: fresh weights at the path's first step;
    - ``resume``: the path's own checkpoint (model, optimizer, data position, RNG);
    - ``fork``: a parent's checkpoint (model, data position and step; its optimizer state too unless
      ``fresh_optimizer``), the path's first step being the parent's step;
    - ``weights``: only a checkpoint's weights, at step 0 with a fresh optimizer and data.
    """

    kind: str = SCRATCH
    checkpoint: Optional[Path] = None
    fresh_optimizer: bool = False

    def __post_init__(self) -> None:
        assert self.kind in (SCRATCH, RESUME, FORK, WEIGHTS), self.kind
        assert (self.checkpoint is None) == (self.kind == SCRATCH), self

    @property
    def own(self) -> bool:
        return self.kind == RESUME


@dataclass(frozen=True)
class PathRun:
    """Everything the trainer needs beyond the model and optimizer settings."""

    path: PathSpec
    dirs: PathDirs  # checkpoints, metrics, tensorboard
    origin: Start = Start()  # where the path starts while it has no checkpoint of its own
    # Applied to the GPTModel after start weights are loaded and before DDP wraps it (e.g. add LoRA modules
    # and freeze the base); it must also be the same on resume, so it is part of the run.
    model_transform: Optional[Callable] = None
    lineage: dict = field(default_factory=dict)  # extra manifest fields (plan hash, parent, release)
    source: str = "config"  # what the user edits to change this path: "config" (stand-alone) or "plan"
    # (step, why): the path stops there with a checkpoint, as with --stop-at-step, until what it waits for
    # has happened (a plan's main path waiting for a decay_steps: auto choice, plan.MainPause)
    pause: Optional[tuple] = None

    @property
    def name(self) -> str:
        return self.path.name


def standalone_run(cfg, run_dir: Path) -> PathRun:
    """The path of ``lrpath train CONFIG.yaml``: ``schedule:`` and ``data.mix`` over ``train_steps`` steps in
    ``run_dir`` (no mix = the corpora in equal shares), from ``checkpoint.init_from``'s weights if given."""
    from lrpath_megatron.config import MixConfig, MixStage
    from lrpath_megatron.mix_policy import MixSchedule, resolve_stages
    from lrpath_megatron.schedules import from_schedule_config

    lr = from_schedule_config(cfg.schedule, cfg.optimizer.lr, cfg.optimizer.min_lr)
    corpora = [c.name for c in cfg.data.corpora]
    mix = cfg.data.mix if cfg.data.mix.stages else MixConfig(stages=[MixStage(weights={c: 1.0 for c in corpora})])
    stages = resolve_stages(mix, corpora, cfg.optimizer.lr, "data.mix")
    blend = MixSchedule(stages, mix.ramp_steps, lr, cfg.schedule.warmup_steps, cfg.schedule.train_steps).weights_at_step
    spec = PathSpec("train", cfg.schedule.train_steps, lr, blend)
    init = cfg.checkpoint.init_from
    return PathRun(spec, PathDirs(Path(run_dir)), Start(WEIGHTS, Path(init)) if init is not None else Start())
