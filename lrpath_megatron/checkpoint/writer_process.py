"""The background checkpoint writer of one rank: a process started with the run that writes what the
trainer staged into shared host memory, with megatron-core's own write function.

Why not a process forked per save (megatron-core 0.16.1's ``TemporalAsyncCaller``): a fork shares the
trainer's memory copy-on-write, so for as long as the write runs every page training updates (weights,
gradients, optimizer state) is copied once more - measured on CPU, a stall of the same order as the
write itself. megatron-core's ``PersistentAsyncCaller`` avoids the fork but selects a CUDA device in its
worker and waits forever on a worker that died. Here the trainer copies the tensors of a save into
buffers in shared memory (kept across saves: one host copy of this rank's part of a checkpoint) and hands
the write to the process. (At the lowest CPU priority it cost training no measurably less on a 2-core
machine, docs/checkpointing.md; so it runs at the trainer's.)
"""
from __future__ import annotations

import atexit
import os
import queue
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lrpath_megatron.checkpoint.write_requests import replace_tensors, write_parts
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.process_lifetime import die_with_parent, forks_die_with_this_process

SHARED_MEMORY = Path("/dev/shm")


class WriterProcess:
    """Trainer side. ``submit`` stages and hands over one write; ``finished`` says whether it is done."""

    def __init__(self):
        ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of the trainer's memory is shared
        self._todo, self._done = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(self._todo, self._done, os.getpid()),
                                 name="lrpath-checkpoint-writer")  # not a daemon: it forks its writers
        self._proc.start()
        self._buffers: dict[tuple, torch.Tensor] = {}
        # This rank's outcome of the write in flight once reported: (done, failure). Kept until the next
        # submit, as the other ranks may still be writing when this one hears of it.
        self._outcome: tuple[bool, str | None] = (True, None)
        atexit.register(self.abort)  # before multiprocessing's own exit handler, which would wait for it

    def submit(self, parts: list, digests: Path) -> None:
        """Copy every tensor of the write ``parts`` (:func:`write_requests.handover`) into its shared buffer
        and queue the write. A buffer crosses to the process once; later saves send its key."""
        tensors: dict[tuple, torch.Tensor] = {}

        def to_key(key: tuple, tensor: torch.Tensor) -> tuple:
            tensors[key] = tensor
            return key

        keyed_parts = replace_tensors(parts, to_key)
        new = self._allocate({key: tensor for key, tensor in tensors.items()
                              if key not in self._buffers or self._buffers[key].shape != tensor.shape
                              or self._buffers[key].dtype != tensor.dtype})
        self._buffers.update(new)
        for key, tensor in tensors.items():
            self._buffers[key].copy_(tensor)
        self._outcome = (False, None)
        self._todo.put((new, keyed_parts, str(digests)))

    @staticmethod
    def _allocate(like: dict) -> dict:
        need = sum(t.numel() * t.element_size() for t in like.values())
        free = shutil.disk_usage(SHARED_MEMORY).free if SHARED_MEMORY.is_dir() else need
        if free < need:
            raise LrpathError(
                f"checkpoint.async_save stages each save in shared memory ({SHARED_MEMORY}), which has "
                f"{free / 2**20:.1f} MiB free for {need / 2**20:.1f} MiB: enlarge it (a container's --shm-size) "
                "or set checkpoint.async_save: false")
        return {key: torch.empty(t.shape, dtype=t.dtype).share_memory_() for key, t in like.items()}

    def finished(self, blocking: bool) -> tuple[bool, str | None]:
        """(done, failure) of the last write submitted, on this rank; ``blocking`` waits for it."""
        while not self._outcome[0]:
            try:
                self._outcome = (True, self._done.get(timeout=0.1) if blocking else self._done.get_nowait())
            except queue.Empty:
                if not self._proc.is_alive():
                    self._outcome = (True, f"the checkpoint writer process exited (code {self._proc.exitcode})")
                elif not blocking:
                    break
        return self._outcome

    def close(self) -> None:
        if self._proc.is_alive():
            self._todo.put(None)
            self._proc.join(timeout=60)
        self.abort()

    def abort(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _serve(todo, done, parent_pid: int) -> None:
    """The writer process: one write at a time, each reported as None (written) or its failure."""
    # SLURM signals every process of a job step (USR1 before the time limit, TERM on preemption): the
    # trainer answers with a save that waits for this write, so it must not stop here.
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(parent_pid)
    forks_die_with_this_process()  # megatron-core's writers, forked from here
    buffers: dict = {}
    while (job := todo.get()) is not None:
        new, parts, digests = job
        buffers.update(new)
        start = time.perf_counter()
        try:
            write_parts(replace_tensors(parts, lambda _, key: buffers[key]), Path(digests))
            done.put(None)
        except Exception as exc:  # reported to the trainer, which stops the run with it
            done.put(f"{type(exc).__name__}: {exc} (after {time.perf_counter() - start:.1f} s)")
