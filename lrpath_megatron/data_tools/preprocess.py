"""JSONL / plain text -> megatron-core ``IndexedDataset`` files, in parallel, byte-identical for any worker count.

Output names follow Megatron-LM's ``tools/preprocess_data.py``: ``{output_prefix}_{key}_document.bin/.idx``.
Each worker tokenizes whole work units (see :mod:`lrpath_megatron.data_tools.inputs`) into its own small
.bin/.idx (:mod:`indexed_writer`, megatron-core's format byte for byte); the main process appends them in
unit order into ``*.tmp-PID.bin/.idx`` and renames those only when complete, then writes the sidecar
(:mod:`corpus_meta`). ``--backend``: :mod:`encoders`, checked on the verification sample (:mod:`sample_check`)
before anything is written; sharded, resumable output: :mod:`shards`.

Long documents: the text of one document is held in memory once and encoded in ~64 K-character pieces
(exact SentencePiece backend, models without normalisation, see :meth:`Tokenizer.encode`), so a 50 MB document
costs ~50 MB plus its token array. Documents over
``max_doc_chars`` (0 = no limit) are reported and skipped/refused like any other bad input.
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from lrpath_megatron.config import ConfigError
from lrpath_megatron.data_tools import inputs as inp
from lrpath_megatron.data_tools.corpus_meta import file_checksums, write_meta
from lrpath_megatron.data_tools.encoders import Encoder
from lrpath_megatron.data_tools.indexed_writer import DatasetWriter, optimal_dtype
from lrpath_megatron.data_tools.sample_check import (FirstDifference, SampleCheck, SwitchToExact, compare,
                                                     settle_backend)
from lrpath_megatron.errors import LrpathError


@dataclass
class PreprocessConfig:
    inputs: list
    output_prefix: str
    tokenizer_model: str
    json_keys: list = field(default_factory=lambda: ["text"])
    workers: int = 1
    append_eod: bool = True
    on_error: str = "skip"  # skip | fail
    max_doc_chars: int = 0  # 0 = no limit
    input_format: str = "auto"  # auto (.txt[.gz] = text, else JSONL) | jsonl | text (one document per line)
    chunk_bytes: int = 64 << 20  # largest work unit (bytes of input); does not change the output
    progress: bool = True
    overwrite: bool = False  # replace existing output files (else refuse before reading any input)
    max_listed: int = 10  # problems listed per kind in the summary (all are counted)
    backend: str = "exact"  # exact | fast | auto (see encoders); the CLI defaults to auto
    eod_token: str | None = None  # the EOD token's text; default: the tokenizer's eos
    # None: auto / fast check the verification sample (sample_check); N: also re-encode about N documents while
    # tokenizing and report them; -1: every document; 0: no check
    verify: int | None = None
    shard_tokens: int = 0  # sharded output: a new shard after a document brings one to this many tokens
    sharded: bool = False  # one output shard (or more, with shard_tokens) per input file; resumable
    task_index: int = 0  # this task's share of the input files (file i goes to task i % task_count)
    task_count: int = 1

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("--input: give at least one file or glob")
        if not self.output_prefix:
            raise ConfigError("--output-prefix is empty")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ConfigError(f"--json-keys={self.json_keys}: give one or more distinct keys")
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"--on-error={self.on_error!r}: choose skip or fail")
        if self.input_format not in ("auto", "jsonl", "text"):
            raise ConfigError(f"--input-format={self.input_format!r}: choose auto, jsonl or text")
        if self.workers < 1 or self.chunk_bytes < 1 or self.max_doc_chars < 0:
            raise ConfigError("--workers and --chunk-bytes must be >= 1, --max-doc-chars >= 0")
        if (self.verify is not None and self.verify < -1) or self.shard_tokens < 0:
            raise ConfigError("--verify takes a count or 'all'; --shard-tokens must be >= 0")
        if not 0 <= self.task_index < self.task_count:
            raise ConfigError(f"--task-index {self.task_index} must be in [0, --task-count {self.task_count})")
        if self.task_count > 1 and not self.is_sharded:
            raise ConfigError("--task-count > 1 splits input files into shards: add --sharded or --shard-tokens")

    @property
    def is_sharded(self) -> bool:
        return self.sharded or self.shard_tokens > 0


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


def output_prefix(prefix: str | Path, key: str) -> str:
    return f"{prefix}_{key}_document"


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


_WORKER: dict = {}  # per-process state set by _init_worker


def _init_worker(cfg: PreprocessConfig, encoder: Encoder, dtype: type, partial_dir: str, total_bytes: int,
                 sink: Callable[[tuple], None]) -> None:
    if mp.parent_process() is not None:  # a pool worker: the pool's terminate() must simply end it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # see _run_units
    _WORKER.update(cfg=cfg, dtype=dtype, partial_dir=partial_dir, total_bytes=total_bytes, progress=_Progress(sink),
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
    relative to the unit. Runs in a worker (or in-process) after :func:`_init_worker`.
    """
    cfg, enc, progress = _WORKER["cfg"], _WORKER["encoder"], _WORKER["progress"]
    plain = inp.is_plain_text(unit.path, cfg.input_format)
    unit_bytes = (unit.end - unit.start) or unit.disk_bytes
    quota = -(-cfg.verify * unit_bytes // max(1, _WORKER["total_bytes"])) if (cfg.verify or 0) > 0 else 0
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


def process_unit(unit: inp.WorkUnit) -> UnitResult:
    """Tokenize one unit into partial datasets (one per key). Runs in a worker (or in-process)."""
    partials = {k: os.path.join(_WORKER["partial_dir"], f"u{unit.index:07d}_{k}") for k in _WORKER["cfg"].json_keys}
    builders = {k: DatasetWriter(p + ".bin", _WORKER["dtype"]) for k, p in partials.items()}

    def write(_line: int, ids_by_key: dict) -> None:
        for key, ids in ids_by_key.items():
            builders[key].add_documents(ids, (ids.size,))

    result = tokenize_unit(unit, write)
    for key, builder in builders.items():
        builder.finalize(partials[key] + ".idx")
    result.partials = partials
    return result


def run_tasks(cfg: PreprocessConfig, task: Callable, units: Iterator, setup: "Setup",
              partial_dir: str) -> Iterator[UnitResult]:
    """``task(unit)`` results in unit order; a pool of forked workers when ``cfg.workers > 1``."""
    args = (cfg, setup.encoder, setup.dtype, partial_dir, setup.total_bytes)
    if cfg.workers == 1:
        _init_worker(*args, setup.on_progress)
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

    # Workers are forked with SIGTERM blocked and unblock it in _init_worker once its default action is back:
    # with the inherited Python handler, a terminate() right after the start (an early error) is swallowed
    # and pool.terminate() waits forever for a worker that never exits.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = ctx.Pool(cfg.workers, _init_worker, (*args, progress_q.put))
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


def _file_lines(results: Iterator[UnitResult], line_base: Counter, enc: Encoder) -> Iterator[UnitResult]:
    """``results``; a unit's first difference (--verify all) is raised with its line in the file: the units before
    it in its file are counted in ``line_base`` by then."""
    try:
        yield from results
    except FirstDifference as found:
        found.mismatch.line += line_base[found.mismatch.path]
        raise found.failure(enc) from None


def _remove(paths: list) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


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


def preprocess(cfg: PreprocessConfig) -> Summary:
    """Tokenize ``cfg.inputs`` into ``{output_prefix}_{key}_document.bin/.idx`` (or shards of it, see
    :mod:`lrpath_megatron.data_tools.shards`); see the module docstring."""
    cfg.validate()
    try:
        return _run(cfg)
    except SwitchToExact as switch:  # auto, --verify N|all found a difference: nothing of it is kept
        return _run(dataclasses.replace(cfg, overwrite=cfg.overwrite or cfg.is_sharded), str(switch))


def _run(cfg: PreprocessConfig, switched: str = "") -> Summary:
    outputs = {key: output_prefix(cfg.output_prefix, key) for key in cfg.json_keys}
    if cfg.is_sharded:
        from lrpath_megatron.data_tools.shards import preprocess_shards

        return preprocess_shards(cfg, outputs, switched)
    existing = [p + ext for p in outputs.values() for ext in (".bin", ".idx") if os.path.lexists(p + ext)]
    if existing and not cfg.overwrite:
        raise LrpathError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite "
                          f"to replace {'it' if len(existing) == 1 else 'them'}, or choose another --output-prefix")
    setup = prepare(cfg, switched)
    files, problems, dtype = setup.files, setup.problems, setup.dtype
    # Several units per worker keep all workers busy to the end; the output does not depend on the size.
    units = inp.iter_units(files, min(cfg.chunk_bytes, max(1 << 20, setup.total_bytes // (4 * cfg.workers))),
                           cfg.json_keys)

    tmp = {key: f"{prefix}.tmp-{os.getpid()}" for key, prefix in outputs.items()}
    parent = Path(cfg.output_prefix).parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]  # leaf first; removed again on failure
    parent.mkdir(parents=True, exist_ok=True)
    partial_dir = f"{cfg.output_prefix}.partials-{os.getpid()}"
    os.makedirs(partial_dir, exist_ok=True)
    builders = {key: DatasetWriter(t + ".bin", dtype) for key, t in tmp.items()}
    tmp_files = [t + ext for t in tmp.values() for ext in (".bin", ".idx")]

    documents, tokens, line_base, written, verification = 0, Counter(), Counter(), False, Verification()
    results = run_tasks(cfg, process_unit, units, setup, partial_dir)
    try:
        for result in _file_lines(results, line_base, setup.encoder):
            for p in result.problems:  # unit-relative -> file line numbers
                p.line += line_base[result.path] if p.line else 0
            for m in result.verification.examples:
                m.line += line_base[result.path]
            line_base[result.path] += result.lines
            problems += result.problems
            if cfg.on_error == "fail" and result.problems:
                raise LrpathError(f"{result.problems[0]} (--on-error fail: nothing was written; "
                                  f"fix the input or use --on-error skip)")
            for key, builder in builders.items():
                builder.add_index(result.partials[key])
                _remove([result.partials[key] + ".bin", result.partials[key] + ".idx"])
            documents += result.documents
            tokens.update(result.tokens)
            verification.merge(result.verification, cfg.max_listed)
            switch_if_differs(setup, verification)
        if documents == 0:
            raise LrpathError(f"no documents were written from {len(files)} file(s): "
                              f"{'; '.join(map(str, problems[:3]))}")
        summary = summarize(cfg, setup, documents, tokens, problems, outputs, verification)
        for key, builder in builders.items():
            builder.finalize(tmp[key] + ".idx")
            # .bin first: a reader never sees an .idx without its complete .bin; the sidecar comes last.
            os.replace(tmp[key] + ".bin", outputs[key] + ".bin")
            os.replace(tmp[key] + ".idx", outputs[key] + ".idx")
            write_meta(outputs[key], dataset_meta(setup, cfg, documents, tokens[key])
                       | {"files": file_checksums(outputs[key])})
        written = True
    except BaseException:
        for builder in builders.values():
            builder.data_file.close()
        _remove(tmp_files)
        raise
    finally:
        results.close()  # stops the workers before their partial files are removed
        setup.bar.close()
        shutil.rmtree(partial_dir, ignore_errors=True)
        if not written:
            for directory in made:
                with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                    directory.rmdir()
    return summary
