"""Branches fork where they first differ from the main path: the releases are the same bits as from their
nominal forks, and the plan counts only the branches' own steps."""
from __future__ import annotations

import os

import pytest
import torch
import yaml

from conftest import losses, run_lrpath, side_by_side, stored_tensors
from lrpath_megatron.config import ConfigError
from lrpath_megatron.plan import Plan


def shapes_plan(demo_data: dict, fork: str) -> dict:
    """Two versions on tail data with several corpora per batch: v1 knee, v2 multistep."""
    return {
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": demo_data["vocab_size"]},
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"corpora": [{"name": n, "prefix": demo_data["prefixes"][n]} for n in ("docs", "code_a", "code_b")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "plan": {
            "fork": fork,
            "main": {"eta_max": 3.0e-3, "eta_min": 3.0e-4, "warmup_steps": 2, "replay": 0.25},
            "versions": [
                {"name": "v1", "corpora": {"docs": 0.7, "code_a": 0.3}, "steps": 14,
                 "release": {"method": "decay", "shape": "knee", "decay_steps": 8}},
                {"name": "v2", "corpora": ["code_b"], "steps": 14,
                 "release": {"method": "decay", "shape": "multistep", "decay_steps": 10, "drop_points": [0.5, 0.8]}},
            ],
        },
    }


def test_plan_forks_at_first_difference_and_counts_own_steps(demo_data):
    effective, nominal = (Plan.from_dict(shapes_plan(demo_data, f)) for f in ("effective", "nominal"))
    assert [v.release.nominal_step for v in effective.versions] == [6, 18]
    # knee: 8 steps, stable fraction 0.5 -> t = (s - 6) / 7 > 0.5 first at step 10; multistep drops at t >= 0.5.
    assert [v.release.step for v in effective.versions] == [10, 23]
    assert [v.release.step for v in nominal.versions] == [6, 18]
    for v in effective.versions:
        branch, main = effective.path(v.name), effective.path("main")
        for step in range(v.release.nominal_step, v.release.step):
            assert branch.lr(step) == main.lr_at_step(step)
            assert branch.blend(step)[1] == main.weights_at_step(step)[1]
        assert branch.lr_at_step(v.release.step) < main.lr_at_step(v.release.step)
    assert effective.path("main").save_steps == {10, 23}
    a, b = effective.costs(), nominal.costs()
    (fewest, most), nominal_steps = a["total_steps"], b["total_steps"][0]
    assert fewest == most == nominal_steps - (4 + 5) + (23 - 18)  # the last fork moves the main path's end
    assert a["tokens_saved_by_effective_forks"] == (nominal_steps - fewest) * a["tokens_per_step"]
    assert b["tokens_saved_by_effective_forks"] == 0
    with pytest.raises(ConfigError, match="plan.fork='later' is not one of effective, nominal"):
        Plan.from_dict(shapes_plan(demo_data, "later"))


def test_releases_from_effective_forks_equal_nominal_forks_bitwise(demo_data, tmp_path):
    plans = {}
    for fork in ("effective", "nominal"):
        data = shapes_plan(demo_data, fork)
        if fork == "effective":  # one main path serves both rules: it also saves at the nominal forks
            data["plan"]["main"]["save_steps"] = [6, 18]
        plans[fork] = tmp_path / f"{fork}.yaml"
        plans[fork].write_text(yaml.safe_dump(data))
    runs = {f: tmp_path / f for f in plans}
    run_lrpath(["train", str(plans["effective"]), "--path", "main", "--run-dir", str(runs["effective"])])
    runs["nominal"].mkdir()
    os.symlink(runs["effective"] / "main", runs["nominal"] / "main")

    def branches(fork: str) -> None:
        for version in ("v1", "v2"):
            run_lrpath(["train", str(plans[fork]), "--path", version, "--run-dir", str(runs[fork])])

    side_by_side(*(lambda fork=fork: branches(fork) for fork in runs))
    for version, end in (("v1", 14), ("v2", 28)):
        a = stored_tensors(runs["effective"] / version / "checkpoints" / f"iter_{end:07d}")
        b = stored_tensors(runs["nominal"] / version / "checkpoints" / f"iter_{end:07d}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), version
        # The nominal branch's first steps are the main path's steps, loss for loss.
        nominal, main = losses(runs["nominal"] / version), losses(runs["effective"] / "main")
        shared = [s for s in nominal if s in main and s < (10 if version == "v1" else 23)]
        assert shared and all(nominal[s] == main[s] for s in shared), version

    # A branch started under one rule is not continued under the other.
    (runs["nominal"] / "v1" / "checkpoints" / "iter_0000014").rename(runs["nominal"] / "v1" / "kept")
    proc = run_lrpath(["train", str(plans["effective"]), "--path", "v1", "--run-dir", str(runs["nominal"])], check=False)
    assert proc.returncode == 2 and "forked from step 6" in proc.stderr and "set plan.fork: nominal" in proc.stderr


def test_segments_sized_by_their_new_data(demo_data):
    data = shapes_plan(demo_data, "effective")
    tps = 8 * 64
    v2 = data["plan"]["versions"][1]
    del v2["steps"]
    v2["new_tokens"] = 15 * tps  # replay 0.25: the segment is 15 / 0.75 = 20 steps
    rows = Plan.from_dict(data).costs()["versions"]
    assert [r["data_steps"] for r in rows] == [14, 20]
    assert [r["new_data_tokens"] for r in rows] == [14 * tps, 15 * tps]
    assert [r["data_tokens"] for r in rows] == [14 * tps, 20 * tps]
    v2["steps"] = 20
    with pytest.raises(ConfigError, match=r"plan.versions\[1\]: give only one of steps, new_tokens"):
        Plan.from_dict(data)
