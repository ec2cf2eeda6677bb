"""What a rank does when another rank stops or dies, or its own step stalls: say so once, write every thread's
Python stack to the log, and exit with the requeue code, so that the job ends and the scheduler brings it
back (from the last complete checkpoint) instead of waiting until its time limit burns out.

Collectives are bounded by ``parallel.distributed_timeout_minutes`` (the process groups' timeout, as
Megatron-LM's ``--distributed-timeout-minutes``): a peer that stops answering makes the collective raise
after that time, a peer that died makes it raise at once (connection closed). What is not a collective (a
data read, a save on a stalled filesystem) is bounded by :class:`StepWatchdog`.

Under SLURM every rank that leaves this way first writes a fault record, ``rank-R@NODE.peer`` (a collective
failed: the fault is elsewhere) or ``rank-R@NODE.stall`` (its own step stalled), into ``$LRPATH_FAULT_DIR``;
the batch script leaves the nodes of silent and stalled ranks out of the requeued job (docs/launch.md).
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
from typing import Callable, NoReturn

import torch

from lrpath_megatron import ranks
from lrpath_megatron.errors import EXIT_REQUEUE, FAULT_DIR_ENV

# What gloo and NCCL say when a peer stopped answering or is gone (raised as RuntimeError by some releases).
PEER_FAILURE_MARKS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                      "Broken pipe", "NCCL communicator was aborted", "NCCL error", "watchdog")
# The watchdog's bound in units of the slowest stretch between two progress marks seen so far.
SLOWEST_FACTOR = 10.0
# Slack past the collective timeout (plus one slowest stretch: a collective starts up to a step after the
# last mark) before the watchdog fires, so that a rank waiting on a peer reports a peer, not a stall.
WATCHDOG_SLACK_S = 5.0
# Seconds a fault record's write may take (the filesystem may be what stalled) before the rank exits anyway.
RECORD_WRITE_S = 5.0
PEER, STALL = "peer", "stall"
_leaving = threading.Lock()


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank stopped answering or is gone."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in PEER_FAILURE_MARKS)


def leave_for_requeue(what: str, kind: str = PEER) -> NoReturn:
    """Log ``what`` and every thread's stack, write the fault record (``kind``: PEER or STALL), then exit
    EXIT_REQUEUE at once: no exit handler runs (tearing down process groups whose peers are gone can block
    forever). The first caller wins; a second (the watchdog beside a failed collective) waits for its exit."""
    _leaving.acquire()
    print(f"{what}; every thread's stack follows; exiting {EXIT_REQUEUE} for requeue", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    writer = threading.Thread(target=_write_record, args=(what, kind), daemon=True)
    writer.start()
    writer.join(RECORD_WRITE_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_REQUEUE)


def _write_record(what: str, kind: str) -> None:
    """``$LRPATH_FAULT_DIR/rank-R@NODE.KIND`` holding ``what``; nothing when the variable is unset."""
    fault_dir = os.environ.get(FAULT_DIR_ENV)
    if not fault_dir:
        return
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        os.makedirs(fault_dir, exist_ok=True)
        with open(os.path.join(fault_dir, f"rank-{ranks.rank()}@{node}.{kind}"), "w") as f:
            f.write(what + "\n")
    except OSError as exc:
        print(f"could not write the fault record in {fault_dir}: {exc}", file=sys.stderr, flush=True)


class StepWatchdog:
    """A thread that ends the process (:func:`leave_for_requeue`) when the trainer marks no progress for
    longer than its bound: ``SLOWEST_FACTOR`` times the slowest stretch between two marks so far (steps,
    evaluations and saves all mark), never below ``floor_s`` (the collective timeout) plus one slowest
    stretch and ``WATCHDOG_SLACK_S``, so that a collective waiting on a stalled peer times out first."""

    def __init__(self, floor_s: float, where: Callable[[], str]):
        self.floor_s, self._where = floor_s, where
        self._last, self._slowest = time.monotonic(), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lrpath-step-watchdog", daemon=True)
        self._thread.start()

    def bound(self) -> float:
        return max(self.floor_s + self._slowest + WATCHDOG_SLACK_S, SLOWEST_FACTOR * self._slowest)

    def progress(self) -> None:
        now = time.monotonic()
        self._slowest = max(self._slowest, now - self._last)
        self._last = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.floor_s / 10)):
            idle = time.monotonic() - self._last
            if idle > self.bound():
                leave_for_requeue(f"{self._where()}: no progress for {idle:.0f} s (bound {self.bound():.0f} s: "
                                  f"{SLOWEST_FACTOR:g} x the slowest step so far, at least the collective timeout "
                                  "and a step)", STALL)
