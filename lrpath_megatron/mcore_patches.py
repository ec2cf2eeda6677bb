"""Every patch of megatron-core internals, each checked against the installed megatron-core first.

Each patch is a :class:`~lrpath_megatron.mcore_audit.Patch`: the megatron-core internals it relies on, per
audited release, compared with the installed megatron-core before the patch is first applied. Where
megatron-core fixed a bug upstream, the patch probes the behaviour instead of trusting a version string
(:func:`gathered_state_offsets`). The CPU-only workarounds stay in :mod:`lrpath_megatron.cpu_compat`,
checked the same way.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from lrpath_megatron.mcore_api import optimizer_parts
from lrpath_megatron.mcore_audit import Internals, McorePatchError, Patch, installed_version
from lrpath_megatron.process_lifetime import die_with_parent

logger = logging.getLogger(__name__)

_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"
_GATHER = f"{_DISTRIB_OPTIMIZER}.get_parameter_state_dp_zero"
_SLICE = f"{_DISTRIB_OPTIMIZER}.sharded_param_state_fully_reshardable"

GATHERED_STATE_OFFSETS = Patch(
    "gathered_state_offsets",
    {"0.16.1": {_GATHER: "812c52ea4568", _SLICE: "e888c7cccb71"},
     "0.19.2": {_GATHER: "14d11a75ad9c", _SLICE: "6df6392a0ebb"}},
    "how DistributedOptimizer.get_parameter_state_dp_zero lays out the gathered state of several buckets "
    "(each bucket without its end padding, one after the other)",
)


def _methods(owner: str, **digests: str) -> Internals:
    return {f"{owner}.{name}": digest for name, digest in digests.items()}


TORCH_ADAM_LOAD = Patch(
    "torch_adam_load",
    {"0.16.1": _methods(_DISTRIB_OPTIMIZER, state_dict="fe621ae6a622", load_state_dict="15f257b4c4f9",
                        sharded_state_dict="2d70893ff7c0", load_parameter_state_from_fully_reshardable="ea3388fac431",
                        _set_main_param_and_optimizer_states="93c254228283"),
     "0.19.2": _methods(_DISTRIB_OPTIMIZER, state_dict="fe621ae6a622", load_state_dict="7e5f988b86b4",
                        sharded_state_dict="8beb5164ba90", load_parameter_state_from_fully_reshardable="ea3388fac431",
                        _set_main_param_and_optimizer_states="40cab7846597")},
    "how DistributedOptimizer.state_dict and load_state_dict read and set torch Adam's per-parameter "
    "'step', and which keys _set_main_param_and_optimizer_states copies into the live state",
)

_ROW = "megatron.core.tensor_parallel.layers:RowParallelLinear"
ROW_PARALLEL_TP_GROUP = Patch(
    "row_parallel_tp_group",
    {"0.16.1": {f"{_ROW}.forward": "2148db9855a3", f"{_ROW}._forward_impl": "6042a461a2e6"},
     "0.19.2": {f"{_ROW}.forward": "d98cea58261a", f"{_ROW}._forward_impl": "6042a461a2e6"}},
    "whether RowParallelLinear.forward still hands tp_group=None to self._forward_impl",
)

_CLIP = "megatron.core.optimizer.clip_grads"
_LOCAL_KERNELS = {
    f"{_CLIP}:l2_norm_impl": None,
    f"{_CLIP}:multi_tensor_scale_impl": None,
    "megatron.core.utils:local_multi_tensor_applier": "15310e316e1e",
    "megatron.core.utils:local_multi_tensor_l2_norm": "01526c55444a",
    "megatron.core.utils:local_multi_tensor_scale": "a271d86b6125",
}
FOREACH_GRAD_NORM = Patch(
    "foreach_grad_norm",
    {"0.16.1": {**_LOCAL_KERNELS, f"{_CLIP}:get_grad_norm_fp32": "7fa2ba2493d4",
                f"{_CLIP}:clip_grad_by_total_norm_fp32": "8edb9da53650"},
     # 0.19 also scales by a tensor coefficient through multi_tensor_scale_tensor_impl when TE has it.
     "0.19.2": {**_LOCAL_KERNELS, f"{_CLIP}:multi_tensor_scale_tensor_impl": None,
                f"{_CLIP}:get_grad_norm_fp32": "810944e99b1e", f"{_CLIP}:clip_grad_by_total_norm_fp32": "cf07b488fb76"}},
    "how clip_grads calls l2_norm_impl and multi_tensor_scale_impl (arguments, return value) and what "
    "megatron.core.utils' local_multi_tensor_* fallbacks compute",
)

_FILESYSTEM_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
WRITE_RESULTS_QUEUE = Patch(
    "write_results_queue",
    {"0.16.1": {f"{_FILESYSTEM_ASYNC}:_results_queue": None,
                f"{_FILESYSTEM_ASYNC}:_get_write_results_queue": "349269cbdd56"},
     "0.19.2": {f"{_FILESYSTEM_ASYNC}:_results_queue": None,
                f"{_FILESYSTEM_ASYNC}:get_write_results_queue": "e395fb0e86a0"}},
    "whether filesystem_async still creates the checkpoint writers' result queue once, in the module "
    "global _results_queue, from a spawned multiprocessing Manager (get_write_results_queue)",
)

PATCHES = (GATHERED_STATE_OFFSETS, TORCH_ADAM_LOAD, ROW_PARALLEL_TP_GROUP, FOREACH_GRAD_NORM, WRITE_RESULTS_QUEUE)


# ------------------------------------------------------------------------------- distributed optimizer checkpoints
def _torch_adam_parts(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [part for part in optimizer_parts(optimizer) if isinstance(part, DistributedOptimizer)
            and type(getattr(part, "optimizer", None)) in (torch.optim.Adam, torch.optim.AdamW)]


def check_checkpoint_patches(optimizer) -> None:
    """Check the patches that saving and loading ``optimizer`` will apply, when it is built: a mismatch then
    stops a run before its first step rather than at its first save."""
    if any(getattr(part, "buffers", None) for part in optimizer_parts(optimizer)):
        GATHERED_STATE_OFFSETS.check()
    if _torch_adam_parts(optimizer):
        TORCH_ADAM_LOAD.check()


_probed: list[bool] = []  # slices_padded_offsets' answer for the megatron-core of this process


def _gathered_starts(buffer) -> list[int]:
    """Per bucket: what to add to a parameter's offset in the padded buffer to get its offset in the
    gathered state (every bucket without its end padding, one after the other)."""
    starts, gathered = [], 0
    for bucket in buffer.buckets:
        starts.append(gathered - bucket.offset)
        gathered += bucket.numel_unpadded
    return starts


def slices_padded_offsets(optimizer, model_sd: dict) -> bool:
    """Probe megatron-core: does its ``fully_reshardable`` save slice each parameter's state out of the
    gathered state at the parameter's offset in the *padded* buffer (the bug of 0.16.1-0.19.2, fixed
    upstream by subtracting the end padding of the buckets before)? Runs megatron-core's own slicing over
    an empty gathered state of the real layout (no communication) and reads where each slice starts.
    False where nothing tells the two apart (one bucket per buffer: both offsets agree)."""
    verdicts = set()
    for part in optimizer_parts(optimizer):
        buffers = getattr(part, "buffers", None) or []
        if all(len(b.buckets) == 1 for b in buffers):
            continue
        empty = part.get_parameter_state_dp_zero(empty_data=True, return_on_all_ranks=True)
        part.get_parameter_state_dp_zero = lambda *args, **kwargs: empty  # the slicing only, on the real layout
        quiet = logging.getLogger("megatron.core.optimizer.distrib_optimizer")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its warning for a slice past the end is what is probed here
        try:
            sliced = part.sharded_param_state_fully_reshardable(model_sd, is_loading=False, metadata={})
        finally:
            del part.get_parameter_state_dp_zero
            quiet.setLevel(level)
        # megatron-core numbers the sliced parameters buffer by buffer, in param_index_map's order.
        params = [(b, item) for b, buffer in enumerate(buffers) for item in buffer.param_index_map.values()]
        shifts = [_gathered_starts(buffer) for buffer in buffers]
        for (b, (start, _, bucket)), tensors in zip(params, (sliced[i] for i in range(len(params)))):
            shift = shifts[b][bucket]
            data, world = tensors["param"].data, next(iter(empty[b].values()))["param"]
            if shift == 0:
                continue  # the same offset either way
            if data.untyped_storage().data_ptr() != world.untyped_storage().data_ptr():
                verdicts.add(True)  # read past the gathered state and padded with zeros: the bug
            elif data.storage_offset() in (start, start + shift):
                verdicts.add(data.storage_offset() == start)
            else:
                raise McorePatchError(
                    f"megatron-core {installed_version()} slices the distributed optimizer's gathered state "
                    f"neither at the padded nor at the gathered offset (parameter at {start} in bucket {bucket} "
                    f"read from {data.storage_offset()}): re-audit {GATHERED_STATE_OFFSETS.reaudit}")
    if len(verdicts) > 1:
        raise McorePatchError("megatron-core slices some parameters of the distributed optimizer's gathered state at "
                              f"padded offsets and others not: re-audit {GATHERED_STATE_OFFSETS.reaudit}")
    return verdicts == {True}


@contextlib.contextmanager
def gathered_state_offsets(optimizer, model_sd: dict) -> Iterator[None]:
    """While the distributed optimizer builds its ``fully_reshardable`` state for a save, point each
    parameter at its place in the gathered state instead of in the gradient buffer - where megatron-core
    slices at padded offsets (:func:`slices_padded_offsets`, probed once per process).

    megatron-core 0.16.1 to 0.19.2 gather every bucket's state without the padding at the bucket's end, one
    bucket after the other, then slice it per parameter at the parameter's offset in the padded buffer:
    with more than one bucket (``performance.overlap_grad_reduce``) every parameter after the first bucket
    got another parameter's state. Once megatron-core corrects the offsets itself, correcting them again
    would corrupt the state the same way: hence the probe, not a version check. Loading slices per
    parameter correctly and needs nothing. Optimizers without gradient buffers are left alone."""
    buffers = {id(b): b for opt in optimizer_parts(optimizer) for b in getattr(opt, "buffers", [])}.values()
    if buffers:
        GATHERED_STATE_OFFSETS.check()
    if not any(len(b.buckets) > 1 for b in buffers):
        yield
        return
    first = not _probed
    if first:
        _probed.append(slices_padded_offsets(optimizer, model_sd))
    saved = [(b, b.param_index_map) for b in buffers] if _probed[0] else []
    for buffer, index in saved:
        starts = _gathered_starts(buffer)
        buffer.param_index_map = {p: (start + starts[b], end + starts[b], b) for p, (start, end, b) in index.items()}
    try:
        if first and saved:
            logger.warning("megatron-core %s slices the distributed optimizer's multi-bucket state at padded "
                           "offsets on save: corrected", installed_version())
        yield
    finally:
        for buffer, index in saved:
            buffer.param_index_map = index


def prepare_torch_adam_load(optimizer) -> list:
    """megatron-core 0.16.1's distributed optimizer over torch's AdamW (its fallback without TE or apex)
    cannot load as it stands: ``sharded_state_dict(is_loading=True)`` reads the step of the optimizer
    state, which a fresh optimizer does not have yet; ``load_state_dict`` gives every parameter the same
    ``step`` tensor (which torch's foreach and fused kernels would advance once per parameter) and then
    copies the loaded per-parameter state over every key of the live state, ``step`` included, which the
    loaded state does not have. So: give the fresh state a step, hold the steps aside while the state is
    copied in, and give each parameter its own step back (:func:`restore_steps`). Returns what to restore."""
    parts = _torch_adam_parts(optimizer)
    if parts:
        TORCH_ADAM_LOAD.check()
    held = []
    for part in parts:
        inner = part.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        steps: dict = {}
        inner.register_load_state_dict_post_hook(
            lambda opt, steps=steps: steps.update({p: s.pop("step") for p, s in opt.state.items() if "step" in s}))
        held.append((inner, steps))
    return held


def restore_steps(held: list) -> None:
    for inner, steps in held:
        for p, step in steps.items():
            inner.state[p]["step"] = step.clone()


# ------------------------------------------------------------------------------------------- checkpoint writers
_results_manager: list = []  # the Manager serving the writers' result queue, alive as long as this process


def results_queue_dies_with_trainer() -> None:
    """megatron-core's checkpoint writers report through a queue served by a Manager process that
    filesystem_async starts with the "spawn" method at the first save. A spawned process is not forked
    from Python, so :func:`lrpath_megatron.process_lifetime.die_with_parent` (every fork's) does not reach it,
    and it outlives a trainer killed with -9 - one stray process per rank and kill. Create that queue
    first, from a Manager that gets SIGKILL when this process dies (on CPU and GPU alike)."""
    import multiprocessing
    import os
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    WRITE_RESULTS_QUEUE.check()
    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_results_server_init, initargs=(os.getpid(),))
    _results_manager.append(manager)
    filesystem_async._results_queue = manager.Queue()


def _results_server_init(parent_pid: int) -> None:
    """The result queue's server lives exactly as long as its trainer. SLURM signals every process of a job
    step (USR1 before the time limit, TERM on preemption): the trainer answers with a save that needs this
    server, so the server ignores them and goes when the trainer does."""
    import signal

    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(parent_pid)


# ------------------------------------------------------------------------------------------- performance levers
def pass_own_tp_group(linear) -> None:
    """megatron-core 0.16.1's RowParallelLinear hands ``tp_group=None`` to its matmul, which then issues a
    deprecation warning on every call and uses the default TP group - the group the layer already holds.
    A warning inside a compiled region is a graph break, here inside a context manager that cannot resume,
    so dynamo would leave the rest of every layer eager. Passing the layer's own group avoids it."""
    ROW_PARALLEL_TP_GROUP.check()
    forward_impl, group = linear._forward_impl, linear.tp_group

    def with_group(*args, tp_group=None, **kwargs):
        return forward_impl(*args, tp_group=group if tp_group is None else tp_group, **kwargs)

    linear._forward_impl = with_group


def use_foreach_grad_norm() -> bool:
    """Grad norm and clipping through torch._foreach kernels instead of megatron-core's local fallbacks
    (``local_multi_tensor_l2_norm`` takes one norm per tensor and syncs the host once per tensor;
    ``local_multi_tensor_scale`` loops). Replaces the two functions in megatron-core's clip_grads module,
    for this process, only when those are the fallbacks; returns False (nothing to do) when TE's or apex's
    multi-tensor kernels are in use."""
    FOREACH_GRAD_NORM.check()
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is _foreach_l2_norm:
        return True
    if clip_grads.l2_norm_impl is not mcore_utils.local_multi_tensor_l2_norm:
        return False
    clip_grads.l2_norm_impl = _foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = _foreach_scale
    return True


# Same signatures as megatron-core's local_multi_tensor_* (amp_C's multi-tensor calling convention).
def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    src, dst = tensor_lists
    if src is dst:  # clipping scales the grads in place: no temporary copy of every gradient
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))
