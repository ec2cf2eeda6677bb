"""What a finished version-update benchmark run says, beside the per-version numbers run.py gathers: the
method: auto arms' summary, the backtest of every release's forecast, the Markdown table and the plot."""
from __future__ import annotations

from pathlib import Path

def auto_summary(methods: dict, run: Path) -> dict:
    """For a method: auto arm: its cost and gaps vs PTFS, and how well the forecasts it chose by held (a
    measured merge is no forecast): the share of releases whose measured loss lies within the forecast's
    +- 1 sd, and the mean relative error. ``calibration``: the same over every release of every switch arm of
    the run, backtested as benchmarks/forecast_accuracy.py does (lrpath's calibrated law, from what was known
    before the release), overall and per method and shape."""
    arms = [n for n, r in methods.items() if (r["release"] or {}).get("method") == "auto"]
    if not arms:
        return {}

    def calibration(told: list) -> dict:
        out = {"releases": len(told)}
        if told:
            inside = [abs(c["predicted_loss"] - c["measured_loss"]) <= c["predicted_sd"] for c in told]
            out.update(coverage_1sd=sum(inside) / len(told),
                       mean_abs_error=sum(abs(c["relative_error"]) for c in told) / len(told))
        return out

    def arm(name: str) -> dict:
        row = methods[name]
        return {"method": name, "first_release": row["first_release"], "cost_vs_ptfs": row["cost_ratio_vs_ptfs"],
                "max_gap_vs_ptfs": row["max_relative_gap_vs_ptfs"],
                "mean_gap_vs_ptfs": row["mean_relative_gap_vs_ptfs"],
                "min_annealing_gain_vs_main": row.get("min_annealing_gain_vs_main"),
                "chosen": {n: {k: v["decay_choice"][k] for k in ("method", "decay_steps", "window_steps", "measured")}
                           for n, v in row["versions"].items() if "decay_choice" in v},
                "calibration": calibration([v["decay_choice"] for v in row["versions"].values()
                                            if "predicted_loss" in v.get("decay_choice", {})
                                            and not v["decay_choice"]["measured"]])}

    # "auto": every release method: auto; further arms (the first release written) beside it.
    every = [n for n in arms if methods[n]["first_release"] is None] or arms
    return {"auto": arm(every[0]), "auto_arms": [arm(n) for n in arms], "calibration": backtest(run)}


def backtest(run: Path) -> dict:
    """Every release of every switch arm of ``run`` forecast from what was known before it (lrpath's
    calibrated law; forecast_accuracy.py): the share within +- 1 sd and the mean relative error, over all and
    per method and shape."""
    import forecast_accuracy as fa
    from lrpath_megatron.plan import load_plan
    from lrpath_megatron.plan_decisions import with_choices

    results = {}
    for method_dir in sorted((run / "switch").iterdir()):
        plan_path = run / "plans" / f"{method_dir.name}.yaml"
        plan = with_choices(load_plan(plan_path), method_dir)
        evals = [fa.main_evals(run, plan_path, (method_dir / "main").resolve()), run / "eval.json"]
        results[method_dir.name] = {"versions": fa.backtest_run(plan, method_dir, evals)}
    every = [row["targets"][fa.BLEND]["calibrated"] for r in results.values() for row in r["versions"].values()
             if "refused" not in row["targets"][fa.BLEND]["calibrated"]]
    return {"releases": len(every), "coverage_1sd": fa.calibration(every),
            "mean_abs_error": sum(e["rel_error"] for e in every) / len(every) if every else None,
            "by_method_and_shape": fa.by_method_and_shape(results)["calibrated"],
            "meaning": "every release of every switch arm, forecast by lrpath's calibrated law from what was known "
                       "before its fork or merge (a method: auto release chooses a merge by its measurement)"}


def choice_summary(choice: dict, measured: float) -> dict:
    """A forecast's choice beside the release's measured loss (the seen-data mean of `lrpath eval`)."""
    out = {"method": choice.get("method", "decay"), "decay_steps": choice["decay_steps"],
           "window_steps": choice.get("window_steps")}
    if "candidates" in choice and "method" in choice:  # method: auto: what it chose among
        out["candidates"] = choice["candidates"]
    out["measured"] = bool(choice.get("measured"))  # a merge chosen by its measurement, not a forecast
    if "predicted_loss" in choice:
        out.update(predicted_loss=choice["predicted_loss"], predicted_sd=choice["predicted_sd"],
                   measured_loss=measured, relative_error=(choice["predicted_loss"] - measured) / measured)
    if "no_forecast" in choice:
        out["no_forecast"] = choice["no_forecast"]
    return out


def table(result: dict) -> str:
    corpora = result["increments"]
    head = ["method", "version", "cost vs PTFS (cum.)", *[f"loss {c}" for c in corpora], "seen mean", "gap vs PTFS",
            "gain vs main path"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["methods"].items():
        for vname, v in row["versions"].items():
            gain = v.get("annealing_gain_vs_main")
            cells = [name, vname, f"{v['cumulative_cost_vs_ptfs_total']:.3f}",
                     *[f"{v['val_loss'][c]:.3f}" for c in corpora], f"{v['val_loss_seen']:.3f}",
                     f"{v['gap_vs_ptfs']:+.3f} ({v['relative_gap_vs_ptfs']:+.1%})",
                     "-" if gain is None else f"{gain:+.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | tokens | cost ratio vs PTFS | mean gap | max gap | comparable |", "|---|---|---|---|---|---|"]
    for name, row in result["methods"].items():
        lines.append(f"| {name} | {row['tokens']:,} | {row['cost_ratio_vs_ptfs']:.3f} | "
                     f"{row['mean_relative_gap_vs_ptfs']:+.2%} | {row['max_relative_gap_vs_ptfs']:+.2%} | "
                     f"{'yes' if row['comparable_to_ptfs'] else 'no'} |")
    chosen = [(name, vname, v["decay_choice"]) for name, row in result["methods"].items()
              for vname, v in row["versions"].items() if "decay_choice" in v]
    if chosen:
        lines += ["", "| method | version | chosen (steps) | forecast (merges: measured at the choice) | measured "
                  "by the benchmark | error |", "|---|---|---|---|---|---|"]
        for name, vname, c in chosen:
            said = (f"{c['predicted_loss']:.3f}" + (" (measured)" if c["measured"] else f" ± {c['predicted_sd']:.3f}")
                    if "predicted_loss" in c else "none (too little data)")
            told = (f"{said} | {c['measured_loss']:.3f} | {c['relative_error']:+.2%}" if "predicted_loss" in c
                    else f"{said} | | ")
            what = f"merge {c['window_steps']}" if c["method"] == "merge" else f"decay {c['decay_steps']}"
            lines.append(f"| {name} | {vname} | {what} | {told} |")
    cal = result.get("calibration")
    if cal and cal["releases"]:
        lines += ["", f"Backtest of every release of the run ({cal['releases']}, calibrated law, from what was known "
                  f"before each): mean error {cal['mean_abs_error']:.2%}, within +- 1 sd {cal['coverage_1sd']:.0%}", "",
                  "| method, shape | releases | mean error | max error | within 1 sd |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {g['releases']} | {g['mean_rel_error']:.2%} | {g['max_rel_error']:.2%} | "
                  f"{g['coverage_1sd']:.0%} |" for k, g in cal["by_method_and_shape"].items()]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    others = [n for n, r in result["methods"].items() if r["kind"] in ("switch", "main")]
    for name, row in result["methods"].items():
        xs = [v["cumulative_cost_vs_ptfs_total"] for v in row["versions"].values()]
        ys = [v["val_loss_seen"] for v in row["versions"].values()]
        if row["kind"] in ("ptfs", "cpt"):
            style = dict(color="black" if row["kind"] == "ptfs" else "tab:red", lw=2.5)
        else:  # one colour per method; dashed: main path on new data only; dotted: no release (main itself)
            style = dict(color=plt.cm.tab20(others.index(name) % 20), lw=1.2,
                         ls=":" if row["kind"] == "main" else "--" if row["main"] == "new" else "-")
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({row['cost_ratio_vs_ptfs']:.2f})", **style)
    ax.set_xlabel("cumulative training tokens / PTFS total (each point: a released version)")
    ax.set_ylabel("val loss on the increments seen so far (mean)")
    n = result["parameters"]
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
    ax.set_title(f"version updates, {size}-parameter GPT, {result['device']}")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
