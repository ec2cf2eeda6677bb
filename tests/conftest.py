"""Shared fixtures: the shipped corpora tokenized once per session, and running `lrpath` as real processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO / "benchmarks"))  # tests share a few checks with the benchmark scripts


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """Tokenizer + .bin/.idx of the shipped corpora (docs, code_a, code_b, c_headers)."""
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.getbasetemp() / "demo_data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lrpath_command(args: list[str], nproc: int = 1) -> list[str]:
    """`lrpath ARGS` in one process, or under torchrun with `nproc` ranks (gloo on CPU)."""
    if nproc == 1:
        return [sys.executable, "-m", "lrpath_megatron.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "lrpath_megatron.cli", *args]


def run_lrpath(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(lrpath_command(args, nproc), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"lrpath {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny_config(demo_data: dict, path: Path, corpora=("docs", "code_a"), **sections) -> Path:
    """A complete tiny stand-alone config on the demo corpora, written to `path`; sections override."""
    cfg = {
        "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                  "vocab_size": demo_data["vocab_size"]},
        "parallel": {"micro_batch_size": 2, "global_batch_size": 8},
        "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4},
        "schedule": {"style": "cosine", "warmup_steps": 4, "train_steps": 40},
        "data": {"corpora": [{"name": n, "prefix": demo_data["prefixes"][n]} for n in corpora]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "eval_interval": 0, "tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def stored_tensors(ckpt: Path, part: str = "model") -> dict:
    """Every floating tensor of a checkpoint's dist checkpoint ``part`` (model or optimizer), read whole
    from the DCP files (layout-independent)."""
    from lrpath_megatron.merge import DcpTensorReader

    reader = DcpTensorReader(Path(ckpt) / part)
    return {fqn: reader.read(fqn, [0] * len(md.size), list(md.size))
            for fqn, md in reader.tensor_meta().items() if md.properties.dtype.is_floating_point}
