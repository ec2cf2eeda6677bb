"""The worker side of preprocessing: the documents of one work unit encoded in batches, checked, handed on.

A worker (or the main process, with ``--workers 1``) holds the run's settings in :data:`WORKER`, set once by
:func:`init_worker`; the encoder is loaded by the main process and inherited by forked workers.
"""
from __future__ import annotations

import multiprocessing as mp
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lrpath_megatron.data_tools import inputs as inp
from lrpath_megatron.data_tools.encoders import Encoder
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig
from lrpath_megatron.data_tools.sample_check import FirstDifference, compare


@dataclass
class Verification:
    documents: int = 0  # documents re-encoded with the exact backend
    differing: int = 0
    examples: list = field(default_factory=list)  # the first few Mismatch

    def merge(self, other: "Verification", max_listed: int) -> None:
        self.documents += other.documents
        self.differing += other.differing
        self.examples += other.examples[:max(0, max_listed - len(self.examples))]

    @property
    def rate(self) -> float:
        return self.differing / self.documents if self.documents else 0.0


@dataclass
class UnitResult:
    index: int
    path: str
    lines: int
    documents: int
    tokens: dict  # key -> tokens written (EOD included)
    problems: list  # Problem, lines relative to the unit
    partials: dict  # key -> partial dataset prefix (sharded runs: {})
    verification: Verification = field(default_factory=Verification)
    shards: tuple = (0, 0)  # sharded runs: (shards written, complete shards kept)


class _Progress:
    """Batches (bytes, documents, tokens) increments; ``sink`` is called at most every 0.2 s."""

    def __init__(self, sink: Callable[[tuple], None]):
        self.sink, self.pending, self.last = sink, [0, 0, 0], time.monotonic()

    def add(self, nbytes: int = 0, docs: int = 0, tokens: int = 0) -> None:
        self.pending[0] += nbytes
        self.pending[1] += docs
        self.pending[2] += tokens
        if time.monotonic() - self.last > 0.2:
            self.flush()

    def flush(self) -> None:
        if any(self.pending):
            self.sink(tuple(self.pending))
        self.pending, self.last = [0, 0, 0], time.monotonic()


WORKER: dict = {}  # per-process state set by init_worker


def init_worker(cfg: PreprocessConfig, encoder: Encoder, dtype: type, partial_dir: str, total_bytes: int,
                 sink: Callable[[tuple], None]) -> None:
    if mp.parent_process() is not None:  # a pool worker: the pool's terminate() must simply end it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # see run_tasks
    WORKER.update(cfg=cfg, dtype=dtype, partial_dir=partial_dir, total_bytes=total_bytes, progress=_Progress(sink),
                   encoder=encoder)  # loaded once by the main process, inherited by forked workers


BATCH_CHARS = 4 << 20  # characters encoded per backend call: large enough for the fast backend's batching


def _check_text(key: str, text: str, cfg: PreprocessConfig, report) -> bool:
    if cfg.max_doc_chars and len(text) > cfg.max_doc_chars:
        report(inp.TOO_LONG, f"{key!r} has {len(text):,} characters > --max-doc-chars={cfg.max_doc_chars:,}")
        return False
    if not text or text.isspace():  # (no stripped copy of a possibly huge text)
        report(inp.EMPTY_DOCUMENT, f"{key!r} is empty or whitespace only")
        return False
    return True


class _Verifier:
    """Checks fast-backend ids against the exact backend: every document (``cfg.verify == -1``) or a
    reservoir sample of ``quota`` documents of the unit (seeded by the unit's index: reproducible)."""

    def __init__(self, enc: Encoder, cfg: PreprocessConfig, path: str, quota: int, seed: int):
        self.enc, self.cfg, self.path = enc, cfg, path
        self.all = cfg.verify == -1 and enc.backend != "exact"
        self.quota = quota if enc.backend != "exact" and (cfg.verify or 0) > 0 else 0
        self.rng, self.seen, self.sample = random.Random(seed), 0, []
        self.result = Verification()

    def offer(self, line: int, key: str, text: str, ids: np.ndarray) -> None:
        if self.all:
            self._check(line, key, text, ids)
        elif self.quota:
            self.seen += 1
            if len(self.sample) < self.quota:
                self.sample.append((line, key, text, ids))
            elif (j := self.rng.randrange(self.seen)) < self.quota:
                self.sample[j] = (line, key, text, ids)

    def _check(self, line: int, key: str, text: str, ids: np.ndarray) -> None:
        self.result.documents += 1
        mismatch = compare(self.enc, self.path, line, key, text, ids)
        if mismatch is None:
            return
        if self.all:  # --verify all: the run stops before this unit's output is kept
            raise FirstDifference(mismatch)
        self.result.differing += 1
        if len(self.result.examples) < self.cfg.max_listed:
            self.result.examples.append(mismatch)

    def finish(self) -> Verification:
        for item in self.sample:
            self._check(*item)
        self.sample = []
        return self.result


def tokenize_unit(unit: inp.WorkUnit, write: Callable[[int, dict], None], skip_lines: int = 0) -> UnitResult:
    """Encode the documents of ``unit`` in batches and pass each, in order, to ``write(line, {key: ids})``.

    Lines up to ``skip_lines`` (already in complete shards) are read but not encoded. Problems carry lines
    relative to the unit. Runs in a worker (or in-process) after :func:`init_worker`.
    """
    cfg, enc, progress = WORKER["cfg"], WORKER["encoder"], WORKER["progress"]
    plain = inp.is_plain_text(unit.path, cfg.input_format)
    unit_bytes = (unit.end - unit.start) or unit.disk_bytes
    quota = -(-cfg.verify * unit_bytes // max(1, WORKER["total_bytes"])) if (cfg.verify or 0) > 0 else 0
    verifier = _Verifier(enc, cfg, unit.path, quota, unit.index)
    problems, tokens, docs, line_no, pending, pending_chars = [], Counter(), 0, 0, [], 0

    def report(kind: str, detail: str, line: int | None = None) -> None:
        problems.append(inp.Problem(kind, unit.path, line_no if line is None else line, detail))

    def flush() -> None:
        nonlocal docs, pending_chars
        encoded = {key: enc.encode_batch([fields[key] for _, fields in pending]) for key in cfg.json_keys}
        for i, (line, fields) in enumerate(pending):
            bad = next((k for k in cfg.json_keys if encoded[k][i] is None), None)
            if bad is not None:
                at = next((j for j, c in enumerate(fields[bad]) if "\ud800" <= c <= "\udfff"), -1)
                report(inp.INVALID_UTF8, f"{bad!r} has an unpaired surrogate at character {at}, not encodable "
                                         f"as UTF-8", line)
                continue
            out = {}
            for key in cfg.json_keys:
                ids = encoded[key][i]
                verifier.offer(line, key, fields[key], ids)
                out[key] = np.append(ids, enc.eod_id) if cfg.append_eod else ids
                tokens[key] += out[key].size
            write(line, out)
            docs += 1
            progress.add(docs=1, tokens=sum(ids.size for ids in out.values()))
        pending.clear()
        pending_chars = 0

    try:
        # iter_records reports a record's problem before yielding it, i.e. before line_no counts it.
        records = inp.iter_records(unit, cfg.json_keys, plain, lambda kind, detail: report(kind, detail, line_no + 1),
                                   lambda n: progress.add(nbytes=n))
        for fields in records:
            line_no += 1
            if fields is None or not all(_check_text(k, t, cfg, report) for k, t in fields.items()):
                if cfg.on_error == "fail":
                    break
                continue
            if line_no <= skip_lines:
                continue
            pending.append((line_no, fields))
            pending_chars += sum(map(len, fields.values()))
            if pending_chars >= BATCH_CHARS:
                flush()
        flush()
    except OSError as exc:
        problems.append(inp.Problem(inp.UNREADABLE, unit.path, line_no + 1, str(exc)))
    if unit.error and not (problems and cfg.on_error == "fail"):
        problems.append(inp.Problem(inp.UNREADABLE, unit.path, line_no + 1, unit.error))
    if unit.start == 0 and line_no == 0 and not problems:
        problems.append(inp.Problem(inp.EMPTY_FILE, unit.path, 0, "the file has no lines"))
    problems.sort(key=lambda p: p.line)  # invalid_utf8 is found at encode time, after later lines' problems
    progress.flush()
    return UnitResult(unit.index, unit.path, line_no, docs, dict(tokens), problems, {}, verifier.finish())
