"""Fork creation time vs model size: `lrpath branch PLAN v1 --no-train` references the main path's fork
checkpoint without copying weights, so its time must not grow with the checkpoint.

Trains the main path of a 2-version plan up to v1's fork for two model sizes, forks, and records the
time the fork took, the checkpoint size and the branch directory's size. Writes
benchmarks/results/fork_time.json.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lrpath_megatron.run_layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
SIZES = {"tiny": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
         "medium": {"num_layers": 8, "hidden_size": 512, "num_attention_heads": 8}}


def lrpath(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "lrpath_megatron.cli", *args], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return out.stdout


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    sys.path.insert(0, str(REPO))
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    work = Path(tempfile.mkdtemp(prefix="lrpath_fork_"))
    data = prepare_demo_data(work / "data")
    results = {}
    for name, model in SIZES.items():
        plan = {
            "model": {**model, "seq_length": 64, "vocab_size": data["vocab_size"]},
            "parallel": {"micro_batch_size": 4, "global_batch_size": 4},
            "data": {"corpora": [{"name": n, "prefix": data["prefixes"][n]} for n in ("docs", "code_a")]},
            "checkpoint": {"save_interval": 0},
            "logging": {"eval_interval": 0, "tensorboard": False},
            "plan": {"main": {"eta_max": 1.0e-3, "eta_min": 1.0e-4, "warmup_steps": 1},
                     "versions": [{"name": "v1", "corpora": ["docs"], "steps": 3,
                                   "release": {"method": "decay", "decay_steps": 2, "data": "replay"}},
                                  {"name": "v2", "corpora": ["code_a"], "steps": 3,
                                   "release": {"method": "decay", "decay_steps": 2, "data": "replay"}}]},
        }
        plan_file = work / f"{name}.yaml"
        plan_file.write_text(yaml.safe_dump(plan))
        run = work / f"run_{name}"
        lrpath("train", str(plan_file), "--path", "main", "--run-dir", str(run), "--stop-at-step", "3")
        parent = RunLayout(run).checkpoint("main", 3)
        out = lrpath("branch", str(plan_file), "v1", "--run-dir", str(run), "--no-train")
        seconds = float(re.search(r"\(([0-9.]+) s, no weights copied\)", out).group(1))
        results[name] = {"parameters_bytes": dir_bytes(parent / "model"), "checkpoint_bytes": dir_bytes(parent),
                         "fork_seconds": seconds, "branch_dir_bytes": dir_bytes(run / "v1")}
        print(f"{name:>7}: checkpoint {results[name]['checkpoint_bytes'] / 1e6:8.1f} MB, fork {seconds * 1e3:.2f} ms, "
              f"branch dir {results[name]['branch_dir_bytes']} bytes")
    out_file = REPO / "benchmarks" / "results" / "fork_time.json"
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
