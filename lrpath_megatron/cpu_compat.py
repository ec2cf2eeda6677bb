"""megatron-core on a machine without CUDA: every workaround lives here and nowhere else.

:func:`enable` is called by :mod:`lrpath_megatron.distributed` only when training without a GPU; the GPU
path never applies any of this (tested). Each workaround names the megatron-core call site it exists for.
The ones that replace megatron-core internals are checked against the installed megatron-core first, as
every patch of :mod:`lrpath_megatron.mcore_patches` is (:data:`CPU_RNG`).
"""
from __future__ import annotations

import threading

import torch

from lrpath_megatron.mcore_audit import Patch

_lock = threading.Lock()
_enabled = False

_RANDOM = "megatron.core.tensor_parallel.random"
_RNG_INTERNALS = {
    f"{_RANDOM}:_get_cuda_rng_state": None,
    f"{_RANDOM}:_set_cuda_rng_state": None,
    f"{_RANDOM}:_get_all_rng_states": "0fd22c8e723e",
    f"{_RANDOM}:_set_all_rng_states": "ecfe91a8fe3d",
    f"{_RANDOM}:initialize_rng_tracker": "4bc461df7c7f",
}
CPU_RNG = Patch(
    "cpu_rng",
    {"0.16.1": _RNG_INTERNALS, "0.19.2": _RNG_INTERNALS},  # unchanged between the two
    "where megatron.core.tensor_parallel.random reads and sets the CUDA RNG state for activation "
    "recomputation (through its module globals _get_cuda_rng_state/_set_cuda_rng_state), and that "
    "initialize_rng_tracker(inference_rng_tracker=True) still makes fork() a no-op",
)


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites ``device="cuda"`` (and ``torch.device("cuda")``) in tensor factory calls to the CPU.

    Call sites: pipeline schedules (``total_num_tokens = torch.zeros(..., device="cuda")``),
    ``optimizer/clip_grads.py`` (``torch.tensor(..., device="cuda")`` for the norm),
    ``core/utils.py`` helpers and ``transformer/utils.py``'s default causal mask.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """The CPU's one stream: every wait is already satisfied."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare int means a CUDA ordinal in these call sites


def _type_string_check_passthrough() -> None:
    """``clip_grads.py`` and the optimizers assert ``tensor.type() == 'torch.cuda.FloatTensor'``.

    Only the string comparison is relaxed: a CPU float32 tensor reports the CUDA type name to those
    checks (``torch.FloatTensor`` otherwise). Nothing else in megatron-core reads ``Tensor.type()``.
    """
    original = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        if self.device.type == "cpu" and name in ("torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor"):
            return name.replace("torch.", "torch.cuda.")
        return name

    torch.Tensor.type = cuda_named_type


def _no_cuda_rng_state() -> None:
    """Activation recomputation (``tensor_parallel/random.py``: ``CheckpointFunction`` and ``_fork_rng``)
    saves the CUDA generator's state next to the CPU one and restores both before recomputing. Without
    CUDA there is no such generator; dropout draws from the CPU one (see :func:`init_rng`), whose state
    it still saves and restores, so the recomputed forward is the original one."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


def enable() -> None:
    """Apply all CPU workarounds, once per process. Must not be called when CUDA is used."""
    global _enabled
    with _lock:
        if _enabled:
            return
        CPU_RNG.check()  # before anything is patched
        # rotary_pos_embedding.py and core/utils.py (global memory buffer) call current_device();
        # the async checkpoint writer calls synchronize().
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        # megatron-core 0.19's gradient sync (param_and_grad_buffer.py, start_grad_sync) waits on the
        # current CUDA stream for CUDA-graph events; the CPU has one stream and no such events.
        torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]
        _type_string_check_passthrough()
        _no_cuda_rng_state()
        _CudaToCpu().__enter__()  # process-wide: the mode stays pushed for the life of the process
        _enabled = True


def is_enabled() -> bool:
    return _enabled


def init_rng(seed: int) -> None:
    """Replaces ``model_parallel_cuda_manual_seed`` (needs the CUDA RNG).

    The tracker is created in inference mode so its ``fork()`` is a no-op; dropout then draws from the
    CPU generator, seeded identically on every rank of a tensor-parallel group.
    """
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    CPU_RNG.check()
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(seed)
