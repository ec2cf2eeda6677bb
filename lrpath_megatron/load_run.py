"""The run a training file names: a stand-alone config's, or one path of a version plan's."""
from __future__ import annotations

from pathlib import Path

from lrpath_megatron.config import config_source, load_train_config, read_yaml
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.path import standalone_run
from lrpath_megatron.plan import load_plan
from lrpath_megatron.plan_runs import run_for


def load_run(config_path: str, path: str | None, run_dir: Path, overrides: list[str]):
    """(TrainConfig, PathRun) for a stand-alone config or one path of a plan."""
    if "plan" in read_yaml(config_path):
        plan = load_plan(config_path, overrides)
        if path is None:
            names = ", ".join(p.name for p in plan.paths())
            raise LrpathError(f"{config_path} is a version plan: choose a path with --path ({names})")
        return plan.train_config, run_for(plan, path, run_dir)
    if path is not None:
        raise LrpathError(f"--path {path}: {config_path} is not a version plan (it has no 'plan' section)")
    cfg = load_train_config(config_path, overrides)
    with config_source(config_path, overrides):
        return cfg, standalone_run(cfg, run_dir)
