"""Forecasts of a plan's releases before they train, from the validation losses of what trained so far
(:mod:`lrpath_megatron.observations`), and the choice of a decay_steps: auto release made from them.

Each observation is placed in the version whose data it follows: a main-path point in the segment
(start, end] of version ``v`` and any point of ``v``'s branch belong to ``v``, with areas counted from the
segment's start (the data switch; see :class:`forecast.Curve`).

Targets: per version its evaluation blend (the mean loss over the corpora of D_1..D_v: what the version
must know), and every corpus alone. A release is forecast from the main path's LR up to its fork and its
branch's LR after, for the configured decay and for candidate lengths and shapes; the shortest candidate
whose forecast is within ``tolerance`` of the longest one's is marked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lrpath_megatron import plan_decisions
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.forecast import Curve, ForecastError, LawConfig, fit_law
from lrpath_megatron.observations import Observation, known_before, observations
from lrpath_megatron.plan import Plan
from lrpath_megatron.plan.auto_decay import AUTO_DECAY_FRACTIONS
from lrpath_megatron.schedules import BRANCH_SHAPES
from lrpath_megatron.status import release_status

BLEND = "blend"  # the target: each version's evaluation blend


@dataclass(frozen=True)
class ForecastConfig:
    law: LawConfig = field(default_factory=LawConfig)
    tolerance: float = 0.005  # relative: a decay this close to the longest candidate's forecast is enough
    fractions: tuple = AUTO_DECAY_FRACTIONS  # candidate decays, of the version's steps
    shapes: tuple = ()  # candidate shapes beside each release's own

    def validate(self) -> "ForecastConfig":
        if not 0 < self.tolerance < 1:
            raise LrpathError(f"--tolerance {self.tolerance}: give a fraction in (0, 1), e.g. 0.005")
        bad = [s for s in self.shapes if s not in BRANCH_SHAPES]
        if bad:
            raise LrpathError(f"--shapes {','.join(bad)}: choose from {', '.join(BRANCH_SHAPES)}")
        return self


def path_lrs(plan: Plan, name: str, end: int) -> np.ndarray:
    """The LR of updates 0..end-1 of path ``name``: the main path's before its fork."""
    spec = plan.path(name)
    return variant_lrs(plan, spec.fork_step, end, spec.lr)


def variant_lrs(plan: Plan, fork: int, end: int, lr) -> np.ndarray:
    """The LR of updates 0..end-1 of a branch with schedule ``lr`` leaving the main path at ``fork``."""
    main = plan.path("main")
    return np.array([main.lr(i) if i < fork else lr(i) for i in range(end)])


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


def forecast_release(fit, plan: Plan, index: int) -> tuple[float, float]:
    v = plan.versions[index]
    return fit.predict(path_lrs(plan, v.name, v.branch_end), v.start_step, v.name)


def forecast_decays(fit, plan: Plan, index: int, lengths, shape: Optional[str] = None) -> dict:
    """Per decay length version ``index`` may take (in ``shape``): (loss, sd, branch steps); lengths the
    plan does not allow are left out."""
    v, out = plan.versions[index], {}
    for n in lengths:
        variant = plan.decay_variant(v.name, n, shape)
        if variant is not None:
            fork, end, lr = variant
            out[n] = (*fit.predict(variant_lrs(plan, fork, end, lr), v.start_step, v.name), end - fork)
    return out


def candidates(fit, plan: Plan, index: int, config: ForecastConfig) -> list[dict]:
    """Forecasts for candidate decays of version ``index``; per shape, the shortest within tolerance is
    marked ``enough``."""
    v = plan.versions[index]
    lengths = sorted({max(2, round(f * v.steps)) for f in config.fractions} | {v.release.decay_steps})
    rows = []
    for shape in dict.fromkeys([v.release.shape, *config.shapes]):
        shape_rows = [{"shape": shape, "decay_steps": n, "branch_steps": own, "loss": loss, "sd": sd, "enough": False}
                      for n, (loss, sd, own) in forecast_decays(fit, plan, index, lengths, shape).items()]
        if shape_rows:
            longest = max(shape_rows, key=lambda r: r["decay_steps"])["loss"]
            next(r for r in shape_rows if r["loss"] <= longest * (1 + config.tolerance))["enough"] = True
        rows += shape_rows
    return rows


def backtest(plan: Plan, obs: list[Observation], index: int, target: str = BLEND) -> tuple[float, float]:
    """The forecast of version ``index``'s release from what was known before its branch started."""
    known = known_before(plan, obs, plan.versions[index].release.step)
    return forecast_release(fit_law(curves_for(plan, known, target, index)), plan, index)


def release_loss(plan: Plan, obs: list[Observation], index: int) -> Optional[dict]:
    """The measured per-corpus validation loss of version ``index``'s release, if observed."""
    v = plan.versions[index]
    return next((o.per_corpus for o in obs if o.path == v.name and o.step == v.branch_end), None)


def choose_decay(plan: Plan, name: str, run_dir: Path, config: ForecastConfig = ForecastConfig()) -> dict:
    """The decay length of version ``name`` (decay_steps: auto): among its candidates the shortest whose
    forecast is within ``config.tolerance`` of the longest's, from what the choice reads
    (plan_decisions.choice_inputs); without a fit (the first version: no finished decay yet), the longest,
    with the reason. Made once, when all its inputs exist (otherwise refused, nothing recorded), recorded
    in ``RUN/<name>/decay_choice.json`` and reused."""
    base = plan_decisions.with_choices(plan, run_dir)  # earlier auto branches as they were trained
    if name not in base.decay_candidates:
        return base.auto_decays[name].choice
    inputs = plan_decisions.choice_inputs(base, run_dir, name)
    plan_decisions.require_inputs(inputs, name)
    index = next(v.index for v in base.versions if v.name == name)
    lengths = list(base.decay_candidates[name])
    choice = {"version": name, "decay_steps": lengths[-1], "plan_hash": base.plan_hash(),
              "bounds": list(base.auto_decays[name].bounds), "lengths": lengths, **inputs.record(),
              "tolerance": config.tolerance}
    try:
        fit = fit_law(curves_for(base, inputs.observations, BLEND, index), config.law)
        predicted = forecast_decays(fit, base, index, lengths)
        if set(predicted) != set(lengths):  # every candidate is one the plan allows (Plan._screen)
            raise LrpathError(f"version {name}: no forecast of decay lengths {sorted(set(lengths) - set(predicted))}")
        longest = predicted[lengths[-1]][0]
        pick = next(n for n in lengths if predicted[n][0] <= longest * (1 + config.tolerance))
        choice.update(decay_steps=pick, predicted_loss=predicted[pick][0], predicted_sd=predicted[pick][1],
                      fit=fit.to_dict(), candidates=[{"decay_steps": n, "loss": x, "sd": sd}
                                                     for n, (x, sd, _) in predicted.items()])
    except ForecastError as exc:
        choice["no_forecast"] = f"{exc}; the longest allowed decay is taken"
    plan_decisions.write(run_dir, name, choice)
    return choice


def forecast_plan(plan: Plan, run_dir: Path, config: ForecastConfig = ForecastConfig(),
                  eval_files: list = ()) -> dict:
    """Per decay release not released yet: per target (the version's blend, each corpus) the fit, the
    forecast of the configured decay and, for the blend, the candidates; or why there is no fit. Per
    release whose decay a forecast chose (decay_steps: auto): that forecast, and its error once released."""
    if not Path(run_dir).is_dir():
        raise LrpathError(f"no run at {run_dir}: nothing trained there to forecast from")
    plan = plan_decisions.with_choices(plan, run_dir)
    obs = observations(plan, run_dir, eval_files)
    corpora = plan.corpus_names
    out = {"plan": plan.source, "run_dir": str(run_dir), "observations": len(obs), "tolerance": config.tolerance,
           "law": "L = L0_v + A_v * S1^-alpha - C * S2 (areas from version v's segment start)",
           "releases": []}
    for v in plan.versions:
        released = release_status(plan, run_dir, v.name).released
        row = {"version": v.name, "method": v.release.method, "released": released,
               "decay_steps": v.release.decay_steps, "shape": v.release.shape, "targets": {}}
        auto = plan.auto_decays.get(v.name)
        if auto is not None and auto.choice is not None:
            row["decay_choice"] = dict(auto.choice)
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
