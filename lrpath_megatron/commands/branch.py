"""``lrpath branch PLAN.yaml VERSION``: fork a version's branch from the main path's checkpoint at its fork
step (a reference, no copy of weights) and train it; ``--no-train`` only records the fork."""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("branch", help="fork a version's branch from the main path (by reference) and train it")
    p.add_argument("plan", help="version plan YAML")
    p.add_argument("version", help="the version whose branch to start")
    p.add_argument("--run-dir", default="runs/train", help="the plan's run directory (paths in RUN/<path>/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-train", action="store_true", help="record the fork only")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.load_run import load_run

    run_dir = Path(args.run_dir)
    cfg, path_run = load_run(args.plan, args.version, run_dir, args.overrides)
    from lrpath_megatron.errors import LrpathError
    from lrpath_megatron.plan_runs import MergeRun

    if isinstance(path_run, MergeRun):
        raise LrpathError(f"version {args.version} (method: auto) chose a merge of main-path checkpoints: it has no "
                          f"branch; make it with `lrpath train {args.plan} --path {args.version}` or `lrpath launch`")
    if path_run.origin.checkpoint is None:
        raise LrpathError(f"{args.version!r} is the main path, not a branch; use lrpath train --path main")
    from lrpath_megatron.checkpoint.layout import record_fork
    from lrpath_megatron.checkpoint.policy import Checkpointer

    Checkpointer(cfg, path_run).check_fork_step()
    start = time.perf_counter()
    record = record_fork(path_run.dirs.fork_record, path_run.origin.checkpoint, path_run.path.fork_step)
    print(f"[{args.version}] forked from {record['parent_checkpoint']} at step {record['fork_step']} "
          f"({time.perf_counter() - start:.3f} s, no weights copied)")
    if args.no_train:
        return 0
    from lrpath_megatron.config import config_source
    from lrpath_megatron.trainer import run_path

    with config_source(args.plan, args.overrides):  # settings checked only at run time, e.g. the world size
        return run_path(cfg, path_run)
