"""Writing checkpoints, in the foreground or in the background (``checkpoint.async_save``), and what a
failed write means to the user.

A background write is megatron-core's asynchronous dist-checkpointing: :func:`tensors.stage` plans the
write, the rank's writer process (:mod:`writer_process`, started with the run) gets a copy of the
state and writes it with megatron-core's write function while training goes on, and megatron-core's
finalization (collective) gathers every rank's result once every rank's process is done. Only then
:func:`tensors.commit` makes the checkpoint visible. One write is in flight at a time.

Collective: every rank calls every method at the same step.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from torch.distributed.checkpoint.api import CheckpointException

from lrpath_megatron import ranks
from lrpath_megatron.checkpoint import layout, tensors
from lrpath_megatron.run_layout import iter_name
from lrpath_megatron.checkpoint.tensors import StagedSave
from lrpath_megatron.checkpoint.write_requests import handover
from lrpath_megatron.checkpoint.writer_process import WriterProcess
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mcore_patches import results_queue_dies_with_trainer

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "read-only filesystem", errno.EIO: "I/O error"}
MIB = 1 << 20


class CheckpointWriter:
    def __init__(self, root: Path, background: bool, log: Callable[[str], None]):
        self.root, self.log = Path(root), log
        self._process = WriterProcess() if background else None
        # megatron-core's writers report through a queue served by a spawned process: start it with the run,
        # not at the first save, where its seconds of start-up would stall training.
        results_queue_dies_with_trainer()
        self._pending: tuple[StagedSave, Callable[[Path], None]] | None = None
        self._deleting: threading.Thread | None = None
        latest = layout.find_latest(self.root)
        self._last_size = _size(latest) if latest is not None else 0

    def write(self, step: int, stage: Callable[[], StagedSave], on_commit: Callable[[Path], None]) -> None:
        """The checkpoint at ``step`` that ``stage()`` captures (:func:`tensors.stage`); ``on_commit(it)``
        runs on every rank once it is visible. In the background only with ``checkpoint.async_save``: then
        call :meth:`poll` every step and :meth:`wait` before anything that needs it on disk."""
        assert self._pending is None, "one checkpoint write at a time: wait() first"
        with self._explained(step):
            staged = stage()
            if self._process is not None:
                self._process.submit(*handover(staged.request))
                self._pending = (staged, on_commit)
                return
            staged.request.execute_sync()
            final = tensors.commit(staged)
        self._committed(final, on_commit)

    def poll(self) -> None:
        """Commit the write in flight if every rank finished it; raise its failure on every rank."""
        if self._pending is not None:
            self._finish(blocking=False)

    def wait(self, why: str) -> None:
        """Block until the write in flight is committed (or raise its failure); log how long that took.
        Also waits for old checkpoints still being deleted."""
        self._join_deletes()
        if self._pending is None:
            return
        name, start = self._pending[0].final.name, time.perf_counter()
        self._finish(blocking=True)
        self.log(f"waited {time.perf_counter() - start:.2f} s for the background write of {name} ({why})")

    def close(self) -> None:
        """At the end of the run, after :meth:`wait`: the writer process exits."""
        self._join_deletes()
        if self._process is not None:
            self._process.close()

    def abort(self) -> None:
        """Local, on the way out after an error: kill the write in flight (its temporary directory is
        removed when the run starts again)."""
        if self._process is not None:
            self._process.abort()
        self._pending = None

    def delete(self, dirs: list[Path]) -> None:
        """Rank 0: remove pruned checkpoints (already renamed out of sight). In the background with background
        writes: freeing a large checkpoint's files takes the kernel a while, which would stall training."""
        if self._process is None:
            layout.delete_dirs(dirs)
            return
        self._join_deletes()
        self._deleting = threading.Thread(target=layout.delete_dirs, args=(dirs,), daemon=True)
        self._deleting.start()

    def _join_deletes(self) -> None:
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None

    def check_space(self, step: int) -> None:
        """Rank 0, before a save: warn when the checkpoint filesystem has less room than the last checkpoint took."""
        free = shutil.disk_usage(self.root).free
        if free < self._last_size:
            self.log(f"warning: {self.root} has {free / MIB:.1f} MiB free but the last checkpoint took "
                     f"{self._last_size / MIB:.1f} MiB: the save at step {step} will probably fail "
                     f"({self._resume_point()})")

    def _finish(self, blocking: bool) -> None:
        staged, on_commit = self._pending
        with self._explained(staged.step):
            done, failure = self._process.finished(blocking)
            busy, failed = ranks.on_any_rank(not done, failure is not None)
            if failed:
                raise RuntimeError(failure or "the checkpoint writer process of another rank failed")
            if busy:
                return
            self._pending = None
            for finalize in staged.request.finalize_fns:  # megatron-core's: raises every rank's write errors
                finalize()
            final = tensors.commit(staged)
        self._committed(final, on_commit)

    def _committed(self, final: Path, on_commit: Callable[[Path], None]) -> None:
        if ranks.rank() == 0:
            self._last_size = _size(final)
        on_commit(final)

    @contextlib.contextmanager
    def _explained(self, step: int) -> Iterator[None]:
        """Any failure of a save's writes as one clear :class:`LrpathError` (megatron-core reports a full
        disk as a torch zip-writer traceback from a worker process); the write in flight is dropped."""
        try:
            yield
        except LrpathError:
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            self.abort()
            raise LrpathError(self.describe_failure(exc, step)) from None

    def _resume_point(self) -> str:
        resumable = layout.find_resumable(self.root)
        return (f"nothing is lost: the run resumes from {resumable.name}" if resumable is not None
                else "no complete checkpoint yet: the run starts from the beginning")

    def describe_failure(self, exc: BaseException, step: int) -> str:
        """One message for a failed write: where, what failed, and what the run resumes from."""
        what = _reason(exc, self.root, self._last_size)
        return (f"writing checkpoint {iter_name(step)} to {self.root} failed: {what}; {self._resume_point()} "
                f"(the partial write is removed when the run starts again). Free space or fix the directory, "
                f"then rerun the same command")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, what caused it, and the per-rank failures a torch CheckpointException carries."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [failure[0] for failure in e.failures.values()]


def _reason(exc: BaseException, directory: Path, last_size: int) -> str:
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _REASONS:
            return f"{_REASONS[cause.errno]} ({cause})"
    # torch's zip writer reports a full disk without an errno ("unexpected pos ..."): ask the filesystem.
    free = shutil.disk_usage(directory).free
    if free < max(last_size, MIB):
        return f"no space left on the device ({free / MIB:.1f} MiB free)"
    message = str(exc).strip().splitlines()
    return f"write error ({type(exc).__name__}: {message[-1] if message else 'no message'})"


def _size(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in Path(ckpt).rglob("*") if p.is_file())
