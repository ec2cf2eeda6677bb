"""Run directories written by the code before the path/checkpoint-policy reshaping resume and fork with
today's code, bit for bit: the code of that commit is taken from git history and trains the first part
(with megatron-core 0.16.1, the release it was written for)."""
from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import COMPAT_PYTHON, REPO, free_port, losses, run_lrpath, side_by_side, stored_tensors
from test_status_export import tiny_plan

# The last commit that wrote checkpoints with the previous in-code layout (trainer.PathRun, own flags).
PREVIOUS = "946dac5bfb4f61449a845f4a8c923c2d531f8c09"


@pytest.fixture(scope="module")
def previous_code(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("previous_code")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS, "lrpath_megatron"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out


def run_previous(code: Path, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(code), MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    where = subprocess.run([str(COMPAT_PYTHON), "-c", "import lrpath_megatron; print(lrpath_megatron.__file__)"],
                           capture_output=True, text=True, env=env, cwd=code, check=True).stdout
    assert where.startswith(str(code)), where  # the old code runs, not the installed one
    proc = subprocess.run([str(COMPAT_PYTHON), "-m", "lrpath_megatron.cli", *args], capture_output=True, text=True,
                          env=env, cwd=code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_previous_layout_resumes_and_forks_bitwise(demo_data, previous_code, tmp_path):
    plan = tiny_plan(demo_data, tmp_path / "plan.yaml")
    ref, mixed = tmp_path / "ref", tmp_path / "mixed"

    def reference():
        for path in ("main", "v1"):
            run_lrpath(["train", str(plan), "--path", path, "--run-dir", str(ref)])

    def previous():  # the previous code trains main to step 16 (v1 forks at 12) and v1 to step 15 ...
        for path, stop in (("main", "16"), ("v1", "15")):
            run_previous(previous_code, ["train", str(plan), "--path", path, "--run-dir", str(mixed), "--stop-at-step", stop])

    side_by_side(reference, previous)
    # ... today's code continues both from those checkpoints (and v1's fork record).
    assert "resumed at step 16" in run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(mixed)]).stdout
    assert "resumed at step 15" in run_lrpath(["train", str(plan), "--path", "v1", "--run-dir", str(mixed)]).stdout

    for path, end in (("main", 24), ("v1", 18)):
        assert losses(mixed / path) == losses(ref / path), path
        a = stored_tensors(ref / path / "checkpoints" / f"iter_{end:07d}")
        b = stored_tensors(mixed / path / "checkpoints" / f"iter_{end:07d}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
