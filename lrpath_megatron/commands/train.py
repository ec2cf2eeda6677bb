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
    from lrpath_megatron.plan_runs import MergeCandidates, MergeRun
    from lrpath_megatron.trainer import run_path

    cfg, path_run = load_run(args.config, args.path, Path(args.run_dir), args.overrides)
    if isinstance(path_run, MergeCandidates):  # measured first, then the choice is made from them
        measure_merges(cfg, path_run)
        cfg, path_run = load_run(args.config, args.path, Path(args.run_dir), args.overrides)
    if isinstance(path_run, MergeRun):
        return release_by_merge(cfg, path_run)
    with config_source(args.config, args.overrides):  # settings checked only at run time, e.g. the world size
        code = run_path(cfg, path_run, args.stop_at_step)
    sys.stdout.flush()
    return code


def release_by_merge(cfg, run) -> int:
    """A method: auto release that chose a merge (:class:`plan_runs.MergeRun`): global rank 0 merges (once: a
    rerun finds the merge made) while the other ranks wait (a launcher that saw them exit would end rank 0's
    merge; a failed rank 0 ends them through the launcher); then every rank evaluates the release on the
    held-out data, and its validation loss goes to the version's metrics, where later choices read it."""
    import time

    from lrpath_megatron.checkpoint.layout import is_complete
    from lrpath_megatron.distributed import read_env
    from lrpath_megatron.evaluate import evaluate_checkpoints
    from lrpath_megatron.merge import already_merged, merge_checkpoints
    from lrpath_megatron.merge_weights import merge_weights
    from lrpath_megatron.metrics import MetricsLogger

    weights, rank0 = merge_weights(run.weights, len(run.checkpoints)), read_env().rank == 0
    if rank0:
        steps = ", ".join(c.name.removeprefix("iter_").lstrip("0") or "0" for c in run.checkpoints)
        print(f"[{run.version}] method: auto chose a merge ({run.weights}) of main-path steps {steps}")
        if already_merged(run.checkpoints, weights.spec, run.out):
            print(f"[{run.version}] already merged: {run.out}")
        else:
            merge_checkpoints(run.checkpoints, weights, run.out, progress=False)
            print(f"[{run.version}] merged {len(run.checkpoints)} checkpoints into {run.out}")
    while not is_complete(run.out):
        time.sleep(1)
    result = evaluate_checkpoints(cfg, [run.out])[str(run.out)]
    # The record of step s is after s + 1 updates (the trainer's convention); a rerun replaces it.
    log = MetricsLogger(run.dirs, rank0, cfg.logging.tensorboard, resume_step=run.step - 1)
    log.log({"step": run.step - 1, "path": run.version, "val_loss": result["val_loss"],
             "val_loss_per_corpus": result["val_loss_per_corpus"], "events": ["merged release"]})
    log.close()
    return 0


def measure_merges(cfg, todo) -> None:
    """Before a method: auto release chooses (:class:`plan_runs.MergeCandidates`): per merge window, global rank
    0 merges the window's main-path checkpoints into a scratch checkpoint while the other ranks wait, every
    rank evaluates it on the held-out batches the release is judged on, rank 0 records the loss and removes
    the merge. A rerun measures only the windows not recorded yet; every rank returns once all are recorded."""
    import shutil
    import time

    from lrpath_megatron import plan_decisions
    from lrpath_megatron.checkpoint.layout import is_complete
    from lrpath_megatron.distributed import read_env
    from lrpath_megatron.evaluate import evaluate_checkpoints
    from lrpath_megatron.merge import already_merged, merge_checkpoints
    from lrpath_megatron.merge_weights import merge_weights

    rank0, scratch = read_env().rank == 0, todo.dirs.candidate_merge
    if rank0:
        print(f"[{todo.version}] method: auto measures {len(todo.windows)} merge windows ({todo.weights}) before "
              f"it chooses: {', '.join(map(str, todo.windows))} steps")
    for window, checkpoints in todo.windows.items():
        out = scratch / f"window_{window}"
        weights = merge_weights(todo.weights, len(checkpoints))
        if rank0 and not already_merged(checkpoints, weights.spec, out):  # a killed run's finished merge is kept
            merge_checkpoints(checkpoints, weights, out, progress=False)
        while not is_complete(out):
            time.sleep(0.5)
        result = evaluate_checkpoints(cfg, [out])[str(out)]
        if rank0:
            plan_decisions.record_measured_merge(todo.plan, todo.run_dir, todo.version, window,
                                                 result["val_loss_per_corpus"])
            shutil.rmtree(out)
            print(f"[{todo.version}] merge window {window}: val loss {result['val_loss']:.4f}")
    while set(todo.windows) - set(plan_decisions.measured_merges(todo.plan, todo.run_dir, todo.version)):
        time.sleep(0.5)  # the other ranks: until rank 0 has recorded the last window
    if rank0:
        shutil.rmtree(scratch, ignore_errors=True)
