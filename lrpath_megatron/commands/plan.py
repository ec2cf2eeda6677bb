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


def format_table(costs: dict) -> str:
    tps = costs["tokens_per_step"]
    header = ["version", "release", "fork step (tokens)", "decay steps (tokens)", "data", "+tokens",
              "cum. tokens", "vs PTFS", "vs CPT"]
    rows = []
    for v in costs["versions"]:
        decay = f"{v['decay_steps']} ({human(v['decay_tokens'])})" if v["method"] == "decay" else "-"
        if v.get("decay_candidates"):  # chosen by the release forecast when the branch starts
            decay = f"auto {v['decay_candidates'][0]}..{v['decay_candidates'][-1]}, now {decay}"
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
