"""What a rank does when another rank stops or dies, or its own step stalls: say so once, write every thread's
Python stack to the log, and exit with the requeue code, so that the job ends and the scheduler brings it
back (from the last complete checkpoint) instead of waiting until its time limit burns out.

Collectives are bounded by ``parallel.distributed_timeout_minutes`` (the process groups' timeout, as
Megatron-LM's ``--distributed-timeout-minutes``): a peer that stops answering makes the collective raise
after that time, a peer that died makes it raise at once (connection closed). What is not a collective (a
data read, a save on a stalled filesystem) is bounded by :class:`StepWatchdog`.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable, NoReturn

import torch

from lrpath_megatron.errors import EXIT_REQUEUE

# What gloo and NCCL say when a peer stopped answering or is gone (raised as RuntimeError by some releases).
PEER_FAILURE_MARKS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                      "Broken pipe", "NCCL communicator was aborted", "NCCL error", "watchdog")
# The watchdog's bound in units of the slowest stretch between two progress marks seen so far.
SLOWEST_FACTOR = 10.0


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank stopped answering or is gone."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in PEER_FAILURE_MARKS)


def leave_for_requeue(what: str) -> NoReturn:
    """Log ``what`` and every thread's stack, then exit EXIT_REQUEUE at once: no exit handler runs (tearing
    down process groups whose peers are gone can block forever)."""
    print(f"{what}; every thread's stack follows; exiting {EXIT_REQUEUE} for requeue", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_REQUEUE)


class StepWatchdog:
    """A thread that ends the process (:func:`leave_for_requeue`) when the trainer marks no progress for
    longer than its bound: ``SLOWEST_FACTOR`` times the slowest stretch between two marks so far (steps,
    evaluations and saves all mark), never below ``floor_s`` (the collective timeout, so that a collective
    that times out says so first)."""

    def __init__(self, floor_s: float, where: Callable[[], str]):
        self.floor_s, self._where = floor_s, where
        self._last, self._slowest = time.monotonic(), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lrpath-step-watchdog", daemon=True)
        self._thread.start()

    def bound(self) -> float:
        return max(self.floor_s, SLOWEST_FACTOR * self._slowest)

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
                                  f"{SLOWEST_FACTOR:g} x the slowest step so far, at least the collective timeout)")
