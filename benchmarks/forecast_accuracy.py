"""Forecast accuracy on a finished version-update benchmark run, from what was known before each release.

For every switch method of the run (``RUN/switch/<method>``: decay branches and WSM merges) and every
version v, the law is fitted only to the validation losses available when v's branch starts (or its merge
is made): the main path's checkpoints up to v's (effective) fork step and the releases finished by then; a
merge is forecast as the decay it emulates. The forecast of v's release (its version's blend: the
mean over the corpora of D_1..D_v, and each corpus) is compared with the release's measured loss. Each
method's plan is loaded with the choices its ``decay_steps: auto`` releases recorded in the run
(``RUN/switch/<method>/vN/decay_choice.json``), so those releases are backtested as they trained: at their
chosen decay length and fork.

Five forecasters side by side:
- ``calibrated``: what lrpath forecasts: ``segments`` corrected by the mean signed error of the plan's
  earlier releases of the same kind (method and shape), its deviation widened by their spread;
- ``segments``: lrpath's law, (L0, A) per version's data from the segment start, alpha and C shared;
- ``multi_power``: the multi-power law (Luo et al. 2025; lrpath_megatron.forecast_mpl), fitted the same way;
- ``one_law``: the paper's law over the whole run (one L0, A from step 0);
- ``fork_loss``: no law, the main path's loss at the fork (what one would guess without a forecast).

Every forecaster's summary covers the same releases: those that all three forecast (a law refuses v1: no
decay observed before it), listed under ``versions`` in each summary. Calibration: the share of releases
whose measured loss lies within the law's forecast +- one standard deviation (``coverage_1sd``), per method
and shape and over all of them.

    python benchmarks/forecast_accuracy.py --run-dir /tmp/vu/run       # after version_updates/run.py

The main path's checkpoints are evaluated once with `lrpath eval` (cached in RUN/mains/<main>/eval.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from lrpath_megatron.forecast import ForecastError, fit_law  # noqa: E402
from lrpath_megatron.forecast_mpl import fit_mpl  # noqa: E402
from lrpath_megatron.observations import known_before, observations  # noqa: E402
from lrpath_megatron.plan import load_plan  # noqa: E402
from lrpath_megatron.plan_decisions import with_choices  # noqa: E402
from lrpath_megatron.release_forecast import (  # noqa: E402
    BLEND, backtest, curve_origin, curves_for, law_config, release_loss, release_lrs, seen_corpora)

FORECASTERS = ("calibrated", "segments", "multi_power", "one_law", "fork_loss")
LAWS = ("calibrated", "segments", "multi_power")  # the forecasters with an uncertainty


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
        fork = v.release.step
        known = known_before(plan, obs, fork, v.name)
        actual_pc = release_loss(plan, obs, v.index)
        if actual_pc is None:
            continue
        seen = seen_corpora(plan, v.index)
        row = {"method": v.release.method, "fork_step": fork, "release_step": v.branch_end,
               "shape": v.release.shape if v.release.method == "decay" else f"wsm-{v.release.merge['weights']}",
               "decay_steps": v.release.decay_steps if v.release.method == "decay" else None,
               "merge_steps": v.release.merge.get("save_steps") if v.release.method == "merge" else None,
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
                    elif name in ("segments", "calibrated"):
                        pred, sd = backtest(plan, obs, v.index, target, calibrate=name == "calibrated")
                    elif name == "multi_power":
                        fit = fit_mpl(curves_for(plan, known, target, v.index))
                        pred, sd = fit.predict(release_lrs(plan, v.index), curve_origin(plan, v.index), v.name)
                    else:
                        fit = fit_law(curves_for(plan, known, target, v.index, one_law=True), law_config(plan))
                        pred, sd = fit.predict(release_lrs(plan, v.index))
                    res[name] = {"predicted": pred, "sd": sd, "abs_error": abs(pred - actual),
                                 "rel_error": abs(pred - actual) / actual,
                                 "within_1sd": None if sd is None else bool(abs(pred - actual) <= sd)}
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
                     "max_rel_error": float(np.max([e["rel_error"] for e in ok])) if ok else None,
                     "coverage_1sd": calibration(ok)}
    return out


def calibration(forecasts: list) -> float | None:
    """The share of forecasts (with an uncertainty) whose measured loss lies within +- one sd."""
    inside = [e["within_1sd"] for e in forecasts if e.get("within_1sd") is not None]
    return float(np.mean(inside)) if inside else None


def by_method_and_shape(results: dict) -> dict:
    """Per law (the forecasters with an uncertainty), its blend forecasts grouped by release method and shape
    over every method run: count, mean / max relative error, coverage of +- 1 sd."""
    table: dict = {}
    for law in LAWS:
        groups: dict = {}
        for r in results.values():
            for row in r["versions"].values():
                e = row["targets"][BLEND][law]
                if "refused" not in e:
                    groups.setdefault(f"{row['method']} {row['shape']}", []).append(e)
        table[law] = {k: {"releases": len(es), "mean_rel_error": float(np.mean([e["rel_error"] for e in es])),
                          "max_rel_error": float(np.max([e["rel_error"] for e in es])),
                          "coverage_1sd": calibration(es)} for k, es in sorted(groups.items())}
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="a finished benchmarks/version_updates/run.py run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "forecast_accuracy.json")
    p.add_argument("--annealing-momentum", type=float, default=None,
                   help="the law's momentum for this backtest (default: each plan's plan.forecast."
                        "annealing_momentum); what trained, and its recorded choices, stay as they were")
    p.add_argument("--version-curves", choices=("restart", "continue"), default=None,
                   help="where each version's curve counts its areas from for this backtest (default: each plan's "
                        "plan.forecast.version_curves); the law only, like --annealing-momentum")
    args = p.parse_args(argv)
    start = time.time()
    run = args.run_dir.resolve()
    results = {}
    for method_dir in sorted((run / "switch").iterdir()):
        plan_path = run / "plans" / f"{method_dir.name}.yaml"
        plan = with_choices(load_plan(plan_path), method_dir)  # auto releases as trained
        law = {k: v for k, v in (("annealing_momentum", args.annealing_momentum),
                                 ("version_curves", args.version_curves)) if v is not None}
        if law:  # the law only: the plan's hash is checked above, as trained
            plan.config = dataclasses.replace(plan.config, forecast=dataclasses.replace(plan.config.forecast, **law))
        evals = [main_evals(run, plan_path, (method_dir / "main").resolve()), run / "eval.json"]
        rows = backtest_run(plan, method_dir, evals)
        results[method_dir.name] = {"versions": rows, "blend": summary(rows),
                                    "per_corpus": {c: summary(rows, c) for c in plan.corpus_names}}
    seg = [r["blend"]["segments"] for r in results.values()]
    every = [row["targets"][BLEND]["calibrated"] for r in results.values() for row in r["versions"].values()
             if "refused" not in row["targets"][BLEND]["calibrated"]]
    result = {
        "benchmark": "forecast_accuracy",
        "run_dir": str(run),
        "annealing_momentum": args.annealing_momentum,
        "version_curves": args.version_curves,
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
        "by_method_and_shape": by_method_and_shape(results),
        "calibration": {"coverage_1sd": calibration(every),
                        "mean_abs_error": float(np.mean([e["rel_error"] for e in every])) if every else None,
                        "releases": len(every),
                        "meaning": "lrpath's (calibrated) blend forecasts of every release it forecast: the share "
                                   "whose measured loss lies within +- 1 sd, and the mean relative error"},
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
            what = f"decay {row['decay_steps']}" if row["method"] == "decay" else f"merge {row['merge_steps']}"
            print(f"  {v} ({what}, fork {row['fork_step']}): actual {t['actual']:.3f} | "
                  + " | ".join(cells))
        for n, s in r["blend"].items():
            if s["mean_rel_error"] is not None:
                print(f"  {n} over {','.join(s['versions'])}: mean {s['mean_rel_error']:.2%} max {s['max_rel_error']:.2%} "
                      f"(abs mean {s['mean_abs_error']:.4f}, max {s['max_abs_error']:.4f}), refused {s['refused']}")
    for law, table in result["by_method_and_shape"].items():
        for k, g in table.items():
            print(f"{law} {k}: {g['releases']} releases, mean {g['mean_rel_error']:.2%} max {g['max_rel_error']:.2%}, "
                  f"within 1 sd {g['coverage_1sd']:.0%}")
    cal = result["calibration"]
    if cal["releases"]:
        print(f"all: {cal['releases']} releases, mean {cal['mean_abs_error']:.2%}, within 1 sd {cal['coverage_1sd']:.0%}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
