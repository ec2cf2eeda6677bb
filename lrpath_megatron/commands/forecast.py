"""``lrpath forecast PLAN --run-dir D``: each pending release's validation loss before it trains."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("forecast", help="forecast the validation loss of releases not trained yet, per decay length",
                       description="Fits the LR-annealing loss law (Tissue et al. 2024) to the validation losses of "
                                   "the paths trained so far and forecasts every pending decay release: the "
                                   "configured decay and candidate lengths/shapes, marking the shortest decay "
                                   "within --tolerance of the longest. Reads metrics only (no torch).")
    p.add_argument("plan", help="the version plan YAML")
    p.add_argument("--run-dir", required=True, help="the plan's run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the same --set overrides the run was trained with")
    p.add_argument("--eval-json", action="append", default=[], metavar="FILE",
                   help="`lrpath eval --json` results of the run's checkpoints: more observations (repeatable)")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="relative loss margin to the longest candidate decay (default 0.005 = 0.5%%)")
    p.add_argument("--shapes", type=lambda s: tuple(s.split(",")), default=(),
                   help="candidate decay shapes beside each release's own, e.g. cosine,knee")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=(),
                   help="candidate release methods beside each release's own: decay,merge (merges: WSM 1-sqrt of 4 "
                        "checkpoints; decays: cosine and --shapes), marking the cheapest within --tolerance of the lowest")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON object")
    p.add_argument("--plot", metavar="F.png", help="also plot forecast loss against decay length")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.plan import load_plan
    from lrpath_megatron.release_forecast import ForecastConfig, forecast_plan, format_forecast, plot_forecast

    config = ForecastConfig(tolerance=args.tolerance, shapes=args.shapes, methods=args.methods).validate()
    result = forecast_plan(load_plan(args.plan, args.overrides), Path(args.run_dir), config, args.eval_json)
    print(json.dumps(result, indent=1) if args.json else format_forecast(result))
    if args.plot:
        plot_forecast(result, Path(args.plot))
    return 0
