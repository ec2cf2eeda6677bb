"""Training time lost per checkpoint, foreground saves vs background ones (checkpoint.async_save), on CPU.

A model whose save takes many steps' time (large hidden size, one short sequence per step) trains
STEPS steps, saving every INTERVAL. Each step's wall time is taken from the moment its log line arrives
(the gap before step N's line holds step N and a save after step N-1). The time lost to the save at
step S is the sum of the WINDOW gaps from S on (the save, and the steps a background write overlaps)
minus as many typical steps, typical being the median of the BASELINE gaps just before S: a baseline
next to each save, because this VM's step time drifts by 10-30% over tens of seconds. A run without
saves, measured at the same steps, gives the noise floor (its "loss" is noise only). The modes
alternate for ROUNDS rounds so that drift hits them alike. Writes benchmarks/results/async_save.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"no_saves_noise_floor": ["--set", "checkpoint.save_interval=0"], "sync": [],
         "async": ["--set", "checkpoint.async_save=true"]}


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


def lost_per_save(arrived: dict[int, float], saves: list[int], window: int, baseline: int) -> list[float]:
    gaps = {s: arrived[s] - arrived[s - 1] for s in range(1, max(arrived) + 1)}
    return [round(sum(gaps[s] for s in range(save, save + window))
                  - window * statistics.median(gaps[s] for s in range(save - baseline, save)), 3)
            for save in saves]


def summary(lost: list[float]) -> dict:
    return {"mean_lost_per_save_s": round(statistics.mean(lost), 3),
            "standard_error_s": round(statistics.stdev(lost) / math.sqrt(len(lost)), 3),
            "saves": len(lost), "lost_per_save_s": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=8, help="tokens per step: short, so one save takes many steps")
    parser.add_argument("--interval", type=int, default=12)
    parser.add_argument("--window", type=int, default=8, help="gaps from a save on that it may slow down")
    parser.add_argument("--baseline", type=int, default=4, help="gaps before a save that give the typical step")
    parser.add_argument("--saves", type=int, default=4, help="saves measured per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.window + args.baseline > args.interval:
        parser.error("--window + --baseline must fit in --interval (a baseline must not hold the last save)")
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_config
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    saves = [args.interval * (i + 1) for i in range(args.saves)]
    steps = saves[-1] + args.window + 1  # the end's save (waited for) lies past the last window
    work = Path(tempfile.mkdtemp(prefix="lrpath_async_save_"))
    config = tiny_config(
        prepare_demo_data(work / "data"), work / "c.yaml",
        model={"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": 8, "seq_length": args.seq},
        parallel={"micro_batch_size": 1, "global_batch_size": 1},
        schedule={"train_steps": steps, "warmup_steps": 2},
        checkpoint={"save_interval": args.interval, "keep_last": 1})
    result = {"conditions": {
        "cpu_cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "note": "one training process, gloo, OMP_NUM_THREADS=1; anything else running shows in the load averages",
        "model": {"layers": args.layers, "hidden": args.hidden, "seq_length": args.seq, "global_batch": 1},
        "steps": steps, "save_interval": args.interval, "window": args.window, "baseline": args.baseline,
        "rounds": args.rounds}}
    lost = {mode: [] for mode in MODES}
    step_s, waits = {mode: [] for mode in MODES}, []
    for round_ in range(args.rounds):
        for mode, extra in MODES.items():
            run_dir = work / f"{mode}_{round_}"
            arrived, out = timed_steps(config, run_dir, extra)
            lost[mode] += lost_per_save(arrived, saves, args.window, args.baseline)
            step_s[mode].append(statistics.median(arrived[s] - arrived[s - 1] for s in range(2, steps)))
            if mode == "async":
                waits += [line.split("] ", 1)[1] for line in out.splitlines() if "waited" in line]
            if mode == "sync" and round_ == 0:
                ckpt = max((run_dir / "checkpoints").glob("iter_*"))
                result["checkpoint_mib"] = round(sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**20, 1)
            shutil.rmtree(run_dir)
            print(f"round {round_} {mode}: lost per save {lost[mode][-len(saves):]}", flush=True)
    result["conditions"]["load_average_at_end"] = os.getloadavg()
    for mode in MODES:
        result[mode] = dict(
            summary(lost[mode]), step_s=round(statistics.median(step_s[mode]), 4))
    result["async"]["waits_logged"] = waits
    sync, background = result["sync"]["mean_lost_per_save_s"], result["async"]["mean_lost_per_save_s"]
    result["sync_save_in_steps"] = round(sync / result["sync"]["step_s"], 1)
    result["async_loss_fraction_of_sync"] = round(background / sync, 3)
    out = REPO / "benchmarks" / "results" / "async_save.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    noise = result["no_saves_noise_floor"]
    print(f"sync loses {sync} s per save ({result['sync_save_in_steps']} steps), async {background} s "
          f"({result['async_loss_fraction_of_sync']:.1%}); noise floor {noise['mean_lost_per_save_s']} "
          f"+- {noise['standard_error_s']} s; wrote {out}")


if __name__ == "__main__":
    main()
