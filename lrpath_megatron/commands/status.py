"""``lrpath status PLAN.yaml --run-dir DIR [--json]``: each path's progress and state, and the releases."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("status", help="show the progress of every path of a plan's run and which versions are released",
                       description="Reads checkpoints and metrics only (safe next to a running job).")
    p.add_argument("plan", help="the version plan YAML the run was trained from")
    p.add_argument("--run-dir", default="runs/train", help="the run directory given to `lrpath train`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the same --set overrides the run was trained with (they can change the steps)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.errors import LrpathError
    from lrpath_megatron.plan import load_plan
    from lrpath_megatron.status import format_status, run_status, to_json

    plan, run_dir = load_plan(args.plan, args.overrides), Path(args.run_dir)
    # `lrpath train` and `launch` create it before the first step, so a missing one is a wrong path (all
    # "not started" would hide that), or a run not started yet.
    if not run_dir.is_dir():
        raise LrpathError(f"no run at {run_dir} yet (nothing trained there): start it with `lrpath train "
                          f"{args.plan} --path main --run-dir {run_dir}` (or `lrpath launch` with that --run-dir), "
                          f"or pass the --run-dir it was trained in")
    status = run_status(plan, run_dir)
    from lrpath_megatron.downstream.table import downstream_rows, format_table

    downstream = downstream_rows(plan, run_dir)
    if args.json:
        print(json.dumps({**json.loads(to_json(status)), "downstream": downstream}, indent=1))
    else:
        print(format_status(status))
        if downstream:
            print(f"\ndownstream tasks per release:\n{format_table(downstream)}")
    if not args.json:
        print(f"\nforecast of pending releases: lrpath forecast {args.plan} --run-dir {run_dir}\n"
              f"report (one HTML page): lrpath report {args.plan} --run-dir {run_dir} --out {run_dir / 'report.html'}")
    return 0
