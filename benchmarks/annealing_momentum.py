"""The annealing law's momentum (plan.forecast.annealing_momentum) compared by backtest on finished runs.

The law's annealing area lets an LR drop keep lowering the loss for about 1 / (1 - lambda) steps. The paper's
0.999 (fitted on runs of tens of thousands of steps) makes the gain of a decay of a few hundred steps grow
linearly with its length, so a forecast reaching beyond the observed decays' lengths is too optimistic. For
each run and each lambda, every release is backtested as ``forecast_accuracy.py`` does (from what was known
before it; the run's plans and recorded choices as trained, only the law's momentum changed), per release
method and shape.

    python benchmarks/annealing_momentum.py --run lr3e-3=/tmp/vu/run --run lr1e-2=/tmp/vu2/run
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import forecast_accuracy  # noqa: E402

LAWS = ("calibrated", "segments")


def backtest(run: Path, momentum: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        result = forecast_accuracy.main(["--run-dir", str(run), "--out", f"{tmp}/fa.json",
                                         "--annealing-momentum", str(momentum)])
    return {"by_method_and_shape": {law: result["by_method_and_shape"][law] for law in LAWS},
            "calibration": result["calibration"]}


def table(results: dict) -> str:
    lines = ["| run | momentum | " + " | ".join(f"{law}: kind mean / max (releases)" for law in LAWS) + " |",
             "|---|---|" + "---|" * len(LAWS)]
    for run, by_momentum in results.items():
        for momentum, r in by_momentum.items():
            cells = ["; ".join(f"{kind} {g['mean_rel_error']:.2%} / {g['max_rel_error']:.2%} ({g['releases']})"
                               for kind, g in r["by_method_and_shape"][law].items()) for law in LAWS]
            lines.append(f"| {run} | {momentum} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR",
                   help="a finished benchmarks/version_updates/run.py run (repeatable)")
    p.add_argument("--momenta", default="0.999,0.99,0.98,0.97")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "annealing_momentum.json")
    args = p.parse_args(argv)
    start = time.time()
    runs = dict(r.split("=", 1) for r in args.run)
    momenta = [float(m) for m in args.momenta.split(",")]
    results = {name: {str(m): backtest(Path(d).resolve(), m) for m in momenta} for name, d in runs.items()}
    out = {"benchmark": "annealing_momentum", "runs": runs, "momenta": momenta,
           "meaning": "per run and momentum: the backtest of every release (forecast_accuracy.py), mean and max "
                      "relative error of the release's blend loss and the share within +- 1 sd, per release "
                      "method and shape, for the calibrated law (what lrpath forecasts) and the law alone",
           "results": results, "seconds": round(time.time() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
