"""Run a plan on one machine: the main path, then each branch (torchrun), then each merge release, then
each release's downstream evaluation (plan.evaluate), then the Hugging Face exports (plan.export.hf)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from lrpath_megatron.errors import LrpathError
from lrpath_megatron.launch.jobs import Job, eval_args, export_args, merge_args, plan_jobs


def local_commands(plan_file: Path, overrides: Sequence[str], run_dir: Path, jobs: Sequence[Job],
                   nproc_per_node: int) -> list[tuple[str, list[str]]]:
    """(name, command) per path, merge release and export, in job order: one torchrun run per trained path
    (the main path in one piece: it saves every fork and merge step; in two where it waits for a decay_steps:
    auto choice, plan.MainPause, with the branches that choice reads between), `lrpath merge` after it, then
    `lrpath hf export` of each release."""
    commands = []
    for i, job in enumerate(jobs):
        if job.kind == "train" and job.path == "main" and not job.pause and i > 0 and jobs[i - 1].path == "main":
            continue  # the run before trains this segment too: only a pause stops the main path
        if job.kind != "train":
            args = (merge_args(run_dir, job) if job.kind == "merge" else export_args(run_dir, job)
                    if job.kind == "export" else eval_args(run_dir, job, plan_file, overrides))
            commands.append((job.script, [sys.executable, "-m", "lrpath_megatron.cli", *args]))
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
               "-m", "lrpath_megatron.cli", "train", str(plan_file), "--path", job.path, "--run-dir", str(run_dir)]
        for item in overrides:
            cmd += ["--set", item]
        commands.append((job.path, cmd))
    return commands


def run_local(commands: Sequence[tuple[str, list[str]]]) -> None:
    """Run the commands in order; stop at the first that fails (rerunning resumes where it stopped)."""
    for name, cmd in tqdm(commands, desc="paths", unit="path"):
        code = subprocess.call(cmd)
        if code != 0:
            raise LrpathError(f"{name} exited {code}; rerun the same command to resume from its latest "
                              f"checkpoint (finished merges are skipped).\n  {' '.join(cmd)}")


def plan_commands(plan, plan_file: Path, overrides: Sequence[str], run_dir: Path,
                  nproc_per_node: int) -> list[tuple[str, list[str]]]:
    """Every job of a loaded plan (trained paths, merge releases, exports) as local commands, in order."""
    return local_commands(Path(plan_file).resolve(), overrides, run_dir, plan_jobs(plan), nproc_per_node)
