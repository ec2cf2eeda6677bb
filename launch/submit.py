#!/usr/bin/env python3
"""Submit every path of a version plan to SLURM: ``lrpath launch PLAN --slurm --cluster PROFILE --submit``.

Writes one sbatch script per path and merge release plus ``submit.sh`` (branches and merges depend on the
main-path job that reaches their fork or release step), then runs ``submit.sh``. To render the scripts
without submitting, or to run a plan on this machine, use ``lrpath launch`` (docs/launch.md).

    python launch/submit.py examples/demo_plan.yaml --cluster examples/cluster_h100.yaml
"""
from __future__ import annotations

import argparse
import sys

from lrpath_megatron import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="version plan YAML")
    parser.add_argument("--cluster", required=True, help="cluster profile YAML (partition, time, GPUs per node, ...)")
    parser.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a cluster profile field (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a plan field; passed on to every `lrpath train` (repeatable)")
    parser.add_argument("--run-dir", help="run directory shared by all nodes (default: runs/<plan file stem>)")
    parser.add_argument("--out", help="where the scripts go (default: RUN_DIR/slurm)")
    args = parser.parse_args(argv)
    lrpath = ["launch", args.plan, "--slurm", "--submit", "--cluster", args.cluster]
    lrpath += [arg for item in args.cluster_set for arg in ("--cluster-set", item)]
    lrpath += [arg for item in args.set for arg in ("--set", item)]
    for flag, value in (("--run-dir", args.run_dir), ("--out", args.out)):
        if value is not None:
            lrpath += [flag, value]
    return cli.main(lrpath)


if __name__ == "__main__":
    sys.exit(main())
