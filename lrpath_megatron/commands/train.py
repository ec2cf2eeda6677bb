"""``lrpath train CONFIG.yaml`` (a stand-alone run) or ``lrpath train PLAN.yaml --path NAME`` (one path of a plan)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrpath_megatron.config import config_source


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
    from lrpath_megatron.load_run import load_run
    from lrpath_megatron.trainer import run_path

    cfg, path_run = load_run(args.config, args.path, Path(args.run_dir), args.overrides)
    with config_source(args.config, args.overrides):  # settings checked only at run time, e.g. the world size
        code = run_path(cfg, path_run, args.stop_at_step)
    sys.stdout.flush()
    return code
