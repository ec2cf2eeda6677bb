"""kill -9 at random moments of a run that saves every step: the checkpoint resume would pick up must
always be complete and intact (manifest checksums match). Records each kill point in
benchmarks/results/kill_during_save.json; `tests/test_branches.py` runs the same check with 3 points.

--async: a 120-step path saving every 3 steps with checkpoint.async_save (most kills land inside a
background write); after the kills the run is finished and its losses, every step's, must equal an
uninterrupted run's bit for bit. Records benchmarks/results/kill_during_save_async.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kill_during_saves(config: Path, run_dir: Path, points: int, seed: int, max_delay_s: float = 1.0,
                      in_write_share: float = 0.0) -> list[dict]:
    """Start `lrpath train`, let it save a few steps, SIGKILL it at a random moment, check; repeat (until
    ``points`` kills, or the run ended first). A share ``in_write_share`` of the kills first waits for
    a save in progress (a ``.tmp_iter_*`` directory: with background writes, mostly the write), then
    kills within ``max_delay_s``."""
    import psutil

    from lrpath_megatron.checkpoint import layout
    from lrpath_megatron.run_layout import PathDirs

    rng = random.Random(seed)
    results = []
    for _ in range(points):
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.Popen([sys.executable, "-m", "lrpath_megatron.cli", "train", str(config),
                                 "--run-dir", str(run_dir)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = layout.find_latest(PathDirs(run_dir).checkpoints)
        deadline = time.time() + 300
        while layout.find_latest(PathDirs(run_dir).checkpoints) in (None, before):  # at least one new save
            if proc.poll() == 0:
                return results  # the path ended before this kill
            if proc.poll() is not None:
                raise RuntimeError(f"training exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError("no checkpoint within 300 s")
            time.sleep(0.05)
        if in_write_share and rng.random() < in_write_share:
            while not any(PathDirs(run_dir).checkpoints.glob(".tmp_iter_*")) and proc.poll() is None:
                time.sleep(0.005)
        delay = rng.uniform(0.0, max_delay_s)
        time.sleep(delay)
        try:  # the trainer's writers and the spawned Manager serving their result queue
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        in_save = any(PathDirs(run_dir).checkpoints.glob(".tmp_iter_*"))
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0:
            return results  # ended just before the kill
        latest = layout.find_latest(PathDirs(run_dir).checkpoints)
        bad = layout.verify(latest) if latest is not None else ["<none>"]
        left = leftover_processes(run_dir, descendants)
        results.append({"delay_s": round(delay, 3), "save_in_progress": in_save,
                        "latest": latest.name if latest else None, "corrupt_files": bad, "leftover_processes": left})
        if bad:
            raise AssertionError(f"resume would pick a damaged checkpoint {latest}: {bad}")
        if left:
            raise AssertionError(f"processes of the killed run are still alive: {left}")
    return results


def leftover_processes(run_dir: Path, descendants: list = (), grace_s: float = 10.0) -> list[int]:
    """Pids still running `lrpath train --run-dir RUN_DIR` (e.g. megatron-core's forked checkpoint
    writers), or among the killed trainer's ``descendants`` (psutil processes taken before the kill: the
    spawned ones, whose command line is not the trainer's), once the grace period is over: a killed
    trainer must take them with it."""
    import psutil

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + grace_s
    while True:
        left = [p.pid for p in descendants if alive(p)]
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            cmd = p.info["cmdline"] or []
            if "lrpath_megatron.cli" in cmd and str(run_dir) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(p.info["pid"])
        if not left or time.time() > deadline:
            return left
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async", dest="background", action="store_true",
                        help="background writes (checkpoint.async_save) on a 120-step path saving every 3 steps")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import losses, run_lrpath, tiny_config
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    work = Path(tempfile.mkdtemp(prefix="lrpath_kill_"))
    data = prepare_demo_data(work / "data")
    if not args.background:
        config = tiny_config(data, work / "c.yaml", checkpoint={"save_interval": 1},
                             schedule={"train_steps": 100000, "warmup_steps": 2})
        results = kill_during_saves(config, work / "run", args.points, args.seed)
        summary = {"points": len(results), "killed_during_a_save": sum(r["save_in_progress"] for r in results),
                   "damaged_checkpoints_picked": 0, "kills": results}
        out = REPO / "benchmarks" / "results" / "kill_during_save.json"
    else:
        config = tiny_config(data, work / "c.yaml", checkpoint={"save_interval": 3, "async_save": True},
                             schedule={"train_steps": 120, "warmup_steps": 2})
        run_lrpath(["train", str(config), "--run-dir", str(work / "reference")])
        results = kill_during_saves(config, work / "run", args.points, args.seed, max_delay_s=0.5,
                                    in_write_share=0.75)
        run_lrpath(["train", str(config), "--run-dir", str(work / "run")])
        reference, resumed = losses(work / "reference"), losses(work / "run")
        differing = sorted(s for s in reference if resumed.get(s) != reference[s])
        if differing:
            raise AssertionError(f"the killed and resumed run differs from the uninterrupted one at steps {differing}")
        summary = {"points": len(results), "killed_during_a_save": sum(r["save_in_progress"] for r in results),
                   "damaged_checkpoints_picked": 0, "steps": len(reference), "losses_bitwise_equal": True,
                   "conditions": f"{os.cpu_count()} CPU cores shared with other jobs; tiny model, one process, "
                                 f"checkpoint every 3 steps, checkpoint.async_save=true",
                   "kills": results}
        out = REPO / "benchmarks" / "results" / "kill_during_save_async.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['points']} kills ({summary['killed_during_a_save']} during a save): resume always found an "
          f"intact checkpoint; wrote {out}")


if __name__ == "__main__":
    main()
