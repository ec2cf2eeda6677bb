"""WSM merge: weight math, exactness of the merge identity, streaming merge of dist checkpoints (TP=2 vs
TP=1 with real megatron-core), exported files, and clear errors with no output."""
from __future__ import annotations

import json
import math
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lrpath_megatron.checkpoint.dist_files import DcpTensorReader
from lrpath_megatron.checkpoint.layout import verify
from lrpath_megatron.cli import main as cli_main
from lrpath_megatron.config import ConfigError
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.merge import MCORE_SIDE_FILES, merge_checkpoints
from lrpath_megatron.merge_weights import (
    coefficients_from_multipliers,
    merge_release,
    merge_save_steps,
    merge_weights,
    multipliers_from_coefficients,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# --------------------------------------------------------------------------------------------------
# Weight math
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_linear_weights_are_the_mean(n):
    assert merge_weights("linear", n).coefficients == pytest.approx([1.0 / n] * n, abs=1e-12)


@pytest.mark.parametrize("spec", ["linear", "cosine", "1-sqrt", "mean", "ema:0.7", "points:0:1,0.3:0.5,1:0.1"])
def test_weights_sum_to_one_and_invert(spec):
    w = merge_weights(spec, 6)
    assert math.fsum(w.coefficients) == pytest.approx(1.0, abs=1e-12)
    assert all(c >= -1e-15 for c in w.coefficients)
    assert multipliers_from_coefficients(w.coefficients) == pytest.approx(list(w.multipliers), abs=1e-12)
    assert coefficients_from_multipliers(w.multipliers) == pytest.approx(list(w.coefficients), abs=1e-12)
    assert list(w.multipliers) == sorted(w.multipliers, reverse=True)  # a decay


def test_curve_samples_and_known_values():
    w = merge_weights("1-sqrt", 4)  # w_i = 1 - sqrt(i / 4)
    assert w.multipliers == pytest.approx([1 - math.sqrt(0.25), 1 - math.sqrt(0.5), 1 - math.sqrt(0.75)])
    assert w.coefficients[0] == pytest.approx(math.sqrt(0.25))
    assert merge_weights("ema:0.5", 3).coefficients == pytest.approx([0.25, 0.25, 0.5])
    # 1-sqrt puts more weight on the oldest checkpoint than linear (concave decay: less averaging)
    assert merge_weights("1-sqrt", 8).coefficients[0] > merge_weights("linear", 8).coefficients[0]


@pytest.mark.parametrize("spec,n,fragment", [
    ("0.2,0.3,0.5", 2, "3 coefficients for 2 checkpoints"),
    ("0.5,0.6", 2, "sum to 1.1"),
    ("-0.5,1.5", 2, ">= 0"),
    ("sqrt", 3, "not a number"),
    ("ema:1.5", 3, "(0, 1)"),
    ("points:0:1,0.5:0.6,0.7:0.8,1:0", 3, "never increase"),
    ("points:0.1:1,1:0", 3, "first 0:1"),
    ("linear", 1, "at least 2"),
])
def test_bad_weight_specs(spec, n, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        merge_weights(spec, n)


def test_merge_save_steps():
    assert merge_save_steps(1000, 400, 5) == [600, 700, 800, 900, 1000]
    with pytest.raises(ConfigError, match="multiple of"):
        merge_save_steps(1000, 401, 5)
    with pytest.raises(ConfigError, match="before step 0"):
        merge_save_steps(100, 400, 5)


def test_merge_release_save_steps():
    where = "plan.versions[0].release.merge"
    release = merge_release({"num_checkpoints": 5, "window_tokens": 10_000, "weights": "linear"}, where)
    # 10000 tokens / 1024 per step -> 10 steps -> 12 (a multiple of 4 intervals)
    assert release.save_steps(100, 1024) == [88, 91, 94, 97, 100]
    assert merge_release({"window_steps": 7}, where).save_steps(20, 1) == [13, 14, 15, 16, 17, 18, 19, 20]
    with pytest.raises(ConfigError, match="unknown key plan.versions.0..release.merge.windw_tokens"):
        merge_release({"windw_tokens": 1}, where)
    with pytest.raises(ConfigError, match="exactly one of window_tokens or window_steps"):
        merge_release({"num_checkpoints": 4}, where)
    with pytest.raises(ConfigError, match="sum to"):
        merge_release({"window_steps": 4, "num_checkpoints": 2, "weights": "0.5,0.6"}, where)


def test_cli_print(capsys):
    assert cli_main(["merge", "--weights", "1-sqrt", "--num-checkpoints", "4", "--print"]) == 0
    out = capsys.readouterr().out
    assert "1-sqrt (4 checkpoints)" in out and f"{math.sqrt(0.25):.6f}" in out
    assert cli_main(["merge", "--weights", "0.5,0.6", "--num-checkpoints", "2", "--print"]) == 2
    assert "sum to 1.1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Exactness on random tensors: merge of constant-LR SGD checkpoints == same updates with decayed LR
# --------------------------------------------------------------------------------------------------
def _sgd_run(tmp: Path, k: int, steps_per_ckpt: int, fmt: str):
    """Constant-LR SGD on a noisy quadratic; saves k+1 checkpoints; returns paths, theta_0, gradients."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"layer.weight": (16, 8), "layer.bias": (8,), "emb": (32, 4)}
    theta = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    target = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    lr, grads, paths = 0.1, [], []
    theta0 = {n: t.clone() for n, t in theta.items()}
    for step in range(k * steps_per_ckpt + 1):
        if step % steps_per_ckpt == 0:
            paths.append(_save(tmp / f"iter_{step:07d}", theta, fmt))
        if step == k * steps_per_ckpt:
            break
        g = {n: theta[n] - target[n] + 0.5 * torch.randn(theta[n].shape, generator=gen) for n in theta}
        grads.append(g)
        theta = {n: theta[n] - lr * g[n] for n in theta}
    return paths, theta0, grads, lr


def _save(path: Path, state: dict, fmt: str) -> Path:
    if fmt == "file":
        torch.save({"config": {"model": {"hidden_size": 8}}, "model": dict(state)}, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    dcp.save({n: t.clone() for n, t in state.items()}, checkpoint_id=str(path / "model"), no_dist=True)
    return path


def _read_all(out: Path, fmt: str) -> dict:
    if fmt == "file":
        return torch.load(out, weights_only=True)["model"]
    reader = DcpTensorReader(out / "model")
    return {n: reader.read(n, [0] * len(m.size), m.size) for n, m in reader.tensor_meta().items()}


@pytest.mark.parametrize("fmt", ["dist", "file"])
@pytest.mark.parametrize("spec", ["linear", "1-sqrt", "cosine"])
def test_merge_equals_decayed_updates(tmp_path, spec, fmt):
    k, s = 4, 3
    paths, theta0, grads, lr = _sgd_run(tmp_path, k, s, fmt)
    weights = merge_weights(spec, k + 1)
    out = tmp_path / ("merged.pt" if fmt == "file" else "merged")
    merge_checkpoints(paths, weights, out, progress=False, group_bytes=600)
    merged = _read_all(out, fmt)
    # The same recorded updates, interval i scaled by the emulated multiplier w_i (float64 reference).
    decayed = {n: t.double() for n, t in theta0.items()}
    for step, g in enumerate(grads):
        w = weights.multipliers[step // s]
        decayed = {n: decayed[n] - lr * w * g[n].double() for n in decayed}
    for n in decayed:
        torch.testing.assert_close(merged[n], decayed[n].float(), rtol=2e-6, atol=2e-6)
    # ...and it is not the constant-LR end point (the check can fail).
    last = _read_all_input(paths[-1], fmt)
    assert not torch.allclose(merged["emb"], last["emb"], atol=1e-3)


def _read_all_input(path: Path, fmt: str) -> dict:
    if fmt == "file":
        return torch.load(path, weights_only=True)["model"]
    reader = DcpTensorReader(path / "model")
    return {n: reader.read(n, [0] * len(m.size), m.size) for n, m in reader.tensor_meta().items()}


def test_mean_merge_equals_linear_merge(tmp_path):
    paths, *_ = _sgd_run(tmp_path, 5, 1, "dist")
    merge_checkpoints(paths, merge_weights("mean", 6), tmp_path / "mean", progress=False)
    merge_checkpoints(paths, merge_weights("linear", 6), tmp_path / "linear", progress=False)
    a, b = _read_all(tmp_path / "mean", "dist"), _read_all(tmp_path / "linear", "dist")
    inputs = [_read_all_input(p, "dist") for p in paths]
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(a[n], torch.stack([x[n] for x in inputs]).mean(0), rtol=1e-6, atol=1e-6)


def test_dtypes_and_manifest(tmp_path):
    """bf16 merges in fp32 and stays bf16; integer tensors are copied from the last checkpoint."""
    paths = []
    for j in range(3):
        state = {"w": torch.full((4, 4), float(j), dtype=torch.bfloat16), "count": torch.tensor([10 + j])}
        paths.append(_save(tmp_path / f"iter_{j:07d}", state, "dist"))
    result = merge_checkpoints(paths, merge_weights("ema:0.5", 3), tmp_path / "out", progress=False)
    merged = _read_all(tmp_path / "out", "dist")
    assert merged["w"].dtype == torch.bfloat16 and merged["w"][0, 0].item() == pytest.approx(0.25 + 1.0)
    assert merged["count"].item() == 12
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest == result.manifest
    assert [i["step"] for i in manifest["inputs"]] == [0, 1, 2]
    assert manifest["weights"]["coefficients"] == pytest.approx([0.25, 0.25, 0.5])
    assert manifest["copied_from_last"] == ["count"] and "not merged" in manifest["optimizer"]
    # Checksummed like a trainer checkpoint: a truncated file is named.
    assert "model/.metadata" in manifest["files"] and verify(tmp_path / "out") == []
    shard = next((tmp_path / "out" / "model").glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size // 2)
    assert verify(tmp_path / "out") == [f"model/{shard.name}"]


# --------------------------------------------------------------------------------------------------
# Errors: one clear message, no output
# --------------------------------------------------------------------------------------------------
def _assert_no_output(tmp_path: Path, out: Path):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_mismatched_shapes_dist(tmp_path):
    a = _save(tmp_path / "iter_0000001", {"w": torch.zeros(4, 4)}, "dist")
    b = _save(tmp_path / "iter_0000002", {"w": torch.zeros(4, 5)}, "dist")
    with pytest.raises(LrpathError, match=r"mismatched checkpoints: tensor w is \(4, 4\)"):
        merge_checkpoints([a, b], merge_weights("mean", 2), tmp_path / "out", progress=False)
    _assert_no_output(tmp_path, tmp_path / "out")


def test_mismatched_keys_and_files(tmp_path):
    a = _save(tmp_path / "iter_0000001", {"w": torch.zeros(4)}, "dist")
    b = _save(tmp_path / "iter_0000002", {"v": torch.zeros(4)}, "dist")
    with pytest.raises(LrpathError, match="lacks tensors"):
        merge_checkpoints([a, b], merge_weights("mean", 2), tmp_path / "out", progress=False)
    f1 = _save(tmp_path / "a", {"w": torch.zeros(4)}, "file")
    f2 = _save(tmp_path / "b", {"w": torch.zeros(4, dtype=torch.float16)}, "file")
    with pytest.raises(LrpathError, match="mismatched checkpoints: w is"):
        merge_checkpoints([f1, f2], merge_weights("mean", 2), tmp_path / "out.pt", progress=False)
    with pytest.raises(LrpathError, match="one kind"):
        merge_checkpoints([a, f2], merge_weights("mean", 2), tmp_path / "out", progress=False)
    _assert_no_output(tmp_path, tmp_path / "out")
    _assert_no_output(tmp_path, tmp_path / "out.pt")


def test_mismatched_configs(tmp_path):
    paths = []
    for j, hidden in enumerate([64, 128]):
        p = _save(tmp_path / f"iter_{j:07d}", {"w": torch.zeros(4)}, "dist")
        (p / "manifest.json").write_text(json.dumps({"config": {"model": {"hidden_size": hidden}}}))
        paths.append(p)
    with pytest.raises(LrpathError, match="differs .* in model.hidden_size"):
        merge_checkpoints(paths, merge_weights("mean", 2), tmp_path / "out", progress=False)
    _assert_no_output(tmp_path, tmp_path / "out")


def test_cli_errors_leave_no_output(tmp_path, capsys):
    a = _save(tmp_path / "iter_0000001", {"w": torch.ones(4)}, "dist")
    b = _save(tmp_path / "iter_0000002", {"w": torch.ones(4)}, "dist")
    out = tmp_path / "out"
    assert cli_main(["merge", str(a), str(b), "--weights", "0.2,0.3,0.5", "--out", str(out)]) == 2
    assert "3 coefficients for 2 checkpoints" in capsys.readouterr().err
    assert cli_main(["merge", str(a), str(b), "--weights", "0.5,0.6", "--out", str(out)]) == 2
    assert "sum to 1.1" in capsys.readouterr().err
    assert cli_main(["merge", str(b), str(a), "--weights", "mean", "--out", str(out)]) == 2
    assert "oldest first" in capsys.readouterr().err
    assert cli_main(["merge", str(a), str(tmp_path / "iter_0000009"), "--weights", "mean", "--out", str(out)]) == 2
    assert f"{tmp_path / 'iter_0000009'} does not exist; give existing checkpoints" in capsys.readouterr().err
    _assert_no_output(tmp_path, out)
    assert cli_main(["merge", str(a), str(b), "--weights", "mean", "--out", str(out), "--no-progress"]) == 0
    torch.testing.assert_close(_read_all(out, "dist")["w"], torch.ones(4))


# --------------------------------------------------------------------------------------------------
# Real megatron-core dist checkpoints: TP=2 saves merge to the same model as TP=1 saves
# --------------------------------------------------------------------------------------------------
NUM_CKPTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(tp: int):
    from lrpath_megatron import distributed
    from lrpath_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
    from lrpath_megatron.model import build_model

    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=96, seq_length=16,
                            make_vocab_size_divisible_by=16, activation="swiglu")
    parallel = ParallelConfig(tensor_parallel=tp, micro_batch_size=1, global_batch_size=2)
    distributed.initialize(parallel, seed=7)
    return build_model(model_cfg, parallel, PrecisionConfig())


def _worker(rank: int, world: int, port: int, root: str) -> None:
    """Two gloo ranks: save checkpoints at TP=2; then, re-initialised at TP=1 (DP=2), re-save the same
    weights at TP=1, merge both sets (rank 0) and load both merges into the TP=1 model."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LRPATH_DEVICE="cpu")
    from megatron.core import dist_checkpointing, parallel_state

    from lrpath_megatron import distributed
    from lrpath_megatron.merge import merge_checkpoints
    from lrpath_megatron.merge_weights import merge_weights

    root = Path(root)

    def save(model, target: Path) -> None:
        if rank == 0:
            target.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(target))

    model = _tiny_model(tp=2)
    for j in range(NUM_CKPTS):  # a "path": the init plus growing perturbations
        torch.manual_seed(100 * j + rank)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        save(model, root / "tp2" / f"iter_{j:07d}" / "model")
    parallel_state.destroy_model_parallel()
    model = _tiny_model(tp=1)
    for j in range(NUM_CKPTS):
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(),
                                                      str(root / "tp2" / f"iter_{j:07d}" / "model")))
        save(model, root / "tp1" / f"iter_{j:07d}" / "model")
    if rank == 0:
        for tp in ("tp1", "tp2"):
            inputs = [root / tp / f"iter_{j:07d}" for j in range(NUM_CKPTS)]
            merge_checkpoints(inputs, merge_weights("1-sqrt", NUM_CKPTS), root / f"merged_{tp}",
                              group_bytes=8192, progress=False)
    torch.distributed.barrier()
    loaded = {}
    for tp in ("tp1", "tp2"):
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(),
                                                      str(root / f"merged_{tp}" / "model")))
        loaded[tp] = {k: v.detach().clone() for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if rank == 0:
        torch.save(loaded, root / "loaded_at_tp1.pt")
    distributed.shutdown()


@pytest.mark.compat
def test_dist_merge_tp2_equals_tp1(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)

    merged = {tp: _read_all(tmp_path / f"merged_{tp}", "dist") for tp in ("tp1", "tp2")}
    inputs = [_read_all_input(tmp_path / "tp1" / f"iter_{j:07d}", "dist") for j in range(NUM_CKPTS)]
    coefficients = merge_weights("1-sqrt", NUM_CKPTS).coefficients
    assert len(merged["tp1"]) > 5 and merged["tp1"].keys() == merged["tp2"].keys()
    for name, tensor in merged["tp1"].items():
        assert torch.equal(tensor, merged["tp2"][name]), name
        expected = sum(c * x[name].double() for c, x in zip(coefficients, inputs))
        torch.testing.assert_close(tensor, expected.float(), rtol=1e-6, atol=1e-6)
    # The merge of TP=2 saves, loaded by megatron-core at TP=1, is the same model.
    loaded = torch.load(tmp_path / "loaded_at_tp1.pt", weights_only=True)
    assert loaded["tp1"].keys() == loaded["tp2"].keys() and len(loaded["tp1"]) > 5
    for name in loaded["tp1"]:
        assert torch.equal(loaded["tp1"][name], loaded["tp2"][name]), name
    # Layout: the TP=2 merge keeps TP=2 chunks, split over several files (group_bytes), plus mcore files.
    files = sorted(p.name for p in (tmp_path / "merged_tp2" / "model").iterdir())
    # (common.pt: only from megatron-core 0.16, which writes one; the files the last input has.)
    last = tmp_path / "tp2" / f"iter_{NUM_CKPTS - 1:07d}" / "model"
    assert {".metadata", *(n for n in MCORE_SIDE_FILES if (last / n).is_file())} <= set(files)
    assert "metadata.json" in files
    assert sum(f.endswith(".distcp") for f in files) > 2
    assert "extra_state" in " ".join(json.loads((tmp_path / "merged_tp2" / "manifest.json").read_text())
                                     ["copied_from_last"])
