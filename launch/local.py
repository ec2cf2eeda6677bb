"""Run a plan on one machine with torchrun: the main path, then each branch (for development)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from lrpath_megatron.errors import LrpathError

from launch.jobs import MAIN, PathLike


def local_commands(plan_file: Path, overrides: Sequence[str], run_dir: Path, paths: Sequence[PathLike],
                   nproc_per_node: int) -> list[list[str]]:
    """One torchrun command per path; the main path runs first (it saves every fork step)."""
    order = [p.name for p in paths if p.name == MAIN] + [p.name for p in paths if p.name != MAIN]
    commands = []
    for name in order:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
               "-m", "lrpath_megatron.cli", "train", str(plan_file), "--path", name, "--run-dir", str(run_dir)]
        for item in overrides:
            cmd += ["--set", item]
        commands.append(cmd)
    return commands


def run_local(commands: Sequence[list[str]]) -> None:
    """Run the commands in order; stop at the first that fails (rerunning resumes where it stopped)."""
    for cmd in tqdm(commands, desc="paths", unit="path"):
        code = subprocess.call(cmd)
        if code != 0:
            raise LrpathError(f"path {cmd[cmd.index('--path') + 1]} exited {code}; rerun the same command to "
                              f"resume from its latest checkpoint.\n  {' '.join(cmd)}")
