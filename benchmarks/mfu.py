"""Tokens/s and MFU of the lrpath trainer (megatron-core GPTModel, DDP, Megatron optimizer) in each
configuration of its performance levers, side by side with a plain PyTorch GPT of the same shape (eager and
torch.compile'd), in one run on one GPU; plus one profiled step per trainer configuration, by kernel category.

The reference does the same work: RoPE, RMSNorm, GELU MLP, untied output layer, SDPA attention, fused
AdamW with fp32 master weights, bf16 autocast. MFU = tokens/s x Megatron-LM's FLOPs per token / peak.
Data: random tokens (never zeros) written as a Megatron .bin/.idx, so the trainer runs its real loader.

    python benchmarks/mfu.py                       # the 1.34B shape, bf16, on the GPU (about 6 minutes)
    python benchmarks/mfu.py --tiny --steps 6      # a smoke run of the script on CPU
    python benchmarks/mfu.py --loss-agreement      # baseline vs the optimized config, 200 steps, real text
Writes benchmarks/results/mfu.json (or --out; --loss-agreement: mfu_loss_agreement.json).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
SHAPE_1B = {"num_layers": 24, "hidden_size": 2048, "num_attention_heads": 16, "ffn_hidden_size": 8192,
            "seq_length": 2048, "vocab_size": 32000}
SHAPE_TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
              "seq_length": 64, "vocab_size": 512}
# Trainer configurations, in run order. foreach_grad_norm replaces megatron-core functions for the rest
# of the process, so the configurations without it run first.
OPTIMIZER = {"fused_adam": True, "foreach_grad_norm": True}
FUSIONS = {"bias_dropout_fusion": True, "cross_entropy_fusion": True}
CONFIGS = {
    "baseline": {},
    "compile": {"compile_layers": True},
    "fusions": FUSIONS,
    "optimizer": OPTIMIZER,
    "all": {"compile_layers": True, **FUSIONS, **OPTIMIZER},
    # Memory for compute: peak memory and tokens/s against "all".
    "all+recompute": {"compile_layers": True, **FUSIONS, **OPTIMIZER, "recompute": "selective"},
}
# Max |loss difference| per step accepted as the same training (--loss-agreement). bf16: the levers change
# kernel order and fusion, so rounding differs at ~2^-8 relative per op and grows along a training run;
# 0.05 nats is ~1% of the loss early and well under the step-to-step noise of a 8k-token batch.
TOLERANCE = {"bf16": 0.05, "fp32": 1e-3}


def levers(name: str, device: str) -> dict:
    """The configuration's levers as run here: CPU runs are fp32, where cross_entropy_fusion is refused."""
    return {k: v for k, v in CONFIGS[name].items() if device == "cuda" or k != "cross_entropy_fusion"}


class Block(nn.Module):
    def __init__(self, h: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)
        self.fc1, self.fc2 = nn.Linear(h, ffn, bias=False), nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        q, k = (rope(t, cos, sin).transpose(1, 2) for t in (q, k))
        a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class PlainGPT(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        h, heads = m["hidden_size"], m["num_attention_heads"]
        self.embed = nn.Embedding(m["vocab_size"], h)
        self.blocks = nn.ModuleList(Block(h, heads, m["ffn_hidden_size"]) for _ in range(m["num_layers"]))
        self.norm, self.out = nn.RMSNorm(h), nn.Linear(h, m["vocab_size"], bias=False)
        d = h // heads
        freqs = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        angles = torch.outer(torch.arange(m["seq_length"]).float(), freqs)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    def forward(self, tokens, labels):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.out(self.norm(x))
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


def time_plain(m: dict, micro_batch: int, steps: int, device: str, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = PlainGPT(m).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    times = []
    _reset_memory(device)
    for _ in tqdm(range(steps), desc=f"plain {'compiled' if compiled else 'eager'}", leave=False):
        tokens = torch.randint(0, m["vocab_size"], (micro_batch, m["seq_length"] + 1), device=device)
        start = _now(device)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = forward(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(_now(device) - start)
    return {"times": times, "peak_memory_gib": _peak_memory(device)}


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _reset_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def write_random_corpus(prefix: Path, m: dict, documents: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16 if m["vocab_size"] < 65500 else np.int32)
    for _ in range(documents):
        doc = rng.integers(1, m["vocab_size"], size=m["seq_length"] * 2)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


def make_trainer(m: dict, micro_batch: int, steps: int, device: str, work: Path, perf: dict,
                 corpora: dict[str, str], schedule: dict | None = None):
    """A set-up lrpath Trainer (world size 1) with performance levers ``perf``; no checkpoints written."""
    from lrpath_megatron.load_run import load_run
    from lrpath_megatron.trainer import Trainer

    cfg = {
        "model": {**m, "activation": "gelu", "normalization": "RMSNorm", "position_embedding": "rope"},
        "parallel": {"micro_batch_size": micro_batch, "global_batch_size": micro_batch},
        "precision": {"dtype": "bf16" if device == "cuda" else "fp32"},
        "optimizer": {"lr": 3e-4, "min_lr": 3e-5},
        "schedule": {"style": "constant", "warmup_steps": 0, **(schedule or {}), "train_steps": steps},
        "data": {"corpora": [{"name": n, "prefix": p} for n, p in corpora.items()], "valid_fraction": 0.05},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "performance": perf,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    train_cfg, run = load_run(str(work / "c.yaml"), None, work / "run", [])
    trainer = Trainer(train_cfg, run, stop_at_step=steps)
    trainer.setup()
    return trainer


def train_steps(trainer, steps: int, device: str, desc: str) -> tuple[list[float], list[float]]:
    """(wall seconds, loss) of ``steps`` optimizer steps, timed device-synchronised around each."""
    times, losses = [], []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        start = _now(device)
        record = trainer._train_step()
        times.append(_now(device) - start)
        losses.append(record["loss"])
        trainer.step += 1
    return times, losses


def time_trainer(m: dict, micro_batch: int, steps: int, device: str, work: Path, name: str, perf: dict,
                 corpus: str) -> dict:
    from lrpath_megatron import distributed

    _reset_memory(device)
    trainer = make_trainer(m, micro_batch, steps + 1, device, work / name, perf, {"random": corpus})
    try:
        times, _ = train_steps(trainer, steps, device, f"trainer {name}")
        peak = _peak_memory(device)
        profile = profile_step(trainer, device)
    finally:
        distributed.shutdown()
        release(trainer)
    return {"times": times, "peak_memory_gib": peak, "profile": profile}


def release(trainer) -> None:
    """Free a finished trainer's GPU memory before the next one: five 1.34B trainers do not fit at once,
    and compiled graphs keep references to the modules they were traced from."""
    import gc

    trainer.model = trainer.optimizer = None
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- profile
CATEGORIES = (  # first match wins; lower-case substrings of kernel (GPU) or operator (CPU) names
    ("communication", ("nccl", "c10d::", "gloo", "allreduce", "all_reduce", "reduce_scatter", "all_gather")),
    ("optimizer", ("adam", "multi_tensor", "_foreach")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "matmul")),
)


def category(name: str) -> str:
    lower = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in lower for k in keys)), "elementwise/other")


def profile_step(trainer, device: str) -> dict:
    """One more step under torch.profiler: milliseconds per kernel category (self time of GPU kernels, or
    of CPU operators without a GPU) and, on the GPU, host gaps = wall time - time with a kernel running."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        (wall,), _ = train_steps(trainer, 1, device, "profiled step")
    per_category: dict[str, float] = defaultdict(float)
    busy = []
    for event in prof.events():
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            per_category[category(event.name)] += event.time_range.elapsed_us() / 1e3
            busy.append((event.time_range.start, event.time_range.end))
        elif event.name.startswith("aten::") or "c10d" in event.name or "_foreach" in event.name:
            per_category[category(event.name)] += event.self_cpu_time_total / 1e3
    result = {"step_ms": wall * 1e3, "ms": {k: round(v, 3) for k, v in sorted(per_category.items())}}
    if device == "cuda":
        result["ms"]["host_gaps"] = round(wall * 1e3 - _union_us(busy) / 1e3, 3)
    return result


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


# ------------------------------------------------------------------------------------------- runs
def throughput(args, m: dict, device: str) -> dict:
    from lrpath_megatron.config import ModelConfig

    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    flops = ModelConfig(**m).flops_per_token()
    tokens = args.micro_batch * m["seq_length"]
    runs = {"plain_eager": time_plain(m, args.micro_batch, args.steps, device, compiled=False),
            "plain_compiled": time_plain(m, args.micro_batch, args.steps, device, compiled=True)}
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "random"
        write_random_corpus(corpus, m, documents=max(64, 4 * (args.steps + 2) * args.micro_batch))
        for name in sorted(names, key=list(CONFIGS).index):
            runs[f"lrpath_{name}"] = time_trainer(m, args.micro_batch, args.steps, device, Path(work), name,
                                                  levers(name, device), str(corpus))
    rows = {}
    for name, run in runs.items():
        step = statistics.median(run["times"][args.warmup:])
        rows[name] = {"step_ms": step * 1e3, "tokens_per_s": tokens / step,
                      "mfu": tokens / step * flops / (args.peak_tflops * 1e12),
                      "peak_memory_gib": run["peak_memory_gib"]}
        if "profile" in run:
            rows[name]["profile"] = run["profile"]
            rows[name]["levers"] = levers(name.removeprefix("lrpath_"), device)
    peer = rows["plain_compiled"]["tokens_per_s"]
    for row in rows.values():
        row["ratio_vs_compiled_peer"] = row["tokens_per_s"] / peer
    best = max((n for n in rows if n.startswith("lrpath_")), key=lambda n: rows[n]["tokens_per_s"])
    return {"rows": rows, "best_trainer_config": best.removeprefix("lrpath_"),
            "ratio_vs_compiled_peer": rows[best]["ratio_vs_compiled_peer"],
            "flops_per_token": flops, "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup}


def loss_agreement(args, m: dict, device: str) -> dict:
    """Baseline vs ``--agreement-config`` for ``--agreement-steps`` steps on the demo corpora (real text,
    same seed, same data order): max |loss difference| against the stated tolerance."""
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    from lrpath_megatron import distributed

    curves = {}
    with tempfile.TemporaryDirectory() as work:
        demo = prepare_demo_data(Path(work) / "demo")
        shape = {**m, "vocab_size": demo["vocab_size"]}
        corpora = {n: demo["prefixes"][n] for n in ("docs", "code_a")}
        for name in ("baseline", args.agreement_config):
            trainer = make_trainer(shape, args.micro_batch, args.agreement_steps, device, Path(work) / name,
                                   levers(name, device), corpora,
                                   {"style": "cosine", "warmup_steps": max(1, args.agreement_steps // 10)})
            try:
                _, curves[name] = train_steps(trainer, args.agreement_steps, device, f"agreement {name}")
            finally:
                distributed.shutdown()
                release(trainer)
    base, opt = curves["baseline"], curves[args.agreement_config]
    diffs = [abs(a - b) for a, b in zip(base, opt)]
    dtype = "bf16" if device == "cuda" else "fp32"
    return {"config": args.agreement_config, "levers": levers(args.agreement_config, device), "steps": args.agreement_steps,
            "dtype": dtype, "tolerance": TOLERANCE[dtype], "max_abs_loss_diff": max(diffs),
            "max_abs_loss_diff_step": diffs.index(max(diffs)), "within_tolerance": max(diffs) <= TOLERANCE[dtype],
            "mean_abs_loss_diff_last_50": statistics.mean(diffs[-50:]), "loss_baseline": base, "loss_optimized": opt}


def environment(device: str) -> dict:
    from lrpath_megatron.mcore_api import versions

    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "megatron_core": versions()["megatron_core"], "cuda": torch.version.cuda}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (smoke test of the script on CPU)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the medians (compilation)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"trainer configurations: {', '.join(CONFIGS)}")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    parser.add_argument("--loss-agreement", action="store_true",
                        help="instead of throughput: baseline vs --agreement-config on real text")
    parser.add_argument("--agreement-config", default="all", choices=[c for c in CONFIGS if c != "baseline"])
    parser.add_argument("--agreement-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    m = SHAPE_TINY if args.tiny else SHAPE_1B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = REPO / "benchmarks" / "results"
    if args.loss_agreement:
        result = {**environment(device), "shape": m, "micro_batch": args.micro_batch, **loss_agreement(args, m, device)}
        out = args.out or results / "mfu_loss_agreement.json"
        verdict = "within" if result["within_tolerance"] else "OUTSIDE"
        summary = (f"loss agreement baseline vs {result['config']} over {result['steps']} steps ({result['dtype']}): "
                   f"max |diff| {result['max_abs_loss_diff']:.4f} at step {result['max_abs_loss_diff_step']}, "
                   f"{verdict} tolerance {result['tolerance']}")
    else:
        result = {**environment(device), "shape": m, "peak_tflops": args.peak_tflops, **throughput(args, m, device)}
        out = args.out or results / "mfu.json"
        lines = [f"{'run':<22} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'vs compiled':>12}"]
        for name, row in result["rows"].items():
            mem = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
            lines.append(f"{name:<22} {row['tokens_per_s']:>10.0f} {row['mfu']:>7.1%} {mem:>9} "
                         f"{row['ratio_vs_compiled_peer']:>11.2f}x")
        for name, row in result["rows"].items():
            if "profile" in row:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in row["profile"]["ms"].items())
                lines.append(f"profile {name}: step {row['profile']['step_ms']:.1f} ms: {parts}")
        summary = "\n".join(lines) + (f"\nbest trainer config {result['best_trainer_config']}: "
                                      f"{result['ratio_vs_compiled_peer']:.2f}x the compiled peer ({result['device']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
