"""Time to produce one step's micro-batches: MixingSampler + TrainData vs megatron-core's static BlendedDataset.

Both read the same megatron-core train ``GPTDataset``s (synthetic corpora written here with
``IndexedDatasetBuilder``) and collate the same way; the difference is the blend: ours decides the corpus
and sample per global batch at run time (LR-triggered stages, resumable), megatron-core's is a
precomputed static index. Budget: 1% of the measured 1.34B-model GPU step (254 ms for 8192 tokens per
step on one H100, /work/shared/notes/gpu.md), i.e. 2.54 ms per step.

    python benchmarks/loader.py [--out benchmarks/results/loader.json] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

GPU_STEP_MS = 254.0  # 1.34B GPTModel, 8192 tokens per step, H100 (gpu.md)
GPU_STEP_TOKENS = 8192
BUDGET_MS = GPU_STEP_MS / 100
SEQ = 2048
VOCAB = 32000
CORPUS_TOKENS = {"web": 10_000_000, "code": 6_000_000, "new": 4_000_000}
WEIGHTS = {"web": 0.5, "code": 0.3, "new": 0.2}
# (name, global batch, micro batch, dp size, steps): the GPU step's shape, and a large DP job's rank 0.
CASES = [("gbs4_mbs4_dp1", 4, 4, 1, 300), ("gbs256_mbs4_dp8_rank0", 256, 4, 8, 30)]


def write_corpora(root: Path) -> dict[str, str]:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefixes = {}
    for name, total in tqdm(CORPUS_TOKENS.items(), desc="writing corpora"):
        prefix = str(root / name)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        written = 0
        while written < total:
            length = int(rng.integers(200, 4000))
            builder.add_document(rng.integers(0, VOCAB, length, dtype=np.uint16), [length])
            written += length
        builder.finalize(prefix + ".idx")
        prefixes[name] = prefix
    return prefixes


def time_steps(fetch, steps: int, warmup: int = 3) -> dict:
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        fetch(step)
        if step >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "steps_timed": len(times)}


def bench_case(cfg, name: str, gbs: int, mbs: int, dp: int, steps: int) -> dict:
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from lrpath_megatron.data import TrainData, collate
    from lrpath_megatron.mixing import MixingSampler

    weights_at_step = lambda step: ("static", WEIGHTS)
    t0 = time.perf_counter()
    ours = TrainData(cfg, SEQ, gbs, mbs, 0, dp, weights_at_step, seed=cfg.seed, vocab_size=VOCAB)
    build_ours = time.perf_counter() - t0
    result = {"global_batch_size": gbs, "micro_batch_size": mbs, "dp_size": dp, "dp_rank": 0,
              "samples_per_rank_per_step": gbs // dp, "build_s": build_ours}
    result["mixing_trainData"] = time_steps(ours.microbatches, steps)

    sampler = MixingSampler({n: len(d) for n, d in ours.datasets.items()}, weights_at_step, gbs, cfg.seed)
    result["sampler_only"] = time_steps(sampler.global_batch, steps)

    datasets = list(ours.datasets.values())
    t0 = time.perf_counter()
    blended = BlendedDataset(datasets, [WEIGHTS[n] for n in ours.datasets], steps * gbs, datasets[0].config)
    result["blended_build_s"] = time.perf_counter() - t0
    per_rank = gbs // dp

    def fetch_blended(step: int):
        start = step * gbs  # rank 0's contiguous share, like TrainData
        samples = [blended[i] for i in range(start, start + per_rank)]
        return [collate(samples[i:i + mbs]) for i in range(0, per_rank, mbs)]

    result["megatron_blended"] = time_steps(fetch_blended, steps)
    ours_ms = result["mixing_trainData"]["median_ms"]
    result["overhead_vs_blended_ms"] = ours_ms - result["megatron_blended"]["median_ms"]
    # A rank's GPU step grows with the tokens it trains on; scale the measured step to this rank's share.
    step_ms = GPU_STEP_MS * per_rank * SEQ / GPU_STEP_TOKENS
    result["gpu_step_ms_for_these_tokens"] = step_ms
    result["fraction_of_gpu_step"] = ours_ms / step_ms
    result["within_budget"] = ours_ms < step_ms / 100
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/loader.json")
    parser.add_argument("--data-dir", default=None, help="keep the synthetic corpora here (default: temp dir)")
    args = parser.parse_args()
    logging.getLogger("lrpath_megatron.mixing").setLevel(logging.ERROR)  # epoch wraps are expected here

    from lrpath_megatron.config import CorpusConfig, DataConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        prefixes = write_corpora(root)
        cfg = DataConfig(corpora=[CorpusConfig(name=n, prefix=p) for n, p in prefixes.items()],
                         valid_fraction=0.02, seed=1234)
        results = {name: bench_case(cfg, name, *rest) for name, *rest in tqdm(CASES, desc="cases")}

    report = {
        "what": "time per training step to produce this rank's micro-batches (CPU, median after warm-up)",
        "seq_length": SEQ, "corpus_tokens": CORPUS_TOKENS, "weights": WEIGHTS,
        "gpu_step_ms": GPU_STEP_MS, "gpu_step_tokens": GPU_STEP_TOKENS, "budget_ms": BUDGET_MS,
        "budget": "1% of the GPU step, scaled to the tokens one rank trains per step",
        "gpu_step_source": "1.34B GPTModel, 8192 tokens/step, one H100 (/work/shared/notes/gpu.md)",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "cases": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'case':<24}{'ours ms':>10}{'blended ms':>12}{'sampler ms':>12}{'% of step':>11}"
          f"  (budget 1%: {BUDGET_MS:.2f} ms per {GPU_STEP_TOKENS} tokens)")
    for name, r in results.items():
        print(f"{name:<24}{r['mixing_trainData']['median_ms']:>10.3f}{r['megatron_blended']['median_ms']:>12.3f}"
              f"{r['sampler_only']['median_ms']:>12.3f}{100 * r['fraction_of_gpu_step']:>10.2f}%")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
