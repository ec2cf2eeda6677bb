"""What a plan costs: tokens and FLOPs of the main path, each branch and the total, beside pre-training from
scratch (PTFS: version v trains D_1..D_v from scratch) and continual pre-training (CPT: version v trains D_v
from the previous release). This is what ``lrpath plan --json`` prints.

Every figure that depends on a decay_steps: auto or method: auto release that has not chosen yet is a pair
[fewest, most] (the same number twice once every release has chosen): an undecided release costs between its
cheapest candidate (the shortest decay; a merge: nothing beyond the main path) and its longest decay. The main
path counts to the latest fork an auto release may take (its branch waits for it), but not past the main
path's end: the release that ends the main path chooses where the main path waits for it (MainPause), and the
main path then ends at the chosen fork.
"""
from __future__ import annotations

import dataclasses


def span(pair, fmt=str) -> str:
    """A cost pair in words: ``lo..hi`` while it is a range, else the one value."""
    return fmt(pair[0]) if pair[0] == pair[-1] else f"{fmt(pair[0])}..{fmt(pair[-1])}"


def _scaled(pair, factor: float) -> list:
    return [pair[0] * factor, pair[1] * factor]


def _per(pair, divisor: float) -> list:
    return [pair[0] / divisor, pair[1] / divisor]


def plan_costs(plan) -> dict:
    tps, fpt = plan.tokens_per_step, plan.flops_per_token()
    undecided = [v.name for v in plan.versions if v.name in plan.decay_candidates]
    rows, ptfs, cpt, main_steps = [], 0, 0, 0
    branches = [0, 0]
    nominal_main = nominal_branches = 0  # the same releases with every branch at its nominal fork
    for v in plan.versions:
        ptfs += v.end_step  # D_1..D_v
        cpt += v.steps
        auto = plan.auto_decays.get(v.name)
        own = auto.own_steps() if v.name in undecided else (v.branch_end - v.release.step,) * 2
        branches = [branches[0] + own[0], branches[1] + own[1]]
        # An auto branch waits for the main path's latest candidate fork, unless the main path ends before
        # it (it stopped at that release's choice: MainPause).
        main_steps = max(main_steps, v.release.step, min(auto.fork_span[1], plan.main_end) if auto else 0)
        nominal = v.release.nominal_step if v.release.nominal_step is not None else v.release.step
        nominal_main = max(nominal_main, nominal, min(max(auto.nominal_forks.values()), plan.main_end) if auto else 0)
        nominal_branches += v.branch_end - nominal
        spent = [main_steps + branches[0], main_steps + branches[1]]
        path = plan.path(v.name) if v.release.method == "decay" else None
        rows.append({
            "name": v.name,
            "method": v.release.method,
            "corpora": v.corpora,
            "data_steps": v.steps,
            "data_tokens": v.steps * tps,  # the main-path segment, replay included
            "new_data_tokens": round(v.steps * tps * plan.new_share(v.index)),  # of the version's own corpora
            "segment": [v.start_step, v.end_step],
            "fork_step": v.release.step,
            "fork_tokens": v.release.step * tps,
            "nominal_fork_step": v.release.nominal_step,
            "shared_steps": v.release.shared_steps,  # decay steps the main path trains for the branch
            "shape": v.release.shape,
            "branch_data": v.release.data,
            # decay_steps: auto: the shortest candidate until the branch records its choice
            "decay_steps": v.release.decay_steps,
            "decay_tokens": v.release.decay_steps * tps,
            "decay_candidates": plan.decay_candidates.get(v.name),  # decay_steps: auto, until it chose
            "release_step": v.branch_end,
            "branch_steps": list(own),
            "tokens": _scaled(own, tps),  # training this release adds beyond the main path
            "mix_switch_steps": path.switch_steps if path else [],
            "cumulative_tokens": _scaled(spent, tps),
            "ptfs_cumulative_tokens": ptfs * tps,
            "cpt_cumulative_tokens": cpt * tps,
            "cumulative_ratio_vs_ptfs": _per(spent, ptfs),
            "cumulative_ratio_vs_cpt": _per(spent, cpt),
            # decay_steps: auto: the bounds, the forks the candidates take, what the bounds left out and why,
            # and the choice once recorded
            "decay_auto": None if auto is None else {
                "bounds": list(auto.bounds), "candidates": list(auto.candidates), "dropped": list(auto.dropped),
                "fork_steps": list(auto.fork_span), "choice_step": auto.choice_step,
                "chosen": None if v.name in undecided else v.release.decay_steps,
                "choice": auto.choice,
                # method: auto: the merge windows it may take instead (a merge costs no steps beyond the main path)
                "methods": ["decay", "merge"] if auto.merges else ["decay"], "merge_windows": sorted(auto.merges),
                "merge_weights": auto.merge_weights, "method_auto": auto.method_auto, "reads": list(auto.reads),
                "chosen_method": None if v.name in undecided else v.release.method},
        })
    # The release the main path waits for (MainPause) ends it at its chosen fork: its candidates cost the
    # main path to there plus their own steps, not the main path to the latest fork plus their own steps.
    pause, delta = plan.main_pause, (0, 0)
    if pause:
        auto = plan.auto_decays[pause.version]
        totals = [max(pause.others_end, fork) + end - fork for fork, end in auto.spans()]
        fewest, most = (plan.main_end + o for o in auto.own_steps())
        delta = (min(totals) - fewest, max(totals) - most)
        index = next(i for i, r in enumerate(rows) if r["name"] == pause.version)
        for r in rows[index:]:
            steps = [r["cumulative_tokens"][0] // tps + delta[0], r["cumulative_tokens"][1] // tps + delta[1]]
            r.update(cumulative_tokens=_scaled(steps, tps),
                     cumulative_ratio_vs_ptfs=_per(steps, r["ptfs_cumulative_tokens"] // tps),
                     cumulative_ratio_vs_cpt=_per(steps, r["cpt_cumulative_tokens"] // tps))
    total = [plan.main_end + branches[0] + delta[0], plan.main_end + branches[1] + delta[1]]
    return {
        "fork_rule": plan.config.fork,
        "tokens_saved_by_effective_forks": (nominal_main + nominal_branches - total[0]) * tps,
        "plan": plan.source,
        "plan_hash": plan.plan_hash(),
        "tokens_per_step": tps,
        "flops_per_token": fpt,
        "eta_max": plan.eta_max,
        "eta_min": plan.eta_min,
        "warmup_steps": plan.warmup_steps,
        "main": {"steps": plan.main_end, "tokens": plan.main_end * tps, "flops": plan.main_end * tps * fpt,
                 "save_steps": sorted(plan.path("main").save_steps),
                 "weights_only_steps": sorted(plan.path("main").weights_only_steps)},
        "versions": rows,
        "branch_tokens": _scaled(branches, tps),
        "total_steps": total,
        "total_tokens": _scaled(total, tps),
        "total_flops": _scaled(total, tps * fpt),
        "ptfs_tokens": ptfs * tps,
        "ptfs_flops": ptfs * tps * fpt,
        "cpt_tokens": cpt * tps,
        "cpt_flops": cpt * tps * fpt,
        "cost_ratio_vs_ptfs": _per(total, ptfs),
        "cost_ratio_vs_cpt": _per(total, cpt),
        "undecided": undecided,
        # the main path stops there until that release chose; it then ends at the chosen fork
        "main_pause": {**dataclasses.asdict(pause), "note": pause.describe()} if pause else None,
    }
