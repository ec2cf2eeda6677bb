"""Training time lost per checkpoint, foreground saves vs background ones (checkpoint.async_save), on CPU.

A model whose save takes many steps' time (large hidden size, one short sequence per step) trains
STEPS steps, saving every INTERVAL; each step's wall time is taken from the moment its log line
arrives (the gap before step N's line holds step N and a save after step N-1). The time lost per save
is the sum of the gaps from a save to the next one minus as many typical steps (the median gap of the
steps before the first save); the end of the run, which waits for the last write, is not counted.
Writes benchmarks/results/async_save.json with the conditions (other jobs may share the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_steps(config: Path, run_dir: Path, extra: list[str]) -> tuple[dict[int, float], str]:
    """Wall time at which each step's log line arrived, and the run's output."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lrpath_megatron.cli", "train", str(config), "--run-dir",
                             str(run_dir), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    arrived, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        words = line.split()
        if len(words) > 2 and words[1] == "step" and words[2].isdigit():
            arrived[int(words[2])] = time.perf_counter()
    if proc.wait() != 0:
        raise RuntimeError(f"training failed:\n{''.join(lines[-40:])}")
    return arrived, "".join(lines)


def lost_per_save(arrived: dict[int, float], interval: int, steps: int) -> dict:
    gaps = {s: arrived[s] - arrived[s - 1] for s in range(1, steps)}
    typical = statistics.median(gaps[s] for s in range(2, interval))  # before the first save
    saves = list(range(interval, steps - interval + 1, interval))
    lost = [sum(gaps[s] for s in range(save, save + interval)) - interval * typical for save in saves]
    around = [statistics.mean(gaps[s] for s in range(save, save + interval)) for save in saves]
    return {"step_s": round(typical, 4), "saves": len(saves), "lost_per_save_s": [round(x, 3) for x in lost],
            "mean_lost_per_save_s": round(statistics.mean(lost), 3),
            "mean_step_s_after_a_save": round(statistics.mean(around), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=8, help="tokens per step: short, so one save takes many steps")
    parser.add_argument("--steps", type=int, default=101)
    parser.add_argument("--interval", type=int, default=25)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_config
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    work = Path(tempfile.mkdtemp(prefix="lrpath_async_save_"))
    config = tiny_config(
        prepare_demo_data(work / "data"), work / "c.yaml",
        model={"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": 8, "seq_length": args.seq},
        parallel={"micro_batch_size": 1, "global_batch_size": 1},
        schedule={"train_steps": args.steps, "warmup_steps": 2},
        checkpoint={"save_interval": args.interval, "keep_last": 1})
    result = {"conditions": {
        "cpu_cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "note": "one training process, gloo, OMP_NUM_THREADS=1; anything else running shows in the load averages",
        "model": {"layers": args.layers, "hidden": args.hidden, "seq_length": args.seq, "global_batch": 1},
        "steps": args.steps, "save_interval": args.interval}}
    for mode, extra in (("sync", []), ("async", ["--set", "checkpoint.async_save=true"])):
        arrived, out = timed_steps(config, work / mode, extra)
        result[mode] = lost_per_save(arrived, args.interval, args.steps)
        result[mode]["waits_logged"] = [line.split("] ", 1)[1] for line in out.splitlines() if "waited" in line]
        print(mode, json.dumps(result[mode]), flush=True)
    result["conditions"]["load_average_at_end"] = os.getloadavg()
    ckpt = max((work / "sync" / "checkpoints").glob("iter_*"))
    result["checkpoint_mib"] = round(sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**20, 1)
    result["sync_save_in_steps"] = round(result["sync"]["mean_lost_per_save_s"] / result["sync"]["step_s"], 1)
    result["async_loss_fraction_of_sync"] = round(result["async"]["mean_lost_per_save_s"]
                                                  / result["sync"]["mean_lost_per_save_s"], 3)
    out = REPO / "benchmarks" / "results" / "async_save.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"sync loses {result['sync']['mean_lost_per_save_s']} s per save ({result['sync_save_in_steps']} steps), "
          f"async {result['async']['mean_lost_per_save_s']} s ({result['async_loss_fraction_of_sync']:.1%}); wrote {out}")


if __name__ == "__main__":
    main()
