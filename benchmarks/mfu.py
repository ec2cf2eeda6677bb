"""Tokens/s and MFU of the lrpath trainer (megatron-core GPTModel, DDP, Megatron optimizer) side by side
with a plain PyTorch GPT of the same shape, in one run on one GPU.

The reference does the same work: RoPE, RMSNorm, GELU MLP, untied output layer, SDPA attention, fused
AdamW with fp32 master weights, bf16 autocast. MFU = tokens/s x Megatron-LM's FLOPs per token / peak.
Data: random tokens (never zeros) written as a Megatron .bin/.idx, so the trainer runs its real loader.

    python benchmarks/mfu.py                 # the 1.34B shape, bf16, on the GPU
    python benchmarks/mfu.py --tiny --steps 6  # a smoke run of the script on CPU
Writes benchmarks/results/mfu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPE_1B = {"num_layers": 24, "hidden_size": 2048, "num_attention_heads": 16, "ffn_hidden_size": 8192,
            "seq_length": 2048, "vocab_size": 32000}
SHAPE_TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
              "seq_length": 64, "vocab_size": 512}


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


def time_plain(m: dict, micro_batch: int, steps: int, device: str) -> list[float]:
    torch.manual_seed(0)
    model = PlainGPT(m).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    times = []
    for _ in range(steps):
        tokens = torch.randint(0, m["vocab_size"], (micro_batch, m["seq_length"] + 1), device=device)
        start = _now(device)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(_now(device) - start)
    return times


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_trainer(m: dict, micro_batch: int, steps: int, device: str, work: Path) -> list[float]:
    """The real `lrpath train` path in this process (world size 1), on a random-token corpus."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from lrpath_megatron.commands.train import resolve
    from lrpath_megatron.trainer import Trainer
    from lrpath_megatron import distributed

    prefix = work / "random"
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16 if m["vocab_size"] < 65500 else np.int32)
    for _ in range(max(64, 4 * steps * micro_batch)):
        doc = rng.integers(1, m["vocab_size"], size=m["seq_length"] * 2)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    cfg = {
        "model": {**m, "activation": "gelu", "normalization": "RMSNorm", "position_embedding": "rope"},
        "parallel": {"micro_batch_size": micro_batch, "global_batch_size": micro_batch},
        "precision": {"dtype": "bf16" if device == "cuda" else "fp32"},
        "schedule": {"style": "constant", "warmup_steps": 0, "train_steps": steps},
        "data": {"corpora": [{"name": "random", "prefix": str(prefix)}], "valid_fraction": 0.05},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
    }
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    train_cfg, run = resolve(str(work / "c.yaml"), None, work / "run", [])
    trainer = Trainer(train_cfg, run, stop_at_step=steps)
    try:
        trainer.setup()
        trainer.train()
    finally:
        distributed.shutdown()
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = micro_batch * m["seq_length"]
    return [tokens / r["tokens_per_s"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (smoke test of the script on CPU)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mfu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from lrpath_megatron.config import ModelConfig

    m = SHAPE_TINY if args.tiny else SHAPE_1B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flops = ModelConfig(**m).flops_per_token()
    tokens = args.micro_batch * m["seq_length"]
    with tempfile.TemporaryDirectory() as work:
        trainer = time_trainer(m, args.micro_batch, args.steps, device, Path(work))
    plain = time_plain(m, args.micro_batch, args.steps, device)
    rows = {}
    for name, times in (("lrpath_megatron", trainer), ("plain_pytorch", plain)):
        step = statistics.median(times[args.warmup:])
        rows[name] = {"step_s": step, "tokens_per_s": tokens / step,
                      "mfu": tokens / step * flops / (args.peak_tflops * 1e12)}
    ratio = rows["lrpath_megatron"]["tokens_per_s"] / rows["plain_pytorch"]["tokens_per_s"]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "shape": m,
              "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
              "flops_per_token": flops, "peak_tflops": args.peak_tflops, **rows, "ratio_trainer_vs_plain": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<16} {'tokens/s':>10} {'MFU':>7}")
    for name, row in rows.items():
        print(f"{name:<16} {row['tokens_per_s']:>10.0f} {row['mfu']:>7.1%}")
    print(f"ratio lrpath/plain: {ratio:.2f}   ({result['device']}; wrote {args.out})")
    assert math.isfinite(ratio)


if __name__ == "__main__":
    main()
