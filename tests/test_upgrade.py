"""Upgrading megatron-core under a running plan: a run directory written by megatron-core 0.16.1 (the
compatibility venv, Python 3.11) resumes under the installed release with model and optimizer loaded as
saved, merges and Hugging Face exports read checkpoints of either release, and 0.16.1 refuses a checkpoint
that a newer megatron-core wrote, naming both releases."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import COMPAT_PYTHON, REPO, losses, run_lrpath, stored_tensors
from lrpath_megatron.checkpoint.layout import read_manifest
from lrpath_megatron.mcore_api import versions

OLD = "0.16.1"
STEPS, DECAY, STOP, END = 12, 4, 16, 18  # v1 forks at 8 and is released at 12; main stops at 16
pytestmark = pytest.mark.skipif(versions()["megatron_core"] == OLD, reason="the upgrade is tested from the newer release")


def run_old(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """``lrpath ARGS`` under megatron-core 0.16.1."""
    assert COMPAT_PYTHON.is_file(), f"{COMPAT_PYTHON} is missing: `make setup-compat` builds it (make test does)"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(COMPAT_PYTHON), "-m", "lrpath_megatron.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"lrpath {' '.join(args)} under {OLD} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def _plan(path: Path, demo_data: dict) -> Path:
    plan = {
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
                  "activation": "swiglu", "vocab_size": demo_data["vocab_size"]},
        "parallel": {"micro_batch_size": 2, "global_batch_size": 4},
        "data": {"corpora": [{"name": n, "prefix": demo_data["prefixes"][n]} for n in ("docs", "code_a")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "plan": {
            "main": {"eta_max": 3e-3, "eta_min": 3e-4, "warmup_steps": 2, "save_steps": [8, 10]},
            "versions": [{"name": v, "corpora": [c], "steps": STEPS,
                          "release": {"method": "decay", "shape": "cosine", "decay_steps": DECAY}}
                         for v, c in (("v1", "docs"), ("v2", "code_a"))],
        },
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def _ckpt(run: Path, path: str, step: int) -> Path:
    return run / path / "checkpoints" / f"iter_{step:07d}"


@pytest.fixture(scope="module")
def old_run(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """The plan's run directory as 0.16.1 left it: the main path stopped at step 16, v1 released."""
    root = tmp_path_factory.mktemp("upgrade")
    plan, run = _plan(root / "plan.yaml", demo_data), root / "old"
    run_old(["train", str(plan), "--path", "main", "--run-dir", str(run), "--stop-at-step", str(STOP)])
    run_old(["train", str(plan), "--path", "v1", "--run-dir", str(run)])
    return plan, run


def test_a_run_directory_of_0_16_resumes_under_the_installed_release_as_under_0_16(old_run, tmp_path):
    plan, old = old_run
    up, ref = tmp_path / "up", tmp_path / "ref"
    shutil.copytree(old, up)
    shutil.copytree(old, ref)
    assert read_manifest(_ckpt(old, "main", STOP))["versions"]["megatron_core"] == OLD
    run_old(["train", str(plan), "--path", "main", "--run-dir", str(ref), "--stop-at-step", str(END)])
    run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(up), "--stop-at-step", str(END)])
    # Model and optimizer state loaded as saved: the next steps are 0.16.1's own, bit for bit, and so is
    # everything saved after them (the two releases compute the same numbers on CPU).
    got, want = losses(up / "main"), losses(ref / "main")
    assert [got[s] for s in range(STOP, END)] == [want[s] for s in range(STOP, END)]
    for part in ("model", "optimizer"):
        ours, theirs = (stored_tensors(_ckpt(r, "main", END), part) for r in (up, ref))
        assert ours.keys() == theirs.keys() and len(ours) > 5
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert read_manifest(_ckpt(up, "main", END))["versions"] == versions()
    # A checkpoint the installed release wrote is refused by 0.16.1, naming both releases, nothing written.
    proc = run_old(["train", str(plan), "--path", "main", "--run-dir", str(up), "--stop-at-step", str(END + 2)],
                   check=False)
    installed = versions()["megatron_core"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"was written by megatron-core {installed}, which the installed megatron-core {OLD} cannot read"
            in proc.stderr), proc.stderr[-3000:]
    assert sorted(losses(up / "main")) == list(range(END))


def test_merges_and_exports_read_checkpoints_of_either_release(old_run, tmp_path):
    plan, old = old_run
    released = _ckpt(old, "v1", STEPS)
    # A branch released under 0.16.1 goes to Hugging Face under the installed release, tensor for tensor.
    run_lrpath(["hf", "export", str(released), "--out", str(tmp_path / "hf_old"), "--no-progress"])
    # A WSM merge of main-path checkpoints of both releases (8 and 10 by 0.16.1, a resumed step by this one).
    new = tmp_path / "new"
    shutil.copytree(old, new)
    run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(new), "--stop-at-step", str(STOP + 1)])
    inputs = [_ckpt(new, "main", s) for s in (8, 10, STOP + 1)]
    run_lrpath(["merge", *map(str, inputs), "--weights", "mean", "--out", str(tmp_path / "merged")])
    stored = [stored_tensors(c) for c in inputs]
    merged = stored_tensors(tmp_path / "merged")
    assert merged.keys() == stored[0].keys()
    for name, tensor in merged.items():
        expected = sum(s[name].double() for s in stored) / 3
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name
    run_lrpath(["hf", "export", str(tmp_path / "merged"), "--out", str(tmp_path / "hf_merged"), "--no-progress"])
    config = json.loads((tmp_path / "hf_merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    exported = {}
    for f in (tmp_path / "hf_old").glob("*.safetensors"):
        exported |= load_file(str(f))
    weights = stored_tensors(released)
    for hf_name, ours in (("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
                          ("lm_head.weight", "output_layer.weight"), ("model.norm.weight", "decoder.final_layernorm.weight")):
        assert torch.equal(exported[hf_name], weights[ours]), hf_name
