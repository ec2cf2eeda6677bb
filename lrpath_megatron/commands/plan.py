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
    from lrpath_megatron.corpus_shards import check_corpora
    from lrpath_megatron.plan import load_plan

    if args.layout and not args.cluster:
        raise SystemExit("lrpath plan: --layout needs --cluster PROFILE (the nodes and GPUs to fit)")
    plan = load_plan(args.plan, args.overrides)
    if args.run_dir:
        from lrpath_megatron.plan_decisions import with_choices

        plan = with_choices(plan, args.run_dir)
    if args.layout:
        from lrpath_megatron.launch.profile import load_profile
        from lrpath_megatron.layout_planner import layout_report

        profile = load_profile(args.cluster, args.cluster_overrides)
        print(layout_report(plan.train_config, profile, args.cluster, args.top))
        return 0
    if args.check_data:
        check_corpora(plan.train_config, plan.used_corpora())
    costs = plan.costs()
    if args.plot:
        from lrpath_megatron.plan_plot import draw_plan

        costs["plot"] = str(draw_plan(plan, args.plot))
    if args.json:
        print(json.dumps(costs, indent=2))
    else:
        from lrpath_megatron.plan.costs_table import format_table

        print(format_table(costs))
    return 0
