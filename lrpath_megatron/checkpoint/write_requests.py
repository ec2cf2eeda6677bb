"""megatron-core's asynchronous write requests: the one place that reads their layout.

``dist_checkpointing.save(..., async_sharded_save=True)`` with megatron-core's own writer
(:func:`lrpath_megatron.mcore_api.async_save_kwargs`) returns an ``AsyncRequest`` per part of a checkpoint
(model, optimizer): ``async_fn`` writes, ``preload_fn`` stages the tensors in host memory, and
``async_fn_args`` are ``[rank, write buckets, results queue]``. A write bucket is one file:
``(file path, storage key, (byte items, tensor items))``, each item ``(WriteItem, data)``.

:func:`join` makes the parts of a checkpoint one request; its write runs in the foreground
(:mod:`tensors`) or is handed to the rank's writer process (:func:`handover`, :mod:`writer_process`), which
puts its own copies of the tensors into the buckets (:func:`replace_tensors`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from lrpath_megatron.checkpoint.layout import sha256_file, write_json_atomic

_BUCKETS = 1  # the position of the write buckets in a write function's arguments


def join(requests: list[AsyncRequest], digests: Path) -> AsyncRequest:
    """The write requests of the parts (model, optimizer) as one, its tensors in host memory now
    (megatron-core's preload: copies from a GPU; CPU tensors stay where they are: a background write
    copies them into its staging buffers when it is handed over). Every part's writers report through the
    one result queue of the process, which each part's finalization reads in turn: the parts are written
    one after the other by one process, in the order they are finalized. Then the same process writes the
    sha256 of the files it wrote to ``digests``, for the manifest: hashing a large checkpoint would
    otherwise stall training in the commit."""
    parts = []
    for request in requests:
        args = list(request.async_fn_args)
        if request.preload_fn is not None:
            args[_BUCKETS] = request.preload_fn()  # the write buckets, staged
        if request.async_fn is not None:  # None: nothing of this part to write on this rank
            parts.append((request.async_fn, args, request.async_fn_kwargs))
    return AsyncRequest(write_parts, (parts, digests), [fn for request in requests for fn in request.finalize_fns])


def handover(request: AsyncRequest) -> tuple[list, Path]:
    """What a writer process needs of a request from :func:`join`: the arguments of :func:`write_parts`."""
    parts, digests = request.async_fn_args
    return parts, digests


def write_parts(parts: list, digests: Path) -> None:
    """Write every part (write function, arguments, keyword arguments), then record the written files'
    sha256 in ``digests``."""
    for write, args, kwargs in parts:
        write(*args, **kwargs)
    written = [Path(file_path) for _, args, _ in parts for file_path, _, _ in args[_BUCKETS]]
    try:
        write_json_atomic(digests, {str(f.relative_to(digests.parent)): sha256_file(f) for f in written})
    except OSError:  # the write failed (its finalization says so) or left no room for the record: then
        pass  # the commit hashes these files itself


def replace_tensors(parts: list, replace: Callable[[tuple, Any], Any]) -> list:
    """The parts of a request from :func:`join` with each tensor of their buckets replaced by
    ``replace(key, tensor)``; key = (part, bucket, item), the same for the same state at every save."""
    def bucket(p: int, b: int, file_path, storage_key, byte_items, items) -> tuple:
        return file_path, storage_key, (byte_items, [(item, replace((p, b, t), tensor))
                                                     for t, (item, tensor) in enumerate(items)])

    out = []
    for p, (write, args, kwargs) in enumerate(parts):
        args = list(args)
        args[_BUCKETS] = [bucket(p, b, f, key, byte_items, items)
                          for b, (f, key, (byte_items, items)) in enumerate(args[_BUCKETS])]
        out.append((write, args, kwargs))
    return out
