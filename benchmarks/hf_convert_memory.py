"""Peak memory of ``lrpath hf import`` and ``lrpath hf export`` on a Llama of a few hundred MB.

Saves a random Llama (about 125M parameters, fp32, untied embeddings) with transformers in safetensors
shards, imports it, exports the import, and records each conversion's peak RSS above the RSS just before
it (imports of the libraries excluded: a fresh process per conversion, the libraries loaded before the
baseline), against the largest shard plus the largest unit read at once (one layer, or the embedding).
Writes benchmarks/results/hf_convert_memory.json.

    .venv/bin/python benchmarks/hf_convert_memory.py [--hidden 768 --layers 12 --vocab 32000] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "hf_convert_memory.json"
SHARD = "100MB"


def _measure(kind: str, src: str, out: str) -> dict:
    """Runs in a fresh interpreter: one conversion, the RSS before it and the peak."""
    import psutil
    import transformers  # noqa: F401  (loaded before the baseline, as the libraries below)
    from megatron.core.dist_checkpointing import core  # noqa: F401

    from lrpath_megatron.checkpoint import tensors  # noqa: F401
    from lrpath_megatron.hf.exporter import export_hf
    from lrpath_megatron.hf.importer import import_hf

    before = psutil.Process().memory_info().rss
    # Reset the peak to now: getrusage's ru_maxrss would keep the parent's peak across fork and exec.
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if kind == "import":
        import_hf(Path(src), Path(out), progress=False)
    else:
        export_hf(Path(src), Path(out), max_shard_bytes=10**8, progress=False)
    seconds = time.perf_counter() - start
    return {"rss_before_bytes": before, "peak_rss_bytes": _peak_rss(), "seconds": round(seconds, 2)}


def _peak_rss() -> int:
    """VmHWM: this process's peak resident set since the last reset (Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _save_model(directory: Path, hidden: int, layers: int, vocab: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64 // 3, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size=SHARD)
    state = model.state_dict()
    layer = sum(t.numel() * t.element_size() for n, t in state.items() if n.startswith("model.layers.0."))
    largest_tensor = max(t.numel() * t.element_size() for t in state.values())
    return {"parameters": sum(t.numel() for t in state.values()), "layer_bytes": layer,
            "largest_tensor_bytes": largest_tensor, "config": config.to_diff_dict()}


def _largest_file(directory: Path, pattern: str) -> int:
    return max(p.stat().st_size for p in directory.glob(pattern))


def _run(kind: str, src: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(src), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(*args.child)))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hf_convert_memory_"))
    try:
        model = _save_model(work / "hf", args.hidden, args.layers, args.vocab)
        unit = max(model["layer_bytes"], model["largest_tensor_bytes"])
        runs = {}
        for kind, src, out, shards in (("import", work / "hf", work / "ckpt", work / "hf"),
                                       ("export", work / "ckpt", work / "exported", work / "exported")):
            run = _run(kind, src, out)
            shard = _largest_file(shards, "*.safetensors")
            delta = run["peak_rss_bytes"] - run["rss_before_bytes"]
            run.update(largest_shard_bytes=shard, largest_unit_bytes=unit, peak_minus_before_bytes=delta,
                       peak_minus_before_over_shard_plus_unit=round(delta / (shard + unit), 3))
            runs[kind] = run
            print(kind, json.dumps(run), flush=True)
        result = {
            "what": "peak RSS of `lrpath hf import` and `lrpath hf export` (fresh process each), against the "
                    "largest safetensors shard plus the largest unit read at once (one layer, or the embedding)",
            "model": {k: model[k] for k in ("parameters", "layer_bytes", "largest_tensor_bytes")} | {
                "hidden_size": args.hidden, "num_layers": args.layers, "vocab_size": args.vocab, "dtype": "fp32",
                "checkpoint_bytes": sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors")),
                "shard_size": SHARD},
            "runs": runs,
            "bound": "peak_minus_before_over_shard_plus_unit < 1.5",
            "passed": all(r["peak_minus_before_over_shard_plus_unit"] < 1.5 for r in runs.values()),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "date": time.strftime("%Y-%m-%d"),
        }
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'conversion':<10} {'peak - before':>14} {'shard + unit':>13} {'ratio':>6} {'seconds':>8}")
        for kind, run in runs.items():
            print(f"{kind:<10} {run['peak_minus_before_bytes'] / 2**20:>11.0f} MiB "
                  f"{(run['largest_shard_bytes'] + unit) / 2**20:>9.0f} MiB "
                  f"{run['peak_minus_before_over_shard_plus_unit']:>6.2f} {run['seconds']:>8.1f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
