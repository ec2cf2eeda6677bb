"""Log-likelihoods of a release: lm-evaluation-harness through lrpath's own forward vs the harness's HFLM on
the release's Hugging Face export, on every (context, choice) of the shipped tasks and on whole texts
(perplexity), fp32.

Trains a small Llama (RMSNorm, SwiGLU, RoPE) on the shipped corpora with the demo tokenizer, exports it with
``lrpath hf export``, scores the same requests both ways and writes the largest absolute difference
(``max_abs_loglik_diff``) to benchmarks/results/downstream_parity.json.

    .venv/bin/python benchmarks/downstream_parity.py [--steps 60] [--docs 100] [--texts 10] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "downstream_parity.json"
MODEL = {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 128,
         "normalization": "RMSNorm", "activation": "swiglu"}


def _lrpath(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lrpath_megatron.cli", *args], check=True,
                   env=dict(os.environ, PYTHONWARNINGS="ignore"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps of the model (default 60)")
    ap.add_argument("--docs", type=int, default=100, help="documents per shipped task (default 100: all)")
    ap.add_argument("--texts", type=int, default=10, help="whole texts per corpus (docs, code_a) scored by "
                                                          "loglikelihood_rolling (default 10)")
    ap.add_argument("--workdir", help="where the data, run and export go (default: a temporary directory)")
    args = ap.parse_args()

    from lrpath_megatron.config import load_train_config
    from lrpath_megatron.data_tools.demo import iter_corpus, prepare_demo_data
    from lrpath_megatron.downstream import parity

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data = prepare_demo_data(work / "data")
        config = work / "model.yaml"
        config.write_text(yaml.safe_dump({
            "model": {**MODEL, "vocab_size": data["vocab_size"]},
            "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
            "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
            "schedule": {"style": "cosine", "warmup_steps": 5, "train_steps": args.steps},
            "data": {"corpora": [{"name": n, "prefix": data["prefixes"][n]} for n in ("docs", "code_a", "code_b")]},
            "checkpoint": {"save_interval": 0},
            "logging": {"log_interval": 20, "eval_interval": 0, "tensorboard": False},
        }))
        _lrpath("train", str(config), "--run-dir", str(work / "run"))
        ckpt = work / "run" / "checkpoints" / f"iter_{args.steps:07d}"
        _lrpath("hf", "export", str(ckpt), "--out", str(work / "hf"), "--overwrite", "--no-progress",
                "--tokenizer-model", data["tokenizer_model"])
        pairs = parity.task_pairs(args.docs)
        # perplexity requests too: whole texts of several windows each (loglikelihood_rolling)
        texts = [text[:4000] for corpus in ("docs", "code_a") for _, text in zip(range(args.texts), iter_corpus(corpus))]
        start = time.perf_counter()
        ours = parity.lrpath_loglikelihoods(load_train_config(str(config)), ckpt, Path(data["tokenizer_model"]), pairs,
                                            texts=texts)
        lrpath_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = parity.hf_loglikelihoods(work / "hf", pairs, texts=texts)
        hf_s = time.perf_counter() - start

    import lm_eval
    import torch
    import transformers

    result = {
        "what": "log-likelihoods of every (context, choice) of the shipped tasks and of whole texts (rolling "
                "windows): lrpath's harness model (own forward) vs lm-evaluation-harness HFLM on the `lrpath hf "
                "export` of the same checkpoint, fp32, CPU",
        "model": MODEL, "train_steps": args.steps, "docs_per_task": args.docs, "rolling_texts": len(texts),
        **parity.compare(ours, theirs),
        "mean_loglik": sum(x[0] for x in ours) / len(ours),
        "seconds": {"lrpath": round(lrpath_s, 2), "hflm": round(hf_s, 2)},
        "versions": {"lm_eval": lm_eval.__version__, "megatron_core": version("megatron-core"), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["max_abs_loglik_diff"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
