"""Forecasts of a plan's releases before they train, from the validation losses of what trained so far
(:mod:`lrpath_megatron.observations`), and the choice of a decay_steps: auto release made from them.

Each observation is placed in the version whose data it follows: a main-path point in the segment
(start, end] of version ``v`` and any point of ``v``'s branch belong to ``v``, with areas counted from the
segment's start (the data switch; see :class:`forecast.Curve`).

Targets: per version its evaluation blend (the mean loss over the corpora of D_1..D_v: what the version
must know), and every corpus alone. A decay release is forecast from the main path's LR up to its fork and
its branch's LR after, for the configured decay and for candidate lengths and shapes; the shortest candidate
whose forecast is within ``tolerance`` of the longest one's is marked. A merge release (WSM) is forecast as
the decay it emulates (:func:`merge_lrs`), for its window and for candidate windows; the lowest is marked.
Merged releases already measured are observations like finished branches (for a plan of merges only, they
are what the annealing term is fitted to).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lrpath_megatron import plan_decisions
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.config import ConfigError
from lrpath_megatron.forecast import Curve, ForecastError, LawConfig, fit_law
from lrpath_megatron.merge_weights import merge_save_steps, merge_weights
from lrpath_megatron.observations import Observation, known_before, observations
from lrpath_megatron.plan import Plan
from lrpath_megatron.plan.auto_decay import AUTO_DECAY_FRACTIONS, AUTO_MERGE
from lrpath_megatron.schedules import BRANCH_SHAPES
from lrpath_megatron.status import release_status

BLEND = "blend"  # the target: each version's evaluation blend
# What a decay release is compared with when merges are candidates too (``--methods``), and the reverse:
# the WSM setting of the CPU benchmark, and the default decay shape.
MERGE_CANDIDATE = AUTO_MERGE
DECAY_CANDIDATE_SHAPE = "cosine"
RELEASE_METHODS = ("decay", "merge")


@dataclass(frozen=True)
class ForecastConfig:
    tolerance: float = 0.005  # relative: a decay this close to the longest candidate's forecast is enough
    # method: auto: a decay forecast whose deviation exceeds this share of the loss cannot choose against a
    # measured merge (on the converged CPU run, forecasts with sd 9-16% erred by 10-17%; those with 2-3%, by <1%)
    max_sd: float = 0.05
    fractions: tuple = AUTO_DECAY_FRACTIONS  # candidate decays, of the version's steps
    shapes: tuple = ()  # candidate shapes beside each release's own
    methods: tuple = ()  # candidate release methods beside each release's own

    def validate(self) -> "ForecastConfig":
        if not 0 < self.tolerance < 1:
            raise LrpathError(f"--tolerance {self.tolerance}: give a fraction in (0, 1), e.g. 0.005")
        bad = [s for s in self.shapes if s not in BRANCH_SHAPES]
        if bad:
            raise LrpathError(f"--shapes {','.join(bad)}: choose from {', '.join(BRANCH_SHAPES)}")
        bad = [m for m in self.methods if m not in RELEASE_METHODS]
        if bad:
            raise LrpathError(f"--methods {','.join(bad)}: choose from {', '.join(RELEASE_METHODS)}")
        return self


def law_config(plan: Plan) -> LawConfig:
    """The annealing law as the plan sets it (plan.forecast): every forecast of its releases fits this one."""
    momentum = plan.config.forecast.annealing_momentum
    return LawConfig() if momentum is None else LawConfig(momentum=momentum)


def curve_origin(plan: Plan, index: int) -> int:
    """The step version ``index``'s curves count their areas from (plan.forecast.version_curves)."""
    return 0 if plan.config.forecast.version_curves == "continue" else plan.versions[index].start_step


def path_lrs(plan: Plan, name: str, end: int) -> np.ndarray:
    """The LR of updates 0..end-1 of path ``name``: the main path's before its fork."""
    spec = plan.path(name)
    return variant_lrs(plan, spec.fork_step, end, spec.lr)


def variant_lrs(plan: Plan, fork: int, end: int, lr) -> np.ndarray:
    """The LR of updates 0..end-1 of a branch with schedule ``lr`` leaving the main path at ``fork``."""
    main = plan.path("main")
    return np.array([main.lr(i) if i < fork else lr(i) for i in range(end)])


def merge_lrs(plan: Plan, save_steps, weights: str) -> np.ndarray:
    """The LR of updates 0..last-1 that a merge of the main path's checkpoints at ``save_steps`` emulates
    (lrpath_megatron.merge_weights): the main path's up to the first checkpoint, then the updates into
    checkpoint j at the main path's LR times the multiplier w_j."""
    steps = sorted(save_steps)
    multipliers = merge_weights(weights, len(steps)).multipliers
    lrs = path_lrs(plan, "main", steps[-1])
    for j, w in enumerate(multipliers, start=1):
        lrs[steps[j - 1]:steps[j]] *= w
    return lrs


def release_lrs(plan: Plan, index: int) -> np.ndarray:
    """The LR of every update up to version ``index``'s release: its branch's, or the decay its merge emulates."""
    v = plan.versions[index]
    if v.release.method == "merge":
        return merge_lrs(plan, v.release.merge["save_steps"], v.release.merge["weights"])
    return path_lrs(plan, v.name, v.branch_end)


def merge_windows(plan: Plan, index: int, fractions, num_checkpoints: int, own: Optional[int] = None) -> dict:
    """Per candidate window of a merge of ``num_checkpoints`` main-path checkpoints ending version ``index``'s
    segment (``fractions`` of the version's steps rounded to a multiple of the checkpoint spacing, and
    ``own``): its checkpoint steps; windows that start inside the warmup or before step 0 are left out."""
    v = plan.versions[index]
    k = num_checkpoints - 1
    end = v.release.step if v.release.method == "merge" else v.end_step
    out = {}
    for window in sorted({max(k, round(f * v.steps / k) * k) for f in fractions} | ({own} if own else set())):
        try:
            out[window] = merge_save_steps(end, window, k + 1, plan.warmup_steps)
        except ConfigError:
            continue
    return out


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
    point (kept to measure what the per-version groups gain under data switches).

    A measured merge is a point of the annealing term only where no decay branch is: a merge is the decay its
    weights emulate only approximately (on the converged CPU run, one merge in the fit moved the next decay's
    forecast by 4%), so beside decays its error is left to the track record of merges (:func:`calibrated`)."""
    curves = []
    by_path: dict = {}
    for o in obs:
        by_path.setdefault(o.path, []).append(o)
    decays_seen = any(v.release.method == "decay" and v.name in by_path for v in plan.versions[: upto + 1])
    for v in plan.versions[: upto + 1]:
        seen = seen_corpora(plan, upto if one_law else v.index)
        main_pts = [(o.step, _target_value(o.per_corpus, target, seen)) for o in by_path.get("main", [])
                    if v.start_step < o.step <= v.end_step]
        if v.release.method == "decay":
            branch_pts = [(o.step, _target_value(o.per_corpus, target, seen)) for o in by_path.get(v.name, [])
                          if o.step > plan.path(v.name).fork_step]
        else:  # the merged release, at the step of its last checkpoint
            branch_pts = [(o.step, _target_value(o.per_corpus, target, seen)) for o in by_path.get(v.name, [])
                          if o.step == v.release.step and not decays_seen]
        for name, pts in (("main", main_pts), (v.name, branch_pts)):
            pts = [(s, x) for s, x in pts if x is not None]
            if pts:
                end = max(s for s, _ in pts)
                lrs = release_lrs(plan, v.index) if name != "main" and v.release.method == "merge" else \
                    path_lrs(plan, name, end)
                curves.append(Curve(name, lrs, [s for s, _ in pts], [x for _, x in pts],
                                    origin=0 if one_law else curve_origin(plan, v.index),
                                    group="" if one_law else v.name))
    return curves


def forecast_release(fit, plan: Plan, index: int) -> tuple[float, float]:
    v = plan.versions[index]
    return fit.predict(release_lrs(plan, index), curve_origin(plan, index), v.name)


def forecast_decays(fit, plan: Plan, index: int, lengths, shape: Optional[str] = None) -> dict:
    """Per decay length version ``index`` may take (in ``shape``): (loss, sd, branch steps); lengths the
    plan does not allow are left out."""
    v, out = plan.versions[index], {}
    for n in lengths:
        variant = plan.decay_variant(v.name, n, shape)
        if variant is not None:
            fork, end, lr = variant
            out[n] = (*fit.predict(variant_lrs(plan, fork, end, lr), curve_origin(plan, index), v.name), end - fork)
    return out


def candidates(fit, plan: Plan, index: int, config: ForecastConfig, record: Optional[dict] = None) -> list[dict]:
    """Forecasts of version ``index``'s candidate releases: decays (lengths per shape; per shape the shortest
    within tolerance of the longest is marked ``enough``) and merges (windows; the lowest is marked), its
    own method's and those of ``config.methods``; those of the release's own kind corrected by its
    ``record`` (:func:`calibrated`). Each has its training cost beyond the main path (``cost_steps``); the
    ``choice`` is the cheapest whose forecast is within tolerance of the lowest (:func:`mark_choice`)."""
    v, record = plan.versions[index], record or {}
    own_kind = release_kind(plan, index)
    methods = dict.fromkeys([v.release.method, *config.methods])
    rows = []
    if "merge" in methods:
        m = v.release.merge if v.release.method == "merge" else MERGE_CANDIDATE
        own = m["save_steps"][-1] - m["save_steps"][0] if "save_steps" in m else None
        merge_rows = merge_candidates(fit, plan, index, merge_windows(plan, index, config.fractions,
                                                                      m["num_checkpoints"], own),
                                      m["weights"], record if own_kind == _kind("merge", m["weights"]) else {})
        if merge_rows:
            min(merge_rows, key=lambda r: r["loss"])["enough"] = True
        rows += merge_rows
    if "decay" in methods:
        own_shape = v.release.shape if v.release.method == "decay" else DECAY_CANDIDATE_SHAPE
        lengths = sorted({max(2, round(f * v.steps)) for f in config.fractions} |
                         ({v.release.decay_steps} if v.release.method == "decay" else set()))
        for shape in dict.fromkeys([own_shape, *config.shapes]):
            shape_rows = decay_candidates(fit, plan, index, lengths, shape,
                                          record if own_kind == _kind("decay", shape) else {})
            if shape_rows:
                longest = max(shape_rows, key=lambda r: r["decay_steps"])["loss"]
                next(r for r in shape_rows if r["loss"] <= longest * (1 + config.tolerance))["enough"] = True
            rows += shape_rows
    return mark_choice(rows, config.tolerance)


def decay_candidates(fit, plan: Plan, index: int, lengths, shape: Optional[str], record: dict) -> list[dict]:
    """One row per decay length the plan allows version ``index`` (in ``shape``), calibrated by ``record``."""
    return [{"method": "decay", "shape": shape, "decay_steps": n, "branch_steps": own, "cost_steps": own,
             "enough": False, "law_loss": loss, **dict(zip(("loss", "sd"), calibrated(loss, sd, record)))}
            for n, (loss, sd, own) in forecast_decays(fit, plan, index, lengths, shape).items()]


def merge_candidates(fit, plan: Plan, index: int, windows: dict, weights: str, record: dict) -> list[dict]:
    """One row per merge window (-> the main-path steps it merges) of version ``index``, calibrated by
    ``record``; a merge trains nothing beyond the main path."""
    v, rows = plan.versions[index], []
    for w, steps in windows.items():
        loss, sd = fit.predict(merge_lrs(plan, steps, weights), curve_origin(plan, index), v.name)
        rows.append({"method": "merge", "shape": _kind("merge", weights), "window_steps": w, "checkpoints": list(steps),
                     "cost_steps": 0, "enough": False, "law_loss": loss,
                     **dict(zip(("loss", "sd"), calibrated(loss, sd, record)))})
    return rows


def mark_choice(rows: list[dict], tolerance: float, by: str = "loss") -> list[dict]:
    """``rows`` with ``choice`` set on the cheapest whose ``by`` (the forecast) is within ``tolerance`` of the
    lowest (ties: the lower one)."""
    if rows:
        best = min(r[by] for r in rows)
        pick = min((r for r in rows if r[by] <= best * (1 + tolerance)), key=lambda r: (r["cost_steps"], r[by]))
        for r in rows:
            r["choice"] = r is pick
    return rows


def backtest(plan: Plan, obs: list[Observation], index: int, target: str = BLEND,
             calibrate: bool = True) -> tuple[float, float]:
    """The forecast of version ``index``'s release from what was known before it started (its branch forked
    or its merge was made); ``calibrate``: corrected by the track record of the plan's earlier releases of
    its kind (:func:`calibrated`)."""
    v = plan.versions[index]
    known = known_before(plan, obs, v.release.step, v.name)
    loss, sd = forecast_release(fit_law(curves_for(plan, known, target, index), law_config(plan)), plan, index)
    return calibrated(loss, sd, track_record(plan, known, index, target)) if calibrate else (loss, sd)


def release_kind(plan: Plan, index: int) -> str:
    """What a release's forecast errors are shared by: the method and its shape (a merge: its weights)."""
    r = plan.versions[index].release
    return _kind("merge", r.merge["weights"]) if r.method == "merge" else _kind("decay", r.shape)


def _kind(method: str, shape: str) -> str:
    return f"{method} {shape}"


def track_record(plan: Plan, known: list[Observation], index: int, target: str = BLEND,
                 kind: Optional[str] = None) -> dict:
    """Per earlier release of the same kind (``kind``, default version ``index``'s) measured in ``known``: its
    forecast's signed relative error (forecast / measured - 1), the law's forecast before calibration: for the
    blend of a release an auto choice made, the one it was chosen by (its record's ``law_loss``); otherwise
    the forecast from what was known before it was made."""
    out, kind = {}, kind or release_kind(plan, index)
    for u in plan.versions[:index]:
        if release_kind(plan, u.index) != kind:
            continue
        measured = _target_value(release_loss(plan, known, u.index) or {}, target, seen_corpora(plan, u.index))
        if measured is None:
            continue
        choice = plan.auto_decays[u.name].choice if u.name in plan.auto_decays else None
        if target == BLEND and choice and "law_loss" in choice:
            out[u.name] = choice["law_loss"] / measured - 1
            continue
        try:
            out[u.name] = backtest(plan, known, u.index, target, calibrate=False)[0] / measured - 1
        except ForecastError:
            continue  # the first release: no decay seen before it
    return out


def calibrated(loss: float, sd: float, record: dict) -> tuple[float, float]:
    """A forecast corrected by the mean signed error of its kind's earlier forecasts (a law's bias on a
    shape or merge repeats from version to version), its deviation widened by their spread (half the one
    error when there is one). Without a record: unchanged."""
    if not record:
        return loss, sd
    errors = np.array(list(record.values()))
    bias = float(errors.mean())
    spread = float(errors.std(ddof=1) / np.sqrt(len(errors))) if len(errors) > 1 else 0.0
    corrected = loss / (1 + bias)
    return corrected, float(np.hypot(sd, corrected * spread))


def release_loss(plan: Plan, obs: list[Observation], index: int) -> Optional[dict]:
    """The measured per-corpus validation loss of version ``index``'s release, if observed."""
    v = plan.versions[index]
    return next((o.per_corpus for o in obs if o.path == v.name and o.step == v.branch_end), None)


def choose_decay(plan: Plan, name: str, run_dir: Path, config: ForecastConfig = ForecastConfig()) -> dict:
    """The release of auto version ``name``, from what the choice reads (plan_decisions.choice_inputs):
    decay_steps: auto takes the shortest decay whose forecast is within ``config.tolerance`` of the longest's;
    method: auto the cheapest candidate, decay or merge, whose forecast (corrected by the track record of its
    kind) is within tolerance of the lowest. Without a fit (the first version: no finished decay yet), the
    longest decay, with the reason. Made once, when all its inputs exist (otherwise refused, nothing
    recorded), recorded in ``RUN/<name>/decay_choice.json`` and reused.

    method: auto with merge candidates chooses at the version's end, with every merge window measured (its job
    made and evaluated each, plan_decisions.measured_merges): a merge's loss is its measurement, a decay's
    the forecast; without a fit, the lowest measured merge (merged constant-LR checkpoints stand in for the
    annealed model, PMA) rather than the longest decay."""
    base = plan_decisions.with_choices(plan, run_dir)  # earlier auto releases as they were made
    if name not in base.decay_candidates:
        return base.auto_decays[name].choice
    inputs = plan_decisions.choice_inputs(base, run_dir, name)
    plan_decisions.require_inputs(inputs, name)
    index, auto = next(v.index for v in base.versions if v.name == name), base.auto_decays[name]
    lengths = list(base.decay_candidates[name])
    choice = {"version": name, "decay_steps": lengths[-1], "plan_hash": base.plan_hash(),
              "bounds": list(auto.bounds), "lengths": lengths, **inputs.record(), "tolerance": config.tolerance}
    if auto.method_auto:
        choice.update(method="decay", window_steps=None, windows=sorted(auto.merges), merge_weights=auto.merge_weights)
    seen = seen_corpora(base, index)
    measured = {w: _target_value(per, BLEND, seen) for w, per in inputs.merges.items()}
    try:
        if measured and not _decay_measured(base, inputs.observations, index):
            raise ForecastError("no decay branch has finished before it, and a decay is not forecast from merges")
        fit = fit_law(curves_for(base, inputs.observations, BLEND, index), law_config(base))
        choice.update(_cheapest(fit, base, index, inputs.observations, config, measured)
                      if auto.method_auto else _shortest_enough(fit, base, index, config.tolerance), fit=fit.to_dict())
    except ForecastError as exc:
        if measured:
            rows = mark_choice(_measured_rows(measured), config.tolerance)
            pick = next(r for r in rows if r["choice"])
            choice.update(method="merge", decay_steps=None, window_steps=pick["window_steps"],
                          predicted_loss=pick["loss"], predicted_sd=0.0, measured=True, candidates=rows,
                          no_forecast=f"{exc}; no decay can be forecast: the lowest measured merge is taken")
        else:
            choice["no_forecast"] = f"{exc}; the longest allowed decay is taken"
    plan_decisions.write(run_dir, name, choice)
    return choice


def _decay_measured(plan: Plan, known: list[Observation], index: int) -> bool:
    """Whether a finished decay branch of an earlier version is among ``known`` (what the law's annealing term
    is fitted to when a merge is measured instead of forecast)."""
    decays = {v.name for v in plan.versions[:index] if v.release.method == "decay"}
    return any(o.path in decays for o in known)


def _measured_rows(measured: dict) -> list[dict]:
    """Candidate rows of measured merge windows (a measurement, no deviation; they train nothing)."""
    return [{"method": "merge", "window_steps": w, "loss": x, "sd": 0.0, "cost_steps": 0, "measured": True}
            for w, x in sorted(measured.items())]


def _shortest_enough(fit, plan: Plan, index: int, tolerance: float) -> dict:
    """decay_steps: auto: the shortest candidate whose forecast is within ``tolerance`` of the longest's."""
    name, lengths = plan.versions[index].name, list(plan.decay_candidates[plan.versions[index].name])
    predicted = forecast_decays(fit, plan, index, lengths)
    if set(predicted) != set(lengths):  # every candidate is one the plan allows (Plan._screen)
        raise LrpathError(f"version {name}: no forecast of decay lengths {sorted(set(lengths) - set(predicted))}")
    longest = predicted[lengths[-1]][0]
    pick = next(n for n in lengths if predicted[n][0] <= longest * (1 + tolerance))
    return {"decay_steps": pick, "predicted_loss": predicted[pick][0], "predicted_sd": predicted[pick][1],
            "law_loss": predicted[pick][0],
            "candidates": [{"decay_steps": n, "loss": x, "sd": sd} for n, (x, sd, _) in predicted.items()]}


def _cheapest(fit, plan: Plan, index: int, known: list[Observation], config: ForecastConfig, measured: dict) -> dict:
    """method: auto: every decay length of the release, each forecast corrected by the track record of decays
    of its shape in ``known``, and every merge window at its measured loss (``measured``: window -> blend;
    the law's forecast of it kept as ``law_loss``); the cheapest within tolerance of the lowest. Beside
    measured merges a decay is weighed at its forecast plus one deviation (``weighed``: what it reaches with
    about 84% probability, against a merge's certain measurement), and not at all where that deviation
    exceeds ``config.max_sd`` of its loss (``too_uncertain``)."""
    v = plan.versions[index]
    auto = plan.auto_decays[v.name]
    rows = decay_candidates(fit, plan, index, auto.candidates, v.release.shape,
                            track_record(plan, known, index, kind=_kind("decay", v.release.shape)))
    if len(rows) != len(auto.candidates):  # every candidate is one the plan allows (Plan._screen)
        raise LrpathError(f"version {v.name}: no forecast of some decay lengths of {list(auto.candidates)}")
    if auto.merges:
        law = {r["window_steps"]: r["law_loss"] for r in merge_candidates(fit, plan, index, auto.merges,
                                                                           auto.merge_weights, {})}
        for r in rows:
            r.update(weighed=r["loss"] + r["sd"], too_uncertain=r["sd"] > config.max_sd * r["loss"])
        rows += [{**r, "shape": _kind("merge", auto.merge_weights), "law_loss": law[r["window_steps"]],
                  "weighed": r["loss"]} for r in _measured_rows(measured)]
    weighed = mark_choice([r for r in rows if not r.get("too_uncertain")], config.tolerance,
                          "weighed" if auto.merges else "loss")
    pick = next(r for r in weighed if r["choice"])
    for r in rows:
        r.setdefault("choice", False)
    return {"method": pick["method"], "decay_steps": pick.get("decay_steps"), "window_steps": pick.get("window_steps"),
            "predicted_loss": pick["loss"], "predicted_sd": pick["sd"], "law_loss": pick["law_loss"],
            "measured": pick.get("measured", False),
            "candidates": [{k: r[k] for k in ("method", "shape", "loss", "sd", "law_loss", "cost_steps", "choice")}
                           | {k: r[k] for k in ("decay_steps", "window_steps", "measured", "weighed", "too_uncertain")
                              if k in r}
                           for r in rows]}


def forecast_plan(plan: Plan, run_dir: Path, config: ForecastConfig = ForecastConfig(),
                  eval_files: list = ()) -> dict:
    """Per release not released yet: per target (the version's blend, each corpus) the fit, the forecast of
    the configured decay or merge and, for the blend, the candidates; or why there is no fit. Per
    release whose decay a forecast chose (decay_steps: auto): that forecast, and its error once released."""
    if not Path(run_dir).is_dir():
        raise LrpathError(f"no run at {run_dir}: nothing trained there to forecast from")
    plan = plan_decisions.with_choices(plan, run_dir)
    obs = observations(plan, run_dir, eval_files)
    corpora = plan.corpus_names
    out = {"plan": plan.source, "run_dir": str(run_dir), "observations": len(obs), "tolerance": config.tolerance,
           "law": "L = L0_v + A_v * S1^-alpha - C * S2 (areas from "
                  + ("step 0" if plan.config.forecast.version_curves == "continue" else "version v's segment start")
                  + f", annealing momentum {law_config(plan).momentum})",
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
        if v.release.method == "merge":
            row["merge"] = {k: v.release.merge[k] for k in ("weights", "num_checkpoints", "save_steps")}
        if released:
            out["releases"].append(row)
            continue
        own_config = config
        if auto is not None and auto.merges and auto.choice is None:  # method: auto, undecided
            row["method_auto"] = True
            own_config = dataclasses.replace(config, methods=tuple(dict.fromkeys((*config.methods, "merge"))))
        for target in [BLEND, *corpora]:
            try:
                fit = fit_law(curves_for(plan, obs, target, v.index), law_config(plan))
                raw = forecast_release(fit, plan, v.index)
                record = track_record(plan, known_before(plan, obs, v.release.step, v.name), v.index, target)
                loss, sd = calibrated(*raw, record)
                row["targets"][target] = {"loss": loss, "sd": sd, "law_loss": raw[0], "law_sd": raw[1],
                                          "track_record": record, "fit": fit.to_dict(),
                                          "candidates": candidates(fit, plan, v.index, own_config, record)
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
        if choice:  # decay_steps: auto or method: auto
            told = (f"{'measured when chosen' if choice.get('measured') else 'forecast'} "
                    f"{choice['predicted_loss']:.4f} ± {choice['predicted_sd']:.4f}"
                    if "predicted_loss" in choice else choice["no_forecast"])
            if "error" in choice:
                told += f", measured {choice['measured_loss']:.4f} (error {choice['error']:+.4f})"
            what = (f"method auto chose a merge over {choice['window_steps']} steps" if choice.get("method") == "merge"
                    else f"{'method' if 'method' in choice else 'decay_steps'} auto chose a decay of "
                         f"{choice['decay_steps']} steps")
            lines.append(f"{r['version']}: {what} at launch: {told}")
        if r["released"]:
            lines.append(f"{r['version']}: released")
            continue
        blend = r["targets"][BLEND]
        if "refused" in blend:
            lines.append(f"{r['version']}: no forecast: {blend['refused']}")
            continue
        what = (f"merge ({r['merge']['weights']}) of main-path steps {', '.join(map(str, r['merge']['save_steps']))}"
                if r["method"] == "merge" else f"{r['shape']} decay of {r['decay_steps']} steps")
        if r.get("method_auto"):
            what = f"method auto, not chosen yet (its shortest {what})"
        lines.append(f"{r['version']}: {what} -> blend val loss {blend['loss']:.4f} ± {blend['sd']:.4f}")
        if blend["track_record"]:
            errors = ", ".join(f"{u} {e:+.2%}" for u, e in blend["track_record"].items())
            lines.append(f"    the law says {blend['law_loss']:.4f} ± {blend['law_sd']:.4f}; corrected by its errors on "
                         f"earlier {r['method']} releases of this kind ({errors})")
        per = [f"{t} {x['loss']:.3f}" for t, x in r["targets"].items() if t != BLEND and "loss" in x]
        if per:
            lines.append("    per corpus: " + ", ".join(per))
        several = len({c["method"] for c in blend["candidates"]}) > 1
        for c in blend["candidates"]:
            if "window_steps" in c:
                what, mark = f"{c['shape']} window {c['window_steps']:>6} steps", "  <- lowest" if c["enough"] else ""
            else:
                what = f"{c['shape']:<9} decay {c['decay_steps']:>6} steps"
                mark = f"  <- shortest within {result['tolerance']:.1%} of the longest" if c["enough"] else ""
            if several and c["choice"]:
                mark += f"  <- choice: the cheapest within {result['tolerance']:.1%} of the lowest"
            lines.append(f"    {what}: {c['loss']:.4f} ± {c['sd']:.4f}, {c['cost_steps']} steps beyond the main "
                         f"path{mark}")
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
            x = [c.get("decay_steps", c.get("window_steps")) for c in cs]
            y = np.array([c["loss"] for c in cs])
            sd = np.array([c["sd"] for c in cs])
            line, = ax.plot(x, y, marker="o", label=f"{r['version']} {shape}")
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15)
            pick = next(c for c in cs if c["enough"])
            ax.plot([pick.get("decay_steps", pick.get("window_steps"))], [pick["loss"]], marker="*", ms=14,
                    color=line.get_color())
    ax.set_xlabel("decay steps (merges: window steps)")
    ax.set_ylabel("forecast val loss (version's blend)")
    ax.set_title("release forecasts (star: shortest decay within tolerance; merges: lowest)")
    if rows:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
