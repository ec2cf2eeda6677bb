"""A rank that stops (SIGSTOP) or dies (kill -9) alone: every other rank exits with the requeue code within
the collective timeout, its log names the step and holds every thread's stack, no partial checkpoint becomes
visible, and the job resumes to the uninterrupted run's losses bit for bit. A stall that is no collective (a
write that blocks) is ended by the step watchdog. On a real three-node SLURM cluster the generated script
requeues the job without the node whose rank hung, and gives up after ``max_restarts`` faults."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, losses, run_lrpath, tiny_config
from slurm_cluster import ClusterUnavailable, LocalSlurmCluster
from lrpath_megatron.checkpoint.layout import is_complete, verify
from lrpath_megatron.errors import EXIT_REQUEUE

# The collective timeout of the runs a fault is injected into (15 s); the others wait long enough never to
# time out on a loaded machine (the timeout changes nothing that trains: a run resumes under another).
TIMEOUT_MIN = 0.25
STEPS = 24


def start(cfg: Path, run_dir: Path, world: int, tag: str, args: tuple = ()) -> list:
    """The ranks of one job, each its own process (as srun starts them), logging to RUN.<tag>.rank<R>.log;
    ``args``: e.g. ("--path", NAME) for a plan."""
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        log = open(f"{run_dir}.{tag}.rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "lrpath_megatron.cli", "train", str(cfg), *args,
                                       "--run-dir", str(run_dir)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO))
    return procs


def wait_for_step(run_dir: Path, step: int, procs: list, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        assert all(p.poll() is None for p in procs), "a rank ended before the fault was injected"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def finish(procs: list, timeout: float = 600) -> list:
    return [p.wait(timeout=timeout) for p in procs]


MAIN = ("--path", "main")


@pytest.fixture(scope="module")
def job(demo_data, tmp_path_factory):
    """A plan whose main path (24 steps) trains on 2 ranks saving every 4 steps in the background, and its
    uninterrupted run."""
    from test_status_export import tiny_plan

    root = tmp_path_factory.mktemp("hangs")
    plan = tiny_plan(demo_data, root / "plan.yaml")
    data = yaml.safe_load(plan.read_text())
    data["parallel"]["distributed_timeout_minutes"] = 2
    data["checkpoint"].update(save_interval=4, async_save=True)
    data["logging"]["eval_batches"] = 2  # one per data-parallel rank
    plan.write_text(yaml.safe_dump(data))
    reference = root / "reference"
    run_lrpath(["train", str(plan), *MAIN, "--run-dir", str(reference)], nproc=2)
    return plan, reference, root


def test_every_logged_step_names_the_slowest_rank(job):
    plan, reference, _ = job
    records = [json.loads(line) for line in (reference / "main" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS and all(r["slowest_rank"] in (0, 1) for r in records)
    assert all(r["slowest_step_s"] > 0 and 0 <= r["straggler_lag_s"] <= r["slowest_step_s"] for r in records)
    out = run_lrpath(["status", str(plan), "--run-dir", str(reference)]).stdout
    last = records[-1]
    assert (f"main: slowest rank {last['slowest_rank']} at step {last['step']}: {last['slowest_step_s']:.3f} s/step, "
            f"{last['straggler_lag_s']:.3f} s behind the median") in out, out


@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_rank_that_stops_or_dies_ends_the_job_for_requeue_and_it_resumes_bitwise(job, fault):
    plan, reference, root = job
    run = root / fault.name
    procs = start(plan, run, 2, "faulted", (*MAIN, "--set", f"parallel.distributed_timeout_minutes={TIMEOUT_MIN}"))
    wait_for_step(run / "main", 9, procs)
    os.kill(procs[1].pid, fault)
    hit = time.monotonic()
    code = procs[0].wait(timeout=120)
    elapsed = time.monotonic() - hit
    procs[1].kill()
    procs[1].wait()
    log = Path(f"{run}.faulted.rank0.log").read_text()
    assert code == EXIT_REQUEUE, log[-3000:]
    # stopped: the collective waits out its timeout; killed: the connection closes at once
    assert elapsed < (TIMEOUT_MIN * 60 + 10 if fault == signal.SIGSTOP else 10), elapsed
    assert "rank 0:" in log and "another rank stopped answering or is gone" in log, log[-3000:]
    assert " at step " in log and "most recent call first" in log  # the step, and every thread's stack
    # Only complete checkpoints are visible; a background write in flight was not committed.
    ckpts = sorted((run / "main" / "checkpoints").glob("iter_*"))
    assert ckpts and all(is_complete(c) and not verify(c) for c in ckpts)
    assert finish(start(plan, run, 2, "resumed", MAIN)) == [0, 0]
    assert losses(run / "main") == losses(reference / "main")


def test_a_stall_outside_collectives_is_ended_by_the_watchdog(demo_data, tmp_path):
    """The metrics file becomes a pipe nobody reads: the next log write blocks (as on a dead filesystem)."""
    cfg = tiny_config(demo_data, tmp_path / "cfg.yaml", schedule={"train_steps": 400},
                      parallel={"distributed_timeout_minutes": 0.1})
    run = tmp_path / "run"
    procs = start(cfg, run, 1, "stalled")
    wait_for_step(run, 20, procs)
    metrics = run / "metrics.jsonl"
    metrics.rename(run / "metrics.before")
    os.mkfifo(metrics)
    code = procs[0].wait(timeout=180)
    log = Path(f"{run}.stalled.rank0.log").read_text()
    assert code == EXIT_REQUEUE, log[-3000:]
    assert "metrics write at step" in log and "no progress for" in log and "most recent call first" in log


# ------------------------------------------------------------------------------- on a real SLURM cluster
LOCAL_PROFILE = REPO / "examples" / "cluster_local.yaml"
LRPATH = str(Path(sys.executable).with_name("lrpath"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes: the main path runs on two, the third is the spare a requeued job can move to."""
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm3"), nodes=("n1", "n2", "n3"))
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        cluster.stop()
        pytest.fail(f"the fault tests need a local SLURM cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


def submit_main(cluster, plan: Path, root: Path, *profile_sets: str) -> tuple[str, Path]:
    """Render the plan's scripts for the test cluster (collective timeout 15 s) and submit the main path's."""
    run, out = root / "run", root / "scripts"
    args = ["launch", str(plan), "--slurm", "--cluster", str(LOCAL_PROFILE), "--run-dir", str(run), "--out", str(out),
            "--set", f"parallel.distributed_timeout_minutes={TIMEOUT_MIN}", "--cluster-set", f"lrpath={LRPATH}",
            "--cluster-set", "rank_exit_wait=5"]
    run_lrpath(args + [a for s in profile_sets for a in ("--cluster-set", s)])
    return cluster.run("sbatch", "--parsable", str(out / "main.sbatch")).strip().split(";")[0], run


def rank_pid(job_id: str, node: str) -> int:
    """The training process of the job's rank on ``node`` (all nodes share this machine; srun, on the first
    node, carries the same command line)."""
    marks = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURMD_NODENAME={node}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
            if b"train" in argv and not argv[0].endswith(b"srun") and \
                    marks <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no rank of job {job_id} on {node}")


def wait_until_ended(cluster, job_id: str, log: Path, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while (info := cluster.job_info(job_id))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']}\n{log.read_text()[-4000:]}"
        time.sleep(1)
    return info


def test_on_slurm_the_job_is_requeued_without_the_node_whose_rank_hung(job, cluster, tmp_path):
    plan, reference, _ = job
    job_id, run = submit_main(cluster, plan, tmp_path, "max_restarts=1")
    log = run / "main" / "logs" / f"slurm-{job_id}.out"
    wait_for_step(run / "main", 9, [])
    assert cluster.job_info(job_id)["NodeList"] == "n[1-2]"
    os.kill(rank_pid(job_id, "n2"), signal.SIGSTOP)
    info = wait_until_ended(cluster, job_id, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert info["NodeList"] == "n[1,3]" and info["ExcNodeList"] == "n2", info
    # The rank on n1 timed out on its peer and said so; rank 1 (n2) wrote nothing: its node is left out.
    faults = run / "main" / "logs" / "faults" / f"{job_id}.0"
    assert sorted(p.name for p in faults.iterdir()) == ["rank-0@n1.peer"]
    assert "another rank stopped answering or is gone" in (faults / "rank-0@n1.peer").read_text()
    assert "ranks without a record: 1; suspect nodes: n2" in text, text[-4000:]
    assert f"requeued job {job_id} without nodes n2" in text and "most recent call first" in text
    # The resumed run's metrics are the uninterrupted run's bit for bit; every loss the log printed, those of
    # the steps the first attempt trained before the hang included, is the uninterrupted run's (4 decimals).
    expected = losses(reference / "main")
    assert losses(run / "main") == expected
    printed = [(int(m[1]), m[2]) for m in re.finditer(r"^main step (\d+) \| loss (\S+)", text, re.M)]
    assert len(printed) > STEPS and all(loss == f"{expected[step]:.4f}" for step, loss in printed), printed


def test_on_slurm_a_job_past_max_restarts_is_not_requeued(job, cluster, tmp_path):
    plan, _, _ = job
    job_id, run = submit_main(cluster, plan, tmp_path, "max_restarts=0")
    log = run / "main" / "logs" / f"slurm-{job_id}.out"
    wait_for_step(run / "main", 3, [])
    os.kill(rank_pid(job_id, "n1"), signal.SIGKILL)
    info = wait_until_ended(cluster, job_id, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-4000:]
    assert "ranks without a record: 0; suspect nodes: n1" in text
    assert "more than max_restarts=0: not requeued" in text, text[-4000:]
