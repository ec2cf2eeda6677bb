"""kill -9 at random moments of a run that saves every step: the checkpoint resume would pick up must
always be complete and intact (manifest checksums match). Records each kill point in
benchmarks/results/kill_during_save.json; `tests/test_branches.py` runs the same check with 3 points.
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


def kill_during_saves(config: Path, run_dir: Path, points: int, seed: int) -> list[dict]:
    """Start `lrpath train`, let it save a few steps, SIGKILL it at a random moment, check; repeat."""
    from lrpath_megatron import checkpoint_layout
    from lrpath_megatron.run_layout import PathDirs

    rng = random.Random(seed)
    results = []
    for _ in range(points):
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.Popen([sys.executable, "-m", "lrpath_megatron.cli", "train", str(config),
                                 "--run-dir", str(run_dir)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = checkpoint_layout.find_latest(PathDirs(run_dir).checkpoints)
        deadline = time.time() + 300
        while checkpoint_layout.find_latest(PathDirs(run_dir).checkpoints) in (None, before):  # at least one new save
            if proc.poll() is not None:
                raise RuntimeError(f"training exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError("no checkpoint within 300 s")
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.0)
        time.sleep(delay)
        in_save = any(PathDirs(run_dir).checkpoints.glob(".tmp_iter_*"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = checkpoint_layout.find_latest(PathDirs(run_dir).checkpoints)
        bad = checkpoint_layout.verify(latest) if latest is not None else ["<none>"]
        left = leftover_processes(run_dir)
        results.append({"delay_s": round(delay, 3), "save_in_progress": in_save,
                        "latest": latest.name if latest else None, "corrupt_files": bad, "leftover_processes": left})
        if bad:
            raise AssertionError(f"resume would pick a damaged checkpoint {latest}: {bad}")
        if left:
            raise AssertionError(f"processes of the killed run are still alive: {left}")
    return results


def leftover_processes(run_dir: Path, grace_s: float = 10.0) -> list[int]:
    """Pids still running `lrpath train --run-dir RUN_DIR` (e.g. megatron-core's forked checkpoint
    writers) once the grace period is over: a killed trainer must take them with it."""
    import psutil

    deadline = time.time() + grace_s
    while True:
        left = []
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
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_config
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    work = Path(tempfile.mkdtemp(prefix="lrpath_kill_"))
    config = tiny_config(prepare_demo_data(work / "data"), work / "c.yaml", checkpoint={"save_interval": 1},
                         schedule={"train_steps": 100000, "warmup_steps": 2})
    results = kill_during_saves(config, work / "run", args.points, args.seed)
    summary = {"points": len(results), "killed_during_a_save": sum(r["save_in_progress"] for r in results),
               "damaged_checkpoints_picked": 0, "kills": results}
    out = REPO / "benchmarks" / "results" / "kill_during_save.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['points']} kills ({summary['killed_during_a_save']} during a save): resume always found an "
          f"intact checkpoint; wrote {out}")


if __name__ == "__main__":
    main()
