"""One self-contained HTML page per plan run: what a team reads after each release.

Sections: the version tree with the LR paths (forks, decays, merges, blend switches: :func:`plan_plot.draw_plan`),
loss curves per path, validation loss per release and corpus (forgetting of older corpora shows as a rising
column), tokens and FLOPs per release and cumulatively beside PTFS and CPT, per release the forecast
from what was known before its branch started against its measured loss, and the release x task table of
downstream scores (plan.evaluate). Images are inline PNGs (base64):
the page is one file to mail or archive.
"""
from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

from lrpath_megatron.downstream.table import HEAD as DOWNSTREAM_HEAD, downstream_rows, table_cells
from lrpath_megatron.forecast import ForecastError
from lrpath_megatron.metrics import read_metrics
from lrpath_megatron.plan import Plan
from lrpath_megatron.plan.costs import span
from lrpath_megatron.plan_decisions import with_choices
from lrpath_megatron.plan_plot import draw_plan
from lrpath_megatron.release_forecast import (
    BLEND, ForecastConfig, backtest, forecast_plan, observations, release_loss, seen_corpora)
from lrpath_megatron.run_layout import RunLayout
from lrpath_megatron.status import release_status


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list, rows: list) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    return ("<table><tr>" + cells("th", head) + "</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
            + "</table>")


def _tree_image(plan: Plan) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return base64.b64encode(draw_plan(plan, Path(tmp) / "tree.png").read_bytes()).decode()


def _loss_image(plan: Plan, run_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for spec in plan.paths():
        records = read_metrics(RunLayout(run_dir).path(spec.name))
        train = [(r["step"] + 1, r["loss"]) for r in records if r.get("loss") is not None]
        val = [(r["step"] + 1, r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if train:
            line, = ax.plot(*zip(*train), lw=1, alpha=0.6, label=f"{spec.name} train")
            if val:
                ax.plot(*zip(*val), marker="o", ms=3, color=line.get_color(), label=f"{spec.name} val")
    for v in plan.versions:
        ax.axvline(v.end_step, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss per path (val: mean over all corpora)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _forecast_rows(plan: Plan, run_dir: Path, obs: list, forecasts: dict) -> tuple[list, list]:
    """(table rows, (version, predicted, sd, actual) for the plot) per release. ``forecasts``: the rows of
    :func:`forecast_plan` by version."""
    rows, points = [], []
    for v in plan.versions:
        actual_pc = release_loss(plan, obs, v.index)
        seen = seen_corpora(plan, v.index)
        actual = sum(actual_pc[c] for c in seen) / len(seen) if actual_pc and all(c in actual_pc for c in seen) else None
        choice = forecasts[v.name].get("decay_choice", {})
        if "predicted_loss" in choice:
            pred, sd = choice["predicted_loss"], choice["predicted_sd"]
            note = f"{'measured' if choice.get('measured') else 'made'} at launch: {_chosen(choice)}"
        elif release_status(plan, run_dir, v.name).released:
            try:
                pred, sd = backtest(plan, obs, v.index)
                note = "from data before its fork"
            except ForecastError as exc:
                pred, sd, note = None, None, str(exc)
        else:
            target = forecasts[v.name]["targets"].get(BLEND, {})
            pred, sd, note = target.get("loss"), target.get("sd"), target.get("refused", "pending")
        err = f"{(pred - actual) / actual:+.2%}" if pred is not None and actual is not None else "-"
        rows.append([v.name, f"{pred:.4f} ± {sd:.4f}" if pred is not None else note,
                     note if pred is not None else "-", f"{actual:.4f}" if actual is not None else "-", err])
        if pred is not None:
            points.append((v.name, pred, sd, actual))
    return rows, points


def _chosen(choice: dict) -> str:
    """An auto release's recorded choice in words."""
    if "method" not in choice:
        return f"decay_steps auto -> {choice['decay_steps']}"
    return "method auto -> " + (f"merge over {choice['window_steps']} steps" if choice["method"] == "merge" else
                                f"decay of {choice['decay_steps']} steps")


def _choice_section(forecasts: dict, actual: dict) -> list:
    """Per auto release that chose: what it chose, every candidate it weighed (forecast, cost beyond the main
    path) and its forecast beside the measured loss."""
    parts = []
    for name, row in forecasts.items():
        choice = row.get("decay_choice")
        if not choice:
            continue
        measured = actual.get(name)
        said = (f"{'measured when chosen' if choice.get('measured') else 'forecast'} {choice['predicted_loss']:.4f}"
                f" ± {choice['predicted_sd']:.4f}, measured "
                + (f"{measured:.4f} ({(choice['predicted_loss'] - measured) / measured:+.2%})" if measured else "-")
                if "predicted_loss" in choice else "")
        if "no_forecast" in choice:
            said = f"{said}; {html.escape(choice['no_forecast'])}" if said else html.escape(choice["no_forecast"])
        parts.append(f"<h3>{html.escape(name)}: {html.escape(_chosen(choice))}</h3><p>{said}; chosen from the run "
                     f"up to step {choice.get('observations_up_to_step')} (tolerance "
                     f"{choice.get('tolerance', 0):.1%}).</p>")
        cands = choice.get("candidates", [])
        parts.append(_table(["method", "steps", "forecast (merges: measured)", "cost (steps beyond the main path)",
                             "chosen"], [
            [c.get("method", "decay"), c.get("decay_steps", c.get("window_steps")),
             f"{c['loss']:.4f}" + ("" if c.get("measured") else f" ± {c['sd']:.4f}")
             + (" (not weighed: too uncertain)" if c.get("too_uncertain") else ""),
             c.get("cost_steps", "-"), "yes" if c.get("choice", c.get("decay_steps") == choice["decay_steps"]) else ""]
            for c in cands]) if cands else "")
    return (["<h2>Release method choice</h2>", "<p>Releases with decay_steps: auto or method: auto. method: auto weighs "
             "each merge window at its measured loss and each decay at its forecast plus one standard deviation, and "
             "takes the cheapest within the tolerance of the lowest.</p>", *parts]
            if parts else [])


def _forecast_image(points: list) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(points))
    ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], fmt="o", capsize=4, label="forecast")
    ax.plot([x for x, p in zip(xs, points) if p[3] is not None], [p[3] for p in points if p[3] is not None],
            "k*", ms=11, label="measured")
    ax.set_xticks(list(xs), [p[0] for p in points])
    ax.set_ylabel("val loss (version's blend)")
    ax.set_title("forecast vs measured per release")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def write_report(plan: Plan, run_dir: Path, out: Path, eval_files: list = ()) -> Path:
    run_dir = Path(run_dir)
    plan = with_choices(plan, run_dir)  # decay_steps: auto releases as their branches chose
    obs = observations(plan, run_dir, eval_files)
    corpora = plan.corpus_names
    costs = plan.costs()
    forecasts = {r["version"]: r for r in forecast_plan(plan, run_dir, ForecastConfig(), eval_files)["releases"]}

    loss_rows = []
    for v in plan.versions:
        pc = release_loss(plan, obs, v.index)
        loss_rows.append([v.name, v.release.method] + [f"{pc[c]:.4f}" if pc and c in pc else "-" for c in corpora])
    gflop = 1e9
    count, ratio = "{:,.0f}".format, "{:.3f}".format
    cost_rows = [[r["name"], span(r["tokens"], count),
                  span([t * costs["flops_per_token"] / gflop for t in r["tokens"]], "{:,.1f}".format),
                  span(r["cumulative_tokens"], count), f"{r['ptfs_cumulative_tokens']:,}",
                  f"{r['cpt_cumulative_tokens']:,}", span(r["cumulative_ratio_vs_ptfs"], ratio),
                  span(r["cumulative_ratio_vs_cpt"], ratio)] for r in costs["versions"]]
    f_rows, points = _forecast_rows(plan, run_dir, obs, forecasts)
    actual = {name: a for name, _, _, a in points}
    parts = [
        f"<h1>{html.escape(Path(plan.source).name or 'plan')}: run report</h1>",
        f"<p>run directory {html.escape(str(run_dir))}, plan hash {costs['plan_hash']}, "
        f"{costs['tokens_per_step']:,} tokens per step; total {span(costs['total_tokens'], count)} tokens = "
        f"{span(costs['cost_ratio_vs_ptfs'], ratio)} x PTFS, {span(costs['cost_ratio_vs_cpt'], ratio)} x CPT.</p>",
        "<h2>Version tree and LR paths</h2>", _img(_tree_image(plan), "version tree"),
        "<h2>Loss per path</h2>", _img(_loss_image(plan, run_dir), "loss curves"),
        "<h2>Validation loss per release and corpus</h2>",
        "<p>Rows: releases in order; a corpus's column rising in later rows is forgetting.</p>",
        _table(["release", "method", *corpora], loss_rows),
        "<h2>Tokens and FLOPs</h2>",
        "<p>Per release the tokens its branch adds beyond the main path; cumulative: everything trained when "
        "it is released, beside PTFS (each version from scratch on D_1..D_v) and CPT (each from the previous "
        "release on D_v).</p>",
        _table(["release", "branch tokens", "branch GFLOP", "cumulative tokens", "PTFS cumulative",
                "CPT cumulative", "vs PTFS", "vs CPT"], cost_rows),
        "<h2>Forecast vs actual</h2>",
        "<p>Validation loss on each version's blend (mean over the corpora of D_1..D_v). Released versions: "
        "the forecast the law gives from the observations made before the branch started; pending ones: the "
        "forecast from everything so far (`lrpath forecast` lists candidate decays).</p>",
        _table(["release", "forecast", "basis", "measured", "error"], f_rows),
    ]
    if points:
        parts.append(_img(_forecast_image(points), "forecast vs measured"))
    parts += _choice_section(forecasts, actual)
    downstream = downstream_rows(plan, run_dir)
    if downstream:
        parts += ["<h2>Downstream tasks per release</h2>",
                  "<p>Each release's score on the plan's tasks (lm-evaluation-harness, ± its standard error), the "
                  "change vs the previous release and vs PTFS of the same version where it was evaluated; a release "
                  "the gate held is marked, with the evidence, and was not exported.</p>",
                  _table(DOWNSTREAM_HEAD, table_cells(downstream))]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrpath report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
