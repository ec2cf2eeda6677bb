"""Render one sbatch script per path plus ``submit.sh`` that submits the jobs with their dependencies.

The scripts are plain bash: the only Python they run is ``lrpath train`` inside ``srun`` (one task per
GPU; each rank reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the same code path as torchrun), or, for
a merge release or a release's Hugging Face export, ``lrpath merge`` or ``lrpath hf export`` as one CPU task.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lrpath_megatron.launch.jobs import MAIN, Job, eval_args, export_args, merge_args, merge_time
from lrpath_megatron.launch.profile import ClusterProfile
from lrpath_megatron.launch.requeue import after_step_lines, fault_setup_lines
from lrpath_megatron.run_layout import RunLayout

# Defaults exported unless already set in the submitting environment or overridden by profile.env.
ENV_DEFAULTS = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron-core orders TP communication before compute kernels
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",  # frees async-collective buffers promptly (less memory)
    "NCCL_DEBUG": "WARN",  # NCCL problems in the log without per-call noise
    # A timed-out or broken collective raises in the rank (which then writes its stacks and exits 3 for
    # requeue, hang_guard) instead of NCCL's watchdog aborting the process.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    "OMP_NUM_THREADS": "1",  # what torchrun sets: no CPU oversubscription by one-process-per-GPU ranks
    "PYTHONUNBUFFERED": "1",  # log lines appear while the job runs
}


@dataclass(frozen=True)
class LaunchSpec:
    plan_file: Path  # absolute: the scripts run on other machines
    overrides: tuple  # the plan's --set KEY=VALUE strings, passed through to `lrpath train`
    run_dir: Path  # absolute, on a filesystem shared by all nodes
    workdir: Path  # where relative paths in the plan resolve: the directory `lrpath launch` ran in
    profile: ClusterProfile


def script_name(path: str) -> str:
    return f"{path}.sbatch"


def log_dir(spec: LaunchSpec, path: str) -> Path:
    return RunLayout(spec.run_dir).path(path).logs


def _container_opts(prof: ClusterProfile) -> list[str]:
    if not prof.container.image:
        return []
    opts = [f"--container-image={prof.container.image}"]
    opts += [f"--container-mounts={','.join(prof.container.mounts)}"] if prof.container.mounts else []
    opts += [f"--container-workdir={prof.container.workdir}"] if prof.container.workdir else []
    return opts


def _profile_env(prof: ClusterProfile) -> list[str]:
    """The profile's `env`, exported after the defaults so it wins."""
    if not prof.env:
        return []
    return ["# Cluster profile `env`."] + [f"export {k}={shlex.quote(str(v))}" for k, v in prof.env.items()]


def _sbatch_options(spec: LaunchSpec, name: str, time_limit: str, placement: list[str],
                    signal: list[str], path: str | None = None) -> list[str]:
    """The #SBATCH options every job shares, around its own placement and signal options; its log goes to
    the directory of ``path`` (default: ``name``)."""
    prof = spec.profile
    opts = [f"--job-name=lrpath-{name}", f"--partition={prof.partition}"]
    opts += [f"--account={prof.account}"] if prof.account else []
    opts += [f"--qos={prof.qos}"] if prof.qos else []
    opts += [f"--time={time_limit}", *placement]
    opts += [f"--cpus-per-task={prof.cpus_per_task}"] if prof.cpus_per_task else []
    opts += [f"--mem={prof.mem}"] if prof.mem is not None else []
    opts += [f"--constraint={prof.constraint}"] if prof.constraint else []
    opts += [
        f"--chdir={spec.workdir}",
        f"--output={log_dir(spec, path or name)}/slurm-%j.out",
        "--open-mode=append",  # a requeued job appends to its log instead of truncating it
        *signal,
        "--requeue",  # preemption and `scontrol requeue` rerun the job; it resumes where it stopped
    ]
    return opts + [str(o) for o in prof.sbatch_extra]


def render_sbatch(spec: LaunchSpec, path: str) -> str:
    prof = spec.profile
    nodes, time_limit = prof.resources(path)
    placement = [f"--nodes={nodes}", f"--ntasks-per-node={prof.gpus_per_node}"]
    placement += [f"--gpus-per-node={prof.gpus_per_node}"] if prof.request_gpus else []
    placement += ["--exclusive"] if prof.exclusive else []
    # USR1 goes to the srun step: the trainer saves and exits EXIT_REQUEUE before the limit.
    opts = _sbatch_options(spec, path, time_limit, placement, [f"--signal=USR1@{prof.signal_grace}"])

    # Not --kill-on-bad-exit: that would kill ranks still finishing a signal-triggered save the moment the
    # first rank exits with code 3; srun ends the others rank_exit_wait seconds after the first exit.
    srun = ["srun", f"--ntasks-per-node={prof.gpus_per_node}", "--kill-on-bad-exit=0", f"--wait={prof.rank_exit_wait}"]
    srun += _container_opts(prof) + [str(o) for o in prof.srun_extra]
    train = [prof.lrpath, "train", '"$PLAN"', "--path", path, "--run-dir", '"$RUN_DIR"']
    for item in spec.overrides:
        train += ["--set", shlex.quote(item)]
    train.append('"${STOP_ARGS[@]}"')

    usage = f"sbatch [--dependency=afterok:JOBID] {script_name(path)}"
    usage += " [STOP_AT_STEP]" if path == MAIN else ""
    lines = [
        "#!/bin/bash",
        f"# lrpath path {path!r} of plan {spec.plan_file}; generated by `lrpath launch --slurm`, edit freely.",
        f"# Usage: {usage}",
    ]
    lines += [f"#SBATCH {o}" for o in opts]
    lines += [
        "set -uo pipefail",
        "",
        f"PLAN={shlex.quote(str(spec.plan_file))}",
        f"RUN_DIR={shlex.quote(str(spec.run_dir))}",
        "STOP_ARGS=()",
        'if [[ $# -ge 1 ]]; then STOP_ARGS=(--stop-at-step "$1"); fi',
        "",
    ]
    if prof.setup:
        lines += ["# Site setup (cluster profile `setup`)."] + [str(s) for s in prof.setup] + [""]
    lines += [
        "# Rendezvous on the first node of the allocation, at the address SLURM itself uses for it.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_ADDR=$(scontrol show node \"$head_node\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        'export MASTER_ADDR=${MASTER_ADDR:-$head_node}',
        "# A port per job: jobs that share a node do not collide.",
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "",
        "# NCCL/CUDA defaults (docs/launch.md); values already in the environment win.",
    ]
    lines += [f"export {k}=${{{k}:-{v}}}" for k, v in ENV_DEFAULTS.items()]
    lines += _profile_env(prof)
    lines += fault_setup_lines(log_dir(spec, path), prof.gpus_per_node, prof.max_restarts)
    lines += _step_lines(f"path {path} ${{STOP_ARGS[*]}} on $SLURM_JOB_NODELIST", srun, train, f"path {path}",
                         after_step_lines())
    return "\n".join(lines)


def render_cpu_sbatch(spec: LaunchSpec, job: Job) -> str:
    """A merge release or a release's export: one CPU task (no GPUs, not exclusive) running ``lrpath merge``
    or ``lrpath hf export``. A rerun or requeue is harmless: a finished merge exits 0 (``--skip-existing``),
    an export is written again; either output is renamed into place only when complete."""
    prof = spec.profile
    gpu = ["--gpus-per-node=1"] if job.evaluate and job.evaluate.gpu and prof.request_gpus else []
    opts = _sbatch_options(spec, job.script, merge_time(prof, job.path), ["--nodes=1", "--ntasks=1", *gpu], [], job.path)
    # srun_extra holds site flags (--mpi, --cpu-bind, container options) that every srun step needs.
    srun = ["srun", "--ntasks=1", *_container_opts(prof), *map(str, prof.srun_extra)]
    if job.kind == "merge":
        args = merge_args(spec.run_dir, job)
        what = f"merge release of version {job.path!r} (plan {spec.plan_file}): main-path steps " \
               f"{', '.join(map(str, job.merge.steps))}"
        started, finished = f"merge release {job.path} at step {job.end_step}", f"merge release {job.path}"
    elif job.kind == "evaluate":
        args = eval_args(spec.run_dir, job, spec.plan_file, spec.overrides)
        what = f"downstream evaluation of release {job.path!r} (plan {spec.plan_file})"
        started, finished = f"evaluation of release {job.path} (step {job.end_step})", f"evaluation of release {job.path}"
    else:
        args = export_args(spec.run_dir, job)
        what = f"Hugging Face export of release {job.path!r} (plan {spec.plan_file})"
        started, finished = f"export of release {job.path} (step {job.end_step})", f"export of release {job.path}"
    command = [prof.lrpath, *map(shlex.quote, args)]
    lines = [
        "#!/bin/bash",
        f"# lrpath {what}; generated by `lrpath launch --slurm`, edit freely.",
        f"# Usage: sbatch [--dependency=afterok:JOBID] {script_name(job.script)}",
    ]
    lines += [f"#SBATCH {o}" for o in opts]
    lines += ["set -uo pipefail", ""]
    if prof.setup:
        lines += ["# Site setup (cluster profile `setup`)."] + [str(s) for s in prof.setup] + [""]
    lines += ["export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}"]
    lines += _profile_env(prof)
    lines += _step_lines(started, srun, command, finished)
    return "\n".join(lines)


def _step_lines(started: str, srun: list[str], command: list[str], finished: str,
                after: list[str] = ()) -> list[str]:
    """The job's one srun step between a start and an exit line, with ``after`` (the requeue decisions of a
    training job) in between."""
    lines = [
        "",
        f'echo "lrpath: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) {started}, start $(date -Is)"',
        " \\\n    ".join([" ".join(srun), " ".join(command)]),
        "rc=$?",
        *after,
    ]
    return lines + [f'echo "lrpath: {finished} exited $rc at $(date -Is)"', "exit $rc", ""]


def _var(key: str) -> str:
    return "job_" + re.sub(r"[^A-Za-z0-9]", "_", key)


def render_submit(jobs: Sequence[Job]) -> str:
    """``submit.sh``: sbatch every job in order, print "KEY JOBID" lines, cancel all on a failure."""
    lines = [
        "#!/bin/bash",
        "# Submits the plan's jobs with their dependencies; prints one 'KEY JOBID' line per job.",
        "# Generated by `lrpath launch --slurm`; running it is what `--submit` does.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "submitted=()",
        "trap 'if [[ ${#submitted[@]} -gt 0 ]]; then scancel \"${submitted[@]}\"; fi' ERR",
        "",
    ]
    for job in jobs:
        args = ["sbatch", "--parsable", f"--job-name=lrpath-{job.key.replace('@', '-to-')}"]
        if job.waits_for:
            args.append("--dependency=afterok:" + ":".join(f"${_var(key)}" for key in job.waits_for))
        args.append(script_name(job.script))
        if job.stop_at_step is not None:
            args.append(str(job.stop_at_step))
        comment = f"# {job.key}: " + (job.describe() if job.auto or job.pause else
                                      f"steps {job.start_step}..{job.end_step}")
        comment += f", after {', '.join(job.waits_for)}" if job.waits_for else ""
        var = _var(job.key)
        lines += [
            comment,
            f"{var}=$({' '.join(args)})",
            f"{var}=${{{var}%%;*}}",  # --parsable prints "id" or "id;cluster"
            f'submitted+=("${var}")',
            f'echo "{job.key} ${var}"',
        ]
    return "\n".join(lines) + "\n"


def write_scripts(spec: LaunchSpec, jobs: Sequence[Job], out_dir: Path) -> list[Path]:
    """Write ``<path>.sbatch`` per path or merge release, ``<version>-hf.sbatch`` per export, and
    ``submit.sh``; create the log directories sbatch needs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, job in {job.script: job for job in jobs}.items():
        log_dir(spec, job.path).mkdir(parents=True, exist_ok=True)
        target = out_dir / script_name(name)
        target.write_text(render_sbatch(spec, job.path) if job.kind == "train" else render_cpu_sbatch(spec, job))
        target.chmod(0o755)
        written.append(target)
    submit = out_dir / "submit.sh"
    submit.write_text(render_submit(jobs))
    submit.chmod(0o755)
    return written + [submit]
