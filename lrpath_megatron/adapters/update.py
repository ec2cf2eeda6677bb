"""What one cheap update of a released version trains: one trainer run from the frozen release.

A plan's ``adapt:`` section (read here, next to the plan) says which release is the base and how an
update trains. Version ``V`` of the plan is an update when it comes after the base; its method is one of

* ``full``: all parameters, the update's corpora only (the baseline that forgets);
* ``lora``: a LoRA adapter on the frozen base, the update's corpora only;
* ``conpet-static``: ONE adapter carried through the updates (loaded from the previous update's), with
  dynamic replay of every earlier version's corpora (:mod:`.replay`);
* ``conpet-dynamic``: a fresh adapter per update, plus the selector retrained over [base, updates...]
  (:mod:`.selector`); inputs are routed to their top-k experts;
* ``lpft``: ``full`` split by :func:`.lpft.lpft_phases` (head first, then everything).

:func:`path_run` is the update as the trainer's :class:`~lrpath_megatron.path.PathRun`;
:mod:`lrpath_megatron.adapt` trains it and evaluates the result.
"""
from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lrpath_megatron.adapters import METHODS
from lrpath_megatron.adapters.lora import DEFAULT_ADAPTER, LoraConfig, inject_lora, load_adapter, param_report
from lrpath_megatron.adapters.replay import replay_blend
from lrpath_megatron.adapters.selector import SelectorConfig
from lrpath_megatron.checkpoint.layout import is_complete
from lrpath_megatron.checkpoint.tensors import check_model
from lrpath_megatron.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_source,
    from_dict,
    read_yaml,
    to_dict,
)
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.path import WEIGHTS, PathRun, PathSpec, Start
from lrpath_megatron.run_layout import AdaptDirs, RunLayout
from lrpath_megatron.status import release_status


@dataclass
class ReplayConfig:
    new_ratio: float = 0.5  # share of the update's own samples in each conpet-static batch (1:1)


@dataclass
class LpftConfig:
    probe_steps: int = 10  # phase 1 length (output layer only), of adapt.steps
    train_final_norm: bool = True


@dataclass
class AdaptConfig:
    base: Optional[str] = None  # the released version updates sit on; None = the version before --version
    steps: int = 40  # batch budget of one update, the same for every method
    lr: float = 2e-3  # peak LR of adapter methods (lora, conpet-*)
    full_lr: float = 3e-4  # peak LR when all parameters train (full, lpft)
    min_lr_ratio: float = 0.1  # cosine decay to lr * ratio
    warmup_steps: int = 4
    eval_batches: int = 8  # held-out micro-batches per corpus for the reported losses
    lora: LoraConfig = field(default_factory=LoraConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    lpft: LpftConfig = field(default_factory=LpftConfig)

    def validate(self) -> "AdaptConfig":
        if self.steps <= 1 or not 0 <= self.warmup_steps < self.steps - 1:
            raise ConfigError(f"adapt.steps={self.steps} must be > 1 and adapt.warmup_steps={self.warmup_steps} "
                              f"in [0, steps - 1)")
        if self.lr <= 0 or self.full_lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("adapt.lr and adapt.full_lr must be > 0, adapt.min_lr_ratio in [0, 1]")
        if self.eval_batches <= 0:
            raise ConfigError("adapt.eval_batches must be > 0")
        self.lora.validate()
        self.selector.validate()
        replay_blend({}, [], self.replay.new_ratio)  # range check
        return self


def load_adapt_plan(path: str | Path, overrides: list[str] | None = None):
    """(Plan, AdaptConfig) from a plan YAML with an ``adapt:`` section (defaults when it has none)."""
    from lrpath_megatron.plan import Plan

    data = read_yaml(path)
    apply_overrides(data, overrides or [])
    with config_source(path, overrides):
        adapt = from_dict(AdaptConfig, data.pop("adapt", None), "adapt").validate()
        return Plan.from_dict(data, str(path)), adapt


# --------------------------------------------------------------------------------------------------
# What one update trains
# --------------------------------------------------------------------------------------------------
@dataclass
class Update:
    plan: object
    adapt: AdaptConfig
    version: str
    method: str
    run_root: Path
    base_checkpoint: Path

    @property
    def index(self) -> int:
        return [v.name for v in self.plan.versions].index(self.version)

    @property
    def base_index(self) -> int:
        return [v.name for v in self.plan.versions].index(self.base)

    @property
    def base(self) -> str:
        return self.adapt.base or self.plan.versions[self.index - 1].name

    @property
    def updates(self) -> list[str]:
        """The versions trained as updates on this base, up to and including this one."""
        return [v.name for v in self.plan.versions[self.base_index + 1:self.index + 1]]

    def dirs(self, version: Optional[str] = None, method: Optional[str] = None) -> AdaptDirs:
        return RunLayout(self.run_root).adapt(method or self.method, version or self.version)

    @property
    def new_corpora(self) -> dict:
        return dict(self.plan.versions[self.index].corpora)

    @property
    def old_corpora(self) -> list[str]:
        new = self.new_corpora
        return [c for v in self.plan.versions[:self.index] for c in v.corpora if c not in new]

    @property
    def blend(self) -> dict:
        """What the update trains on: its own corpora, with conpet-static's replay of the earlier versions'."""
        if self.method != "conpet-static":
            return self.new_corpora
        past = [dict(v.corpora) for v in self.plan.versions[:self.index]]
        return replay_blend(self.new_corpora, past, self.adapt.replay.new_ratio)

    @property
    def train_config(self) -> TrainConfig:
        cfg = copy.deepcopy(self.plan.train_config)
        cfg.checkpoint.save_interval = 0
        cfg.logging.eval_interval = self.adapt.steps  # one evaluation, at the end
        cfg.logging.eval_batches = self.adapt.eval_batches
        return cfg


def resolve_update(plan, adapt: AdaptConfig, version: str, method: str, run_root: Path,
                   base_checkpoint: Optional[Path] = None) -> Update:
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    names = [v.name for v in plan.versions]
    if version not in names:
        raise LrpathError(f"--version {version!r} is not in the plan; versions: {', '.join(names)}")
    base = adapt.base or (names[names.index(version) - 1] if names.index(version) > 0 else None)
    if base is None or base not in names or names.index(base) >= names.index(version):
        raise ConfigError(f"adapt.base={base!r} must name a version released before {version!r} "
                          f"(versions in order: {', '.join(names)})")
    if base_checkpoint is None:
        release = release_status(plan, run_root, base)
        if not release.released:
            raise LrpathError(f"base release {base} is not in {run_root} yet: "
                              f"{_how_to_release(plan, run_root, base)}; or pass its checkpoint with --base-checkpoint")
        base_checkpoint = Path(release.checkpoint)
    elif not is_complete(Path(base_checkpoint)):
        raise LrpathError(f"--base-checkpoint {base_checkpoint} is not a complete checkpoint (no manifest.json)")
    check_model(base_checkpoint, to_dict(plan.train_config.model), "adapt",
                f"give a --base-checkpoint of this model, or set the plan's model: section to the "
                f"settings {base} was trained with")
    if method == "conpet-dynamic" and adapt.lora.train_output_layer:
        raise ConfigError("adapt.lora.train_output_layer cannot be used with conpet-dynamic: the experts share "
                          "one base, so none of them may change its output layer")
    return Update(plan, adapt, version, method, Path(run_root), Path(base_checkpoint))


def _how_to_release(plan, run_root: Path, version: str) -> str:
    """The commands that write ``version``'s release into ``run_root``."""
    plan_file = plan.source or "PLAN"
    r = next(v.release for v in plan.versions if v.name == version)
    if r.method == "decay":
        return f"train its branch (`lrpath train {plan_file} --path {version} --run-dir {run_root}`)"
    # The merge job `lrpath launch` would run, so the command cannot drift from the one that releases it.
    from lrpath_megatron.launch.jobs import build_jobs, merge_args

    job = next(j for j in build_jobs(plan.paths(), plan.releases()) if j.key == version)
    return (f"train the main path through step {r.step} (`lrpath train {plan_file} --path main --run-dir "
            f"{run_root}`), then merge it (`{shlex.join(['lrpath', *merge_args(run_root, job)])}`)")


def _lr(update: Update):
    from lrpath_megatron.schedules import WarmupDecay

    a = update.adapt
    peak = a.full_lr if update.method in ("full", "lpft") else a.lr
    return WarmupDecay(peak, peak * a.min_lr_ratio, a.warmup_steps, a.steps - 1, "cosine")


def _previous_static_adapter(update: Update) -> Optional[Path]:
    """Static ConPET carries one adapter: the previous update's, unless this is the first update."""
    if len(update.updates) == 1:
        return None
    previous = update.dirs(update.updates[-2]).adapter
    if not (previous / "adapter_config.json").is_file():
        raise LrpathError(f"conpet-static trains one adapter through the updates: {update.updates[-2]}'s adapter "
                          f"{previous} is missing; run `lrpath adapt ... --version {update.updates[-2]} "
                          f"--method conpet-static` first")
    return previous


def path_run(update: Update, report: dict) -> PathRun:
    """The trainer's PathRun of the update: from the base's weights, a fresh optimizer and data; with
    ``report['params']`` filled when the trainer builds the model."""
    method, lora_cfg, seed = update.method, update.adapt.lora, update.plan.train_config.seed
    previous = _previous_static_adapter(update) if method == "conpet-static" else None

    def transform(model) -> None:
        if method in ("lora", "conpet-dynamic") or (method == "conpet-static" and previous is None):
            inject_lora(model, lora_cfg, DEFAULT_ADAPTER, seed)
        elif method == "conpet-static":
            load_adapter(model, previous, DEFAULT_ADAPTER, seed)
        report["params"] = param_report(model)

    blend = update.blend
    spec = PathSpec(f"adapt-{method}-{update.version}", update.adapt.steps, _lr(update),
                    lambda step: (method, dict(blend)))
    return PathRun(spec, update.dirs(), Start(WEIGHTS, update.base_checkpoint), model_transform=transform,
                   lineage={"adapt": {"method": method, "version": update.version, "base": update.base,
                                      "base_checkpoint": str(update.base_checkpoint), "blend": blend}},
                   source="plan")
