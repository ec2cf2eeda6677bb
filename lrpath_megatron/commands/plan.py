"""``lrpath plan PLAN.yaml``: validate a version plan, print its paths and costs, optionally plot them."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="validate a version plan; print forks, decays, tokens and cost vs PTFS/CPT",
        description="Validate a version plan and print, per version, its fork point, decay, data and the "
                    "cumulative cost against pre-training from scratch (PTFS) and continual pre-training (CPT).",
    )
    p.add_argument("plan", help="plan YAML (see examples/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set plan.main.eta_max=1e-3 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the costs as JSON instead of a table")
    p.add_argument("--plot", metavar="OUT.png", help="draw the LR of every path against tokens")
    p.add_argument("--check-data", action="store_true", help="also check every corpus the plan uses: .bin/.idx exist and belong together, token ids < model.vocab_size")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lrpath_megatron.plan import load_plan

    plan = load_plan(args.plan, args.overrides)
    if args.check_data:
        plan.check_data()
    costs = plan.costs()
    if args.plot:
        from lrpath_megatron.plan_plot import draw_plan

        costs["plot"] = str(draw_plan(plan, args.plot))
    if args.json:
        print(json.dumps(costs, indent=2))
    else:
        print(format_table(costs))
    return 0


def human(tokens: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(tokens) >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return f"{tokens:g}"


def format_table(costs: dict) -> str:
    tps = costs["tokens_per_step"]
    header = ["version", "release", "fork step (tokens)", "decay steps (tokens)", "data", "+tokens",
              "cum. tokens", "vs PTFS", "vs CPT"]
    rows = []
    for v in costs["versions"]:
        decay = f"{v['decay_steps']} ({human(v['decay_tokens'])})" if v["method"] == "decay" else "-"
        release = f"{v['method']}:{v['shape']}" if v["method"] == "decay" else v["method"]
        data = "+".join(v["corpora"]) + (f" [{v['branch_data']}]" if v["branch_data"] else "")
        fork = f"{v['fork_step']} ({human(v['fork_tokens'])})"
        if v["shared_steps"]:
            fork += f", nominal {v['nominal_fork_step']}"
        rows.append([v["name"], release, fork, decay, data,
                     human(v["tokens"]), human(v["cumulative_tokens"]),
                     f"{v['cumulative_ratio_vs_ptfs']:.3f}", f"{v['cumulative_ratio_vs_cpt']:.3f}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    main = costs["main"]
    out += [
        "",
        f"tokens per step {tps:,}; warmup {costs['warmup_steps']} steps; eta_max {costs['eta_max']:g}, "
        f"eta_min {costs['eta_min']:g}; plan hash {costs['plan_hash']}",
        f"main path   {main['steps']} steps, {human(main['tokens'])} tokens; checkpoints at steps "
        f"{', '.join(map(str, main['save_steps']))}"
        + (f"; weights only at {', '.join(map(str, main['weights_only_steps']))}" if main["weights_only_steps"] else ""),
        f"branches    {human(costs['branch_tokens'])} tokens"
        + (f"; forked where they first differ from the main path, {human(costs['tokens_saved_by_effective_forks'])} "
           f"tokens fewer than from their nominal forks" if costs["tokens_saved_by_effective_forks"] else ""),
        f"total       {human(costs['total_tokens'])} tokens, {costs['total_flops']:.3e} FLOPs",
        f"PTFS        {human(costs['ptfs_tokens'])} tokens, {costs['ptfs_flops']:.3e} FLOPs   "
        f"-> ratio {costs['cost_ratio_vs_ptfs']:.3f}",
        f"CPT         {human(costs['cpt_tokens'])} tokens, {costs['cpt_flops']:.3e} FLOPs   "
        f"-> ratio {costs['cost_ratio_vs_cpt']:.3f}",
    ]
    if "plot" in costs:
        out.append(f"plot        {costs['plot']}")
    return "\n".join(out)
