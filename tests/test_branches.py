"""Branches and resume: fork from the main path, kill -9 and SIGTERM, crash-safe saves, refused resumes."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, losses, lrpath_command, run_lrpath, tiny_config
from lrpath_megatron.checkpoint import layout
from lrpath_megatron.errors import EXIT_REQUEUE


def _plan(demo_data, path: Path, eta_max: float = 3.0e-3) -> Path:
    steps_tokens = 8 * 64  # global batch 8 x seq 64
    plan = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": demo_data["vocab_size"]},
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"corpora": [{"name": n, "prefix": demo_data["prefixes"][n]} for n in ("docs", "code_a")]},
        "checkpoint": {"save_interval": 3},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "plan": {
            "main": {"eta_max": eta_max, "eta_min": 3.0e-4, "warmup_steps": 2, "replay": 0.25},
            "versions": [
                {"name": "v1", "corpora": ["docs"], "tokens": 12 * steps_tokens,
                 "release": {"method": "decay", "shape": "cosine", "decay_steps": 8, "data": "replay"}},
                {"name": "v2", "corpora": ["code_a"], "tokens": 12 * steps_tokens,
                 "release": {"method": "decay", "shape": "cosine", "decay_steps": 8, "data": "replay"}},
            ],
        },
    }
    path.write_text(yaml.safe_dump(plan))
    return path


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps in {timeout} s")


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen(lrpath_command(args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def plan_file(demo_data, tmp_path_factory) -> Path:
    return _plan(demo_data, tmp_path_factory.mktemp("plan") / "plan.yaml")


@pytest.fixture(scope="module")
def uninterrupted(plan_file, tmp_path_factory) -> dict[str, dict[int, float]]:
    run = tmp_path_factory.mktemp("uninterrupted")
    for path in ("main", "v1"):
        run_lrpath(["train", str(plan_file), "--path", path, "--run-dir", str(run)])
    return {"run": run, "main": losses(run / "main"), "v1": losses(run / "v1")}


@pytest.mark.compat
def test_branch_forks_from_the_main_checkpoint_and_decays_to_eta_min(plan_file, uninterrupted):
    run = uninterrupted["run"]
    main, v1 = uninterrupted["main"], uninterrupted["v1"]
    assert sorted(main) == list(range(24))  # main ends at the last fork (v2's) in this plan
    assert sorted(v1) == list(range(12, 20))  # v1 forks at step 12 and decays for 8 steps
    manifest = layout.read_manifest(layout.find_latest(run / "v1" / "checkpoints"))
    assert manifest["parent"] == str(run / "main" / "checkpoints" / "iter_0000012")
    assert manifest["parent_path"] == "main" and manifest["fork_step"] == 12
    records = [json.loads(line) for line in (run / "v1" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == pytest.approx(3.0e-3)  # continues the main path's LR at the fork
    assert records[-1]["lr"] == pytest.approx(3.0e-4)  # ends at eta_min
    assert not (run / "v1" / "checkpoints" / "iter_0000012").exists()  # no copy of the parent's weights


@pytest.mark.parametrize("path", ["main", "v1"])
def test_kill9_at_a_random_step_then_resume_is_bitwise(plan_file, uninterrupted, tmp_path, path):
    if path == "v1":  # the branch needs its parent's fork checkpoint
        (tmp_path / "main").mkdir()
        os.symlink(uninterrupted["run"] / "main" / "checkpoints", tmp_path / "main" / "checkpoints")
    args = ["train", str(plan_file), "--path", path, "--run-dir", str(tmp_path)]
    proc = _start(args)
    _wait_for_steps(tmp_path / path, random.Random(7).randint(4, 7), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_lrpath(args)
    assert losses(tmp_path / path) == uninterrupted[path]


def test_sigterm_saves_at_the_current_step_and_asks_for_requeue(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "c.yaml", schedule={"train_steps": 100000, "warmup_steps": 2})
    args = ["train", str(cfg), "--run-dir", str(tmp_path / "run")]
    proc = _start(args)
    _wait_for_steps(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    done = len(losses(tmp_path / "run"))
    latest = layout.find_latest(tmp_path / "run" / "checkpoints")
    assert latest.name == layout.iter_name(done)
    run_lrpath([*args, "--stop-at-step", str(done + 2)])
    assert sorted(losses(tmp_path / "run")) == list(range(done + 2))  # continues, no step lost or repeated


def test_kill9_during_saves_never_exposes_a_partial_checkpoint(demo_data, tmp_path):
    """Saves every step; killed at random moments (often inside a save): what resume picks is intact.
    benchmarks/kill_during_save.py runs the same with 20 kill points."""
    from kill_during_save import kill_during_saves

    cfg = tiny_config(demo_data, tmp_path / "c.yaml", checkpoint={"save_interval": 1},
                      schedule={"train_steps": 100000, "warmup_steps": 2})
    kill_during_saves(cfg, tmp_path / "run", points=3, seed=11)
    step = int(layout.find_latest(tmp_path / "run" / "checkpoints").name.split("_")[1])
    out = run_lrpath(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--stop-at-step", str(step + 1)])
    assert f"resumed at step {step}" in out.stdout


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def test_resume_with_a_changed_model_or_past_schedule_is_refused_and_writes_nothing(plan_file, uninterrupted, demo_data,
                                                                                      tmp_path):
    run = uninterrupted["run"]
    before = _snapshot(run)
    proc = run_lrpath(["train", str(plan_file), "--path", "main", "--run-dir", str(run),
                       "--set", "model.hidden_size=128"], check=False)
    assert proc.returncode == 2
    assert "the model differs (model.hidden_size: checkpoint 64 vs config 128)" in proc.stderr
    changed = _plan(demo_data, tmp_path / "changed.yaml", eta_max=2.0e-3)
    proc = run_lrpath(["train", str(changed), "--path", "main", "--run-dir", str(run)], check=False)
    assert proc.returncode == 2
    assert ("the LR schedule or data blend of steps 0..23 differ from what was trained; restore the original plan "
            "(extending it with later versions is fine)") in proc.stderr
    assert _snapshot(run) == before


@pytest.fixture(scope="module")
def stopped(demo_data, tmp_path_factory) -> dict:
    """A stand-alone run stopped at step 4, with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = tiny_config(demo_data, tmp / "c.yaml", checkpoint={"save_interval": 2})
    run_lrpath(["train", str(cfg), "--run-dir", str(tmp / "run"), "--stop-at-step", "4"])
    return {"cfg": cfg, "run": tmp / "run", "losses": losses(tmp / "run")}


def test_resume_names_the_changed_data_setting_and_writes_nothing(stopped, demo_data, tmp_path):
    run, cfg = tmp_path / "run", str(stopped["cfg"])
    shutil.copytree(stopped["run"], run)
    before = _snapshot(run)
    one_corpus = tiny_config(demo_data, tmp_path / "docs_only.yaml", corpora=("docs",),
                             checkpoint={"save_interval": 2})
    docs = {"name": "docs", "prefix": demo_data["prefixes"]["docs"]}
    code = {"name": "code_a", "prefix": demo_data["prefixes"]["code_a"]}
    for config, sets, message in [
        (cfg, ["data.seed=7", "data.valid_fraction=0.05"],
         "data.seed: checkpoint 1234 vs config 7; data.valid_fraction: checkpoint 0.02 vs config 0.05; "
         "restore the original config, or use a new --run-dir"),
        (str(one_corpus), [], f"data.corpora: checkpoint {[docs, code]!r} vs config {[docs]!r}"),
        (cfg, ["optimizer.lr=2.0e-3"], "the LR schedule or data blend of steps 0..3 differ from what was trained"),
    ]:
        args = ["train", config, "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
        proc = run_lrpath(args, check=False, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
        assert f"cannot resume path 'train' from {run / 'checkpoints' / 'iter_0000004'}: {message}" in proc.stderr
    assert _snapshot(run) == before
    # A checkpoint from before the settings were recorded: the digest alone tells that something changed.
    manifest = run / "checkpoints" / "iter_0000004" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                    if k != "schedule_inputs"}))
    proc = run_lrpath(["train", cfg, "--run-dir", str(run), "--set", "data.seed=7"], check=False, timeout=120)
    assert proc.returncode == 2
    assert ("the LR schedule, data blend or data settings of steps 0..3 differ from what was trained; restore the "
            "original config, or use a new --run-dir") in proc.stderr


def test_a_damaged_checkpoint_is_named_and_moving_it_aside_resumes_from_the_one_before(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped["run"], run)
    damaged = run / "checkpoints" / "iter_0000004"
    os.truncate(damaged / "model" / "__0_0.distcp", 1000)
    before = _snapshot(run)
    args = ["train", str(stopped["cfg"]), "--run-dir", str(run), "--stop-at-step", "4"]
    proc = run_lrpath(args, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"checkpoint {damaged} is damaged" in proc.stderr and "manifest.json: model/__0_0.distcp)" in proc.stderr
    aside = damaged.parent / "damaged_iter_0000004"
    assert f"move it aside (mv {damaged} {aside}) and rerun" in proc.stderr
    assert _snapshot(run) == before  # nothing written, the metrics of steps 0..3 kept
    damaged.rename(aside)
    assert "resumed at step 2" in run_lrpath(args).stdout
    assert losses(run) == stopped["losses"]  # steps 2 and 3 trained again, bit for bit
