"""A plan's main path continues an open model: imported from a Hugging Face directory, its first training
step's loss is transformers' loss on the same batch; a start the plan cannot continue is refused."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import run_lrpath
from lrpath_megatron import cli
from lrpath_megatron.config import ConfigError
from lrpath_megatron.plan import Plan
from test_hf import _hf_model


@pytest.fixture(scope="module")
def imported(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    model = _hf_model("LlamaForCausalLM", dict(vocab_size=demo_data["vocab_size"], num_hidden_layers=2,
                                                tie_word_embeddings=False), seed=3)
    model.save_pretrained(root / "hf")
    assert cli.main(["hf", "import", str(root / "hf"), "--out", str(root / "ckpt"), "--seq-length", "64",
                     "--no-progress"]) == 0
    section = yaml.safe_load((root / "ckpt" / "model.yaml").read_text())["model"]
    return root, model, section


def _plan(demo_data, path, model: dict, init_from) -> dict:
    plan = {
        "model": model,
        "parallel": {"micro_batch_size": 2, "global_batch_size": 4},
        "data": {"corpora": [{"name": n, "prefix": demo_data["prefixes"][n]} for n in ("docs", "code_a")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "plan": {"main": {"eta_max": 1e-3, "eta_min": 1e-4, "warmup_steps": 0, "init_from": str(init_from)},
                 "versions": [{"name": "v1", "corpora": ["docs", "code_a"], "steps": 8,
                               "release": {"decay_steps": 4}}]},
    }
    path.write_text(yaml.safe_dump(plan))
    return plan


def test_main_path_from_an_imported_model_starts_at_its_loss(demo_data, imported, tmp_path):
    from lrpath_megatron.data import TrainData
    from lrpath_megatron.plan import load_plan

    root, hf_model, section = imported
    _plan(demo_data, tmp_path / "plan.yaml", section, root / "ckpt")
    out = run_lrpath(["train", str(tmp_path / "plan.yaml"), "--path", "main", "--run-dir", str(tmp_path / "run"),
                      "--stop-at-step", "2"]).stdout
    assert f"initialised from the weights of {root / 'ckpt'}" in out
    logged = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run" / "main" / "metrics.jsonl").open())}

    # transformers on the same micro-batches of step 0 (the trainer's loss: the mean of their masked means)
    plan = load_plan(tmp_path / "plan.yaml")
    cfg = plan.train_config
    data = TrainData(cfg.data, 64, 4, 2, 0, 1, plan.path("main").weights_at_step, cfg.data.seed,
                     vocab_size=cfg.model.vocab_size)
    losses = []
    with torch.no_grad():
        for batch in data.microbatches(0):
            logits = hf_model(batch["tokens"]).logits
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
            mask = batch["loss_mask"].float()
            losses.append(float((per_token * mask).sum() / mask.sum()))
    assert logged[0] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert set(logged) == {0, 1}

    # A stand-alone config starts from the same weights with checkpoint.init_from (same blend, same batch).
    config = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    del config["plan"]
    config.update(optimizer={"lr": 1e-3, "min_lr": 1e-4}, schedule={"style": "constant", "warmup_steps": 0,
                                                                     "train_steps": 1})
    config["checkpoint"]["init_from"] = str(root / "ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run_lrpath(["train", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path / "alone")])
    alone = json.loads((tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()[0])
    assert alone["step"] == 0 and alone["loss"] == logged[0]


def test_a_start_the_plan_cannot_continue_is_refused(demo_data, imported, tmp_path):
    root, _, section = imported
    run = tmp_path / "run"
    _plan(demo_data, tmp_path / "other.yaml", dict(section, num_layers=4), root / "ckpt")
    proc = run_lrpath(["train", str(tmp_path / "other.yaml"), "--path", "main", "--run-dir", str(run)], check=False)
    assert proc.returncode == 2 and "the model differs (model.num_layers: checkpoint 2 vs config 4)" in proc.stderr
    _plan(demo_data, tmp_path / "hf.yaml", section, root / "hf")
    proc = run_lrpath(["train", str(tmp_path / "hf.yaml"), "--path", "main", "--run-dir", str(run)], check=False)
    assert proc.returncode == 2 and "a Hugging Face model directory; import it first" in proc.stderr
    assert not run.exists()
    plan = _plan(demo_data, tmp_path / "both.yaml", section, root / "ckpt")
    plan["checkpoint"]["init_from"] = str(root / "ckpt")
    with pytest.raises(ConfigError, match="a plan's main path starts from plan.main.init_from"):
        Plan.from_dict(plan)
