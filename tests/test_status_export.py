"""`lrpath status` on a real tiny plan run (partial main, ready/waiting branches, decay and merge releases)
and `lrpath export` to one plain torch file, checked against the stored dist-checkpoint tensors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_lrpath, stored_tensors, tiny_config

from lrpath_megatron.config import TrainConfig, to_dict
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.export import export_checkpoint, read_checkpoint
from lrpath_megatron.plan import load_plan
from lrpath_megatron.status import run_status, to_json

# megatron-core stores the local spec's layer norms under Transformer Engine's names (fused into the
# following linear layer), so one checkpoint loads with either spec.
STORED_NAME = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def tiny_plan(demo_data: dict, path: Path) -> Path:
    """2 versions x 12 steps of 512 tokens: v1 decays 6 steps on a branch from step 12, v2 is a merge of
    main-path steps 20, 22, 24."""
    plan = {
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": demo_data["vocab_size"]},
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"corpora": [{"name": n, "prefix": demo_data["prefixes"][n]} for n in ("docs", "code_a")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 6, "eval_batches": 1, "tensorboard": False},
        "plan": {
            "main": {"eta_max": 3.0e-3, "eta_min": 3.0e-4, "warmup_steps": 2, "replay": 0.2},
            "versions": [
                {"name": "v1", "corpora": ["docs"], "steps": 12,
                 "release": {"method": "decay", "shape": "cosine", "decay_steps": 6, "data": "replay"}},
                {"name": "v2", "corpora": ["code_a"], "steps": 12,
                 "release": {"method": "merge", "merge": {"window_steps": 4, "num_checkpoints": 3,
                                                          "weights": "linear"}}},
            ],
        },
    }
    path.write_text(yaml.safe_dump(plan))
    return path


def status(plan: Path, run: Path, cli: bool = False) -> dict:
    """The --json output (through the CLI when ``cli``; in-process otherwise, it reads the same files)."""
    if cli:
        out = json.loads(run_lrpath(["status", str(plan), "--run-dir", str(run), "--json"]).stdout)
    else:
        out = json.loads(to_json(run_status(load_plan(plan), run)))
    out["by_path"] = {p["name"]: p for p in out["paths"]}
    out["by_version"] = {r["version"]: r for r in out["releases"]}
    return out


def assert_export_matches(exported: dict, ckpt: Path) -> None:
    """The exported state dict holds exactly the stored tensors: megatron-core stores the layers of a block
    stacked on a leading dimension (``decoder.layers.X`` = layer i's ``decoder.layers.i.X``)."""
    stored = stored_tensors(ckpt)
    model = exported["model"]
    assert not any(k.endswith("_extra_state") for k in model)
    assert all(isinstance(t, torch.Tensor) for t in model.values())
    seen = set()
    for name, tensor in model.items():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"] and parts[2].isdigit():
            inner = ".".join(parts[3:])
            key = "decoder.layers." + STORED_NAME.get(inner, inner)
            ref = stored[key][int(parts[2])]
        else:
            key, ref = name, stored[name]
        seen.add(key)
        assert tensor.shape == ref.shape and tensor.dtype == ref.dtype, name
        assert torch.equal(tensor, ref), name
    assert seen == set(stored)


def test_status_and_releases_follow_the_run(demo_data, tmp_path):
    plan, run = tiny_plan(demo_data, tmp_path / "plan.yaml"), tmp_path / "run"

    s = status(plan, run)
    assert [p["name"] for p in s["paths"]] == ["main", "v1"]  # a merge release has no training path
    assert s["by_path"]["main"]["state"] == "not started"
    assert s["by_path"]["v1"]["state"] == "waiting"
    assert not any(r["released"] for r in s["releases"])

    run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(run), "--stop-at-step", "12"])
    s = status(plan, run, cli=True)
    main, v1 = s["by_path"]["main"], s["by_path"]["v1"]
    assert (main["state"], main["step"], main["end_step"], main["tokens"]) == ("partial", 12, 24, 12 * 512)
    assert main["progress"] == pytest.approx(0.5)
    assert Path(main["checkpoint"]).name == "iter_0000012"
    metrics = [json.loads(line) for line in (run / "main" / "metrics.jsonl").read_text().splitlines()]
    assert main["loss"] == metrics[-1]["loss"] and main["last_logged_step"] == 11
    assert main["val_loss"] == metrics[-1]["val_loss"] and main["val_step"] == 11
    assert v1["state"] == "ready" and v1["step"] is None and v1["loss"] is None
    assert s["by_version"]["v2"]["released"] is False and s["by_version"]["v2"]["step"] == 24

    table = run_lrpath(["status", str(plan), "--run-dir", str(run)]).stdout
    assert "iter_0000012" in table and "can start: main has its step-12 checkpoint" in table
    assert "v2" in table and "not yet (merge to step 24)" in table

    run_lrpath(["train", str(plan), "--path", "v1", "--run-dir", str(run)])
    s = status(plan, run)
    v1 = s["by_path"]["v1"]
    assert (v1["state"], v1["step"], v1["progress"]) == ("done", 18, 1.0)
    assert s["by_version"]["v1"] == {"version": "v1", "method": "decay", "step": 18, "released": True,
                                     "checkpoint": str(run / "v1" / "checkpoints" / "iter_0000018")}
    assert s["by_path"]["main"]["state"] == "partial"

    run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(run)])
    assert status(plan, run)["by_path"]["main"]["state"] == "done"
    assert status(plan, run)["by_version"]["v2"]["released"] is False  # main is done, the merge is not
    merged = run / "v2" / "checkpoints" / "iter_0000024"
    run_lrpath(["merge", *(str(run / "main" / "checkpoints" / f"iter_{s:07d}") for s in (20, 22, 24)),
                "--weights", "linear", "--out", str(merged), "--no-progress"])
    s = status(plan, run)
    assert s["by_version"]["v2"]["released"] is True and s["by_version"]["v2"]["checkpoint"] == str(merged)

    # Both kinds of release export to plain files holding exactly the stored weights.
    for ckpt, name in ((run / "v1" / "checkpoints" / "iter_0000018", "v1.pt"), (merged, "v2.pt")):
        proc = run_lrpath(["export", str(ckpt), "--out", str(tmp_path / name)])
        assert "exported" in proc.stdout
        exported = torch.load(tmp_path / name, weights_only=True)
        assert exported["config"]["model"]["hidden_size"] == 32
        assert_export_matches(exported, ckpt)
    assert exported["source"]["kind"] == "merge" and len(exported["source"]["inputs"]) == 3
    v1_source = torch.load(tmp_path / "v1.pt", weights_only=True)["source"]
    assert (v1_source["path"], v1_source["step"], v1_source["fork_step"]) == ("v1", 18, 12)

    # A damaged merge is named with its damaged file, as a damaged trainer checkpoint is.
    shard = next((merged / "model").glob("*.distcp"))
    os.truncate(shard, 100)
    proc = run_lrpath(["export", str(merged), "--out", str(tmp_path / "damaged.pt")], check=False)
    assert proc.returncode != 0 and f"checkpoint {merged} is damaged" in proc.stderr
    assert f"model/{shard.name}" in proc.stderr and not (tmp_path / "damaged.pt").exists()


def test_status_of_a_run_dir_that_does_not_exist_is_an_error(demo_data, tmp_path):
    plan, run = tiny_plan(demo_data, tmp_path / "plan.yaml"), tmp_path / "nope"
    proc = run_lrpath(["status", str(plan), "--run-dir", str(run)], check=False)
    assert proc.returncode == 2
    assert f"no run at {run} yet (nothing trained there): start it with `lrpath train {plan} --path main" in proc.stderr
    assert not run.exists()


def test_export_of_a_tp2_checkpoint_equals_its_stored_tensors(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "cfg.yaml", model={"num_layers": 2, "hidden_size": 32},
                      parallel={"micro_batch_size": 2, "global_batch_size": 4})
    run = tmp_path / "run"
    run_lrpath(["train", str(cfg), "--run-dir", str(run), "--stop-at-step", "2", "--set",
                "parallel.tensor_parallel=2"], nproc=2)
    ckpt = run / "checkpoints" / "iter_0000002"
    run_lrpath(["export", str(ckpt), "--out", str(tmp_path / "out.pt")])
    exported = torch.load(tmp_path / "out.pt", weights_only=True)
    assert exported["config"]["parallel"]["tensor_parallel"] == 2  # the training config, as recorded
    assert_export_matches(exported, ckpt)
    # The exported model runs as a plain TP=1 GPTModel: its weights are the full (unsharded) tensors.
    qkv = exported["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (3 * 32, 32)


@pytest.mark.parametrize("make,fragment", [
    (lambda d: d / "missing", "is not a directory"),
    (lambda d: (d / "half").mkdir() or d / "half", "no manifest.json: not a complete checkpoint"),
    (lambda d: (d / "nomodel").mkdir() or (d / "nomodel" / "manifest.json").write_text("{}") and d / "nomodel",
     "the model weights are missing"),
])
def test_export_rejects_incomplete_checkpoints(tmp_path, make, fragment):
    out = tmp_path / "out.pt"
    with pytest.raises(LrpathError, match=fragment):
        export_checkpoint(make(tmp_path), out)
    assert not out.exists()


def test_checkpoints_that_record_the_removed_tokenizer_model_still_read(tmp_path):
    config = to_dict(TrainConfig())
    config["data"]["tokenizer_model"] = None  # every manifest written before the field was removed has it
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / ".metadata").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"config": config}))
    assert read_checkpoint(tmp_path)[1] == TrainConfig()
