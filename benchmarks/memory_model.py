"""Predicted vs measured per-rank memory of real megatron-core models on CPU (lrpath_megatron.memory_model).

Each rank builds the model chunks of a layout, wraps them as training does (DDP per chunk, the Megatron
optimizer), runs one step, and measures: parameter bytes, DDP gradient-buffer bytes, optimizer-state bytes
(Adam moments, and fp32 master copies: the inner optimizer's parameters that are not model storage), and
the bytes autograd saves during one micro-batch's forward (PP=1 only: a whole model's forward). Rank 0
writes benchmarks/results/memory_model.json and .md.

    torchrun --nproc-per-node=2 benchmarks/memory_model.py    # DP=2 rows (and PP=2 rows)
    .venv/bin/python benchmarks/memory_model.py               # DP=1 rows
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # name -> model settings (tiny: CPU)
    "h64-L4-swiglu": dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=128, vocab_size=1000,
                          activation="swiglu"),
    "h128-L4-gqa-gelu": dict(num_layers=4, hidden_size=128, num_attention_heads=8, num_query_groups=2,
                             seq_length=256, vocab_size=3000, untie_embeddings=False),
    "h96-L6-bias-layernorm": dict(num_layers=6, hidden_size=96, num_attention_heads=6, seq_length=64, vocab_size=500,
                                  normalization="LayerNorm", add_bias_linear=True),
}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_activation_bytes(fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn`` runs."""
    saved: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[_storage(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def measure(model_cfg, parallel, dtype: str) -> dict:
    """Collective over the initialised world: this rank's measured bytes after one training step."""
    from megatron.core import parallel_state

    from lrpath_megatron import forward
    from lrpath_megatron.config import PrecisionConfig, TrainConfig
    from lrpath_megatron.model import build_model_chunks, transformer_config
    from lrpath_megatron.parallel_training import wrap_for_training

    cfg = TrainConfig(model=model_cfg, parallel=parallel, precision=PrecisionConfig(dtype=dtype))
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, tcfg)
    model, optimizer = wrap_for_training(cfg, tcfg, chunks, lambda m: None)
    params = {id(p): p for c in chunks for p in c.parameters()}.values()
    g = torch.Generator().manual_seed(0)
    b, s = parallel.micro_batch_size, model_cfg.seq_length

    def microbatch():
        t = torch.randint(0, model_cfg.vocab_size, (b, s + 1), generator=g)
        return {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(b, s),
                "position_ids": torch.arange(s).expand(b, s)}

    dp = parallel_state.get_data_parallel_world_size()
    n = parallel.global_batch_size // (parallel.micro_batch_size * dp)
    for m in model:
        m.zero_grad_buffer()
    forward.forward_backward(model, [microbatch() for _ in range(n)], s, b, False)
    optimizer.step()
    model_storages = {_storage(p) for p in params}
    for m in model:
        model_storages |= {_storage(buf.param_data) for buf in m.buffers if buf.param_data is not None}
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    state = sum(t.untyped_storage().nbytes() for o in inner for st in o.state.values()
                for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    masters = {_storage(p): p.untyped_storage().nbytes() for o in inner for grp in o.param_groups
               for p in grp["params"] if _storage(p) not in model_storages}
    out = {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(buf.grad_data.numel() * buf.grad_data.element_size() for m in model for buf in m.buffers),
        "optimizer": state + sum(masters.values()),
    }
    if parallel.pipeline_parallel == 1:
        for m in model:
            m.eval()  # dropout is 0 anyway; eval keeps the DDP hooks from firing on this extra forward
        batch = microbatch()
        saved = saved_activation_bytes(lambda: model[0](batch["tokens"], batch["position_ids"], None,
                                                        labels=batch["labels"]))
        out["activations"] = sum(v for k, v in saved.items() if k not in model_storages)
    return out


def predict(model_cfg, parallel, dtype: str, dp: int, pp_rank: int, dp_rank: int) -> dict:
    from lrpath_megatron import memory_model as mm

    layout = mm.Layout(tensor_parallel=parallel.tensor_parallel, pipeline_parallel=parallel.pipeline_parallel,
                       virtual_pipeline=parallel.virtual_pipeline, data_parallel=dp,
                       micro_batch_size=parallel.micro_batch_size,
                       num_microbatches=parallel.global_batch_size // (parallel.micro_batch_size * dp),
                       distributed_optimizer=bool(parallel.use_distributed_optimizer), dtype=dtype)
    m = mm.stage_memory(model_cfg, layout, pp_rank, dp_rank)
    out = {"weights": m.weights, "gradients": m.gradients, "optimizer": m.optimizer}
    if layout.pipeline_parallel == 1:
        # one micro-batch's forward: the layers, the logits and the token ids
        out["activations"] = (mm.layer_activation_bytes(model_cfg, layout) * model_cfg.num_layers
                              + mm.logits_bytes(model_cfg, layout) + mm.embedding_bytes(model_cfg, layout))
    return out


def rows(world: int):
    """(size, dtype, dist_opt, tp, pp, vpp) measured at this world size."""
    for size in SIZES:
        for dtype in ("fp32", "bf16"):
            for dist_opt in (False, True):
                yield size, dtype, dist_opt, 1, 1, None
    if world == 2:
        for dist_opt in (False, True):
            yield "h64-L4-swiglu", "bf16", dist_opt, 1, 2, None
            yield "h64-L4-swiglu", "bf16", dist_opt, 1, 2, 2
            yield "h128-L4-gqa-gelu", "fp32", dist_opt, 2, 1, None


def main() -> None:
    os.environ["LRPATH_DEVICE"] = "cpu"
    from megatron.core import parallel_state

    from lrpath_megatron import distributed, ranks
    from lrpath_megatron.config import ModelConfig, ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = []
    for size, dtype, dist_opt, tp, pp, vpp in rows(world):
        model_cfg = ModelConfig(**SIZES[size])
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp, micro_batch_size=2,
                                  global_batch_size=4 * world, use_distributed_optimizer=dist_opt)
        distributed.initialize(parallel, 1234)
        try:
            got = measure(model_cfg, parallel, dtype)
            dp = parallel_state.get_data_parallel_world_size()
            want = predict(model_cfg, parallel, dtype, dp, parallel_state.get_pipeline_model_parallel_rank(),
                           parallel_state.get_data_parallel_rank())
            mine = {"rank": ranks.rank(), "measured": got, "predicted": want}
            gathered = ranks.gather(mine)
        finally:
            parallel_state.destroy_model_parallel()
        results.append({"size": size, "dtype": dtype, "distributed_optimizer": dist_opt, "tp": tp, "pp": pp,
                        "vpp": vpp, "dp": dp, "ranks": gathered})
    is_rank0 = ranks.rank() == 0
    distributed.shutdown()
    if not is_rank0:
        return
    name = f"memory_model_world{world}"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| model | dtype | dist. opt | TP | PP | VPP | DP | rank | weights | gradients | optimizer | "
             "activations (1 micro-batch) |", "|" + "---|" * 12]
    for r in results:
        for rk in r["ranks"]:
            cells = []
            for key in ("weights", "gradients", "optimizer", "activations"):
                got, want = rk["measured"].get(key), rk["predicted"].get(key)
                cells.append("-" if got is None else f"{got:,} / {want:,.0f}" + ("" if got == want else
                                                                                f" ({(want - got) / got:+.2%})"))
            lines.append(f"| {r['size']} | {r['dtype']} | {r['distributed_optimizer']} | {r['tp']} | {r['pp']} | "
                         f"{r['vpp'] or '-'} | {r['dp']} | {rk['rank']} | " + " | ".join(cells) + " |")
    (RESULTS / f"{name}.md").write_text(
        f"Measured / predicted bytes per rank (world size {world}, CPU, megatron-core 0.16.1 local spec). "
        "Written by benchmarks/memory_model.py.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
