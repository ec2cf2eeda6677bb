"""Peak memory of ``lrpath merge`` on 8 megatron-core dist checkpoints of one GPT model.

Saves 8 checkpoints of a real GPTModel (perturbed between saves), then merges them in a fresh process per
setting and records the process's peak RSS above its RSS just before the merge (imports excluded), as a
multiple of one checkpoint's size on disk. Writes benchmarks/results/merge_memory.json.

    .venv/bin/python benchmarks/merge_memory.py [--hidden 512 --layers 8 --vocab 32768] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NUM_CHECKPOINTS = 8
RESULTS = Path(__file__).resolve().parent / "results" / "merge_memory.json"


def _make_checkpoints(rank: int, root: str, hidden: int, layers: int, vocab: int, port: int) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LRPATH_DEVICE="cpu")
    from megatron.core import dist_checkpointing

    from lrpath_megatron import distributed
    from lrpath_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
    from lrpath_megatron.model import build_model

    model_cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=8, vocab_size=vocab,
                            seq_length=256, activation="swiglu")
    parallel = ParallelConfig(micro_batch_size=1, global_batch_size=1)
    distributed.initialize(parallel, seed=1)
    model = build_model(model_cfg, parallel, PrecisionConfig())
    for j in range(NUM_CHECKPOINTS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        target = Path(root) / f"iter_{j:07d}" / "model"
        target.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(target))
        print(f"saved {target}", flush=True)
    distributed.shutdown()


def _measure(inputs: list[str], out: str, group_mib: int) -> dict:
    """Runs in a fresh interpreter: merge once, report RSS before and the peak."""
    import psutil

    from lrpath_megatron.merge import merge_checkpoints
    from lrpath_megatron.merge_weights import merge_weights

    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    merge_checkpoints(inputs, merge_weights("1-sqrt", len(inputs)), out, group_bytes=group_mib * 2**20,
                      progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"rss_before_bytes": before, "peak_rss_bytes": peak, "seconds": round(seconds, 2)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--group-mib", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--child", nargs=3, metavar=("INPUTS_JSON", "OUT", "GROUP_MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(json.loads(args.child[0]), args.child[1], int(args.child[2]))))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge_memory_"))
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_make_checkpoints, args=(str(work / "ckpts"), args.hidden, args.layers,
                                                             args.vocab, port), nprocs=1)
        inputs = [str(work / "ckpts" / f"iter_{j:07d}") for j in range(NUM_CHECKPOINTS)]
        ckpt_bytes = _dir_bytes(Path(inputs[-1]) / "model")
        runs = []
        for group in args.group_mib:
            out = work / f"merged_{group}"
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(inputs), str(out), str(group)],
                                  capture_output=True, text=True, check=True)
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            delta = run["peak_rss_bytes"] - run["rss_before_bytes"]
            run.update(group_mib=group, peak_minus_before_bytes=delta,
                       peak_minus_before_over_checkpoint=round(delta / ckpt_bytes, 3),
                       output_bytes=_dir_bytes(out / "model"))
            runs.append(run)
            print(json.dumps(run))
            shutil.rmtree(out)
        result = {
            "what": f"peak RSS of merging {NUM_CHECKPOINTS} dist checkpoints (1-sqrt weights), fresh process per run",
            "model": {"hidden_size": args.hidden, "num_layers": args.layers, "vocab_size": args.vocab,
                      "activation": "swiglu", "dtype": "fp32"},
            "num_checkpoints": NUM_CHECKPOINTS,
            "checkpoint_bytes": ckpt_bytes,
            "runs": runs,
            "bound": "peak_minus_before_over_checkpoint < 3",
            "passed": all(r["peak_minus_before_over_checkpoint"] < 3 for r in runs),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "date": time.strftime("%Y-%m-%d"),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")
        if not result["passed"]:
            sys.exit(1)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
