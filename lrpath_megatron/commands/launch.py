"""``lrpath launch PLAN.yaml --slurm --cluster PROFILE.yaml [--submit]`` or ``--local``: run every path of a plan."""
from __future__ import annotations

import shlex
from pathlib import Path

from lrpath_megatron.errors import LrpathError
from lrpath_megatron.run_layout import RunLayout

# Options of one mode (argparse dest -> flag): the other mode has no use for them, so giving them there is an
# error rather than silently ignored.
MODE_OPTIONS = {
    "--slurm": {"cluster": "--cluster", "cluster_overrides": "--cluster-set", "out": "--out", "submit": "--submit"},
    "--local": {"nproc_per_node": "--nproc-per-node", "dry_run": "--dry-run"},
}


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
    p.add_argument("--cluster", help="with --slurm: cluster profile YAML (partition, time, GPUs per node, ...)")
    p.add_argument("--cluster-set", dest="cluster_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --slurm: override a cluster profile field, e.g. --cluster-set nodes=4 (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a plan field; passed on to every `lrpath train` (repeatable)")
    p.add_argument("--run-dir", help="run directory shared by all nodes (default: runs/<plan file stem>)")
    p.add_argument("--out", help="with --slurm: where the scripts go (default: RUN_DIR/slurm)")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit the jobs (runs OUT/submit.sh)")
    # Default None, not 1: an explicit value given with --slurm must be told apart from the default.
    p.add_argument("--nproc-per-node", type=int, help="with --local: ranks (torchrun processes; default 1)")
    p.add_argument("--dry-run", action="store_true", help="with --local: print the commands, run nothing")
    p.set_defaults(func=run)


def _check_mode_options(args) -> None:
    """One error naming every option given that belongs to the other mode."""
    mode = "--local" if args.local else "--slurm"
    other = "--slurm" if args.local else "--local"
    values = {flag: getattr(args, dest) for dest, flag in MODE_OPTIONS[other].items()}
    # Unset defaults are None, False and []; an explicit 0 or "" counts as given (0 == False, so no `in`).
    given = [flag for flag, v in values.items() if v is not None and v is not False and v != []]
    if not given:
        return
    # What --dry-run is usually meant for with --slurm is already the default.
    hint = "; without --submit, --slurm writes the scripts and submits nothing" if "--dry-run" in given else ""
    raise LrpathError(
        f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to {other}, not to {mode}; "
        f"remove {'it' if len(given) == 1 else 'them'} or use {other}{hint}"
    )


def run(args) -> int:
    _check_mode_options(args)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.plan).stem).resolve()
    if args.local:
        return _local(args, run_dir)
    if not args.cluster:
        raise LrpathError("--slurm needs --cluster PROFILE.yaml (see examples/cluster_h100.yaml)")
    from lrpath_megatron.launch.slurm import prepare_slurm

    out = Path(args.out or RunLayout(run_dir).slurm)
    rendered = prepare_slurm(args.plan, args.overrides, args.cluster, args.cluster_overrides, run_dir, out)
    for f in rendered.files:
        print(f"wrote {f}")
    for job in rendered.jobs:
        after = f" after {', '.join(job.waits_for)}" if job.waits_for else ""
        print(f"  job {job.key}: {job.describe()}{after}")
    if not args.submit:
        print(f"submit with: bash {out / 'submit.sh'}   (or rerun with --submit)")
        return 0
    from lrpath_megatron.launch.submit import submit

    for key, job_id in submit(out).items():
        print(f"submitted {key}: job {job_id}")
    return 0


def _local(args, run_dir: Path) -> int:
    from lrpath_megatron.launch.local import plan_commands, run_local
    from lrpath_megatron.plan import load_plan

    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    if nproc <= 0:
        raise LrpathError(f"--nproc-per-node must be > 0, got {nproc}")
    plan = load_plan(args.plan, args.overrides)
    commands = plan_commands(plan, Path(args.plan), args.overrides, run_dir, nproc)
    if args.dry_run:
        for _, cmd in commands:
            print(shlex.join(cmd))
        return 0
    run_local(commands)
    return 0
