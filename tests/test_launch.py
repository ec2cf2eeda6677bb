"""``lrpath launch``: job graph, rendered sbatch scripts, profile validation, and a real SLURM cluster run.

The end-to-end test starts a localhost cluster (tests/slurm_cluster.py: munged, slurmctld, slurmd n1 + n2),
submits the generated scripts of a tiny plan (main + 2 branches, gloo) and checks dependencies, losses
and a USR1-triggered requeue of a running main-path job.
"""
from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lrpath_megatron.cli import main as lrpath_main
from lrpath_megatron.launch.jobs import AutoSpec, Job, MergeSpec, build_jobs, merge_args
from lrpath_megatron.launch.local import plan_commands
from lrpath_megatron.plan import MainPause, Plan, load_plan
from conftest import record_fallback
from slurm_cluster import slurm_cluster_or_reason  # noqa: F401 - pytest fixture

REPO = Path(__file__).resolve().parents[1]
LOCAL_PROFILE = REPO / "examples" / "cluster_local.yaml"
LRPATH = str(Path(sys.executable).with_name("lrpath"))
STEPS_PER_VERSION = 30
DECAY_STEPS = 4


def _write_plan(path: Path, prefixes: dict, vocab_size: int) -> Path:
    """Main path of 2 x 30 steps with a cosine branch per version: v1 forks at 30, v2 at the main end (60)."""
    plan = {
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": vocab_size},
        "parallel": {"micro_batch_size": 2, "global_batch_size": 4},
        "data": {"corpora": [{"name": n, "prefix": prefixes[n]} for n in ("docs", "code_a")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "plan": {
            "main": {"eta_max": 3e-3, "eta_min": 3e-4, "warmup_steps": 2, "replay": 0.2},
            "versions": [
                {"name": v, "corpora": [c], "steps": STEPS_PER_VERSION,
                 "release": {"method": "decay", "shape": "cosine", "decay_steps": DECAY_STEPS, "data": "replay"}}
                for v, c in (("v1", "docs"), ("v2", "code_a"))
            ],
        },
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    """For rendering only: plans are validated without touching their data files."""
    prefixes = {n: f"/data/{n}_text_document" for n in ("docs", "code_a")}
    return _write_plan(tmp_path_factory.mktemp("plan") / "plan.yaml", prefixes, 2048)


@pytest.fixture(scope="module")
def merge_plan_file(plan_file, tmp_path_factory) -> Path:
    """v1 released by merging main-path steps 20, 25, 30 (WSM); v2 by a decay branch from the main end."""
    plan = yaml.safe_load(plan_file.read_text())
    plan["plan"]["versions"][0]["release"] = {
        "method": "merge", "merge": {"num_checkpoints": 3, "weights": "1-sqrt", "window_steps": 10}}
    path = tmp_path_factory.mktemp("merge_plan") / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trainable_plan_file(tmp_path_factory, demo_data) -> Path:
    return _write_plan(tmp_path_factory.mktemp("plan") / "plan.yaml", demo_data["prefixes"], demo_data["vocab_size"])


def _profile(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(LOCAL_PROFILE.read_text())
    data.update(changes)
    out = tmp_path / "cluster.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def _launch(*args: str) -> int:
    return lrpath_main(["launch", *map(str, args)])


# ----------------------------------------------------------------------------------------------- units
def test_jobs_cut_the_main_path_at_fork_steps(plan_file):
    jobs = build_jobs(load_plan(plan_file).paths())
    assert jobs == [
        Job("main@30", "main", 0, 30, 30, None),
        Job("main", "main", 30, 60, None, "main@30"),  # v2 forks at the main end: no extra segment
        Job("v1", "v1", 30, 30 + DECAY_STEPS, None, "main@30"),
        Job("v2", "v2", 60, 60 + DECAY_STEPS, None, "main"),
    ]


def _jobs(plan_file: Path) -> list[Job]:
    plan = load_plan(plan_file)
    return build_jobs(plan.paths(), plan.releases())


def test_merge_release_is_a_job_after_the_segment_that_reaches_it(merge_plan_file):
    assert _jobs(merge_plan_file) == [
        Job("main@30", "main", 0, 30, 30, None),  # cut at the merge's release step, as at a fork step
        Job("main", "main", 30, 60, None, "main@30"),
        Job("v2", "v2", 60, 60 + DECAY_STEPS, None, "main"),
        Job("v1", "v1", 20, 30, None, "main@30", MergeSpec((20, 25, 30), "1-sqrt")),
    ]
    assert [j.kind for j in _jobs(merge_plan_file)] == ["train"] * 3 + ["merge"]


def test_rendered_merge_script(merge_plan_file, tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    assert _launch(merge_plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--run-dir", run, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["main.sbatch", "submit.sh", "v1.sbatch", "v2.sbatch"]
    for script in out.iterdir():
        subprocess.run(["bash", "-n", str(script)], check=True)
    v1 = (out / "v1.sbatch").read_text()
    opts = {line.split(None, 1)[1] for line in v1.splitlines() if line.startswith("#SBATCH")}
    assert {"--partition=debug", "--nodes=1", "--ntasks=1", "--time=01:00:00", "--requeue",
            f"--output={run}/v1/logs/slurm-%j.out"} <= opts
    assert not any(o.startswith(("--gpus", "--ntasks-per-node", "--signal", "--exclusive")) for o in opts)
    ckpts = " ".join(f"{run}/main/checkpoints/iter_{s:07d}" for s in (20, 25, 30))
    assert (f"srun --ntasks=1 \\\n    lrpath merge {ckpts} --weights 1-sqrt "
            f"--out {run}/v1/checkpoints/iter_0000030 --skip-existing") in v1
    submit = (out / "submit.sh").read_text()
    assert "job_main_30=$(sbatch --parsable --job-name=lrpath-main-to-30 main.sbatch 30)" in submit
    assert "job_v1=$(sbatch --parsable --job-name=lrpath-v1 --dependency=afterok:$job_main_30 v1.sbatch)" in submit
    # The profile's paths.<version>.time sets a merge job's limit.
    assert _launch(merge_plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--cluster-set", "paths.v1.time=00:05:00",
                   "--run-dir", run, "--out", out) == 0
    assert "#SBATCH --time=00:05:00\n" in (out / "v1.sbatch").read_text()
    # The profile's srun_extra (site flags every srun step needs) is on the merge's srun step too.
    profile = _profile(tmp_path, srun_extra=["--mpi=pmix", "--cpu-bind=none"])
    assert _launch(merge_plan_file, "--slurm", "--cluster", profile, "--run-dir", run, "--out", out) == 0
    assert "srun --ntasks=1 --mpi=pmix --cpu-bind=none \\\n    lrpath merge " in (out / "v1.sbatch").read_text()
    assert " --mpi=pmix --cpu-bind=none \\\n    lrpath train " in (out / "main.sbatch").read_text()


def test_merge_version_nodes_is_refused(merge_plan_file, tmp_path, capsys):
    """A merge job is one CPU task on one node: paths.<merge version>.nodes other than 1 would be ignored."""
    out, run = tmp_path / "out", tmp_path / "run"
    code = _launch(merge_plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--cluster-set", "paths.v1.nodes=2",
                   "--run-dir", run, "--out", out)
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "cluster_local.yaml: paths.v1.nodes=2" in err
    assert "released by a merge, which runs as one CPU task on one node; remove paths.v1.nodes" in err
    assert not out.exists() and not run.exists()
    # nodes: 1 is what the merge job gets anyway.
    assert _launch(merge_plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--cluster-set", "paths.v1.nodes=1",
                   "--run-dir", run, "--out", out) == 0


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_merge_job_command_is_idempotent(merge_plan_file, tmp_path, capsys):
    """The merge job's exact command on real dist checkpoints: merges once, then 'already merged'; a
    different merge already at the output is an error, not a skip."""
    import torch
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    for step in (20, 25, 30):
        dcp.save({"w": torch.full((4, 4), float(step))},
                 checkpoint_id=str(run / "main" / "checkpoints" / f"iter_{step:07d}" / "model"), no_dist=True)
    job = _jobs(merge_plan_file)[-1]
    args = merge_args(run, job)
    assert lrpath_main([*args, "--no-progress"]) == 0
    out = run / "v1" / "checkpoints" / "iter_0000030"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [20, 25, 30] and manifest["weights"]["spec"] == "1-sqrt"
    stamp = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert lrpath_main(args) == 0  # a rerun or requeue of the merge job
    assert "already merged" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    other = [a if a != "1-sqrt" else "linear" for a in args]
    assert lrpath_main(other) == 2
    assert "already holds a different merge" in capsys.readouterr().err


def test_local_dry_run_runs_merges_after_main(merge_plan_file, tmp_path, capsys):
    assert _launch(merge_plan_file, "--local", "--run-dir", tmp_path, "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("lrpath_megatron.cli ")[1].split()[0] for line in lines] == ["train", "train", "merge"]
    assert "--path main " in lines[0] and "--path v2 " in lines[1]
    assert lines[2].endswith(f"--weights 1-sqrt --out {tmp_path}/v1/checkpoints/iter_0000030 --skip-existing")
    assert f"{tmp_path}/main/checkpoints/iter_0000020 " in lines[2]


def test_releases_export_to_hugging_face_after_their_jobs(merge_plan_file, tmp_path, capsys):
    """plan.export.hf: one CPU job per release after the job that writes it (the branch, the merge),
    writing RUN/<version>/hf; locally, after the merges. The plan hash does not change."""
    plan = yaml.safe_load(merge_plan_file.read_text())
    tok = tmp_path / "spm.model"  # a path the launcher checks exists; the export jobs read it
    tok.write_bytes(b"")
    plan["plan"]["export"] = {"hf": True, "tokenizer": str(tok)}
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    loaded = load_plan(plan_file)
    assert loaded.plan_hash() == load_plan(merge_plan_file).plan_hash()
    exports = [j for j in build_jobs(loaded.paths(), loaded.releases(), loaded.config.export) if j.kind == "export"]
    assert [(j.key, j.path, j.end_step, j.after) for j in exports] == [
        ("v2-hf", "v2", 60 + DECAY_STEPS, "v2"), ("v1-hf", "v1", 30, "v1")]

    out, run = tmp_path / "out", tmp_path / "run"
    assert _launch(plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--run-dir", run, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["main.sbatch", "submit.sh", "v1-hf.sbatch", "v1.sbatch",
                                                     "v2-hf.sbatch", "v2.sbatch"]
    for script in out.iterdir():
        subprocess.run(["bash", "-n", str(script)], check=True)
    submit = (out / "submit.sh").read_text()
    for version in ("v1", "v2"):
        assert (f"job_{version}_hf=$(sbatch --parsable --job-name=lrpath-{version}-hf "
                f"--dependency=afterok:$job_{version} {version}-hf.sbatch)") in submit
    script = (out / "v1-hf.sbatch").read_text()
    opts = {line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {"--job-name=lrpath-v1-hf", "--nodes=1", "--ntasks=1", f"--output={run}/v1/logs/slurm-%j.out"} <= opts
    assert not any(o.startswith(("--gpus", "--ntasks-per-node", "--exclusive")) for o in opts)
    assert (f"srun --ntasks=1 \\\n    lrpath hf export {run}/v1/checkpoints/iter_0000030 --out {run}/v1/hf "
            f"--overwrite --no-progress --tokenizer-model {tok}") in script

    capsys.readouterr()
    assert _launch(plan_file, "--local", "--run-dir", run, "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("lrpath_megatron.cli ")[1].split()[:2] for line in lines[2:]] == [
        ["merge", f"{run}/main/checkpoints/iter_0000020"], ["hf", "export"], ["hf", "export"]]
    assert lines[3].endswith(f"export {run}/v2/checkpoints/iter_{60 + DECAY_STEPS:07d} --out {run}/v2/hf "
                             f"--overwrite --no-progress --tokenizer-model {tok}")

    from lrpath_megatron.config import ConfigError
    from lrpath_megatron.plan import Plan

    plan["plan"]["export"] = {"tokenizer": str(tok)}
    with pytest.raises(ConfigError, match="plan.export.tokenizer goes with the Hugging Face exports"):
        Plan.from_dict(plan)
    plan["plan"]["export"] = {"hf": True, "tokenizer": str(tmp_path / "missing.model")}
    with pytest.raises(ConfigError, match="plan.export.tokenizer .*missing.model does not exist"):
        build_jobs(loaded.paths(), loaded.releases(), Plan.from_dict(plan).config.export)


def test_rendered_scripts(plan_file, tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    assert _launch(plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--run-dir", run, "--out", out,
                   "--set", "seed=7") == 0
    assert sorted(p.name for p in out.iterdir()) == ["main.sbatch", "submit.sh", "v1.sbatch", "v2.sbatch"]
    for script in out.iterdir():  # real bash parses every generated file
        subprocess.run(["bash", "-n", str(script)], check=True)
    main = (out / "main.sbatch").read_text()
    opts = [line.split(None, 1)[1] for line in main.splitlines() if line.startswith("#SBATCH")]
    assert {"--partition=debug", "--nodes=2", "--ntasks-per-node=1", "--time=00:10:00", "--requeue",
            "--signal=USR1@30", "--open-mode=append", f"--output={run}/main/logs/slurm-%j.out"} <= set(opts)
    assert not any(o.startswith("--gpus-per-node") for o in opts)  # request_gpus: false
    assert "--run-dir \"$RUN_DIR\" --set seed=7" in main and f"PLAN={plan_file}" in main
    assert "--nodes=1" in (out / "v1.sbatch").read_text()  # branches.nodes
    # after a hang or a dead rank: at most max_restarts requeues, srun ends the others rank_exit_wait s later
    assert "MAX_RESTARTS=3" in main and "--kill-on-bad-exit=0 --wait=120" in main
    assert (run / "v2" / "logs").is_dir()  # sbatch cannot create its output directory itself
    submit = (out / "submit.sh").read_text()
    assert "job_main_30=$(sbatch --parsable --job-name=lrpath-main-to-30 main.sbatch 30)" in submit
    assert "--dependency=afterok:$job_main_30 v1.sbatch" in submit
    assert "--dependency=afterok:$job_main v2.sbatch" in submit


def test_h100_example_profile(tmp_path):
    out = tmp_path / "out"
    assert _launch(REPO / "examples" / "demo_plan.yaml", "--slurm", "--cluster", REPO / "examples" / "cluster_h100.yaml",
                   "--run-dir", tmp_path / "run", "--out", out, "--set", "parallel.tensor_parallel=2",
                   "--set", "parallel.pipeline_parallel=2", "--set", "parallel.micro_batch_size=1") == 0
    main, v1, v3 = ((out / f"{p}.sbatch").read_text() for p in ("main", "v1", "v3"))
    for text in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=4",
                 "#SBATCH --account=my-project", "--container-image=/shared/containers/lrpath-megatron.sqsh",
                 "export NCCL_IB_TIMEOUT=22", "export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"):
        assert text in main
    assert "#SBATCH --nodes=2" in v1 and "#SBATCH --time=02:00:00" in v1
    assert "#SBATCH --nodes=4" in v3  # paths.v3 wins over branches


@pytest.mark.parametrize("profile_changes, plan_sets, expected", [
    ({"partition": ""}, [], "partition is not set"),
    ({"gpus_per_node": 3}, ["parallel.tensor_parallel=2"], "gpus_per_node=3 is not divisible by parallel.tensor_parallel=2"),
    ({"gpus_per_node": 6}, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], "do not divide one another"),
    ({"time": "00:01:00"}, [], "shorter than one checkpoint interval"),
    ({"seconds_per_step": 0}, [], "seconds_per_step is not set"),
    ({"max_restarts": -1}, [], "max_restarts must be >= 0"),
])
def test_bad_profile_fails_before_anything_is_written(plan_file, tmp_path, capsys, profile_changes, plan_sets,
                                                      expected):
    out = tmp_path / "out"
    sets = [a for s in plan_sets for a in ("--set", s)]
    code = _launch(plan_file, "--slurm", "--cluster", _profile(tmp_path, **profile_changes), "--out", out,
                   "--run-dir", tmp_path / "run", "--submit", *sets)
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and "cluster.yaml" in err
    assert not out.exists() and not (tmp_path / "run").exists()


def test_local_dry_run_uses_torchrun(plan_file, tmp_path, capsys):
    assert _launch(plan_file, "--local", "--nproc-per-node", 2, "--run-dir", tmp_path, "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("--path ")[1].split()[0] for line in lines] == ["main", "v1", "v2"]
    assert all("torch.distributed.run --standalone --nproc-per-node=2" in line for line in lines)


@pytest.mark.parametrize("mode_args, extra, expected", [
    # --dry-run keeps a --local run from training should the check not fire.
    (["--local", "--dry-run"], ["--submit"],
     "--submit only applies to --slurm, not to --local; remove it or use --slurm"),
    (["--local", "--dry-run"], ["--cluster", LOCAL_PROFILE], "--cluster only applies to --slurm, not to --local"),
    (["--local", "--dry-run"], ["--cluster-set", "nodes=4"], "--cluster-set only applies to --slurm, not to --local"),
    (["--local", "--dry-run"], ["--out", "OUT"], "--out only applies to --slurm, not to --local"),
    (["--local", "--dry-run"], ["--out", "OUT", "--submit"],
     "--out, --submit only apply to --slurm, not to --local; remove them"),
    (["--slurm", "--cluster", LOCAL_PROFILE], ["--nproc-per-node", "2"],
     "--nproc-per-node only applies to --local, not to --slurm; remove it or use --local"),
    (["--slurm", "--cluster", LOCAL_PROFILE], ["--nproc-per-node", "0"], "--nproc-per-node only applies to --local"),
    (["--slurm", "--cluster", LOCAL_PROFILE, "--submit"], ["--dry-run"],
     "--dry-run only applies to --local, not to --slurm; remove it or use --local; without --submit, --slurm "
     "writes the scripts and submits nothing"),
])
def test_option_of_the_other_mode_is_an_error(plan_file, tmp_path, monkeypatch, capsys, mode_args, extra, expected):
    monkeypatch.chdir(tmp_path)  # a relative --out would land here
    code = _launch(plan_file, *mode_args, "--run-dir", tmp_path / "run", *extra)
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"lrpath launch: error: {expected}")
    assert captured.err.count("error:") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written: no run dir, no scripts


# --------------------------------------------------------------------------------- real SLURM cluster
def _metrics(run: Path, path: str) -> list[dict]:
    f = run / path / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _logs(run: Path) -> str:
    return "\n".join(f"==== {f}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(run.glob("*/logs/*.out")))


def _wait_for_training(run: Path, alive, deadline: float) -> None:
    """Until the first main-path segment has logged a few steps (it must still be running)."""
    while len(_metrics(run, "main")) < 3:
        assert time.time() < deadline, f"main@30 did not start training\n{_logs(run)}"
        assert alive(), f"main@30 ended before it could be signalled\n{_logs(run)}"
        time.sleep(0.2)


def _check_requeued_segment(seg_log: str) -> None:
    """The segment saved on USR1, asked for a requeue, and its rerun resumed at exactly that step."""
    saved_at = int(re.search(r"signal received: saved at step (\d+)", seg_log).group(1))
    assert 0 < saved_at < 30, seg_log
    assert "requeueing job" in seg_log and "(restart 1)" in seg_log, seg_log
    assert f"resumed at step {saved_at}" in seg_log, seg_log


def _check_paths_trained(run: Path) -> None:
    """Every path trained each of its steps exactly once, with finite losses."""
    for path, steps in (("main", range(60)), ("v1", range(30, 30 + DECAY_STEPS)),
                        ("v2", range(60, 60 + DECAY_STEPS))):
        records = _metrics(run, path)
        assert [r["step"] for r in records] == list(steps), f"{path}\n{_logs(run)}"
        assert all(0 < r["loss"] < 20 for r in records), path


def test_plan_on_slurm_cluster(slurm_cluster_or_reason, trainable_plan_file, tmp_path, monkeypatch, request):
    plan_file = trainable_plan_file
    run, out = tmp_path / "run", tmp_path / "slurm"
    if isinstance(slurm_cluster_or_reason, str):
        record_fallback(request.node.nodeid, f"no local SLURM cluster: {slurm_cluster_or_reason}; ran the generated "
                        "scripts under bash with srun/scontrol stand-ins instead")
        return _run_scripts_without_slurm(plan_file, run, out, tmp_path / "bin")
    cluster = slurm_cluster_or_reason
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    assert _launch(plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--cluster-set", f"lrpath={LRPATH}",
                   "--run-dir", run, "--out", out, "--submit") == 0
    ids = dict(line.split() for line in (out / "submitted.txt").read_text().splitlines())
    assert set(ids) == {"main@30", "main", "v1", "v2"}

    # Preempt the first main-path segment while it trains: USR1 -> save -> exit 3 -> the script requeues.
    seg = ids["main@30"]
    deadline = time.time() + 180
    _wait_for_training(run, lambda: cluster.job_info(seg)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"),
                       deadline)
    cluster.run("scancel", "--signal=USR1", seg)

    finished = {}
    while len(finished) < len(ids):
        assert time.time() < deadline + 240, f"jobs not finished: {finished}\n{_logs(run)}"
        for key, job_id in ids.items():
            if key in finished:
                continue
            info = cluster.job_info(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                finished[key] = info
        time.sleep(1)
    assert {k: i["JobState"] for k, i in finished.items()} == dict.fromkeys(ids, "COMPLETED"), _logs(run)

    assert finished["main@30"]["Restarts"] == "1", _logs(run)
    _check_requeued_segment((run / "main" / "logs" / f"slurm-{seg}.out").read_text())
    _check_paths_trained(run)
    # Branches started only after the main-path job that ends at their fork step (afterok, across the requeue).
    assert finished["v1"]["StartTime"] >= finished["main@30"]["EndTime"]
    assert finished["main"]["StartTime"] >= finished["main@30"]["EndTime"]
    assert finished["v2"]["StartTime"] >= finished["main"]["EndTime"]
    assert "branched from" in (run / "v1" / "logs" / f"slurm-{ids['v1']}.out").read_text()
    # The main path ran on both nodes (multi-node srun, one rank per node).
    assert finished["main@30"]["NodeList"] == "n[1-2]" and finished["main"]["NumNodes"] == "2"


# ------------------------------------------------------------- fallback: the scripts without a cluster
# Only used where no cluster can start (no root/apt): the same scripts run under bash, with `srun` starting
# the tasks locally (SLURM_PROCID/NTASKS/LOCALID set) and `scontrol` answering the three calls they make.
FAKE_SRUN = r"""#!/bin/bash
per_node=1
while [[ $# -gt 0 && $1 == --* ]]; do [[ $1 == --ntasks-per-node=* ]] && per_node=${1#*=}; shift; done
n=$((per_node * SLURM_JOB_NUM_NODES))
echo $$ > "$FAKE_SLURM_DIR/srun.pid"
pids=()
for ((i = 0; i < n; i++)); do
    SLURM_PROCID=$i SLURM_NTASKS=$n SLURM_LOCALID=$((i % per_node)) "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for p in "${pids[@]}"; do
    while :; do wait "$p"; r=$?; if ((r > 128)) && kill -0 "$p" 2>/dev/null; then continue; fi; break; done
    ((r > rc)) && rc=$r
done
exit $rc
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
    "show hostnames") echo "$3" | tr ',' '\n' ;;
    "show node") echo "NodeName=$3 NodeAddr=127.0.0.1" ;;
    requeue*) echo "$2" >> "$FAKE_SLURM_DIR/requeued" ;;
esac
"""


def _run_scripts_without_slurm(plan_file: Path, run: Path, out: Path, bin_dir: Path) -> None:
    assert _launch(plan_file, "--slurm", "--cluster", LOCAL_PROFILE, "--cluster-set", f"lrpath={LRPATH}",
                   "--run-dir", run, "--out", out) == 0
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    jobs = build_jobs(load_plan(plan_file).paths())
    for job_id, job in enumerate(jobs, start=1):
        script = (out / f"{job.path}.sbatch").read_text()
        nodes = script.split("#SBATCH --nodes=")[1].split()[0]
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(bin_dir),
                   SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES=nodes)
        cmd = ["bash", str(out / f"{job.path}.sbatch")] + ([str(job.stop_at_step)] if job.stop_at_step else [])
        log = run / job.path / "logs" / f"slurm-{job_id}.out"
        with log.open("a") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            if job_id == 1:  # signal the first segment as SLURM would before its time limit, then "requeue"
                _wait_for_training(run, lambda: proc.poll() is None, time.time() + 180)
                os.kill(int((bin_dir / "srun.pid").read_text()), signal.SIGUSR1)
                assert proc.wait(timeout=120) == 0, _logs(run)
                assert (bin_dir / "requeued").read_text().split() == ["1"], _logs(run)
                proc = subprocess.Popen(cmd, env=dict(env, SLURM_RESTART_COUNT="1"), stdout=f,
                                        stderr=subprocess.STDOUT)
            assert proc.wait(timeout=300) == 0, _logs(run)
    _check_requeued_segment((run / "main" / "logs" / "slurm-1.out").read_text())
    _check_paths_trained(run)


def test_auto_branch_waits_for_the_segment_past_every_fork_it_may_choose(plan_file, tmp_path, capsys):
    """decay_steps: auto knee branches: v1 forks where its decay ends D_1 (the shortest forks last), v2 from a
    fixed step 36 (the stable half moves longer decays' forks later); a replay branch keeps its one fork."""
    plan = yaml.safe_load(plan_file.read_text())
    plan["plan"]["versions"][0]["release"] = {"method": "decay", "shape": "knee", "decay_steps": "auto",
                                              "decay_bounds": [6, 20], "data": "tail"}
    plan["plan"]["versions"][1]["release"] = {"method": "decay", "shape": "knee", "decay_steps": "auto",
                                              "decay_bounds": [4, 20], "data": "tail", "fork_step": 36}
    plan["logging"]["eval_interval"] = 2  # the choices read validation losses
    path, run, out = tmp_path / "auto.yaml", tmp_path / "run", tmp_path / "out"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    loaded = load_plan(path)
    jobs = build_jobs(loaded.paths(), loaded.releases(), auto=loaded.auto_decays, pause=loaded.main_pause)
    pause = MainPause("v2", 38, ("v1",), 27)
    assert loaded.main_pause == pause
    assert jobs == [
        Job("main@27", "main", 0, 27, 27, None),
        Job("main@38", "main", 27, 38, 38, "main@27"),
        Job("v1", "v1", 20, 30, None, "main@27", auto=AutoSpec((6, 20), (20, 27))),
        # v2 alone decides how far the main path trains (to its latest candidate fork, 46, at most): the main
        # path stops at v2's earliest fork until v1, which the choice reads, has finished
        Job("main", "main", 38, 46, None, "main@38", pause=pause),
        # ... and so does v2's branch: whichever SLURM starts first, the choice reads the same
        Job("v2", "v2", 38, 56, None, "main", auto=AutoSpec((4, 20), (38, 46)), reads=("v1",)),
    ]
    main = loaded.path("main")
    for job in (j for j in jobs if j.auto):  # every candidate fork is saved before the segment the branch waits for ends
        forks = {f for f, _ in loaded.auto_decays[job.key].forks.values()}
        ends = next(j.end_step for j in jobs if j.key == job.after)
        assert forks <= main.save_steps and max(forks) == ends
    replay = copy.deepcopy(plan)
    replay["plan"]["versions"][1]["release"] = {"method": "decay", "shape": "knee", "decay_steps": "auto",
                                                "decay_bounds": [4, 20], "data": "replay"}
    assert Plan.from_dict(replay).auto_decays["v2"].fork_span == (60, 60)
    # Before the choice: the launch says what is unknown, submit.sh waits for the latest fork.
    assert _launch(path, "--slurm", "--cluster", LOCAL_PROFILE, "--run-dir", run, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "job v2: path v2 decay auto in [4, 20] steps (forks between step 38 and 46, chosen from the run up to step 38) " \
           "after main, v1" in printed
    assert "job main: path main steps 38..46 at most: version v2 chooses its decay length first, the main path " \
           "ends at its fork after main@38, v1" in printed
    submit_sh = (out / "submit.sh").read_text()
    assert "--dependency=afterok:$job_main_27 v1.sbatch" in submit_sh
    assert "--dependency=afterok:$job_main_38:$job_v1 main.sbatch" in submit_sh
    assert submit_sh.index("job_v1=") < submit_sh.index("job_main=")
    # Locally: the main path (it stops at step 38 by itself), v1, the main path again, v2.
    assert [name for name, _ in plan_commands(loaded, path, [], run, 1)] == ["main", "v1", "main", "v2"]
    # Once v1 chose (a resubmission), it waits for its own fork only.
    (run / "v1" / "decay_choice.json").write_text(json.dumps({"decay_steps": 12, "no_forecast": "x"}))
    assert _launch(path, "--slurm", "--cluster", LOCAL_PROFILE, "--run-dir", run, "--out", out) == 0
    assert "job v1: path v1 steps 24..30 after main@24" in capsys.readouterr().out
    assert "--dependency=afterok:$job_main_24 v1.sbatch" in (out / "submit.sh").read_text()


def test_a_method_auto_release_waits_for_the_end_of_its_version(plan_file, tmp_path, capsys):
    """method: auto: the release's job (a branch or a merge, decided when it starts) waits for the segment
    that ends the version, where the last merge checkpoint is, and the main path saves every input."""
    plan = yaml.safe_load(plan_file.read_text())
    plan["plan"]["versions"][1]["release"] = {"method": "auto", "shape": "cosine", "decay_bounds": [4, 12]}
    plan["logging"]["eval_interval"] = 2
    path, run, out = tmp_path / "auto.yaml", tmp_path / "run", tmp_path / "out"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    loaded = load_plan(path)
    auto, end = loaded.auto_decays["v2"], loaded.versions[1].end_step
    assert auto.method_auto and auto.merges and auto.fork_span[1] == end == loaded.main_end
    main = loaded.path("main")
    assert auto.merge_steps() <= main.save_steps | main.weights_only_steps
    jobs = {j.key: j for j in build_jobs(loaded.paths(), loaded.releases(), auto=loaded.auto_decays,
                                         pause=loaded.main_pause)}
    waits = jobs[jobs["v2"].after]
    assert waits.path == "main" and waits.end_step == end and jobs["v2"].auto.windows == tuple(sorted(auto.merges))
    assert _launch(path, "--slurm", "--cluster", LOCAL_PROFILE, "--run-dir", run, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "job v2: path v2 method auto: a decay in [4, 12] steps or a merge over a window of" in printed
