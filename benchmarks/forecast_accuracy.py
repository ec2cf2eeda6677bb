"""Forecast accuracy on a finished version-update benchmark run, from what was known before each branch.

For every decay method of the run (``RUN/switch/<method>``) and every version v, the law is fitted only to
the validation losses available when v's branch starts: the main path's checkpoints up to v's (effective)
fork step and the branches that finished by then. The forecast of v's release (its version's blend: the
mean over the corpora of D_1..D_v, and each corpus) is compared with the release's measured loss. Each
method's plan is loaded with the choices its ``decay_steps: auto`` releases recorded in the run
(``RUN/switch/<method>/vN/decay_choice.json``), so those releases are backtested as they trained: at their
chosen decay length and fork.

Three forecasters side by side:
- ``segments``: lrpath's law, (L0, A) per version's data from the segment start, alpha and C shared;
- ``one_law``: the paper's law over the whole run (one L0, A from step 0);
- ``fork_loss``: no law, the main path's loss at the fork (what one would guess without a forecast).

Every forecaster's summary covers the same releases: those that all three forecast (a law refuses v1: no
decay observed before it), listed under ``versions`` in each summary.

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
from lrpath_megatron.observations import known_before, observations  # noqa: E402
from lrpath_megatron.plan import load_plan  # noqa: E402
from lrpath_megatron.plan_decisions import with_choices  # noqa: E402
from lrpath_megatron.release_forecast import (  # noqa: E402
    BLEND, backtest, curves_for, path_lrs, release_loss, seen_corpora)

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


def backtest_run(plan, run_dir: Path, eval_files: list) -> dict:
    """``plan``: the method's plan as trained (its recorded decay_steps: auto choices applied)."""
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
        row = {"fork_step": fork, "release_step": v.branch_end, "decay_steps": v.release.decay_steps,
               "observations_used": len(known), "targets": {}}
        auto = plan.auto_decays.get(v.name)
        if auto is not None:  # decay_steps: auto: what its choice said
            row["decay_choice"] = ({"chosen_by_forecast": "predicted_loss" in auto.choice,
                                    "candidates": list(auto.candidates)} if auto.choice is not None
                                   else {"not_chosen": "no decay_choice.json in the run"})
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
    """Per forecaster its errors over the SAME releases: those every forecaster forecast (``versions``);
    ``refused`` counts the releases it refused, ``left_out`` the ones another forecaster refused."""
    have = {v: r["targets"][target] for v, r in rows.items() if target in r["targets"]}
    common = [v for v, t in have.items() if all("refused" not in t[n] for n in FORECASTERS)]
    out = {}
    for name in FORECASTERS:
        ok = [have[v][name] for v in common]
        refused = [v for v, t in have.items() if "refused" in t[name]]
        out[name] = {"versions": common, "forecast": len(ok), "refused": len(refused), "refused_versions": refused,
                     "left_out": [v for v in have if v not in common and v not in refused],
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
        plan = with_choices(load_plan(plan_path), method_dir)  # auto releases as trained
        if all(v.release.method != "decay" for v in plan.versions):
            continue  # merges: nothing trains, nothing to forecast
        evals = [main_evals(run, plan_path, (method_dir / "main").resolve()), run / "eval.json"]
        rows = backtest_run(plan, method_dir, evals)
        results[method_dir.name] = {"versions": rows, "blend": summary(rows),
                                    "per_corpus": {c: summary(rows, c) for c in plan.corpus_names}}
    seg = [r["blend"]["segments"] for r in results.values()]
    result = {
        "benchmark": "forecast_accuracy",
        "run_dir": str(run),
        "target": "validation loss of each release on its version's blend (mean over the corpora of D_1..D_v)",
        "information": "main-path checkpoints up to the release's fork step and branches finished by then",
        "criterion": "mean relative error <= 1% of the loss",
        "plans": "each method's plan with its recorded decay_steps: auto choices (RUN/switch/<method>/vN/"
                 "decay_choice.json): auto releases are backtested at their chosen decay length and fork",
        "summaries": "every forecaster's summary covers the same releases: those all of "
                     f"{', '.join(FORECASTERS)} forecast (listed in 'versions'); a release any of them refused "
                     "is left out of all of them",
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
            print(f"  {v} (decay {row['decay_steps']}, fork {row['fork_step']}): actual {t['actual']:.3f} | "
                  + " | ".join(cells))
        for n, s in r["blend"].items():
            if s["mean_rel_error"] is not None:
                print(f"  {n} over {','.join(s['versions'])}: mean {s['mean_rel_error']:.2%} max {s['max_rel_error']:.2%} "
                      f"(abs mean {s['mean_abs_error']:.4f}, max {s['max_abs_error']:.4f}), refused {s['refused']}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
