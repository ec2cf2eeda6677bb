"""The memory model against real megatron-core models on CPU, the layout planner, the profile's memory
check, and the context-parallel data split and loss accounting."""
from __future__ import annotations

import os

import pytest
import torch

from lrpath_megatron import memory_model as mm
from lrpath_megatron.config import ConfigError, ModelConfig, ParallelConfig


@pytest.fixture(scope="module")
def one_process():
    """A world of one process (gloo, CPU) for building real models."""
    from lrpath_megatron import distributed

    previous = os.environ.get("LRPATH_DEVICE")
    os.environ["LRPATH_DEVICE"] = "cpu"
    distributed.initialize(ParallelConfig(), 1234)
    yield
    distributed.shutdown()
    if previous is None:
        del os.environ["LRPATH_DEVICE"]
    else:
        os.environ["LRPATH_DEVICE"] = previous


@pytest.mark.parametrize("size, dtype, dist_opt", [
    ("h64-L4-swiglu", "bf16", True),
    ("h128-L4-gqa-gelu", "fp32", False),
    ("h96-L6-bias-layernorm", "bf16", False),
])
def test_predicted_bytes_match_megatron_core_on_cpu(one_process, size, dtype, dist_opt):
    """Parameters, DDP gradient buffer and optimizer state exactly; one micro-batch's saved activations
    within 0.01% (autograd's saved tensors, parameters excluded)."""
    from memory_model import SIZES, measure, predict

    model = ModelConfig(**SIZES[size])
    parallel = ParallelConfig(micro_batch_size=2, global_batch_size=4, use_distributed_optimizer=dist_opt)
    got = measure(model, parallel, dtype)
    want = predict(model, parallel, dtype, dp=1, pp_rank=0, dp_rank=0)
    for key in ("weights", "gradients", "optimizer"):
        assert got[key] == want[key], key
    assert want["activations"] == pytest.approx(got["activations"], rel=1e-4)


def test_distributed_optimizer_shards_padded_buckets():
    """DP=4: each rank's shard covers a quarter of the padded buffer; the shards add up to every parameter,
    the padding holding no state; the tied embedding of a pipeline gets a bucket of its own."""
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1000, untie_embeddings=False)
    layout = mm.Layout(pipeline_parallel=2, data_parallel=4, distributed_optimizer=True)
    params = mm.chunk_parameters(model, layout, pp_rank=0)
    buckets = mm.grad_buffer(params, layout)
    assert len(buckets) == 2 and buckets[-1].params == ((buckets[-1].start, buckets[-1].start + 1024 * 64),)
    assert all(b.end % 128 == 0 for b in buckets)  # each bucket ends at a multiple of lcm(DP=4, 128)
    shards = [mm.shard_numel(buckets, r, 4) for r in range(4)]
    assert sum(shards) == sum(p.numel for p in params)


def test_pipeline_in_flight_and_bubble():
    """1F1B: the first stage holds PP micro-batches; interleaved with v chunks: PP + (PP - 1) / v stages'
    worth; bubble (p - 1) / (v m): 22% for PP=8 and 32 micro-batches, divided by v."""
    plain = mm.Layout(pipeline_parallel=8, num_microbatches=32)
    assert mm.in_flight_microbatches(plain) == 8 and mm.in_flight_microbatches(plain, 7) == 1
    assert mm.bubble_fraction(plain) == pytest.approx(7 / 32)
    inter = mm.Layout(pipeline_parallel=8, virtual_pipeline=4, num_microbatches=32)
    assert mm.in_flight_microbatches(inter) == pytest.approx(8 + 7 / 4)
    assert mm.bubble_fraction(inter) == pytest.approx(7 / 32 / 4)


def test_planner_marks_a_layout_that_fits_and_the_profile_refuses_one_that_does_not(tmp_path):
    from lrpath_megatron.config import PerformanceConfig, PrecisionConfig, TrainConfig
    from lrpath_megatron.launch.jobs import check_memory
    from lrpath_megatron.launch.profile import ClusterProfile
    from lrpath_megatron.layout_planner import plan_layouts

    model = ModelConfig(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                        ffn_hidden_size=28672, seq_length=4096, vocab_size=128256, activation="swiglu")
    fitting, sized = plan_layouts(model, gpus=256, gpus_per_node=8, global_batch_size=512, dtype="bf16",
                                  gpu_memory_gib=80)
    assert 0 < len(fitting) < sized
    best = fitting[0]
    assert best.memory.total <= 80 * mm.GIB * 0.9
    assert all(best.cost <= c.cost + 1e-9 for c in fitting)
    assert best.layout.tensor_parallel * best.layout.pipeline_parallel > 1  # a 70B model needs model parallelism
    train = TrainConfig(model=model, parallel=ParallelConfig(micro_batch_size=1, global_batch_size=512),
                        precision=PrecisionConfig(dtype="bf16"), performance=PerformanceConfig())
    profile = ClusterProfile(partition="gpu", time="04:00:00", nodes=32, seconds_per_step=1.0, gpu_memory_gib=80)
    with pytest.raises(ConfigError, match=r"job main \(TP1 PP1 DP256 mb1x2, recompute none\) is predicted to need "
                                          r"\d+\.\d GiB per GPU \(weights 131\.\d, gradients"):
        check_memory(profile, "cluster.yaml", "main", 256, train)
    profile.memory_check = False
    check_memory(profile, "cluster.yaml", "main", 256, train)  # overridden: no refusal


def test_context_parallel_split_and_loss_cover_the_sequence_once():
    """Each CP rank gets chunks r and 2CP-1-r of the sequence; together the ranks hold every token once,
    and the gradient summed over the ranks (DDP averages over DP x CP, so each rank's loss is scaled by CP)
    is that of the whole sequence's mean loss."""
    from lrpath_megatron.forward import context_parallel_loss, context_parallel_part

    cp, seq = 2, 8
    batch = {"tokens": torch.arange(2 * seq).view(2, seq), "loss_mask": torch.tensor([[1.0] * seq, [1.0] * 5 + [0.0] * 3])}
    parts = [context_parallel_part(batch, cp, r) for r in range(cp)]
    assert parts[0]["tokens"][0].tolist() == [0, 1, 6, 7] and parts[1]["tokens"][0].tolist() == [2, 3, 4, 5]
    per_token = torch.rand(2, seq, requires_grad=True)
    whole = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    (expected,) = torch.autograd.grad(whole, per_token)
    local = [context_parallel_part({"loss": per_token, "mask": batch["loss_mask"]}, cp, r) for r in range(cp)]
    sums = [(p["loss"] * p["mask"]).sum() for p in local]
    total = torch.stack([sum(s.detach() for s in sums), batch["loss_mask"].sum()])
    (got,) = torch.autograd.grad(sum(context_parallel_loss(s, total, cp) for s in sums) / cp, per_token)
    torch.testing.assert_close(got, expected)


def test_interleaving_refusals_name_the_fix():
    model = ModelConfig(num_layers=4)
    with pytest.raises(ConfigError, match="needs parallel.pipeline_parallel >= 2"):
        ParallelConfig(virtual_pipeline=2).validate()
    with pytest.raises(ConfigError, match="= 6 model chunks do not divide model.num_layers=4"):
        ParallelConfig(pipeline_parallel=2, virtual_pipeline=3).check_model(model)
    with pytest.raises(ConfigError, match=r"= 3\) that is a multiple of parallel.pipeline_parallel=2; change "
                                          r"parallel.global_batch_size to a multiple of 4"):
        ParallelConfig(pipeline_parallel=2, virtual_pipeline=2, micro_batch_size=2, global_batch_size=6).data_parallel(2)


def test_plan_layout_command_lists_the_fitting_layouts_best_first(tmp_path):
    from conftest import REPO, run_lrpath

    args = ["plan", str(REPO / "examples" / "paper_4versions.yaml"), "--layout", "--cluster",
            str(REPO / "examples" / "cluster_h100.yaml"), "--top", "3"]
    out = run_lrpath(args).stdout.splitlines()
    assert out[0].startswith("24 layers, hidden 2048, 1.35B parameters") and "4 nodes x 8 GPUs of 80 GiB" in out[0]
    rows = out[out.index(next(line for line in out if line.startswith("-  "))) + 1:]
    assert len(rows) == 3 and rows[0].startswith("*  TP1 PP1 DP32") and not rows[1].startswith("*")
    from lrpath_megatron.launch.profile import load_profile
    from lrpath_megatron.layout_planner import layout_report
    from lrpath_megatron.plan import load_plan

    with pytest.raises(ConfigError, match="gpu_memory_gib is not set; give the memory of one GPU"):
        layout_report(load_plan(args[1]).train_config, load_profile(args[4], ["gpu_memory_gib=null"]), args[4], 3)
    with pytest.raises(ConfigError, match="logging.eval_batches=6 .* data_parallel=2 ranks, .* multiple of 4"):
        ParallelConfig(pipeline_parallel=2, virtual_pipeline=2).check_eval_batches(6, 2)
    ParallelConfig(pipeline_parallel=2, virtual_pipeline=2).check_eval_batches(4, 2)
