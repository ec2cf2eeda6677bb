"""Forecast accuracy on a finished version-update benchmark run, from what was known before each branch.

For every decay method of the run (``RUN/switch/<method>``) and every version v, the law is fitted only to
the validation losses available when v's branch starts: the main path's checkpoints up to v's (effective)
fork step and the branches that finished by then. The forecast of v's release (its version's blend: the
mean over the corpora of D_1..D_v, and each corpus) is compared with the release's measured loss.

Three forecasters side by side:
- ``segments``: lrpath's law, (L0, A) per version's data from the segment start, alpha and C shared;
- ``one_law``: the paper's law over the whole run (one L0, A from step 0);
- ``fork_loss``: no law, the main path's loss at the fork (what one would guess without a forecast).

    python benchmarks/forecast_accuracy.py --run-dir /tmp/vu/run       # after version_updates/run.py

The main path's checkpoints are evaluated once with `lrpath eval` (cached in RUN/mains/<main>/eval.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from lrpath_megatron.forecast import ForecastError, fit_law  # noqa: E402
from lrpath_megatron.plan import load_plan  # noqa: E402
from lrpath_megatron.release_forecast import (  # noqa: E402
    BLEND, backtest, curves_for, known_before, observations, path_lrs, release_loss, seen_corpora)

FORECASTERS = ("segments", "one_law", "fork_loss")


def main_evals(run: Path, plan_path: Path, main_dir: Path) -> Path:
    """`lrpath eval` of every main-path checkpoint (once; the result is reused)."""
    out = main_dir / "eval.json"
    if not out.is_file():
        from lrpath_megatron.cli import main as lrpath

        ckpts = sorted(str(p) for p in (main_dir / "checkpoints").glob("iter_*"))
        if lrpath(["eval", str(plan_path), *ckpts, "--json", str(out)]) != 0:
            raise SystemExit("lrpath eval of the main-path checkpoints failed")
    return out


def backtest_run(plan_path: Path, run_dir: Path, eval_files: list) -> dict:
    plan = load_plan(plan_path)
    obs = observations(plan, run_dir, eval_files)
    rows = {}
    for v in plan.versions:
        if v.release.method != "decay":
            continue
        fork = v.release.step
        known = known_before(plan, obs, fork)
        actual_pc = release_loss(plan, obs, v.index)
        if actual_pc is None:
            continue
        seen = seen_corpora(plan, v.index)
        row = {"fork_step": fork, "release_step": v.branch_end, "observations_used": len(known), "targets": {}}
        for target in [BLEND, *seen]:
            actual = float(np.mean([actual_pc[c] for c in seen])) if target == BLEND else actual_pc[target]
            res = {"actual": actual}
            for name in FORECASTERS:
                try:
                    if name == "fork_loss":
                        at_fork = max((o for o in known if o.path == "main"), key=lambda o: o.step)
                        pred, sd = (float(np.mean([at_fork.per_corpus[c] for c in seen])) if target == BLEND
                                    else at_fork.per_corpus[target]), None
                    elif name == "segments":
                        pred, sd = backtest(plan, obs, v.index, target)
                    else:
                        fit = fit_law(curves_for(plan, known, target, v.index, one_law=True))
                        pred, sd = fit.predict(path_lrs(plan, v.name, v.branch_end))
                    res[name] = {"predicted": pred, "sd": sd, "abs_error": abs(pred - actual),
                                 "rel_error": abs(pred - actual) / actual}
                except (ForecastError, ValueError) as exc:
                    res[name] = {"refused": str(exc)}
            row["targets"][target] = res
        rows[v.name] = row
    return rows


def summary(rows: dict, target: str = BLEND) -> dict:
    out = {}
    for name in FORECASTERS:
        errs = [r["targets"][target][name] for r in rows.values() if target in r["targets"]]
        ok = [e for e in errs if "refused" not in e]
        out[name] = {"forecast": len(ok), "refused": len(errs) - len(ok),
                     "mean_abs_error": float(np.mean([e["abs_error"] for e in ok])) if ok else None,
                     "max_abs_error": float(np.max([e["abs_error"] for e in ok])) if ok else None,
                     "mean_rel_error": float(np.mean([e["rel_error"] for e in ok])) if ok else None,
                     "max_rel_error": float(np.max([e["rel_error"] for e in ok])) if ok else None}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="a finished benchmarks/version_updates/run.py run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "forecast_accuracy.json")
    args = p.parse_args(argv)
    start = time.time()
    run = args.run_dir.resolve()
    results = {}
    for method_dir in sorted((run / "switch").iterdir()):
        plan_path = run / "plans" / f"{method_dir.name}.yaml"
        plan = load_plan(plan_path)
        if all(v.release.method != "decay" for v in plan.versions):
            continue  # merges: nothing trains, nothing to forecast
        evals = [main_evals(run, plan_path, (method_dir / "main").resolve()), run / "eval.json"]
        rows = backtest_run(plan_path, method_dir, evals)
        results[method_dir.name] = {"versions": rows, "blend": summary(rows),
                                    "per_corpus": {c: summary(rows, c) for c in plan.corpus_names}}
    seg = [r["blend"]["segments"] for r in results.values()]
    result = {
        "benchmark": "forecast_accuracy",
        "run_dir": str(run),
        "target": "validation loss of each release on its version's blend (mean over the corpora of D_1..D_v)",
        "information": "main-path checkpoints up to the release's fork step and branches finished by then",
        "criterion": "mean relative error <= 1% of the loss",
        "methods": results,
        "mean_rel_error_segments": float(np.mean([s["mean_rel_error"] for s in seg if s["mean_rel_error"] is not None])),
        "seconds": round(time.time() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for method, r in results.items():
        print(method)
        for v, row in r["versions"].items():
            t = row["targets"][BLEND]
            cells = [f"{n} " + (f"{t[n]['predicted']:.3f} ({t[n]['rel_error']:.2%})" if "refused" not in t[n]
                                else "refused") for n in FORECASTERS]
            print(f"  {v}: actual {t['actual']:.3f} | " + " | ".join(cells))
        for n, s in r["blend"].items():
            if s["mean_rel_error"] is not None:
                print(f"  {n}: mean {s['mean_rel_error']:.2%} max {s['max_rel_error']:.2%} "
                      f"(abs mean {s['mean_abs_error']:.4f}, max {s['max_abs_error']:.4f}), refused {s['refused']}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
