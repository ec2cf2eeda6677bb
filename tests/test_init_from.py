"""A plan's main path or a stand-alone run continues an open model, imported from a Hugging Face directory
or started from that directory itself: its first training step's loss is transformers' loss on the same
batch; a start the plan cannot continue is refused; the trained release exports back to transformers."""
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


def _transformers_first_loss(plan_file, hf_model) -> float:
    """transformers' loss on the micro-batches of the main path's step 0 (the trainer's loss: the mean of
    their masked means)."""
    from lrpath_megatron.data import TrainData
    from lrpath_megatron.plan import load_plan

    plan = load_plan(plan_file)
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
    return sum(losses) / len(losses)


def test_a_stand_alone_run_from_an_imported_model_starts_at_its_loss(demo_data, imported, tmp_path):
    """checkpoint.init_from names an `lrpath hf import` output; the blend is the plan's main path's (the two
    corpora in equal shares), so step 0 trains the same batch (a plan's main path: the next test)."""
    root, hf_model, section = imported
    config = _plan(demo_data, tmp_path / "plan.yaml", section, root / "ckpt")
    del config["plan"]
    config.update(optimizer={"lr": 1e-3, "min_lr": 1e-4}, schedule={"style": "constant", "warmup_steps": 0,
                                                                     "train_steps": 2})
    config["checkpoint"]["init_from"] = str(root / "ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = run_lrpath(["train", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path / "alone")]).stdout
    assert f"initialised from the weights of {root / 'ckpt'}" in out
    logged = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "alone" / "metrics.jsonl").open())}
    assert logged[0] == pytest.approx(_transformers_first_loss(tmp_path / "plan.yaml", hf_model), abs=1e-4)
    assert set(logged) == {0, 1}


def test_a_start_the_plan_cannot_continue_is_refused(demo_data, imported, tmp_path):
    root, _, section = imported
    run = tmp_path / "run"
    _plan(demo_data, tmp_path / "other.yaml", dict(section, num_layers=4), root / "ckpt")
    proc = run_lrpath(["train", str(tmp_path / "other.yaml"), "--path", "main", "--run-dir", str(run)], check=False)
    assert proc.returncode == 2 and "the model differs (model.num_layers: checkpoint 2 vs config 4)" in proc.stderr
    _plan(demo_data, tmp_path / "hf.yaml", dict(section, num_layers=4), root / "hf")
    proc = run_lrpath(["train", str(tmp_path / "hf.yaml"), "--path", "main", "--run-dir", str(run)], check=False)
    assert proc.returncode == 2 and ("whose settings differ from the plan's model section (model.num_layers: "
                                     "Hugging Face 2 vs plan 4)") in proc.stderr
    assert not run.exists()
    plan = _plan(demo_data, tmp_path / "both.yaml", section, root / "ckpt")
    plan["checkpoint"]["init_from"] = str(root / "ckpt")
    with pytest.raises(ConfigError, match="a plan's main path starts from plan.main.init_from"):
        Plan.from_dict(plan)


def test_a_plan_started_from_a_hugging_face_directory_releases_into_it(demo_data, imported, tmp_path):
    """plan.main.init_from names the HF directory itself: the main path imports it and starts at
    transformers' loss; with plan.export.hf the trained release comes out as an HF directory, with the
    plan's tokenizer, whose logits in transformers are lrpath's."""
    import sentencepiece
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrpath_megatron.run_layout import RunLayout
    from test_hf import TOLERANCE, lrpath_logits

    root, hf_model, section = imported
    plan = _plan(demo_data, tmp_path / "plan.yaml", section, root / "hf")
    plan["plan"]["export"] = {"hf": True, "tokenizer": demo_data["tokenizer_model"]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    run = RunLayout(tmp_path / "run")
    out = run_lrpath(["launch", str(tmp_path / "plan.yaml"), "--local", "--run-dir", str(run.root)]).stdout
    assert f"[main] imported {root / 'hf'} into {run.path('main').hf_import}" in out
    first = json.loads(run.path("main").metrics.read_text().splitlines()[0])
    assert first["step"] == 0
    assert first["loss"] == pytest.approx(_transformers_first_loss(tmp_path / "plan.yaml", hf_model), abs=1e-4)

    loaded = Plan.from_dict(plan)
    release = run.checkpoint("v1", loaded.versions[0].branch_end)
    exported = run.path("v1").hf
    model, info = AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (hf_model.config.bos_token_id,
                                                                hf_model.config.eos_token_id)
    tokens = torch.randint(0, section["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, before = model.eval()(tokens).logits, hf_model(tokens).logits
    ours = lrpath_logits(loaded.train_config, release, tokens)
    diff = (theirs - ours).abs().max().item()
    print(f"trained release export: max |logits diff| = {diff:.2e} (training moved them by "
          f"{(theirs - before).abs().max().item():.2e})")
    assert diff <= TOLERANCE and (theirs - before).abs().max().item() > 100 * TOLERANCE

    text = "int main(void) {\n    return 0;\n}"
    spm = sentencepiece.SentencePieceProcessor(model_file=demo_data["tokenizer_model"])
    assert AutoTokenizer.from_pretrained(exported)(text, add_special_tokens=False)["input_ids"] == spm.encode(text)


def test_a_hugging_face_start_is_imported_once(demo_data, imported, tmp_path):
    """What the path's ranks call: the first call imports (the same tensors as `lrpath hf import`), later
    calls (reruns, resumes) reuse it; an import of another directory in its place is refused."""
    import shutil

    from conftest import stored_tensors
    from lrpath_megatron.errors import LrpathError
    from lrpath_megatron.hf.start import imported_checkpoint

    root, _, section = imported
    cfg = Plan.from_dict(_plan(demo_data, tmp_path / "plan.yaml", section, root / "hf")).train_config
    target = tmp_path / "run" / "main" / "hf_import"
    assert imported_checkpoint(root / "hf", cfg, target, "main", "plan") == target
    ours, theirs = stored_tensors(target), stored_tensors(root / "ckpt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    stamp = (target / "manifest.json").stat().st_mtime_ns
    assert imported_checkpoint(root / "hf", cfg, target, "main", "plan") == target
    assert (target / "manifest.json").stat().st_mtime_ns == stamp
    shutil.copytree(root / "hf", tmp_path / "other")
    with pytest.raises(LrpathError, match="holds the import of"):
        imported_checkpoint(tmp_path / "other", cfg, target, "main", "plan")
