"""``lrpath train CONFIG.yaml`` (a stand-alone run) or ``lrpath train PLAN.yaml --path NAME`` (one path of a plan)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lrpath_megatron.config import ConfigError, TrainConfig, config_source, load_train_config, read_yaml
from lrpath_megatron.errors import LrpathError


def register(sub) -> None:
    p = sub.add_parser("train", help="train a stand-alone config, or one path (main / a version) of a plan",
                       description="Train; rerunning the same command resumes from the latest checkpoint.")
    p.add_argument("config", help="a training config YAML, or a version plan YAML (then --path is required)")
    p.add_argument("--path", help="plan path to train: 'main' or a version name")
    p.add_argument("--run-dir", default="runs/train", help="run directory (a plan's paths live in RUN/<path>/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.hidden_size=256 (repeatable)")
    p.add_argument("--stop-at-step", type=step_number, default=None,
                   help="stop after this step with a checkpoint; the schedule is unchanged")
    p.set_defaults(func=run)


def step_number(text: str) -> int:
    """A global step to stop after: an integer >= 0 (0 saves the initial weights)."""
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step number (an integer >= 0)") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"{step} is negative; give the step to stop after (>= 0; 0 saves the "
                                         f"initial weights)")
    return step


def run(args) -> int:
    from lrpath_megatron.trainer import run_path

    cfg, path_run = resolve(args.config, args.path, Path(args.run_dir), args.overrides)
    with config_source(args.config, args.overrides):  # settings checked only at run time, e.g. the world size
        code = run_path(cfg, path_run, args.stop_at_step)
    sys.stdout.flush()
    return code


def resolve(config_path: str, path: str | None, run_dir: Path, overrides: list[str]):
    """(TrainConfig, PathRun) for a stand-alone config or one path of a plan."""
    if "plan" in read_yaml(config_path):
        from lrpath_megatron.plan import load_plan

        plan = load_plan(config_path, overrides)
        if path is None:
            names = ", ".join(p.name for p in plan.paths())
            raise LrpathError(f"{config_path} is a version plan: choose a path with --path ({names})")
        return plan.train_config, path_run(plan, path, run_dir)
    if path is not None:
        raise LrpathError(f"--path {path}: {config_path} is not a version plan (it has no 'plan' section)")
    cfg = load_train_config(config_path, overrides)
    with config_source(config_path, overrides):
        return cfg, standalone_run(cfg, run_dir)


def standalone_run(cfg: TrainConfig, run_dir: Path):
    from lrpath_megatron.config import MixConfig, MixStage
    from lrpath_megatron.mix_policy import MixSchedule, resolve_stages
    from lrpath_megatron.schedules import from_schedule_config
    from lrpath_megatron.trainer import PathRun

    lr_at_step = from_schedule_config(cfg.schedule, cfg.optimizer.lr, cfg.optimizer.min_lr)
    corpora = [c.name for c in cfg.data.corpora]
    if not corpora:
        raise ConfigError("data.corpora is empty: list at least one {name, prefix} corpus")
    # No policy = one stage with equal weights.
    mix = cfg.data.mix if cfg.data.mix.stages else MixConfig(stages=[MixStage(weights={c: 1.0 for c in corpora})])
    stages = resolve_stages(mix, corpora, cfg.optimizer.lr, "data.mix")
    weights = MixSchedule(stages, mix.ramp_steps, lr_at_step, cfg.schedule.warmup_steps,
                          cfg.schedule.train_steps).weights_at_step
    return PathRun(name="train", run_dir=run_dir, end_step=cfg.schedule.train_steps, lr_at_step=lr_at_step,
                   weights_at_step=weights)


def path_run(plan, name: str, run_dir: Path):
    """The trainer's view of one plan path: a branch starts from the main path's checkpoint at its fork."""
    from lrpath_megatron.checkpoint import iter_name
    from lrpath_megatron.trainer import PathRun

    spec = plan.path(name)
    parent = None
    if spec.parent is not None:
        parent = run_dir / spec.parent / "checkpoints" / iter_name(spec.fork_step)
    lineage = {"plan_hash": plan.plan_hash(), "parent_path": spec.parent, "fork_step": spec.fork_step,
               "release": dataclasses.asdict(spec.release) if spec.release else None}
    return PathRun(name=name, run_dir=run_dir / name, end_step=spec.end_step, lr_at_step=spec.lr_at_step,
                   weights_at_step=spec.weights_at_step, start_step=spec.fork_step,
                   save_steps=frozenset(spec.save_steps), weights_only_steps=frozenset(spec.weights_only_steps),
                   parent_checkpoint=parent, lineage=lineage, source="plan")
