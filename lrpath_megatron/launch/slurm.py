"""Plan + cluster profile -> validated jobs -> sbatch scripts on disk (nothing is submitted here)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lrpath_megatron.launch.jobs import Job, check_profile, plan_jobs
from lrpath_megatron.launch.profile import load_profile
from lrpath_megatron.launch.sbatch import LaunchSpec, write_scripts


@dataclass(frozen=True)
class Rendered:
    jobs: list  # list[Job], in submission order
    files: list  # list[Path]: <path>.sbatch per path or merge release, then submit.sh


def prepare_slurm(plan_file: str | Path, overrides: Sequence[str], profile_file: str | Path,
                  profile_overrides: Sequence[str], run_dir: str | Path, out_dir: str | Path) -> Rendered:
    """Validate everything first (plan, profile, their fit), then write the scripts into ``out_dir``."""
    from lrpath_megatron.plan import load_plan
    from lrpath_megatron.plan_decisions import with_choices

    # decay_steps: auto branches that chose in run_dir (a resubmission) wait for their chosen fork only
    plan = with_choices(load_plan(plan_file, list(overrides)), Path(run_dir))
    paths = plan.paths()
    jobs: list[Job] = plan_jobs(plan)
    profile = load_profile(profile_file, list(profile_overrides))
    check_profile(profile, str(profile_file), jobs, paths, plan.train_config)
    spec = LaunchSpec(Path(plan_file).resolve(), tuple(overrides), Path(run_dir).resolve(), Path.cwd(), profile)
    return Rendered(jobs, write_scripts(spec, jobs, Path(out_dir)))
