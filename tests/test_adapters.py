"""Adapters: LoRA on megatron-core layers (frozen base, TP resharding, bad input), replay blends, LP-FT
phases, and the update methods end to end on a tiny released model and the real demo corpora."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, run_lrpath

from lrpath_megatron.adapters.lora import (
    LoraConfig,
    inject_lora,
    load_adapter,
    lora_modules,
    param_report,
    save_adapter,
)
from lrpath_megatron.adapters.lpft import lpft_phases
from lrpath_megatron.adapters.replay import replay_blend
from lrpath_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from lrpath_megatron.errors import LrpathError

os.environ["LRPATH_DEVICE"] = "cpu"


@pytest.fixture
def dist_session(monkeypatch):
    """torch.distributed (world 1, gloo) + parallel state for in-process model tests."""
    from lrpath_megatron import distributed

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield lambda tp=1: distributed.initialize(ParallelConfig(tensor_parallel=tp, micro_batch_size=1,
                                                             global_batch_size=2), seed=7)
    distributed.shutdown()


def _tiny(hidden: int = 32, activation: str = "swiglu", tp: int = 1):
    from lrpath_megatron.model import build_model, transformer_config

    model_cfg = ModelConfig(num_layers=2, hidden_size=hidden, num_attention_heads=4, vocab_size=96, seq_length=16,
                            make_vocab_size_divisible_by=16, activation=activation)
    parallel = ParallelConfig(tensor_parallel=tp, micro_batch_size=1, global_batch_size=2)
    tcfg = transformer_config(model_cfg, parallel, PrecisionConfig())
    return build_model(model_cfg, parallel, PrecisionConfig(), tcfg), tcfg


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (2, 16), generator=gen)
    return tokens, torch.arange(16).expand(2, 16)


# --------------------------------------------------------------------------------------------------
# LoRA modules
# --------------------------------------------------------------------------------------------------
def test_lora_freezes_base_and_only_adapters_reach_the_optimizer(dist_session):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dist_session()
    model, tcfg = _tiny()
    tokens, pos = _batch()
    before = model(tokens, pos, None, labels=tokens).detach()
    paths = inject_lora(model, LoraConfig(rank=2, alpha=4.0))
    assert len(paths) == 8 and set(lora_modules(model)) == set(paths)  # 4 targets x 2 layers
    assert torch.equal(model(tokens, pos, None, labels=tokens).detach(), before)  # B starts at zero
    report = param_report(model)
    lora_params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert report.trainable == sum(p.numel() for p in lora_params.values()) and report.ratio < 0.1

    ddp = DistributedDataParallel(config=tcfg, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), [ddp])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == report.trainable
    for _ in range(2):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(tokens, pos, None, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        assert optimizer.step()[0]
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.optimizer.state.values()
                      for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert state_bytes == report.optimizer_state_bytes
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_params.items())
    assert all(not torch.equal(after[n], p) for n, p in lora_params.items() if ".lora_B." in n)
    assert not torch.equal(model(tokens, pos, None, labels=tokens).detach(), before)


def test_adapter_roundtrip_and_shape_mismatch(dist_session, tmp_path):
    from megatron.core import dist_checkpointing

    dist_session()
    model, _ = _tiny()
    (tmp_path / "base").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "base"))
    inject_lora(model, LoraConfig(rank=2))
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B["default"].weight.normal_()
    save_adapter(model, tmp_path / "adapter", LoraConfig(rank=2))
    tokens, pos = _batch(1)
    expected = model(tokens, pos, None, labels=tokens)

    fresh, _ = _tiny()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "base")))
    load_adapter(fresh, tmp_path / "adapter", name="v2")
    torch.testing.assert_close(fresh(tokens, pos, None, labels=tokens), expected)

    other, _ = _tiny(hidden=64)
    with pytest.raises(LrpathError, match=r"trained for a different base model .*lora_A.weight: adapter \[2, 32\], "
                                          r"this model \[2, 64\]"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(LrpathError, match="not an adapter directory"):
        load_adapter(other, tmp_path / "base")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"rank": 0}, r"adapt.lora.rank=0 must be an integer > 0"),
    ({"rank": -2}, r"adapt.lora.rank=-2 must be an integer > 0"),
    ({"target_modules": ["linear_qkv", "q_proj"]}, r"unknown target module\(s\) 'q_proj'; valid: linear_qkv"),
    ({"alpha": 0.0}, r"adapt.lora.alpha=0.0 must be > 0"),
])
def test_lora_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        LoraConfig(**kwargs).validate()


def _tp_worker(rank: int, world: int, port: int, root: str) -> None:
    """Base + adapter saved at TP=2; loaded at TP=1 (DP=2) they give the same per-token loss."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LRPATH_DEVICE="cpu")
    from megatron.core import dist_checkpointing, parallel_state

    from lrpath_megatron import distributed

    root = Path(root)

    def init(tp: int):
        distributed.initialize(ParallelConfig(tensor_parallel=tp, micro_batch_size=1, global_batch_size=2), seed=7)
        return _tiny(tp=tp)[0]

    tokens, pos = _batch(2)
    model = init(2)
    if rank == 0:
        (root / "base").mkdir()
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(root / "base"))
    inject_lora(model, LoraConfig(rank=2))
    torch.manual_seed(3)  # same values on both ranks: replicated tensors must agree
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B["default"].weight.normal_()
    save_adapter(model, root / "adapter", LoraConfig(rank=2))
    loss_tp2 = model(tokens, pos, None, labels=tokens).detach()
    parallel_state.destroy_model_parallel()

    model = init(1)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(root / "base")))
    base_tp1 = model(tokens, pos, None, labels=tokens).detach()
    load_adapter(model, root / "adapter")
    loss_tp1 = model(tokens, pos, None, labels=tokens).detach()
    if rank == 0:
        torch.save({"tp2": loss_tp2, "tp1": loss_tp1, "base_tp1": base_tp1}, root / "losses.pt")
    distributed.shutdown()


def test_adapter_saved_at_tp2_loads_at_tp1(tmp_path):
    torch.multiprocessing.spawn(_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    losses = torch.load(tmp_path / "losses.pt")
    torch.testing.assert_close(losses["tp1"], losses["tp2"], rtol=1e-5, atol=1e-5)
    assert (losses["tp1"] - losses["base_tp1"]).abs().max() > 1e-2  # the adapter is really applied
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["tensor_parallel"] == 2
    # GLU fc1: global rows are 2 x ffn whatever the TP size
    assert config["shapes"]["decoder.layers.0.mlp.linear_fc1.lora_B.weight"] == [2 * 4 * 32, 2]


# --------------------------------------------------------------------------------------------------
# Replay and LP-FT phases
# --------------------------------------------------------------------------------------------------
def test_replay_blend_picks_past_updates_uniformly():
    past = [{"docs": 1.0}, {"code_a": 0.5, "code_b": 0.5}]
    blend = replay_blend({"c_headers": 1.0}, past, new_ratio=0.5)
    assert blend == pytest.approx({"c_headers": 0.5, "docs": 0.25, "code_a": 0.125, "code_b": 0.125})
    assert replay_blend({"c_headers": 1.0}, past, new_ratio=1.0) == {"c_headers": 1.0}
    assert replay_blend({"c_headers": 1.0}, [], new_ratio=0.5) == {"c_headers": 1.0}
    with pytest.raises(ConfigError, match=r"new_ratio=0.0 must be in \(0, 1\]"):
        replay_blend({"c_headers": 1.0}, past, new_ratio=0.0)
    # Every batch of 8 holds 4 new samples (the sampler keeps each batch within one sample of the shares).
    from lrpath_megatron.mixing import MixingSampler

    sampler = MixingSampler({"c_headers": 500, "docs": 500, "code_a": 500, "code_b": 500},
                            lambda step: ("replay", blend), 8, seed=1)
    for step in range(20):
        assert sum(corpus == "c_headers" for corpus, _ in sampler.global_batch(step)) == 4


def test_lpft_phases_split_any_path(tmp_path):
    from lrpath_megatron.path import FORK, PathRun, PathSpec, Start
    from lrpath_megatron.run_layout import PathDirs

    spec = PathSpec("v2", 140, lambda s: 1e-3, lambda s: ("x", {"a": 1.0}), parent="main", fork_step=100,
                    save_steps=frozenset({110, 130}))
    run = PathRun(spec, PathDirs(tmp_path), Start(FORK, tmp_path / "main" / "iter"))
    probe, finetune = lpft_phases(run, probe_steps=15)
    assert (probe.path.fork_step, probe.path.end_step, probe.path.save_steps) == (100, 115, frozenset({110}))
    assert probe.origin == Start(FORK, run.origin.checkpoint, fresh_optimizer=True)
    assert (finetune.path.fork_step, finetune.path.end_step, finetune.path.save_steps) == (115, 140, frozenset({130}))
    assert finetune.origin == Start(FORK, tmp_path / "lp" / "checkpoints" / "iter_0000115", fresh_optimizer=True)
    assert finetune.model_transform is None
    with pytest.raises(ConfigError, match=r"probe_steps=40 must be in \(0, 40\)"):
        lpft_phases(run, probe_steps=40)


# --------------------------------------------------------------------------------------------------
# Updates end to end: base v1 (docs) released; v2 (code_a) and v3 (c_headers) as updates
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(demo_data, tmp_path_factory):
    """A tiny plan and its v1 release (main path to v1's fork + v1's decay branch)."""
    from lrpath_megatron.adapters.update import load_adapt_plan
    from lrpath_megatron.plan_runs import run_for
    from lrpath_megatron.trainer import run_path

    root = tmp_path_factory.mktemp("adapt_run")
    prefixes = demo_data["prefixes"]
    release = {"decay_steps": 4, "data": "replay"}
    plan = {
        # a Llama (RMSNorm, SwiGLU): its LoRA updates export to Hugging Face
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": demo_data["vocab_size"], "normalization": "RMSNorm", "activation": "swiglu"},
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"corpora": [{"name": n, "prefix": prefixes[n]} for n in ("docs", "code_a", "c_headers")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 5, "eval_interval": 0, "eval_batches": 2, "tensorboard": False},
        "plan": {"main": {"eta_max": 3e-3, "eta_min": 3e-4, "warmup_steps": 2},
                 "versions": [{"name": "v1", "corpora": ["docs"], "steps": 12, "release": release},
                              {"name": "v2", "corpora": ["code_a"], "steps": 6, "release": release},
                              {"name": "v3", "corpora": ["c_headers"], "steps": 6, "release": release}]},
        "adapt": {"base": "v1", "steps": 6, "warmup_steps": 1, "eval_batches": 2, "lora": {"rank": 4},
                  "selector": {"steps": 12, "eval_batches": 2}, "lpft": {"probe_steps": 2}},
    }
    (root / "plan.yaml").write_text(yaml.safe_dump(plan))
    mp = pytest.MonkeyPatch()
    mp.setenv("MASTER_PORT", str(free_port()))
    loaded, adapt = load_adapt_plan(root / "plan.yaml")
    run_path(loaded.train_config, run_for(loaded, "main", root), stop_at_step=12)
    run_path(loaded.train_config, run_for(loaded, "v1", root))
    yield root, loaded, adapt
    mp.undo()


def _update(released, version: str, method: str):
    from lrpath_megatron.adapt import run_update
    from lrpath_megatron.adapters.update import resolve_update

    root, plan, adapt = released
    return run_update(resolve_update(plan, adapt, version, method, root), progress=False)


def _weights(cfg, ckpt: Path) -> dict:
    from lrpath_megatron import distributed
    from lrpath_megatron.checkpoint.tensors import load_model
    from lrpath_megatron.model import build_model

    distributed.initialize(cfg.parallel, cfg.seed)
    try:
        model = build_model(cfg.model, cfg.parallel, cfg.precision)
        load_model(ckpt, model)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.numel()}
    finally:
        distributed.shutdown()


def test_lora_update_keeps_base_and_matches_trainer_eval(released):
    from lrpath_megatron.metrics import read_metrics
    from lrpath_megatron.run_layout import RunLayout

    root, plan, _ = released
    result = _update(released, "v2", "lora")
    assert 0 < result["params"]["ratio"] < 0.05
    assert result["params"]["optimizer_state_bytes"] == 8 * result["params"]["trainable"]
    assert result["blend"] == {"code_a": 1.0} and result["old_corpora"] == ["docs"]
    # The exported adapter on a freshly loaded base gives the loss the trainer measured at the end.
    trainer_eval = read_metrics(RunLayout(root).adapt("lora", "v2"))[-1]["val_loss_per_corpus"]
    assert result["val_loss"] == pytest.approx(trainer_eval, abs=1e-5)
    assert result["val_loss"]["code_a"] < result["base_val_loss"]["code_a"]
    # The base weights in the update's checkpoint are the release's, bit for bit.
    base = _weights(plan.train_config, Path(result["base_checkpoint"]))
    trained = _weights(plan.train_config, root / "adapt" / "lora" / "v2" / "checkpoints" / "iter_0000006")
    assert base.keys() == trained.keys() and all(torch.equal(base[k], trained[k]) for k in base)
    _check_hf_export_of_update(plan, RunLayout(root).adapt("lora", "v2"), Path(result["base_checkpoint"]))


def _check_hf_export_of_update(plan, update, base: Path) -> None:
    """`lrpath hf export` of the update is base + adapter as one model: transformers loads every weight and
    computes lrpath's logits of the base with the adapter loaded."""
    from transformers import AutoModelForCausalLM

    from lrpath_megatron import cli
    from test_hf import TOLERANCE, lrpath_logits

    out = update.root / "exported"
    assert cli.main(["hf", "export", str(update.root), "--out", str(out), "--no-progress"]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = torch.randint(0, plan.train_config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.eval()(tokens).logits
    ours = lrpath_logits(plan.train_config, base, tokens, update.adapter)
    without = lrpath_logits(plan.train_config, base, tokens)
    diff = (theirs - ours).abs().max().item()
    print(f"LoRA update export: max |logits diff| = {diff:.2e} (adapter moved them by "
          f"{(ours - without).abs().max().item():.2e})")
    assert diff <= TOLERANCE and (ours - without).abs().max().item() > 100 * TOLERANCE


def test_conpet_static_carries_one_adapter_with_replay(released):
    from lrpath_megatron.adapt import run_update
    from lrpath_megatron.adapters.update import resolve_update

    root, plan, adapt = released
    with pytest.raises(LrpathError, match="v2's adapter .* is missing"):
        run_update(resolve_update(plan, adapt, "v3", "conpet-static", root))
    _update(released, "v2", "conpet-static")
    result = _update(released, "v3", "conpet-static")
    # new:old 1:1, the old half split evenly between the past updates v1 and v2
    assert result["blend"] == pytest.approx({"c_headers": 0.5, "docs": 0.25, "code_a": 0.25})
    manifest = json.loads((root / "adapt" / "conpet-static" / "v3" / "checkpoints" / "iter_0000006" /
                           "manifest.json").read_text())
    assert manifest["adapt"]["blend"] == pytest.approx(result["blend"])
    assert result["val_loss"]["c_headers"] < result["base_val_loss"]["c_headers"]


def test_conpet_dynamic_experts_and_selector(released):
    root, _, _ = released
    first = _update(released, "v2", "conpet-dynamic")
    assert first["selector"]["classes"] == ["v1", "v2"]
    result = _update(released, "v3", "conpet-dynamic")
    sel = result["selector"]
    assert sel["classes"] == ["v1", "v2", "v3"]
    assert sel["class_of_corpus"] == {"docs": "v1", "code_a": "v2", "c_headers": "v3"}
    assert set(sel["heldout_accuracy"]) == {"docs", "code_a", "c_headers"}
    assert all(0.0 <= a <= 1.0 for a in sel["heldout_accuracy"].values())
    assert sel["forward_passes_per_input"] == 2  # features + top-1 expert, for any number of updates
    saved = torch.load(root / "adapt" / "conpet-dynamic" / "v3" / "selector.pt", weights_only=False)
    assert saved["experts"] == [None, "v2", "v3"] and saved["state_dict"]["head.weight"].shape[0] == 3
    # Each update trains its own adapter with the same budget; v2's is untouched by v3's training.
    for version in ("v2", "v3"):
        assert (root / "adapt" / "conpet-dynamic" / version / "adapter" / "adapter_config.json").is_file()


def test_lpft_cli_trains_head_first(released):
    root, plan, _ = released
    proc = run_lrpath(["adapt", str(root / "plan.yaml"), "--version", "v2", "--method", "lpft",
                       "--run-dir", str(root)])
    assert "trainable parameters" in proc.stdout and "code_a" in proc.stdout
    base = _weights(plan.train_config, root / "v1" / "checkpoints" / "iter_0000016")
    probe = _weights(plan.train_config, root / "adapt" / "lpft" / "v2" / "lp" / "checkpoints" / "iter_0000002")
    final = _weights(plan.train_config, root / "adapt" / "lpft" / "v2" / "ft" / "checkpoints" / "iter_0000006")
    changed = {k for k in base if not torch.equal(base[k], probe[k])}
    assert changed == {"output_layer.weight", "decoder.final_layernorm.weight"}
    assert not torch.equal(probe["embedding.word_embeddings.weight"], final["embedding.word_embeddings.weight"])
    proc = run_lrpath(["adapt", str(root / "plan.yaml"), "--version", "v2", "--method", "lora", "--run-dir",
                       str(root), "--set", "adapt.lora.target_modules=[linear_qkv,q_proj]"], check=False)
    assert proc.returncode == 2 and "unknown target module(s) 'q_proj'" in proc.stderr


def test_a_base_of_another_model_is_refused_before_anything_is_written(released):
    root, _, _ = released
    proc = run_lrpath(["adapt", str(root / "plan.yaml"), "--version", "v3", "--method", "full", "--run-dir",
                       str(root), "--set", "model.hidden_size=32"], check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert ("the model differs (model.hidden_size: checkpoint 64 vs config 32); give a --base-checkpoint of this "
            "model, or set the plan's model: section to the settings v1 was trained with") in proc.stderr
    assert not (root / "adapt" / "full").exists()


def test_update_of_a_merge_release(demo_data, tmp_path, monkeypatch):
    """A base released by a merge (WSM) has no training path: the update finds it where `lrpath merge`
    writes it, and until then the error gives the commands that make it."""
    import shlex

    from lrpath_megatron import cli
    from lrpath_megatron.adapt import run_update
    from lrpath_megatron.adapters.update import load_adapt_plan, resolve_update
    from lrpath_megatron.plan_runs import run_for
    from lrpath_megatron.trainer import run_path

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    prefixes = demo_data["prefixes"]
    plan = {
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": demo_data["vocab_size"]},
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"corpora": [{"name": n, "prefix": prefixes[n]} for n in ("docs", "code_a")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 5, "eval_interval": 0, "eval_batches": 1, "tensorboard": False},
        "plan": {"main": {"eta_max": 3e-3, "eta_min": 3e-4, "warmup_steps": 2},
                 "versions": [{"name": "v1", "corpora": ["docs"], "steps": 8,
                               "release": {"method": "merge", "merge": {"window_steps": 4, "num_checkpoints": 3,
                                                                        "weights": "linear"}}},
                              {"name": "v2", "corpora": ["code_a"], "steps": 4,
                               "release": {"decay_steps": 2, "data": "replay"}}]},
        "adapt": {"steps": 3, "warmup_steps": 0, "eval_batches": 1},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    loaded, adapt = load_adapt_plan(tmp_path / "plan.yaml")
    run_path(loaded.train_config, run_for(loaded, "main", tmp_path), stop_at_step=8)
    with pytest.raises(LrpathError, match="base release v1 is not in .* then merge it") as missing:
        resolve_update(loaded, adapt, "v2", "lora", tmp_path)
    merge_command = str(missing.value).split("then merge it (`")[1].split("`")[0]
    assert cli.main(shlex.split(merge_command)[1:]) == 0  # the command the error names writes the release

    update = resolve_update(loaded, adapt, "v2", "lora", tmp_path)
    assert update.base == "v1" and update.base_checkpoint == tmp_path / "v1" / "checkpoints" / "iter_0000008"
    result = run_update(update, progress=False)
    assert result["base_checkpoint"] == str(update.base_checkpoint) and set(result["val_loss"]) == {"docs", "code_a"}
