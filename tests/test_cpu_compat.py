"""The CPU workarounds are applied only by a CPU run's distributed set-up, and only there."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.compat  # the megatron-core compatibility lane runs it too

SCRIPT = r"""
import torch
original = torch.cuda.current_device
from lrpath_megatron import cpu_compat, distributed, model, trainer  # importing applies nothing
assert not cpu_compat.is_enabled() and torch.cuda.current_device is original
assert torch.zeros(1).type() == "torch.FloatTensor"
assert not distributed.use_cuda()
from lrpath_megatron.config import ParallelConfig
distributed.initialize(ParallelConfig(global_batch_size=4), seed=1)
assert cpu_compat.is_enabled()
assert torch.zeros(2, device="cuda").device.type == "cpu"  # factory calls megatron-core makes on CUDA
assert torch.zeros(1).type() == "torch.cuda.FloatTensor"  # what clip_grads' type check expects
distributed.shutdown()
print("ok")
"""


def test_workarounds_only_after_cpu_initialisation():
    env = {"MASTER_PORT": "29731", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_gpu_path_does_not_call_the_workarounds():
    """initialize() enables the workarounds in exactly one place, the branch taken without CUDA."""
    import inspect

    from lrpath_megatron import distributed

    source = inspect.getsource(distributed.initialize)
    assert source.count("cpu_compat.enable()") == 1
    cuda_branch, cpu_branch = source.split("if cuda:")[1].split("else:")[:2]
    assert "cpu_compat" not in cuda_branch and "cpu_compat.enable()" in cpu_branch
    assert "cpu_compat.init_rng" in inspect.getsource(distributed.seed_everything).split("else:")[1]
