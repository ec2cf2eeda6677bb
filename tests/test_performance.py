"""Performance levers on CPU (gloo, world size 1, real megatron-core): off = unchanged, each on = the same
losses as the baseline within fp32 tolerance, resume keeps the fused optimizer, clear refusals.

torch.compile on CPU (inductor, C++ backend) takes about 20-40 s for the 2-layer model used here.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import losses, run_lrpath, side_by_side, stored_tensors, tiny_config
from lrpath_megatron import mcore_patches, performance
from lrpath_megatron.config import (ConfigError, LoggingConfig, ModelConfig, ParallelConfig, PerformanceConfig,
                                    PrecisionConfig, load_train_config)

STEPS = 6
# fp32 on CPU: the fused kernels change the order of additions only (observed differences <= 2e-5).
TOLERANCE = 1e-4


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def config(demo_data, tmp_path_factory) -> Path:
    return tiny_config(demo_data, tmp_path_factory.mktemp("perf") / "tiny.yaml",
                       model={"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                              "vocab_size": demo_data["vocab_size"]})


def _train(config: Path, run_dir: Path, *sets: str, stop: int = STEPS):
    args = ["train", str(config), "--run-dir", str(run_dir), "--stop-at-step", str(stop)]
    for item in sets:
        args += ["--set", item]
    return run_lrpath(args)


@pytest.fixture(scope="module")
def baseline(config, tmp_path_factory) -> dict[int, dict]:
    run_dir = tmp_path_factory.mktemp("baseline")
    _train(config, run_dir)
    return _records(run_dir)


LEVERS = {
    "optimizer": ["performance.fused_adam=true", "performance.foreach_grad_norm=true"],
    # cross_entropy_fusion is bf16-only (refused for fp32 below): compared with a bf16 baseline on its own.
    "fusions": ["performance.bias_dropout_fusion=true"],
    "compile": ["performance.compile_layers=true"],
}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_matches_the_baseline(config, baseline, lever, tmp_path):
    out = _train(config, tmp_path, *LEVERS[lever])
    got = _records(tmp_path)
    assert sorted(got) == sorted(baseline) == list(range(STEPS))
    for step in baseline:
        assert got[step]["loss"] == pytest.approx(baseline[step]["loss"], abs=TOLERANCE), step
        assert got[step]["grad_norm"] == pytest.approx(baseline[step]["grad_norm"], rel=TOLERANCE), step
    assert baseline[STEPS - 1]["loss"] < baseline[0]["loss"] - 0.1  # it trains: the comparison has teeth
    if lever == "compile":
        assert "torch.compile: 2 layers" in out.stdout


def test_swiglu_activation_fusion_matches_unfused(config, tmp_path):
    _train(config, tmp_path / "plain", "model.activation=swiglu")
    _train(config, tmp_path / "fused", "model.activation=swiglu", "performance.bias_activation_fusion=true")
    plain, fused = losses(tmp_path / "plain"), losses(tmp_path / "fused")
    assert sorted(plain) == sorted(fused) == list(range(STEPS))
    for step in plain:
        assert fused[step] == pytest.approx(plain[step], abs=TOLERANCE), step


def test_cross_entropy_fusion_matches_unfused_in_bf16(config, tmp_path):
    """docs/performance.md: in bf16 over 3 steps, megatron-core's fused cross entropy gives the unfused
    run's losses within 1e-4 and grad norms within 2.5e-4 relative (measured with megatron-core 0.16.1 and
    0.19.2: 8.0e-6 and 7.5e-5; 3.8e-5 and 1.0e-4 on a CPU with AMX bf16 units, whose bf16 matmuls round
    differently; its logits gradient is bf16)."""
    bf16, steps = "precision.dtype=bf16", 3
    side_by_side(lambda: _train(config, tmp_path / "plain", bf16, stop=steps),
                 lambda: _train(config, tmp_path / "fused", bf16, "performance.cross_entropy_fusion=true", stop=steps))
    plain, fused = _records(tmp_path / "plain"), _records(tmp_path / "fused")
    assert sorted(plain) == sorted(fused) == list(range(steps))
    loss = max(abs(fused[s]["loss"] - plain[s]["loss"]) for s in plain)
    norm = max(abs(fused[s]["grad_norm"] / plain[s]["grad_norm"] - 1) for s in plain)
    print(f"cross_entropy_fusion, bf16, {steps} steps: max |loss diff| = {loss:.1e}, "
          f"max relative grad norm diff = {norm:.1e}")
    for step in plain:
        assert fused[step]["loss"] == pytest.approx(plain[step]["loss"], abs=1e-4), step
        assert fused[step]["grad_norm"] == pytest.approx(plain[step]["grad_norm"], rel=2.5e-4), step
    assert norm > 0  # the fused kernel ran: its bf16 logits gradient moves the gradient norm


def test_resume_keeps_the_fused_optimizer_bitwise(config, tmp_path_factory):
    """A checkpoint saved by the fused optimizer resumes into it (flags and per-parameter step tensors
    restored by the load hook): the resumed run equals the uninterrupted one exactly."""
    whole, split = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("split")
    _train(config, whole, *LEVERS["optimizer"])
    _train(config, split, *LEVERS["optimizer"], stop=3)
    out = _train(config, split, *LEVERS["optimizer"])
    assert "resumed at step 3" in out.stdout
    assert losses(split) == losses(whole)


def test_fused_adam_is_torch_adamw_with_the_fused_kernel():
    torch.manual_seed(0)
    plain, fused = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    fused.load_state_dict(plain.state_dict())
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    opt_fused = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    assert performance.fuse_torch_adam(opt_fused)
    assert not performance.fuse_torch_adam(torch.optim.SGD(plain.parameters(), lr=0.1))  # falls back
    for _ in range(5):
        x = torch.randn(3, 8)
        for model, opt in ((plain, opt_plain), (fused, opt_fused)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert torch.allclose(plain.weight, fused.weight, atol=1e-6)
    # A state saved without the fused flag and with one step tensor shared by all parameters (as
    # megatron-core's distributed optimizer builds it) loads as fused with one step per parameter.
    saved = opt_plain.state_dict()
    shared = torch.tensor(5.0)
    for state in saved["state"].values():
        state["step"] = shared
    opt_fused.load_state_dict(saved)
    assert all(g["fused"] and not g["foreach"] for g in opt_fused.param_groups)
    assert len({id(s["step"]) for s in opt_fused.state.values()}) == len(opt_fused.state) == 2


def test_foreach_grad_norm_matches_the_plain_norm():
    grads = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    norm, _ = mcore_patches._foreach_l2_norm(2048, None, [grads], False)
    assert norm.shape == (1,) and norm.dtype == torch.float32
    assert float(norm) == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-6)
    expected = [g * 0.5 for g in grads]
    mcore_patches._foreach_scale(2048, None, [grads, grads], 0.5)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))


def test_levers_off_leave_the_transformer_config_unchanged():
    from lrpath_megatron.model import transformer_config

    args = (ModelConfig(), ParallelConfig(), PrecisionConfig())
    off, default = transformer_config(*args), transformer_config(*args, PerformanceConfig())
    for name in ("bias_dropout_fusion", "bias_activation_fusion", "cross_entropy_loss_fusion", "apply_rope_fusion",
                 "masked_softmax_fusion", "gradient_accumulation_fusion", "persist_layer_norm"):
        assert getattr(off, name) is False and getattr(default, name) is False, name
    assert off.fp8 is None
    on = transformer_config(*args, PerformanceConfig(bias_dropout_fusion=True, cross_entropy_fusion=True))
    assert on.bias_dropout_fusion and on.cross_entropy_loss_fusion and on.cross_entropy_fusion_impl == "native"


def test_fp8_settings_reach_megatron_core_field_names():
    from megatron.core.transformer.transformer_config import TransformerConfig

    precision = PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024,
                                fp8_amax_compute_algo="max", fp8_margin=1)
    settings = performance.fp8_settings(precision)
    assert settings == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 1, "fp8_amax_history_len": 1024,
                        "fp8_amax_compute_algo": "max"}
    assert set(settings) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    assert performance.fp8_settings(PrecisionConfig()) == {}


def test_refusals_name_the_lever_and_the_fix(monkeypatch):
    from lrpath_megatron.model import have_transformer_engine, transformer_config

    if not have_transformer_engine():
        with pytest.raises(ConfigError, match="performance.rope_fusion needs Transformer Engine"):
            performance.check(PerformanceConfig(rope_fusion=True), cuda=False, have_te=False)
        with pytest.raises(ConfigError, match="Transformer Engine is not importable"):
            transformer_config(ModelConfig(), ParallelConfig(), PrecisionConfig(dtype="bf16", fp8="hybrid"))
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(ConfigError, match=r"performance.compile_layers needs torch.compile, but no C\+\+ compiler"):
        performance.check(PerformanceConfig(compile_layers=True, cross_entropy_fusion=True), cuda=False, have_te=False)
    performance.check(PerformanceConfig(fused_adam=True), cuda=False, have_te=False)  # needs no compiler


@pytest.mark.parametrize("overrides, message", [
    (["performance.compile_mode=reduce-overhead"], "performance.compile_mode='reduce-overhead' is not one of"),
    (["performance.bias_activation_fusion=true"], "performance.bias_activation_fusion needs model.activation=swiglu"),
    (["performance.cross_entropy_fusion=true"], "performance.cross_entropy_fusion needs precision.dtype=bf16"),
    (["performance.fused_adam=1"], "performance.fused_adam must be true or false"),
    (["performance.fuse_everything=true"], "unknown key performance.fuse_everything"),
    (["precision.fp8_amax_compute_algo=mean"], "precision.fp8_amax_compute_algo='mean' is not one of"),
    (["precision.fp8_amax_history_len=0"], "precision.fp8_amax_history_len must be > 0"),
    (["precision.fp8_margin=-1"], "precision.fp8_margin must be >= 0"),
    (["precision.fp8_recipe=custom"], "precision.fp8_recipe='custom' is not one of"),
], ids=["compile-mode", "gelu-fusion", "ce-fusion-fp32", "not-bool", "typo", "amax-algo", "history", "margin", "recipe"])
def test_bad_performance_config_fails_with_one_clear_message(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_train_config(config, overrides)
    assert str(err.value).count(message) == 1, str(err.value)


def test_mfu_is_measured_against_the_gpus_own_peak_or_not_at_all():
    from lrpath_megatron.metrics import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # not the SXM peak
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None  # the table is of bf16 peaks
    assert peak_flops(None, "bf16") is None and peak_flops("NVIDIA L4", "bf16") is None  # CPU, unknown GPU
    assert peak_flops("NVIDIA L4", "bf16", configured_tflops=121) == 121e12
    assert peak_flops(None, "fp32", configured_tflops=2) == 2e12
    with pytest.raises(ConfigError, match="logging.peak_tflops must be > 0"):
        LoggingConfig(peak_tflops=0).validate()


RECOMPUTE_SCRIPT = r"""
import json, torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from lrpath_megatron import distributed
from lrpath_megatron.config import ModelConfig, ParallelConfig, PerformanceConfig, PrecisionConfig
from lrpath_megatron.model import build_model, transformer_config

model_cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=128,
                        hidden_dropout=0.1, attention_dropout=0.1)
parallel = ParallelConfig(micro_batch_size=2, global_batch_size=2)
distributed.initialize(parallel, seed=3)
tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
positions = torch.arange(32).expand(2, 32)
result = {}
for recompute in ("none", "selective", "full"):
    distributed.seed_everything(3)  # same init and dropout draws for each setting
    tcfg = transformer_config(model_cfg, parallel, PrecisionConfig(), PerformanceConfig(recompute=recompute))
    model = build_model(model_cfg, parallel, PrecisionConfig(), tcfg)
    calls = {"layer": 0, "attention": 0}
    for m in model.modules():
        if isinstance(m, TransformerLayer):
            m.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
            m.self_attention.core_attention.register_forward_hook(
                lambda *a: calls.__setitem__("attention", calls["attention"] + 1))
    saved = [0]
    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    result[recompute] = {"calls": calls, "saved": saved[0],
                         "grads": {n: p.grad.tolist() for n, p in model.named_parameters() if "layers.0" in n}}
distributed.shutdown()
print(json.dumps(result))
"""


def test_recompute_reruns_the_forward_in_backward_and_keeps_less():
    """Activation recomputation (with dropout): selective reruns each layer's core attention in backward,
    full reruns whole layers; each keeps fewer activations for backward and gives the same gradients."""
    import subprocess
    import sys

    from conftest import free_port

    env = {"MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", RECOMPUTE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["none"]["calls"] == {"layer": 4, "attention": 4}
    assert r["selective"]["calls"] == {"layer": 4, "attention": 8}
    assert r["full"]["calls"] == {"layer": 8, "attention": 8}
    assert r["full"]["saved"] < r["selective"]["saved"] < r["none"]["saved"]
    assert r["selective"]["grads"] == r["none"]["grads"] == r["full"]["grads"]  # bit for bit


# Small buckets (the tiny model has about 330k parameters), so several reductions overlap backward.
OVERLAP = {"false": ["performance.overlap_grad_reduce=true", "performance.ddp_bucket_size=20000"],
           "true": ["performance.overlap_grad_reduce=true", "performance.overlap_param_gather=true",
                    "performance.ddp_bucket_size=20000"]}


@pytest.mark.compat
@pytest.mark.parametrize("distributed_optimizer", ["false", "true"])
def test_overlapped_communication_trains_saves_and_resumes_as_the_baseline(config, tmp_path, distributed_optimizer):
    """DP=2: reducing gradient buckets during backward (and, with the distributed optimizer, gathering
    the updated parameters during the next forward) gives the baseline's losses, saves the same weights
    and optimizer state, and a run stopped and resumed equals the uninterrupted one."""
    optimizer = f"parallel.use_distributed_optimizer={distributed_optimizer}"
    overlap = [optimizer, *OVERLAP[distributed_optimizer]]

    def train(run_dir, *sets, stop=STEPS):
        args = ["train", str(config), "--run-dir", str(run_dir), "--stop-at-step", str(stop)]
        return run_lrpath([*args, *(x for item in sets for x in ("--set", item))], nproc=2)

    train(tmp_path / "base", optimizer)
    proc = train(tmp_path / "overlap", *overlap)
    # megatron-core 0.16.1 to 0.19.2 save the distributed optimizer's multi-bucket state at padded offsets:
    # lrpath's probe finds it and corrects the offsets (the state compared below would differ otherwise).
    corrected = "slices the distributed optimizer's multi-bucket state at padded offsets on save: corrected"
    assert (corrected in proc.stderr) == (distributed_optimizer == "true"), proc.stderr[-2000:]
    base, got = _records(tmp_path / "base"), _records(tmp_path / "overlap")
    assert sorted(base) == sorted(got) == list(range(STEPS))
    for step in base:
        assert got[step]["loss"] == pytest.approx(base[step]["loss"], abs=TOLERANCE), step
        assert got[step]["grad_norm"] == pytest.approx(base[step]["grad_norm"], rel=TOLERANCE), step
    ckpts = {run: tmp_path / run / "checkpoints" / f"iter_{STEPS:07d}" for run in ("base", "overlap")}
    # The weights saved right after an optimizer step (one step's update is about 3e-3) and, for the
    # distributed optimizer, its per-parameter state gathered from several buckets.
    for part in ("model", "optimizer") if distributed_optimizer == "true" else ("model",):
        saved = {run: stored_tensors(ckpt, part) for run, ckpt in ckpts.items()}
        assert saved["base"].keys() == saved["overlap"].keys() and len(saved["base"]) > 5
        for name, tensor in saved["base"].items():
            assert (saved["overlap"][name] - tensor).abs().max() < 1e-5, name
    train(tmp_path / "split", *overlap, stop=3)
    train(tmp_path / "split", *overlap)
    assert losses(tmp_path / "split") == losses(tmp_path / "overlap")


def test_overlap_settings_that_cannot_work_are_refused(config, tmp_path):
    with pytest.raises(ConfigError, match="ddp_bucket_size splits the gradients for overlap_grad_reduce"):
        PerformanceConfig(ddp_bucket_size=1000).validate()
    with pytest.raises(ConfigError, match="overlap_param_gather needs performance.overlap_grad_reduce"):
        PerformanceConfig(overlap_param_gather=True).validate()
    proc = run_lrpath(["train", str(config), "--run-dir", str(tmp_path / "run"), "--set",
                       "parallel.use_distributed_optimizer=false", "--set", "performance.overlap_grad_reduce=true",
                       "--set", "performance.overlap_param_gather=true"], check=False)
    assert proc.returncode == 2 and "overlap_param_gather gathers the distributed optimizer's" in proc.stderr
    assert not (tmp_path / "run").exists()
