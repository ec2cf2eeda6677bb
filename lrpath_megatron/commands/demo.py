"""``lrpath demo``: the shipped corpora, tokenized, then the tiny demo plan (main path + one branch per
version) trained on this machine, then the version tree. Run from the repository root (``make demo``)."""
from __future__ import annotations

from pathlib import Path

DEMO_PLAN = Path("examples/demo_plan.yaml")
RUN_DIR = Path("runs/demo")  # the plan's corpus prefixes point under runs/demo/data


def register(sub) -> None:
    p = sub.add_parser("demo", help="tokenize the shipped corpora and run the tiny demo plan on this machine")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks (torchrun processes)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.data_tools.demo import prepare_demo_data
    from lrpath_megatron.launch.local import plan_commands, run_local
    from lrpath_megatron.corpus_shards import check_corpora
    from lrpath_megatron.plan import load_plan
    from lrpath_megatron.status import format_status, run_status

    run_dir = RUN_DIR
    data = prepare_demo_data(run_dir / "data")
    print("demo corpora (tokens): " + ", ".join(f"{k} {v:,}" for k, v in data["tokens"].items()))
    plan = load_plan(DEMO_PLAN)
    check_corpora(plan.train_config, plan.used_corpora())
    run_local(plan_commands(plan, DEMO_PLAN, [], run_dir, args.nproc_per_node))
    print(format_status(run_status(plan, run_dir)))
    from lrpath_megatron.downstream.table import downstream_rows, format_table

    print(f"\ndownstream tasks per release:\n{format_table(downstream_rows(plan, run_dir))}")
    from lrpath_megatron.report import write_report

    print(f"\nreport (one HTML page): {write_report(plan, run_dir, run_dir / 'report.html')}")
    return 0
