"""Background checkpoint writes (checkpoint.async_save): the same run as foreground saves bit for bit, a
signal while a write is in flight, and a full disk stopping the run with one clear message."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, lrpath_command, losses, run_lrpath, side_by_side, stored_tensors, tiny_config
from lrpath_megatron.checkpoint import layout
from lrpath_megatron.errors import EXIT_REQUEUE

STEPS = 6
DP2 = ["--set", "parallel.use_distributed_optimizer=true"]
ASYNC = ["--set", "checkpoint.async_save=true"]


@pytest.fixture(scope="module")
def config(demo_data, tmp_path_factory) -> Path:
    return tiny_config(demo_data, tmp_path_factory.mktemp("async") / "c.yaml", checkpoint={"save_interval": 2},
                       schedule={"train_steps": STEPS, "warmup_steps": 2})


@pytest.fixture(scope="module")
def foreground(config, tmp_path_factory) -> Path:
    """DP=2, distributed optimizer, saves in the foreground every 2 steps."""
    run_dir = tmp_path_factory.mktemp("foreground")
    run_lrpath(["train", str(config), "--run-dir", str(run_dir), *DP2], nproc=2)
    return run_dir


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    return {layout.read_manifest(c)["step"]: c for c in (run_dir / "checkpoints").glob("iter_*")}


def _start_ranks(args: list[str], world: int) -> list[subprocess.Popen]:
    """The ranks as srun starts them (each its own process, RANK/WORLD_SIZE set): a rank's own exit code
    is what the sbatch script reads (torchrun would turn a rank's 3 into its own 1). Rank 0 speaks for all;
    the others' output is dropped, so no full pipe can block them."""
    port = str(free_port())
    return [subprocess.Popen(lrpath_command(args), cwd=REPO, text=True,
                             stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                             stderr=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                             env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), MASTER_PORT=port,
                                      PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
            for r in range(world)]


@pytest.mark.compat
def test_background_writes_equal_foreground_ones_through_a_signal_mid_write(config, foreground, tmp_path):
    """DP=2 with the distributed optimizer: USR1 reaches rank 0 while a background write is in flight; the
    trainer waits for it, saves at the current step, exits 3; the resumed run's losses and every checkpoint
    (model and optimizer tensors) equal the foreground run's bit for bit."""
    args = ["train", str(config), "--run-dir", str(tmp_path), *DP2, *ASYNC]
    ranks = _start_ranks(args, 2)
    deadline = time.time() + 300
    while not any((tmp_path / "checkpoints").glob(".tmp_iter_*")):  # a write in flight
        assert ranks[0].poll() is None and time.time() < deadline, ranks[0].stderr.read()[-3000:]
        time.sleep(0.01)
    in_flight = int(next((tmp_path / "checkpoints").glob(".tmp_iter_*")).name.split("_")[-1])
    ranks[0].send_signal(signal.SIGUSR1)  # one rank signalled: all save
    out, err = ranks[0].communicate(timeout=300)
    ranks[1].wait(timeout=60)
    assert [rank.returncode for rank in ranks] == [EXIT_REQUEUE] * 2, err[-3000:]
    saved = layout.find_latest(tmp_path / "checkpoints")
    stopped = layout.read_manifest(saved)["step"]
    assert stopped < STEPS and f"signal received: saved at step {stopped}" in out
    assert layout.checkpoint_at(tmp_path / "checkpoints", in_flight) is not None  # waited for, committed
    assert not any((tmp_path / "checkpoints").glob(".tmp_iter_*"))

    out = run_lrpath(args, nproc=2).stdout
    assert f"resumed at step {stopped}" in out and "waited" in out
    assert losses(tmp_path) == losses(foreground)
    ours, theirs = _checkpoints(tmp_path), _checkpoints(foreground)
    assert set(theirs) <= set(ours)
    for step, ckpt in theirs.items():
        for part in ("model", "optimizer"):
            a, b = stored_tensors(ckpt, part), stored_tensors(ours[step], part)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, part)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs: room for one checkpoint of the tiny model (5.5 MiB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to create a small tmpfs filesystem")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN in this container?): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_stops_with_one_message_and_the_run_resumes_once_space_is_freed(config, small_disk, tmp_path):
    """A background write that runs out of space stops the run at the next step with one message naming
    the directory, the cause and the checkpoint it resumes from; freed, the run resumes from it (and then
    saves by wall time as well: checkpoint.save_interval_minutes) and continues bit for bit: every logged
    loss equals the same run's uninterrupted on a disk with room (trained alongside the failing one; the
    DP=2 foreground run is no reference here: its losses differ from one process's in the last bits)."""
    run_dir = small_disk / "run"
    settings = [*ASYNC, "--set", "schedule.train_steps=6", "--set", "logging.tensorboard=false"]
    args = ["train", str(config), "--run-dir", str(run_dir), *settings]
    uninterrupted = tmp_path / "uninterrupted"
    failed, _ = side_by_side(lambda: run_lrpath(args, check=False),
                             lambda: run_lrpath(["train", str(config), "--run-dir", str(uninterrupted), *settings]))
    ckpts = run_dir / "checkpoints"
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "warning: " in failed.stdout and "will probably fail" in failed.stdout  # free space < last checkpoint
    error = [line for line in failed.stderr.splitlines() if line.startswith("lrpath train: error:")]
    assert len(error) == 1, failed.stderr[-3000:]
    assert f"to {ckpts} failed: no space left on the device" in error[0]
    assert "the run resumes from iter_0000002" in error[0], error[0]
    assert "Traceback" not in failed.stderr
    assert layout.find_latest(ckpts).name == "iter_0000002"
    assert layout.verify(ckpts / "iter_0000002") == []

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    # Saves by wall time too: an interval every step outlasts saves each step.
    out = run_lrpath([*args, "--set", "checkpoint.save_interval_minutes=1e-9"]).stdout
    assert "resumed at step 2" in out
    assert sorted(losses(run_dir)) == list(range(6)) and not list(ckpts.glob(".tmp_iter_*"))
    assert sorted(_checkpoints(run_dir)) == [2, 3, 4, 5, 6]
    print(f"losses resumed after the full disk: {losses(run_dir)}\nuninterrupted: {losses(uninterrupted)}")
    assert losses(run_dir) == losses(uninterrupted)  # exact float equality, every step


def test_staging_that_does_not_fit_in_shared_memory_is_refused_with_its_size(tmp_path, monkeypatch):
    """A background write stages its tensors in /dev/shm: one that cannot hold them (a container's 64 MiB
    default) is refused before anything is allocated, naming what it needs and the two ways out."""
    from lrpath_megatron.checkpoint import writer_process
    from lrpath_megatron.errors import LrpathError

    monkeypatch.setattr(writer_process, "SHARED_MEMORY", tmp_path)
    huge = torch.empty(1 << 50, dtype=torch.float32, device="meta")  # 4 PiB, no memory behind it
    with pytest.raises(LrpathError, match=r"shared memory .* 4294967296\.0 MiB: enlarge it .*--shm-size.* "
                                          r"checkpoint.async_save: false"):
        writer_process.WriterProcess._allocate({(0, 0, 0): huge})
    small = torch.arange(6.0)
    staged = writer_process.WriterProcess._allocate({(0, 0, 0): small})[(0, 0, 0)]
    assert staged.is_shared() and staged.shape == small.shape and staged.dtype == small.dtype
