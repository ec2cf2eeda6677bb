"""The decision record of a decay_steps: auto or method: auto release, ``RUN/<version>/decay_choice.json``
(its decay length, or for method: auto its method and decay length or merge window): what a choice
reads, reading a record back (validated against the plan and the run), writing one atomically, and applying
the recorded choices to a plan. Making a choice is the release forecast's (release_forecast.choose_decay).

A choice reads the run up to its release's ``AutoDecay.choice_step`` (the earliest candidate fork; with merge
candidates, the version's end): the main path's scheduled evaluations up to there, the finished curves of the
earlier branches that end by then (``AutoDecay.reads``; an earlier method: auto release that chose a merge:
the merge's validation loss, which its job measures) and, with merge candidates, every window's merge as its
job measured it (``RUN/<version>/merge_candidates.json``). It is made only once all of that exists, so the
same plan and the same metrics give the same choice whatever order the jobs ran in. The record carries the
plan's hash, the release's bounds and candidates and a digest of the observations it read; a record that
does not match the plan or the run is refused naming what differs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lrpath_megatron.checkpoint.layout import checkpoint_at, find_latest, read_manifest, write_json_atomic
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.observations import digest, known_before, observations, on_schedule
from lrpath_megatron.plan import Plan
from lrpath_megatron.run_layout import RunLayout


@dataclass(frozen=True)
class ChoiceInputs:
    up_to_step: int  # the release's earliest candidate fork
    reads: tuple  # the branches whose finished curves it reads
    observations: list  # list[Observation]
    missing: list  # what must run first, in words (empty: the choice can be made)
    eval_interval: int  # the main path's scheduled evaluations it reads are every so many steps
    merges: dict  # window steps -> the measured merge's validation loss per corpus
    unmeasured: tuple = ()  # merge windows the release's job has still to measure

    def record(self) -> dict:
        """What a record says of its inputs."""
        return {"observations_up_to_step": self.up_to_step, "observations": len(self.observations),
                "eval_interval": self.eval_interval,
                "observations_digest": digest(self.observations), "reads_branches": list(self.reads)}


def record_file(run_dir: Path, name: str) -> Path:
    return RunLayout(Path(run_dir)).path(name).decay_choice


def choice_inputs(plan: Plan, run_dir: Path, name: str) -> ChoiceInputs:
    """What the choice of undecided auto release ``name`` reads in ``run_dir`` (``plan``: with the earlier
    releases' recorded choices applied) and what of it does not exist yet."""
    layout, first = RunLayout(Path(run_dir)), plan.auto_decays[name].choice_step
    reads, missing = plan.auto_decays[name].reads, []
    latest = find_latest(layout.path("main").checkpoints)
    at = read_manifest(latest)["step"] if latest is not None else None
    if at is None or at < first:
        missing.append(f"the main path to step {first} (it is at {'no checkpoint' if at is None else f'step {at}'})")
    found = observations(plan, run_dir)
    releases = {v.name: v.release for v in plan.versions}
    for n in reads:
        if n in plan.decay_candidates:
            missing.append(f"branch {n}, which chooses its own decay length first")
        elif releases[n].method == "merge":  # a method: auto release that chose a merge: its job evaluates it
            if not any(o.path == n and o.step == releases[n].step for o in found):
                missing.append(f"the merged release {n} with its validation loss (its job merges and evaluates it)")
        elif checkpoint_at(layout.path(n).checkpoints, plan.path(n).end_step) is None:
            missing.append(f"branch {n} to its end at step {plan.path(n).end_step}")
    known = on_schedule(plan, known_before(plan, found, first))
    merges = measured_merges(plan, run_dir, name)
    unmeasured = tuple(w for w in sorted(plan.auto_decays[name].merges) if w not in merges)
    return ChoiceInputs(first, reads, [o for o in known if o.path == "main" or o.path in reads], missing,
                        plan.train_config.logging.eval_interval, merges, unmeasured)


def require_inputs(inputs: ChoiceInputs, name: str) -> None:
    missing = inputs.missing + ([f"the measured merges of windows {list(inputs.unmeasured)} (the release's job, "
                                 f"`lrpath train PLAN --path {name}`, measures them)"] if inputs.unmeasured else [])
    if missing:
        raise LrpathError(
            f"version {name} chooses its release (auto) from the run up to step "
            f"{inputs.up_to_step}" + (f" and the finished branches {', '.join(inputs.reads)}" if inputs.reads else "")
            + f"; not there yet: {'; '.join(missing)}. Train those first (`lrpath train PLAN --path NAME`, "
            "or `lrpath launch`, which orders the jobs so); nothing was recorded")


def measured_merges(plan: Plan, run_dir: Path, name: str) -> dict:
    """window steps -> validation loss per corpus of each merge window of method: auto release ``name``
    measured so far; a measurement of other checkpoints or weights than the plan's is refused."""
    f, auto = RunLayout(Path(run_dir)).path(name).merge_candidates, plan.auto_decays[name]
    if not auto.merges or not f.is_file():
        return {}
    try:
        windows = json.loads(f.read_text())["windows"]
        out = {}
        for w, m in windows.items():
            w = int(w)
            if w not in auto.merges or m["checkpoints"] != list(auto.merges[w]) or m["weights"] != auto.merge_weights:
                raise LrpathError(f"{f}: window {w} merged steps {m['checkpoints']} with weights {m['weights']}, not "
                                  f"one of version {name}'s candidates (weights {auto.merge_weights}: "
                                  f"{ {k: list(v) for k, v in auto.merges.items()} }); remove it to measure again")
            out[w] = dict(m["val_loss_per_corpus"])
        return out
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LrpathError(f"{f} is not a record of measured merges ({exc!r}); remove it to measure again") from None


def record_measured_merge(plan: Plan, run_dir: Path, name: str, window: int, per_corpus: dict) -> None:
    """Add window ``window``'s measured merge to ``RUN/<name>/merge_candidates.json`` (atomically)."""
    f, auto = RunLayout(Path(run_dir)).path(name).merge_candidates, plan.auto_decays[name]
    measured = {**measured_merges(plan, run_dir, name), window: per_corpus}
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, {"version": name, "windows": {
        str(w): {"checkpoints": list(auto.merges[w]), "weights": auto.merge_weights, "val_loss_per_corpus": losses}
        for w, losses in sorted(measured.items())}})


def read(plan: Plan, run_dir: Path, name: str) -> Optional[dict]:
    """The recorded choice of undecided auto release ``name``, checked against ``plan`` (with the earlier
    choices applied) and the run; None if there is none."""
    f = record_file(run_dir, name)
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LrpathError(f"{f} is not a decision record ({exc}); remove it to choose again") from None
    if not isinstance(record, dict):
        raise LrpathError(f"{f} is not a decision record (a JSON object); remove it to choose again")
    auto, differs = plan.auto_decays[name], []
    method = record.get("method", "decay")
    key, allowed = (("window_steps", sorted(auto.merges)) if method == "merge" else
                    ("decay_steps", list(auto.candidates)))
    n = record.get(key)
    if method not in ("decay", "merge") or (method == "merge" and not auto.method_auto):
        differs.append(f"method {method!r} is not one the release chooses among")
    elif isinstance(n, bool) or not isinstance(n, int) or n not in allowed:
        differs.append(f"{key} {n!r} is not one of the release's candidates {allowed}")
    if "plan_hash" in record:  # records of earlier releases of lrpath carry the length alone
        expected = {"plan_hash": plan.plan_hash(), "bounds": list(auto.bounds), "lengths": list(auto.candidates),
                    "eval_interval": plan.train_config.logging.eval_interval}
        if auto.method_auto:
            expected.update(windows=sorted(auto.merges), merge_weights=auto.merge_weights)
        differs += [f"{k} {record.get(k)} (the plan's: {v})" for k, v in expected.items() if record.get(k) != v]
        if not differs:
            now = choice_inputs(plan, run_dir, name).record()
            if now["observations_digest"] != record.get("observations_digest"):
                differs.append(f"the observations it read ({record.get('observations')} losses up to step "
                               f"{record.get('observations_up_to_step')}, digest {record.get('observations_digest')}) "
                               f"are not the run's now ({now['observations']}, digest {now['observations_digest']})")
    if differs:
        raise LrpathError(f"{f}: the recorded decay_steps: auto choice of version {name} does not match: "
                          f"{'; '.join(differs)}. Restore the plan and run it was made for, or remove the record "
                          "to choose again (a branch already trained from it must then be retrained)")
    return record


def write(run_dir: Path, name: str, choice: dict) -> None:
    f = record_file(run_dir, name)
    f.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, choice)  # every rank writes the same choice


def with_choices(plan: Plan, run_dir: Path) -> Plan:
    """``plan`` with the decay lengths its decay_steps: auto releases recorded in ``run_dir`` (the releases
    as trained: their steps and costs), in version order: each record is checked against the plan with
    the choices before it."""
    for name in list(plan.decay_candidates):
        record = read(plan, run_dir, name)
        if record is not None and record.get("method") == "merge":
            plan = plan.with_merge(name, record["window_steps"], record)
        elif record is not None:
            plan = plan.with_decay(name, record["decay_steps"], record)
    return plan

