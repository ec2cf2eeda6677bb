"""``lrpath launch PLAN.yaml --slurm --cluster PROFILE.yaml [--submit]`` or ``--local``: run every path of a plan."""
from __future__ import annotations

import shlex
from pathlib import Path

from lrpath_megatron.errors import LrpathError


def register(sub) -> None:
    p = sub.add_parser(
        "launch", help="write (and submit) SLURM jobs for every path of a plan, or run it locally with torchrun",
        description="--slurm writes OUT/<path>.sbatch per path and merge release, and OUT/submit.sh (branches "
                    "and merges depend on the main-path job that reaches their fork or release step); --submit "
                    "also runs submit.sh. --local runs the plan here: torchrun per path, then the merges. See "
                    "docs/launch.md.")
    p.add_argument("plan", help="version plan YAML")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--slurm", action="store_true", help="render sbatch scripts (needs --cluster)")
    mode.add_argument("--local", action="store_true", help="run every path on this machine with torchrun")
    p.add_argument("--cluster", help="cluster profile YAML (partition, time, GPUs per node, ...)")
    p.add_argument("--cluster-set", dest="cluster_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cluster profile field, e.g. --cluster-set nodes=4 (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a plan field; passed on to every `lrpath train` (repeatable)")
    p.add_argument("--run-dir", help="run directory shared by all nodes (default: runs/<plan file stem>)")
    p.add_argument("--out", help="where the scripts go (default: RUN_DIR/slurm)")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit the jobs (runs OUT/submit.sh)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="with --local: ranks (torchrun processes)")
    p.add_argument("--dry-run", action="store_true", help="with --local: print the commands, run nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    run_dir = Path(args.run_dir or Path("runs") / Path(args.plan).stem).resolve()
    if args.local:
        return _local(args, run_dir)
    if not args.cluster:
        raise LrpathError("--slurm needs --cluster PROFILE.yaml (see examples/cluster_h100.yaml)")
    from launch.slurm import prepare_slurm

    out = Path(args.out or run_dir / "slurm")
    rendered = prepare_slurm(args.plan, args.overrides, args.cluster, args.cluster_overrides, run_dir, out)
    for f in rendered.files:
        print(f"wrote {f}")
    for job in rendered.jobs:
        after = f" after {job.after}" if job.after else ""
        what = f"merge of main steps {', '.join(map(str, job.merge.steps))}" if job.merge else \
            f"path {job.path} steps {job.start_step}..{job.end_step}"
        print(f"  job {job.key}: {what}{after}")
    if not args.submit:
        print(f"submit with: bash {out / 'submit.sh'}   (or rerun with --submit)")
        return 0
    from launch.submit import submit

    for key, job_id in submit(out).items():
        print(f"submitted {key}: job {job_id}")
    return 0


def _local(args, run_dir: Path) -> int:
    from launch.local import plan_commands, run_local
    from lrpath_megatron.plan import load_plan

    if args.nproc_per_node <= 0:
        raise LrpathError(f"--nproc-per-node must be > 0, got {args.nproc_per_node}")
    plan = load_plan(args.plan, args.overrides)
    commands = plan_commands(plan, Path(args.plan), args.overrides, run_dir, args.nproc_per_node)
    if args.dry_run:
        for _, cmd in commands:
            print(shlex.join(cmd))
        return 0
    run_local(commands)
    return 0
