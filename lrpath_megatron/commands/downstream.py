"""``lrpath downstream PLAN PATH --run-dir RUN``: a release (or a path such as ptfs/v2) scored on the plan's
downstream tasks, with the release gate; `lrpath launch` runs it after each release (plan.evaluate)."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("downstream", help="score a release of a plan's run on plan.evaluate's tasks, with the gate",
                       description="Scores the release (or a path such as ptfs/v2) on the plan's downstream tasks, "
                                   "compares it with the previous release under plan.evaluate.gate and writes "
                                   "RUN/<path>/downstream.json; a held release is not exported. `lrpath launch` "
                                   "runs it after each release.")
    p.add_argument("plan", help="the version plan YAML")
    p.add_argument("path", help="a version (its release) or a trained path such as ptfs/v2")
    p.add_argument("--run-dir", required=True, help="the plan's run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the same --set overrides the run was trained with")
    p.set_defaults(func=run_release)


def run_release(args) -> int:
    from lrpath_megatron.downstream.table import format_scores
    from lrpath_megatron.downstream.release import evaluate_path
    from lrpath_megatron.plan import load_plan
    from lrpath_megatron.plan_decisions import with_choices

    # Auto releases as they chose (a method: auto release may be a merge).
    plan = with_choices(load_plan(args.plan, args.overrides), Path(args.run_dir))
    record = evaluate_path(plan, Path(args.run_dir), args.path)
    print(f"{args.path} (step {record['step']}):")
    print("\n".join(format_scores(record["tasks"])))
    if record["gate"]:
        print(f"gate: {record['gate']['evidence']['text']}")
    return 0
