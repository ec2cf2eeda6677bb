"""The main-process side of preprocessing, shared by the single-output and the sharded runs: tokenizer,
inputs and backend (:func:`prepare`), the pool of forked workers (:func:`run_tasks`), the summary."""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from lrpath_megatron.data_tools import inputs as inp
from lrpath_megatron.data_tools.encoders import Encoder
from lrpath_megatron.data_tools.indexed_writer import optimal_dtype
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig
from lrpath_megatron.data_tools.sample_check import SampleCheck, SwitchToExact, settle_backend
from lrpath_megatron.data_tools.tokenize_worker import UnitResult, Verification, init_worker
from lrpath_megatron.errors import LrpathError


@dataclass
class Summary:
    files: int
    documents: int
    tokens: dict  # key -> tokens
    skipped: dict  # problem kind -> count
    problems: list  # the first `max_listed` problems of each kind
    outputs: dict  # key -> dataset prefix
    dtype: str
    seconds: float
    backend: str = "exact"  # what ran: exact, fast or fast-normalized
    verification: Verification = field(default_factory=Verification)
    shards: tuple = (0, 0)  # (shards written, complete shards kept from an earlier run)
    backend_reason: str = ""  # why this backend (auto: the tokenizer's class, a difference on the sample)
    sample: SampleCheck | None = None  # the verification sample, where one was checked

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)

    def to_json(self) -> dict:
        v = self.verification
        return dataclasses.asdict(self) | {
            "problems": [str(p) for p in self.problems], "tokens_per_second": self.tokens_per_second,
            "verification": dataclasses.asdict(v) | {"rate": v.rate, "examples": [str(m) for m in v.examples]}}

    def format(self) -> str:
        lines = [f"{self.documents} documents from {self.files} files in {self.seconds:.1f} s "
                 f"({self.tokens_per_second:,.0f} tokens/s), dtype {self.dtype}"]
        lines += [f"  {key}: {n:,} tokens -> {self.outputs[key]}{'_*' if any(self.shards) else ''}.bin/.idx"
                  for key, n in self.tokens.items()]
        if any(self.shards):
            lines.append(f"shards: {self.shards[0]} written, {self.shards[1]} complete from an earlier run kept")
        v = self.verification
        lines.append(f"backend: {self.backend} ({self.backend_reason})")
        if self.sample is not None:
            lines.append(f"  {self.sample}")
        if v.documents:
            lines.append(f"  verified {v.documents:,} documents with the exact backend: {v.differing} differ "
                         f"({v.rate:.3%})")
        elif self.backend != "exact" and self.sample is None:
            lines.append("  not verified (--verify 0)")
        lines += [f"  {m}" for m in v.examples]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k}={n}" for k, n in sorted(self.skipped.items())))
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class Setup:
    """What the single-output and the sharded runs share: the tokenizer, inputs and the progress bar."""

    encoder: Encoder
    dtype: type
    files: list
    problems: list  # missing inputs
    total_bytes: int
    started: float
    bar: tqdm
    on_progress: Callable[[tuple], None]
    sample: SampleCheck | None  # the verification sample, where one was checked


def switch_if_differs(setup: Setup, verification: Verification) -> None:
    """auto: a difference found while tokenizing (--verify N) starts the run again with the exact backend."""
    if verification.differing and setup.encoder.requested == "auto" and setup.encoder.backend != "exact":
        raise SwitchToExact(f"--verify: {setup.encoder.backend} differs from the exact backend at "
                            f"{verification.examples[0]}")


def prepare(cfg: PreprocessConfig, switched: str = "") -> Setup:
    """Tokenizer, inputs and backend: ``switched`` names the difference that made an auto run start again."""
    started = time.monotonic()
    enc = Encoder(cfg.tokenizer_model, cfg.backend, cfg.eod_token)
    if switched:
        enc.use_exact(f"auto: {switched}, so the exact backend")
    if cfg.append_eod and enc.eod_id < 0:
        raise LrpathError(f"{enc.info.path} has no eos token to use as EOD; pass --eod-token TEXT (a Hugging Face "
                          f"tokenizer's eos is read from the tokenizer_config.json next to it) or --no-append-eod")
    files, problems = inp.expand_inputs(cfg.inputs)
    if problems and cfg.on_error == "fail":
        raise LrpathError(f"{problems[0]}; nothing was written")
    if not files:
        raise LrpathError(f"no input files: {'; '.join(map(str, problems))}")
    sample = None if switched else settle_backend(enc, files, cfg.json_keys, cfg.input_format, cfg.max_doc_chars,
                                                  cfg.verify)
    if cfg.progress:  # which backend, and why, before the hours of tokenizing
        print(f"backend: {enc.backend} ({enc.reason})" + (f"; {sample}" if sample else ""), file=sys.stderr)
    total_bytes = sum(os.path.getsize(f) for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True,
               desc="preprocess", disable=not cfg.progress, mininterval=0.5)
    counts = {"docs": 0, "tokens": 0}

    def on_progress(item: tuple) -> None:
        nbytes, docs, tokens = item
        counts["docs"] += docs
        counts["tokens"] += tokens
        bar.update(nbytes)
        rate = counts["tokens"] / max(time.monotonic() - started, 1e-9)
        bar.set_postfix_str(f"{counts['docs']:,} docs, {rate:,.0f} tok/s", refresh=False)

    return Setup(enc, optimal_dtype(enc.vocab_size), files, problems, total_bytes, started, bar, on_progress, sample)


def dataset_meta(setup: Setup, cfg: PreprocessConfig, documents: int, tokens: int) -> dict:
    """The sidecar fields every dataset, shard and manifest shares (see corpus_meta)."""
    enc, sample = setup.encoder, setup.sample
    return {"tokenizer": enc.info.to_json(), "backend": enc.backend,
            "backend_choice": {"requested": enc.requested, "reason": enc.reason,
                               "sample": sample.to_json() if sample else None},
            "dtype": np.dtype(setup.dtype).name, "append_eod": cfg.append_eod,
            "documents": documents, "tokens": tokens}


def summarize(cfg: PreprocessConfig, setup: Setup, documents: int, tokens: Counter, problems: list,
              outputs: dict, verification: Verification, shards: tuple = (0, 0)) -> Summary:
    if cfg.verify == -1 and setup.encoder.backend != "exact" and verification.differing:
        raise LrpathError(f"--verify all: {verification.differing} documents differ: {verification.examples[0]}")
    skipped = Counter(p.kind for p in problems)
    listed, per_kind = [], Counter()
    for p in problems:
        per_kind[p.kind] += 1
        if per_kind[p.kind] <= cfg.max_listed:
            listed.append(p)
    return Summary(len(setup.files), documents, {k: tokens[k] for k in cfg.json_keys}, dict(skipped), listed,
                   outputs, np.dtype(setup.dtype).name, time.monotonic() - setup.started, setup.encoder.backend,
                   verification, shards, setup.encoder.reason, setup.sample)


def run_tasks(cfg: PreprocessConfig, task: Callable, units: Iterator, setup: Setup,
              partial_dir: str) -> Iterator[UnitResult]:
    """``task(unit)`` results in unit order; a pool of forked workers when ``cfg.workers > 1``."""
    args = (cfg, setup.encoder, setup.dtype, partial_dir, setup.total_bytes)
    if cfg.workers == 1:
        init_worker(*args, setup.on_progress)
        yield from map(task, units)
        return
    ctx = mp.get_context("fork")  # workers inherit the imported modules and the loaded configuration
    progress_q, drained = ctx.Queue(), threading.Event()
    drainer = threading.Thread(target=_drain, args=(progress_q, setup.on_progress, drained), daemon=True)
    drainer.start()
    # The pool's feeder thread would otherwise read every unit ahead (decompressed .gz lines are held in
    # memory): allow a few units per worker in flight.
    slots, stop = threading.Semaphore(4 * cfg.workers), threading.Event()

    def feed() -> Iterator[inp.WorkUnit]:
        for unit in units:
            slots.acquire()
            if stop.is_set():
                return
            yield unit

    # Workers are forked with SIGTERM blocked and unblock it in init_worker once its default action is back:
    # with the inherited Python handler, a terminate() right after the start (an early error) is swallowed
    # and pool.terminate() waits forever for a worker that never exits.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = ctx.Pool(cfg.workers, init_worker, (*args, progress_q.put))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        for result in pool.imap(task, feed()):
            slots.release()
            yield result
        pool.close()
    finally:
        stop.set()
        slots.release()  # wake a feeder blocked on a slot so the pool can shut down
        pool.terminate()
        pool.join()
        drained.set()  # (not a final put: a worker terminated mid-put may hold the queue's write lock)
        drainer.join()
        progress_q.close()


def _drain(q: "mp.Queue", sink: Callable[[tuple], None], drained: threading.Event) -> None:
    while not drained.is_set():
        with contextlib.suppress(queue.Empty):
            sink(q.get(timeout=0.1))
    while not q.empty():  # what the finished workers sent last
        sink(q.get())


def remove_files(paths: list) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
