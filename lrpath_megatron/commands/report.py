"""``lrpath report PLAN --run-dir D --out report.html``: one self-contained page on a plan's releases."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page on a plan's run and its releases",
                       description="The version tree with the LRs as trained, loss curves per path, validation "
                                   "loss per release and corpus, tokens and FLOPs against PTFS and CPT, and "
                                   "forecast vs actual per release. Images are embedded: the page is one file.")
    p.add_argument("plan", help="the version plan YAML")
    p.add_argument("--run-dir", required=True, help="the plan's run directory")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the same --set overrides the run was trained with")
    p.add_argument("--eval-json", action="append", default=[], metavar="FILE",
                   help="`lrpath eval --json` results of the run's checkpoints (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.errors import LrpathError
    from lrpath_megatron.plan import load_plan
    from lrpath_megatron.report import write_report

    if not Path(args.run_dir).is_dir():
        raise LrpathError(f"no run at {args.run_dir}: nothing trained there to report on")
    plan = load_plan(args.plan, args.overrides)
    write_report(plan, Path(args.run_dir), Path(args.out), args.eval_json)
    print(f"wrote {args.out}")
    return 0
