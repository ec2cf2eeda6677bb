"""A plan's costs (:mod:`lrpath_megatron.plan.costs`) as the table ``lrpath plan`` prints."""
from __future__ import annotations

from lrpath_megatron.plan.costs import span
from lrpath_megatron.units import human


def auto_note(name: str, auto: dict) -> str:
    """One line on a decay_steps: auto or method: auto release: undecided (its candidates and the main-path
    steps they span) or its choice."""
    lo, hi = auto["bounds"]
    first, last = auto["fork_steps"]
    choice = auto["choice"]
    what, where = f"decay auto in [{lo}, {hi}] steps", f"forks between step {first} and {last}"
    if auto.get("method_auto"):
        where = f"main-path steps {first}..{last}"
        windows = auto["merge_windows"]
        what = f"method auto: a decay of {lo}..{hi} steps" + (
            f" or a {auto['merge_weights']} merge over {windows[0]}..{windows[-1]} steps" if windows else "")
    if choice is None:
        merges = bool(auto.get("merge_windows"))
        fallback = ("the lowest measured merge, as will every later method: auto release until a decay branch has "
                    "finished" if merges else f"the longest decay, {hi} steps")
        blind = "" if auto.get("reads", True) else (
            f"; no release before it finishes by then, so no decay can be forecast: it will take {fallback} "
            "(write this release to choose otherwise)")
        how = ("at the version's end, every merge window measured and each decay forecast from the run up to "
               "there" if merges else f"by the release forecast from the run up to step {auto['choice_step']}")
        return (f"{name}: {what} ({where}); chosen {how}, so its costs are ranges "
                f"({'a merge' if merges else 'shortest decay'}..longest decay){blind}")
    told = (f"forecast {choice['predicted_loss']:.4f} ± {choice['predicted_sd']:.4f}" if "predicted_loss" in choice
            else choice.get("no_forecast", "recorded"))
    chose = (f"a merge over {choice['window_steps']} steps" if choice.get("method") == "merge" else
             f"a decay of {choice['decay_steps']} steps" if auto.get("method_auto") else choice["decay_steps"])
    return f"{name}: {what} chose {chose}: {told}"


def dropped_note(name: str, auto: dict) -> list:
    """One line per decay length or merge window the default bounds left out, with the reason."""
    return [f"{name}: decay auto leaves out {d['decay_steps']} steps: it {d['why']}" if "decay_steps" in d else
            f"{name}: method auto leaves out a merge over {d['window_steps']} steps: it {d['why']}"
            for d in auto["dropped"]]


def format_table(costs: dict) -> str:
    """The costs of :func:`plan.costs.plan_costs` as ``lrpath plan`` prints them: a row per version, notes on
    decay_steps: auto releases and the main path's pause, then the totals against PTFS and CPT."""
    tps = costs["tokens_per_step"]
    header = ["version", "release", "fork step (tokens)", "decay steps (tokens)", "data", "+tokens",
              "cum. tokens", "vs PTFS", "vs CPT"]
    rows, notes = [], []
    ratio = lambda x: f"{x:.3f}"  # noqa: E731
    for v in costs["versions"]:
        decay = f"{v['decay_steps']} ({human(v['decay_tokens'])})" if v["method"] == "decay" else "-"
        release = f"{v['method']}:{v['shape']}" if v["method"] == "decay" else v["method"]
        data = "+".join(v["corpora"]) + (f" [{v['branch_data']}]" if v["branch_data"] else "")
        fork = f"{v['fork_step']} ({human(v['fork_tokens'])})"
        if v["shared_steps"]:
            fork += f", nominal {v['nominal_fork_step']}"
        auto = v.get("decay_auto")
        if auto and auto["chosen"] is None:  # chosen by the release forecast at its earliest fork
            first, last = auto["fork_steps"]
            fork = f"auto {first}..{last} ({human(first * tps)}..{human(last * tps)})"
            decay = f"auto {auto['bounds'][0]}..{auto['bounds'][1]}"
            release = "auto:decay|merge" if auto["merge_windows"] else release
        elif auto:
            decay += ", auto"
        if auto:
            notes += [auto_note(v["name"], auto), *dropped_note(v["name"], auto)]
        rows.append([v["name"], release, fork, decay, data, span(v["tokens"], human),
                     span(v["cumulative_tokens"], human), span(v["cumulative_ratio_vs_ptfs"], ratio),
                     span(v["cumulative_ratio_vs_cpt"], ratio)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    if costs.get("main_pause"):
        notes.append(f"main: {costs['main_pause']['note']}")
    if notes:
        out += ["", *notes]
    main = costs["main"]
    flops = lambda x: f"{x:.3e}"  # noqa: E731
    saved = costs["tokens_saved_by_effective_forks"]
    out += [
        "",
        f"tokens per step {tps:,}; warmup {costs['warmup_steps']} steps; eta_max {costs['eta_max']:g}, "
        f"eta_min {costs['eta_min']:g}; plan hash {costs['plan_hash']}",
        f"main path   {main['steps']} steps, {human(main['tokens'])} tokens; checkpoints at steps "
        f"{', '.join(map(str, main['save_steps']))}"
        + (f"; weights only at {', '.join(map(str, main['weights_only_steps']))}" if main["weights_only_steps"] else ""),
        f"branches    {span(costs['branch_tokens'], human)} tokens"
        + (f"; forked where they first differ from the main path, {human(abs(saved))} tokens "
           f"{'fewer' if saved > 0 else 'more'} than from their nominal forks" if saved else ""),
        f"total       {span(costs['total_tokens'], human)} tokens, {span(costs['total_flops'], flops)} FLOPs"
        + (f" (auto releases undecided: {', '.join(costs['undecided'])})" if costs.get("undecided") else ""),
        f"PTFS        {human(costs['ptfs_tokens'])} tokens, {costs['ptfs_flops']:.3e} FLOPs   "
        f"-> ratio {span(costs['cost_ratio_vs_ptfs'], ratio)}",
        f"CPT         {human(costs['cpt_tokens'])} tokens, {costs['cpt_flops']:.3e} FLOPs   "
        f"-> ratio {span(costs['cost_ratio_vs_cpt'], ratio)}",
    ]
    if "plot" in costs:
        out.append(f"plot        {costs['plot']}")
    return "\n".join(out)
