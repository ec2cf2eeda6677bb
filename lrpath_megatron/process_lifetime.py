"""Child processes that die with their parent: no writer or server outlives a trainer killed with -9."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_forking_pid: list[int] = []  # the pid of the process that forks, recorded just before each fork


def forks_die_with_this_process() -> None:
    """megatron-core writes each checkpoint through forked writer processes. A trainer killed with -9
    mid-save would leave them blocked forever on their result queue, and deaf to SIGTERM (they inherit
    the trainer's save-and-requeue handler, which must stay: a SLURM preemption signals them too while
    they finish the save). On Linux, every process forked from here gets SIGKILL when its parent dies."""
    if not sys.platform.startswith("linux") or _forking_pid:
        return
    _forking_pid.append(os.getpid())
    os.register_at_fork(before=lambda: _forking_pid.__setitem__(-1, os.getpid()),
                        after_in_child=lambda: die_with_parent(_forking_pid[-1]))


def die_with_parent(parent_pid: int) -> None:
    """In a child process of ``parent_pid`` (Linux): SIGKILL when the parent dies, and exit now if it
    already has (before prctl took effect)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
