"""Forecasts of a plan's releases before they train, from the validation losses of what trained so far.

Observations: every validation loss in the metrics of the main path and of the branches (``val_loss_per_corpus``
records; the record of step ``s`` is after ``s + 1`` updates), plus ``lrpath eval --json`` results of their
checkpoints. Each observation is placed in the version whose data it follows: a main-path point in the
segment (start, end] of version ``v`` and any point of ``v``'s branch belong to ``v``, with areas counted
from the segment's start (the data switch; see :class:`forecast.Curve`).

Targets: per version its evaluation blend (the mean loss over the corpora of D_1..D_v: what the version
must know), and every corpus alone. A release is forecast from the main path's LR up to its fork and its
branch's LR after, for the configured decay and for candidate lengths and shapes; the shortest candidate
whose forecast is within ``tolerance`` of the longest one's is marked.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lrpath_megatron.config import ConfigError
from lrpath_megatron.forecast import Curve, ForecastError, LawConfig, fit_law
from lrpath_megatron.metrics import read_metrics
from lrpath_megatron.plan import Plan
from lrpath_megatron.run_layout import RunLayout
from lrpath_megatron.status import release_status

BLEND = "blend"  # the target: each version's evaluation blend


@dataclass(frozen=True)
class ForecastConfig:
    law: LawConfig = field(default_factory=LawConfig)
    tolerance: float = 0.005  # relative: a decay this close to the longest candidate's forecast is enough
    fractions: tuple = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)  # candidate decays, of the version's steps
    shapes: tuple = ()  # candidate shapes beside each release's own


@dataclass(frozen=True)
class Observation:
    path: str  # "main" or a version's branch
    step: int  # updates done
    per_corpus: dict


def observations(plan: Plan, run_dir: Path, eval_files: list = ()) -> list[Observation]:
    """Every validation loss of the plan's paths under ``run_dir``: from the metrics and from ``lrpath eval``
    JSON files (checkpoints named by their path under the run directory, symlinks resolved)."""
    layout = RunLayout(Path(run_dir))
    # Merge releases are written under their version's name too.
    names = list(dict.fromkeys([s.name for s in plan.paths()] + [v.name for v in plan.versions]))
    found: dict = {}
    for name in names:
        for r in read_metrics(layout.path(name)):
            if r.get("val_loss_per_corpus"):
                found[(name, r["step"] + 1)] = r["val_loss_per_corpus"]
    roots = {layout.path(n).checkpoints.resolve(): n for n in names}
    for f in eval_files:
        for ckpt, r in json.loads(Path(f).read_text()).items():
            name = roots.get(Path(ckpt).resolve().parent)
            if name is not None:
                found[(name, r["step"])] = r["val_loss_per_corpus"]
    return [Observation(n, s, pc) for (n, s), pc in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def path_lrs(plan: Plan, name: str, end: int) -> np.ndarray:
    """The LR of updates 0..end-1 of path ``name``: the main path's before its fork."""
    spec, main = plan.path(name), plan.path("main")
    return np.array([main.lr(i) if i < spec.fork_step else spec.lr(i) for i in range(end)])


def seen_corpora(plan: Plan, index: int) -> list[str]:
    """The corpora of D_1..D_v (v = ``index``), the version's evaluation blend."""
    return list(dict.fromkeys(c for v in plan.versions[: index + 1] for c in v.corpora))


def _target_value(per_corpus: dict, target: str, seen: list[str]) -> Optional[float]:
    if target == BLEND:
        if not all(c in per_corpus for c in seen):
            return None
        return float(np.mean([per_corpus[c] for c in seen]))
    return per_corpus.get(target)


def curves_for(plan: Plan, obs: list[Observation], target: str, upto: int, one_law: bool = False) -> list[Curve]:
    """Curves of ``target`` for versions 0..``upto``: per version its main-path points and its branch.
    ``one_law``: the paper's form instead, one group from step 0 with the blend of version ``upto`` for every
    point (kept to measure what the per-version groups gain under data switches)."""
    curves = []
    by_path: dict = {}
    for o in obs:
        by_path.setdefault(o.path, []).append(o)
    for v in plan.versions[: upto + 1]:
        seen = seen_corpora(plan, upto if one_law else v.index)
        main_pts = [(o.step, _target_value(o.per_corpus, target, seen)) for o in by_path.get("main", [])
                    if v.start_step < o.step <= v.end_step]
        branch_pts = [(o.step, _target_value(o.per_corpus, target, seen)) for o in by_path.get(v.name, [])
                      if o.step > plan.path(v.name).fork_step] if v.release.method == "decay" else []
        for name, pts in (("main", main_pts), (v.name, branch_pts)):
            pts = [(s, x) for s, x in pts if x is not None]
            if pts:
                lrs = path_lrs(plan, name, max(s for s, _ in pts))
                curves.append(Curve(name, lrs, [s for s, _ in pts], [x for _, x in pts],
                                    origin=0 if one_law else v.start_step, group="" if one_law else v.name))
    return curves


def variant(plan: Plan, index: int, decay_steps: int, shape: Optional[str] = None) -> Plan:
    """``plan`` with version ``index`` released by a decay of ``decay_steps`` (and ``shape``); a changed shape
    drops the settings of the old one. Raises ConfigError where the plan does not allow it."""
    versions = list(plan.config.versions)
    r = versions[index].release
    changes = dict(decay_steps=decay_steps, decay_tokens=None, decay_fraction=None, decay_bounds=None)
    if shape is not None and shape != (r.shape or "cosine"):
        changes.update(shape=shape, stable_fraction=None, drop_points=None, drop_factors=None)
    versions[index] = dataclasses.replace(versions[index], release=dataclasses.replace(r, **changes))
    return Plan(plan.train_config, dataclasses.replace(plan.config, versions=versions), plan.source)


def forecast_release(fit, plan: Plan, index: int) -> tuple[float, float]:
    v = plan.versions[index]
    return fit.predict(path_lrs(plan, v.name, v.branch_end), v.start_step, v.name)


def candidates(fit, plan: Plan, index: int, config: ForecastConfig) -> list[dict]:
    """Forecasts for candidate decays of version ``index``; per shape, the shortest within tolerance is
    marked ``enough``."""
    v = plan.versions[index]
    shapes = list(dict.fromkeys([v.release.shape, *config.shapes]))
    lengths = sorted({max(2, round(f * v.steps)) for f in config.fractions} | {v.release.decay_steps})
    rows = []
    for shape in shapes:
        shape_rows = []
        for n in lengths:
            try:
                alt = variant(plan, index, n, shape)
            except ConfigError:
                continue  # e.g. a tail decay longer than the version's data
            loss, sd = forecast_release(fit, alt, index)
            shape_rows.append({"shape": shape, "decay_steps": n, "branch_steps": alt.versions[index].branch_end
                               - alt.versions[index].release.step, "loss": loss, "sd": sd, "enough": False})
        if shape_rows:
            longest = max(shape_rows, key=lambda r: r["decay_steps"])["loss"]
            enough = next(r for r in shape_rows if r["loss"] <= longest * (1 + config.tolerance))
            enough["enough"] = True
        rows += shape_rows
    return rows


def known_before(plan: Plan, obs: list[Observation], step: int) -> list[Observation]:
    """What exists when a branch forks at main-path ``step``: main-path points up to it and the branches
    that finished by then."""
    ends = {v.name: v.branch_end for v in plan.versions}
    return [o for o in obs if (o.step <= step if o.path == "main" else ends[o.path] <= step)]


def backtest(plan: Plan, obs: list[Observation], index: int, target: str = BLEND) -> tuple[float, float]:
    """The forecast of version ``index``'s release from what was known before its branch started."""
    known = known_before(plan, obs, plan.versions[index].release.step)
    return forecast_release(fit_law(curves_for(plan, known, target, index)), plan, index)


def release_loss(plan: Plan, obs: list[Observation], index: int) -> Optional[dict]:
    """The measured per-corpus validation loss of version ``index``'s release, if observed."""
    v = plan.versions[index]
    return next((o.per_corpus for o in obs if o.path == v.name and o.step == v.branch_end), None)


def choose_decay(plan: Plan, name: str, run_dir: Path, config: ForecastConfig = ForecastConfig()) -> dict:
    """The decay length of version ``name`` (decay_steps: auto): among the plan's candidates the shortest whose
    forecast is within ``config.tolerance`` of the longest's, from the observations made up to the earliest
    candidate fork (so the choice does not depend on when the branch is launched). Without a fit: the
    longest candidate, with the reason. Recorded in ``RUN/<name>/decay_choice.json`` once and reused."""
    record = RunLayout(Path(run_dir)).path(name).decay_choice
    if record.is_file():
        return json.loads(record.read_text())
    base = plan.with_choices(run_dir)  # earlier auto branches as they were trained
    index = next(v.index for v in base.versions if v.name == name)
    lengths = plan.decay_candidates[name]
    variants = {n: base.with_decay(name, n) for n in lengths}
    first_fork = min(p.versions[index].release.step for p in variants.values())
    known = known_before(base, observations(base, run_dir), first_fork)
    choice = {"decay_steps": lengths[-1], "observations_up_to_step": first_fork, "observations": len(known),
              "tolerance": config.tolerance}
    try:
        fit = fit_law(curves_for(base, known, BLEND, index), config.law)
        predicted = {n: forecast_release(fit, variants[n], index) for n in lengths}
        longest = predicted[lengths[-1]][0]
        pick = next(n for n in lengths if predicted[n][0] <= longest * (1 + config.tolerance))
        choice.update(decay_steps=pick, predicted_loss=predicted[pick][0], predicted_sd=predicted[pick][1],
                      fit=fit.to_dict(), candidates=[{"decay_steps": n, "loss": x, "sd": sd}
                                                     for n, (x, sd) in predicted.items()])
    except ForecastError as exc:
        choice["no_forecast"] = f"{exc}; the longest allowed decay is taken"
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")  # every rank writes the same choice
    tmp.write_text(json.dumps(choice, indent=1, sort_keys=True))
    os.replace(tmp, record)
    return choice


def forecast_plan(plan: Plan, run_dir: Path, config: ForecastConfig = ForecastConfig(),
                  eval_files: list = ()) -> dict:
    """Per decay release not released yet: per target (the version's blend, each corpus) the fit, the
    forecast of the configured decay and, for the blend, the candidates; or why there is no fit. Per
    release whose decay a forecast chose (decay_steps: auto): that forecast, and its error once released."""
    plan = plan.with_choices(run_dir)
    obs = observations(plan, run_dir, eval_files)
    corpora = plan.corpus_names
    out = {"plan": plan.source, "run_dir": str(run_dir), "observations": len(obs), "tolerance": config.tolerance,
           "law": "L = L0_v + A_v * S1^-alpha - C * S2 (areas from version v's segment start)",
           "releases": []}
    for v in plan.versions:
        released = release_status(plan, run_dir, v.name).released
        row = {"version": v.name, "method": v.release.method, "released": released,
               "decay_steps": v.release.decay_steps, "shape": v.release.shape, "targets": {}}
        chosen = RunLayout(Path(run_dir)).path(v.name).decay_choice
        if chosen.is_file():
            row["decay_choice"] = json.loads(chosen.read_text())
            measured = release_loss(plan, obs, v.index)
            seen = seen_corpora(plan, v.index)
            if "predicted_loss" in row["decay_choice"] and measured and all(c in measured for c in seen):
                actual = float(np.mean([measured[c] for c in seen]))
                row["decay_choice"].update(measured_loss=actual,
                                           error=row["decay_choice"]["predicted_loss"] - actual)
        if v.release.method != "decay" or released:
            out["releases"].append(row)
            continue
        for target in [BLEND, *corpora]:
            try:
                fit = fit_law(curves_for(plan, obs, target, v.index), config.law)
                loss, sd = forecast_release(fit, plan, v.index)
                row["targets"][target] = {"loss": loss, "sd": sd, "fit": fit.to_dict(),
                                          "candidates": candidates(fit, plan, v.index, config)
                                          if target == BLEND else None}
            except ForecastError as exc:
                row["targets"][target] = {"refused": str(exc)}
        out["releases"].append(row)
    return out


def format_forecast(result: dict) -> str:
    lines = [f"forecast of {result['plan']} from {result['observations']} validation losses in {result['run_dir']}",
             f"law: {result['law']}", ""]
    for r in result["releases"]:
        choice = r.get("decay_choice")
        if choice:  # decay_steps: auto
            told = (f"forecast {choice['predicted_loss']:.4f} ± {choice['predicted_sd']:.4f}"
                    if "predicted_loss" in choice else choice["no_forecast"])
            if "error" in choice:
                told += f", measured {choice['measured_loss']:.4f} (error {choice['error']:+.4f})"
            lines.append(f"{r['version']}: decay_steps auto chose {choice['decay_steps']} steps at launch: {told}")
        if r["method"] != "decay":
            lines.append(f"{r['version']}: released by {r['method']}: nothing to forecast")
            continue
        if r["released"]:
            lines.append(f"{r['version']}: released")
            continue
        blend = r["targets"][BLEND]
        if "refused" in blend:
            lines.append(f"{r['version']}: no forecast: {blend['refused']}")
            continue
        lines.append(f"{r['version']}: {r['shape']} decay of {r['decay_steps']} steps -> blend val loss "
                     f"{blend['loss']:.4f} ± {blend['sd']:.4f}")
        per = [f"{t} {x['loss']:.3f}" for t, x in r["targets"].items() if t != BLEND and "loss" in x]
        if per:
            lines.append("    per corpus: " + ", ".join(per))
        for c in blend["candidates"]:
            mark = f"  <- shortest within {result['tolerance']:.1%} of the longest" if c["enough"] else ""
            lines.append(f"    {c['shape']:<9} decay {c['decay_steps']:>6} steps: {c['loss']:.4f} ± {c['sd']:.4f}{mark}")
    return "\n".join(lines)


def plot_forecast(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["releases"] if "loss" in r["targets"].get(BLEND, {})]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        for shape in dict.fromkeys(c["shape"] for c in r["targets"][BLEND]["candidates"]):
            cs = [c for c in r["targets"][BLEND]["candidates"] if c["shape"] == shape]
            x = [c["decay_steps"] for c in cs]
            y = np.array([c["loss"] for c in cs])
            sd = np.array([c["sd"] for c in cs])
            line, = ax.plot(x, y, marker="o", label=f"{r['version']} {shape}")
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15)
            pick = next(c for c in cs if c["enough"])
            ax.plot([pick["decay_steps"]], [pick["loss"]], marker="*", ms=14, color=line.get_color())
    ax.set_xlabel("decay steps")
    ax.set_ylabel("forecast val loss (version's blend)")
    ax.set_title("release forecasts (star: shortest decay within tolerance)")
    if rows:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
