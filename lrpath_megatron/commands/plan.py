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
    p.add_argument("--run-dir", help="a run of the plan: decay_steps: auto releases at the lengths their branches "
                                     "chose there (RUN/<version>/decay_choice.json), the others as bounds")
    p.add_argument("--plot", metavar="OUT.png", help="draw the LR of every path against tokens")
    p.add_argument("--check-data", action="store_true", help="also check every corpus the plan uses: .bin/.idx exist and belong together, token ids < model.vocab_size")
    p.add_argument("--layout", action="store_true",
                   help="instead of the costs: the TP/PP/VPP/DP/micro-batch layouts of the plan's model that fit "
                        "the --cluster profile's GPUs, with per-GPU memory and pipeline bubble (docs/layout.md)")
    p.add_argument("--cluster", metavar="PROFILE", help="cluster profile YAML (for --layout)")
    p.add_argument("--cluster-set", dest="cluster_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile field, e.g. --cluster-set nodes=32 (repeatable)")
    p.add_argument("--top", type=int, default=12, help="layouts listed by --layout (default 12)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lrpath_megatron.plan import load_plan

    if args.layout and not args.cluster:
        raise SystemExit("lrpath plan: --layout needs --cluster PROFILE (the nodes and GPUs to fit)")
    plan = load_plan(args.plan, args.overrides)
    if args.run_dir:
        plan = plan.with_choices(args.run_dir)
    if args.layout:
        print(layout_report(plan.train_config, args.cluster, args.cluster_overrides, args.top))
        return 0
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


def layout_report(train, profile_file: str, overrides: list[str], top: int) -> str:
    from lrpath_megatron.config import ConfigError
    from lrpath_megatron.launch.profile import load_profile
    from lrpath_megatron.layout_planner import plan_layouts
    from lrpath_megatron.layout_planner import format_table as layouts_table

    profile = load_profile(profile_file, overrides)
    if profile.gpu_memory_gib is None:
        raise ConfigError(f"{profile_file}: gpu_memory_gib is not set; give the memory of one GPU (e.g. 80 for an "
                          f"H100 80GB), in the profile or with --cluster-set gpu_memory_gib=80")
    nodes, _ = profile.resources("main")
    gpus, model = nodes * profile.gpus_per_node, train.model
    fitting, sized = plan_layouts(model, gpus, profile.gpus_per_node, train.parallel.global_batch_size,
                                  train.precision.dtype, profile.gpu_memory_gib, profile.memory_headroom)
    head = (f"{model.num_layers} layers, hidden {model.hidden_size}, {human(model_parameters(model))} parameters, "
            f"seq {model.seq_length}, global batch {train.parallel.global_batch_size}, {train.precision.dtype}; "
            f"{nodes} nodes x {profile.gpus_per_node} GPUs of {profile.gpu_memory_gib:g} GiB "
            f"({profile.memory_headroom:.0%} kept free)")
    if not fitting:
        return (f"{head}\nnone of {sized} layouts fits, even with full recompute: add nodes, lower "
                f"micro-batch or sequence length, or use GPUs with more memory")
    return (f"{head}\n{len(fitting)} of {sized} layouts fit; GiB per GPU on the most loaded pipeline stage, best "
            f"(*) = least bubble and recompute, then fewest model-parallel ranks\n\n{layouts_table(fitting, top)}")


def model_parameters(model) -> int:
    from lrpath_megatron.memory_model import Layout, chunk_parameters

    return sum(p.numel for p in chunk_parameters(model, Layout(), 0))


def human(tokens: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(tokens) >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return f"{tokens:g}"


def span(values: list, fmt=human) -> str:
    """``a..b`` for a range of two different values, else the one value."""
    return fmt(values[0]) if values[0] == values[-1] else f"{fmt(values[0])}..{fmt(values[-1])}"


def auto_note(name: str, auto: dict) -> str:
    """One line on a decay_steps: auto release: undecided (its bounds and fork steps) or its choice."""
    lo, hi = auto["bounds"]
    first, last = auto["fork_steps"]
    choice = auto["choice"]
    if choice is None:
        return (f"{name}: decay auto in [{lo}, {hi}] steps (forks between step {first} and {last}); chosen by the "
                f"release forecast from the run up to step {first}, so its costs are ranges (shortest..longest decay)")
    told = (f"forecast {choice['predicted_loss']:.4f} ± {choice['predicted_sd']:.4f}" if "predicted_loss" in choice
            else choice.get("no_forecast", "recorded"))
    return f"{name}: decay auto in [{lo}, {hi}] steps chose {choice['decay_steps']}: {told}"


def format_table(costs: dict) -> str:
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
        elif auto:
            decay += ", auto"
        if auto:
            notes.append(auto_note(v["name"], auto))
        rows.append([v["name"], release, fork, decay, data,
                     span(v.get("tokens_range", [v["tokens"]])),
                     span(v.get("cumulative_tokens_range", [v["cumulative_tokens"]])),
                     span(v.get("cumulative_ratio_vs_ptfs_range", [v["cumulative_ratio_vs_ptfs"]]), ratio),
                     span(v.get("cumulative_ratio_vs_cpt_range", [v["cumulative_ratio_vs_cpt"]]), ratio)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    if costs.get("main_pause"):
        from lrpath_megatron.plan import MainPause

        notes.append(f"main: {MainPause(**costs['main_pause']).describe()}")
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
        f"branches    {span(costs.get('branch_tokens_range', [costs['branch_tokens']]))} tokens"
        + (f"; forked where they first differ from the main path, {human(abs(saved))} tokens "
           f"{'fewer' if saved > 0 else 'more'} than from their nominal forks" if saved else ""),
        f"total       {span(costs.get('total_tokens_range', [costs['total_tokens']]))} tokens, "
        f"{span(costs.get('total_flops_range', [costs['total_flops']]), flops)} FLOPs"
        + (f" (decay_steps: auto undecided: {', '.join(costs['undecided'])})" if costs.get("undecided") else ""),
        f"PTFS        {human(costs['ptfs_tokens'])} tokens, {costs['ptfs_flops']:.3e} FLOPs   "
        f"-> ratio {span(costs.get('cost_ratio_vs_ptfs_range', [costs['cost_ratio_vs_ptfs']]), ratio)}",
        f"CPT         {human(costs['cpt_tokens'])} tokens, {costs['cpt_flops']:.3e} FLOPs   "
        f"-> ratio {span(costs.get('cost_ratio_vs_cpt_range', [costs['cost_ratio_vs_cpt']]), ratio)}",
    ]
    if "plot" in costs:
        out.append(f"plot        {costs['plot']}")
    return "\n".join(out)
