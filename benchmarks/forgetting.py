"""Forgetting of cheap updates: old-data vs new-data held-out loss after one update of a released model.

The base is the demo plan's v3 release (trained on docs, code_a, code_b: the "old" data); the update is
v4 = c_headers, a fourth real corpus (the "new" data). Every method gets the same batch budget
(``adapt.steps`` batches) from the same release, through ``lrpath adapt``'s ``run_update``:
full fine-tuning, LoRA, static ConPET (the same LoRA plus 1:1 replay of v1..v3), dynamic ConPET (a LoRA
expert + selector over [base, v4]) and LP-FT. Runs on CPU in a few minutes.

    python benchmarks/forgetting.py [--run-dir runs/bench_forgetting] [--out benchmarks/results/forgetting.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "conpet-static", "conpet-dynamic", "lpft")
ADAPT = {
    "base": "v3",
    "steps": 150,
    "lr": 3.0e-3,
    "full_lr": 1.0e-3,
    "warmup_steps": 10,
    "eval_batches": 12,
    "lora": {"rank": 4, "alpha": 8.0},
    "replay": {"new_ratio": 0.5},
    "selector": {"steps": 150, "lr": 1.0e-2, "hidden": 64, "top_k": 1, "eval_batches": 12},
    "lpft": {"probe_steps": 30, "train_final_norm": True},
}


def write_plan(run_dir: Path, prefixes: dict) -> Path:
    """The demo plan with absolute data prefixes, c_headers as version v4, and the adapt: section."""
    plan = yaml.safe_load((ROOT / "examples" / "demo_plan.yaml").read_text())
    plan["data"]["corpora"] = [{"name": n, "prefix": prefixes[n]} for n in ("docs", "code_a", "code_b", "c_headers")]
    plan["logging"].update(tensorboard=False)
    plan["plan"]["versions"].append({"name": "v4", "corpora": ["c_headers"], "tokens": 81920,
                                     "release": {"method": "decay", "shape": "cosine", "decay_steps": 40,
                                                 "data": "replay"}})
    plan["adapt"] = ADAPT
    path = run_dir / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def train_base(plan_path: Path, run_dir: Path) -> None:
    """Main path up to v3's fork, then v3's release branch (skipped when already there)."""
    from lrpath_megatron.adapters.update import load_adapt_plan
    from lrpath_megatron.plan_runs import run_for
    from lrpath_megatron.trainer import run_path

    plan, _ = load_adapt_plan(plan_path)
    v3 = plan.path("v3")
    run_path(plan.train_config, run_for(plan, "main", run_dir), stop_at_step=v3.fork_step)
    run_path(plan.train_config, run_for(plan, "v3", run_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench_forgetting")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "forgetting.json")
    args = parser.parse_args()
    os.environ.setdefault("LRPATH_DEVICE", "cpu")
    from lrpath_megatron.data_tools.demo import prepare_demo_data
    from lrpath_megatron.adapt import run_update
    from lrpath_megatron.adapters.update import load_adapt_plan, resolve_update

    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    plan_path = write_plan(run_dir, prepare_demo_data(ROOT / "runs" / "demo" / "data")["prefixes"])
    start = time.perf_counter()
    train_base(plan_path, run_dir)
    base_seconds = time.perf_counter() - start
    plan, adapt = load_adapt_plan(plan_path)
    results = {m: run_update(resolve_update(plan, adapt, "v4", m, run_dir)) for m in METHODS}

    base = results["lora"]
    table = {m: {**r["summary"], "val_loss": r["val_loss"], "trainable_params": r["params"]["trainable"],
                 "total_params": r["params"]["total"], "trainable_ratio": r["params"]["ratio"],
                 "optimizer_state_bytes": r["params"]["optimizer_state_bytes"],
                 "train_seconds": round(r["train_seconds"], 1)} for m, r in results.items()}
    replay_gain = table["lora"]["old_loss_after"] - table["conpet-static"]["old_loss_after"]
    out = {
        "what": "held-out loss on old data (docs, code_a, code_b: the base release's versions v1..v3) and new "
                "data (c_headers, version v4) before and after one update of the v3 release, same batch budget",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": yaml.safe_load(plan_path.read_text())["model"],
        "adapt": ADAPT,
        "tokens_per_step": plan.tokens_per_step,
        "base_train_seconds": round(base_seconds, 1),
        "old_corpora": base["old_corpora"],
        "new_corpora": base["new_corpora"],
        "base_val_loss": base["base_val_loss"],
        "methods": table,
        "replay_lowers_old_loss_by": replay_gain,
        "selector": results["conpet-dynamic"]["selector"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'method':<16}{'old before':>11}{'old after':>11}{'new before':>11}{'new after':>11}{'trainable':>12}")
    for m, row in table.items():
        print(f"{m:<16}{row['old_loss_before']:>11.4f}{row['old_loss_after']:>11.4f}{row['new_loss_before']:>11.4f}"
              f"{row['new_loss_after']:>11.4f}{row['trainable_ratio']:>12.2%}")
    print(f"replay lowers the old-data loss by {replay_gain:.4f}; selector held-out accuracy "
          f"{out['selector']['heldout_accuracy']}")


if __name__ == "__main__":
    main()
