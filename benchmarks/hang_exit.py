"""How long a job takes to end when one rank stops (SIGSTOP: a frozen node) or dies (kill -9) alone: from
the fault to every process of the job gone, at 2 and 4 ranks (gloo on CPU; each rank its own process, as
srun starts them). The other ranks wait out the collective timeout (``parallel.distributed_timeout_minutes``)
for a stopped rank and fail at once on a dead one; then they write their stacks and exit 3 (requeue).

    python benchmarks/hang_exit.py            # -> benchmarks/results/hang_exit.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TIMEOUT_MIN = 0.25  # 15 s


def config(root: Path) -> Path:
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    data = prepare_demo_data(root / "data")
    cfg = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": data["vocab_size"]},
        "parallel": {"micro_batch_size": 1, "global_batch_size": 8, "distributed_timeout_minutes": TIMEOUT_MIN},
        "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4},
        "schedule": {"style": "cosine", "warmup_steps": 4, "train_steps": 100000},
        "data": {"corpora": [{"name": "docs", "prefix": data["prefixes"]["docs"]}]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one(cfg: Path, run_dir: Path, world: int, fault: signal.Signals) -> dict:
    port = 29000 + (os.getpid() + world * 7 + int(fault)) % 2000
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, "-m", "lrpath_megatron.cli", "train", str(cfg), "--run-dir",
                                       str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(f"{run_dir}.rank{len(procs)}.log", "w"), cwd=REPO))
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a rank ended before the fault; see {run_dir}.rank*.log")
        time.sleep(0.05)
    victim = procs[-1]
    os.kill(victim.pid, fault)
    hit = time.monotonic()
    others = procs[:-1]
    codes = [p.wait(timeout=600) for p in others]
    gone = time.monotonic() - hit
    victim.kill()
    victim.wait()
    return {"ranks": world, "fault": fault.name, "seconds_to_every_other_rank_gone": round(gone, 2),
            "exit_codes": codes, "collective_timeout_s": TIMEOUT_MIN * 60}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hang_exit.json")
    args = p.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = config(root)
        rows = [one(cfg, root / f"run{world}{fault.name}", world, fault)
                for world in (2, 4) for fault in (signal.SIGSTOP, signal.SIGKILL)]
    for r in rows:
        print(f"{r['ranks']} ranks, {r['fault']:<7}: every other rank gone {r['seconds_to_every_other_rank_gone']:6.2f} s "
              f"after the fault (collective timeout {r['collective_timeout_s']:g} s), exit codes {r['exit_codes']}")
    result = {"benchmark": "hang_exit", "device": "cpu (gloo)", "runs": rows, "seconds": round(time.time() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
