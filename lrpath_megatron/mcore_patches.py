"""Every patch of megatron-core internals, each checked against the installed megatron-core first.

The patches were written against megatron-core 0.16.1 (:data:`WRITTEN_FOR`). Each :class:`Patch` names the
megatron-core objects it replaces or whose behaviour it compensates, with the sha256 of their source in
that release; before a patch is first applied in a process, :meth:`Patch.check` compares them with the
installed megatron-core. A patch on internals it was not written for would corrupt checkpoints or training
without a word, so a changed or missing object stops the run with an error naming the patch, both versions
and what to re-audit. A name listed without a digest (a module global the patch replaces) only has to
exist. The CPU-only workarounds stay in :mod:`lrpath_megatron.cpu_compat`, checked the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from lrpath_megatron.errors import LrpathError

WRITTEN_FOR = "0.16.1"
_checked: set[str] = set()  # names of the patches whose internals matched in this process


class McorePatchError(LrpathError):
    """The installed megatron-core differs where a patch relies on it."""


def installed_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def source_digest(obj) -> str:
    """The digest a :class:`Patch` records for ``obj`` (after a re-audit, the new value to write there)."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]


def _difference(path: str, digest: Optional[str]) -> Optional[str]:
    """What differs about ``module:qualified.name`` from the source ``digest`` it had (None: nothing)."""
    module, _, qualname = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError):
        return f"{path} is missing"
    if digest is None:
        return None
    try:
        found = source_digest(obj)
    except (OSError, TypeError):  # no source file to compare: nothing says it is the same
        return f"{path} has no readable source"
    return None if found == digest else f"{path} changed (source sha256 {found}, written against {digest})"


@dataclass(frozen=True)
class Patch:
    name: str
    internals: dict[str, Optional[str]]  # "module:qualified.name" -> sha256[:12] of its source, or None (exists)
    reaudit: str  # what to read again in a new megatron-core before updating the digests
    written_for: str = WRITTEN_FOR

    def check(self) -> None:
        """Raise :class:`McorePatchError` unless every internal is as the patch was written against."""
        if self.name in _checked:
            return
        differences = [d for path, digest in self.internals.items() if (d := _difference(path, digest))]
        if differences:
            installed = installed_version()
            raise McorePatchError(
                f"megatron-core patch {self.name!r} was written against megatron-core {self.written_for}; the "
                f"installed megatron-core {installed} differs where it relies on it: {'; '.join(differences)}. "
                f"Re-audit {self.reaudit} in megatron-core {installed}, then update the patch and the digests of "
                f"its Patch definition (lrpath_megatron/mcore_patches.py; cpu_compat.py for the CPU workarounds), "
                f"or install megatron-core {self.written_for}")
        _checked.add(self.name)


_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"

GATHERED_STATE_OFFSETS = Patch(
    "gathered_state_offsets",
    {
        f"{_DISTRIB_OPTIMIZER}.get_parameter_state_dp_zero": "812c52ea4568",
        f"{_DISTRIB_OPTIMIZER}.sharded_param_state_fully_reshardable": "e888c7cccb71",
        "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__": "6dee7ab4c9ec",
        "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucket.__init__": "39ceecc3e20d",
    },
    "how DistributedOptimizer.get_parameter_state_dp_zero lays out the gathered state of several buckets "
    "and where sharded_param_state_fully_reshardable slices it per parameter (buffer.param_index_map)",
)

TORCH_ADAM_LOAD = Patch(
    "torch_adam_load",
    {
        f"{_DISTRIB_OPTIMIZER}.state_dict": "fe621ae6a622",
        f"{_DISTRIB_OPTIMIZER}.load_state_dict": "15f257b4c4f9",
        f"{_DISTRIB_OPTIMIZER}.sharded_state_dict": "2d70893ff7c0",
        f"{_DISTRIB_OPTIMIZER}.load_parameter_state_from_fully_reshardable": "ea3388fac431",
        f"{_DISTRIB_OPTIMIZER}._set_main_param_and_optimizer_states": "93c254228283",
    },
    "how DistributedOptimizer.state_dict and load_state_dict read and set torch Adam's per-parameter "
    "'step', and which keys _set_main_param_and_optimizer_states copies into the live state",
)

ROW_PARALLEL_TP_GROUP = Patch(
    "row_parallel_tp_group",
    {
        "megatron.core.tensor_parallel.layers:RowParallelLinear.forward": "2148db9855a3",
        "megatron.core.tensor_parallel.layers:RowParallelLinear._forward_impl": "6042a461a2e6",
    },
    "whether RowParallelLinear.forward still hands tp_group=None to self._forward_impl",
)

FOREACH_GRAD_NORM = Patch(
    "foreach_grad_norm",
    {
        "megatron.core.optimizer.clip_grads:l2_norm_impl": None,
        "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl": None,
        "megatron.core.optimizer.clip_grads:get_grad_norm_fp32": "7fa2ba2493d4",
        "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": "8edb9da53650",
        "megatron.core.utils:local_multi_tensor_applier": "15310e316e1e",
        "megatron.core.utils:local_multi_tensor_l2_norm": "01526c55444a",
        "megatron.core.utils:local_multi_tensor_scale": "a271d86b6125",
    },
    "how clip_grads calls l2_norm_impl and multi_tensor_scale_impl (arguments, return value) and what "
    "megatron.core.utils' local_multi_tensor_* fallbacks compute",
)

_FILESYSTEM_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
WRITE_RESULTS_QUEUE = Patch(
    "write_results_queue",
    {
        f"{_FILESYSTEM_ASYNC}:_results_queue": None,
        f"{_FILESYSTEM_ASYNC}:_get_write_results_queue": "349269cbdd56",
    },
    "whether filesystem_async still creates the checkpoint writers' result queue once, in the module "
    "global _results_queue, from a spawned multiprocessing Manager (_get_write_results_queue)",
)

PATCHES = (GATHERED_STATE_OFFSETS, TORCH_ADAM_LOAD, ROW_PARALLEL_TP_GROUP, FOREACH_GRAD_NORM, WRITE_RESULTS_QUEUE)


# ------------------------------------------------------------------------------- distributed optimizer checkpoints
def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adam_parts(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [part for part in _parts(optimizer) if isinstance(part, DistributedOptimizer)
            and type(getattr(part, "optimizer", None)) in (torch.optim.Adam, torch.optim.AdamW)]


def check_checkpoint_patches(optimizer) -> None:
    """Check the patches that saving and loading ``optimizer`` will apply, when it is built: a mismatch then
    stops a run before its first step rather than at its first save."""
    if any(getattr(part, "buffers", None) for part in _parts(optimizer)):
        GATHERED_STATE_OFFSETS.check()
    if _torch_adam_parts(optimizer):
        TORCH_ADAM_LOAD.check()


@contextlib.contextmanager
def gathered_state_offsets(optimizer) -> Iterator[None]:
    """While the distributed optimizer builds its ``fully_reshardable`` state for a save, point each
    parameter at its place in the gathered state instead of in the gradient buffer.

    megatron-core 0.16.1 gathers every bucket's state without the padding at the bucket's end, one bucket
    after the other, then slices it per parameter at the parameter's offset in the padded buffer: with
    more than one bucket (``performance.overlap_grad_reduce``) every parameter after the first bucket got
    another parameter's state. Loading slices per parameter correctly and needs nothing. Optimizers
    without gradient buffers (not distributed) are left alone."""
    buffers = {id(b): b for opt in _parts(optimizer) for b in getattr(opt, "buffers", [])}.values()
    if buffers:
        GATHERED_STATE_OFFSETS.check()
    saved = [(b, b.param_index_map) for b in buffers]
    for buffer, index in saved:
        starts, gathered = [], 0  # each bucket's start in the gathered (unpadded, concatenated) state
        for bucket in buffer.buckets:
            starts.append(gathered - bucket.offset)
            gathered += bucket.numel_unpadded
        buffer.param_index_map = {p: (start + starts[b], end + starts[b], b) for p, (start, end, b) in index.items()}
    try:
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
    from Python, so :func:`lrpath_megatron.distributed.die_with_parent` (every fork's) does not reach it,
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

    from lrpath_megatron.distributed import die_with_parent

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
