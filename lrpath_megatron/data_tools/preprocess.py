"""JSONL / plain text -> megatron-core ``IndexedDataset`` files, in parallel, byte-identical for any worker count.

Output names follow Megatron-LM's ``tools/preprocess_data.py``: ``{output_prefix}_{key}_document.bin/.idx``.
Each worker tokenizes whole work units (see :mod:`lrpath_megatron.data_tools.inputs`) into its own small
.bin/.idx with megatron-core's ``IndexedDatasetBuilder``; the main process appends them in unit order with
``IndexedDatasetBuilder.add_index`` into ``*.tmp-PID.bin/.idx`` and renames those only when complete.

Long documents: the text of one document is held in memory once and encoded in ~64 K-character pieces
(see :meth:`Tokenizer.encode`), so a 50 MB document costs ~50 MB plus its token array. Documents over
``max_doc_chars`` (0 = no limit) are reported and skipped/refused like any other bad input.
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import shutil
import signal
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
from lrpath_megatron.data_tools.tokenizer import Tokenizer
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


@dataclass
class UnitResult:
    index: int
    path: str
    lines: int
    documents: int
    tokens: dict  # key -> tokens written (EOD included)
    problems: list  # Problem, lines relative to the unit
    partials: dict  # key -> partial dataset prefix


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

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)

    def format(self) -> str:
        lines = [f"{self.documents} documents from {self.files} files in {self.seconds:.1f} s "
                 f"({self.tokens_per_second:,.0f} tokens/s), dtype {self.dtype}"]
        lines += [f"  {key}: {n:,} tokens -> {self.outputs[key]}.bin/.idx" for key, n in self.tokens.items()]
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


def _init_worker(cfg: PreprocessConfig, dtype: type, partial_dir: str, sink: Callable[[tuple], None]) -> None:
    if mp.parent_process() is not None:  # a pool worker: the pool's terminate() must simply end it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # see _run_units
    _WORKER.update(cfg=cfg, dtype=dtype, partial_dir=partial_dir, tokenizer=Tokenizer(cfg.tokenizer_model),
                   progress=_Progress(sink))


def _encode_fields(fields: dict, cfg: PreprocessConfig, tok: Tokenizer, report) -> dict | None:
    encoded = {}
    for key, text in fields.items():
        if cfg.max_doc_chars and len(text) > cfg.max_doc_chars:
            report(inp.TOO_LONG, f"{key!r} has {len(text):,} characters > --max-doc-chars={cfg.max_doc_chars:,}")
            return None
        if not text or text.isspace():  # (no stripped copy of a possibly huge text)
            report(inp.EMPTY_DOCUMENT, f"{key!r} is empty or whitespace only")
            return None
        try:
            ids = tok.encode(text)
        except (UnicodeEncodeError, TypeError):  # sentencepiece's answer to lone surrogates (JSON "\\ud800")
            at = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), -1)
            report(inp.INVALID_UTF8, f"{key!r} has an unpaired surrogate at character {at}, not encodable as UTF-8")
            return None
        encoded[key] = np.append(ids, tok.eod_id) if cfg.append_eod else ids
    return encoded


def process_unit(unit: inp.WorkUnit) -> UnitResult:
    """Tokenize one unit into partial datasets (one per key). Runs in a worker (or in-process)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    cfg, tok, progress = _WORKER["cfg"], _WORKER["tokenizer"], _WORKER["progress"]
    plain = inp.is_plain_text(unit.path, cfg.input_format)
    partials = {k: os.path.join(_WORKER["partial_dir"], f"u{unit.index:07d}_{k}") for k in cfg.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype=_WORKER["dtype"]) for k, p in partials.items()}
    problems, tokens, docs, line_no = [], Counter(), 0, 0

    def report(kind: str, detail: str) -> None:
        problems.append(inp.Problem(kind, unit.path, line_no, detail))

    try:
        for raw in inp.read_lines(unit, lambda n: progress.add(nbytes=n)):
            line_no += 1
            fields = inp.parse_line(raw, cfg.json_keys, plain, report)
            encoded = None if fields is None else _encode_fields(fields, cfg, tok, report)
            if encoded is None:
                if cfg.on_error == "fail":
                    break
                continue
            for key, ids in encoded.items():
                builders[key].add_document(ids, [ids.size])
                tokens[key] += ids.size
            docs += 1
            progress.add(docs=1, tokens=sum(ids.size for ids in encoded.values()))
    except OSError as exc:
        problems.append(inp.Problem(inp.UNREADABLE, unit.path, line_no + 1, str(exc)))
    if unit.error and not (problems and cfg.on_error == "fail"):
        problems.append(inp.Problem(inp.UNREADABLE, unit.path, line_no + 1, unit.error))
    if unit.start == 0 and line_no == 0 and not problems:
        problems.append(inp.Problem(inp.EMPTY_FILE, unit.path, 0, "the file has no lines"))
    for key, builder in builders.items():
        builder.finalize(partials[key] + ".idx")
    progress.flush()
    return UnitResult(unit.index, unit.path, line_no, docs, dict(tokens), problems, partials)


def _run_units(cfg: PreprocessConfig, units: Iterator[inp.WorkUnit], dtype: type, partial_dir: str,
               sink: Callable[[tuple], None]) -> Iterator[UnitResult]:
    """Results in unit order; a pool of forked workers when ``cfg.workers > 1``."""
    if cfg.workers == 1:
        _init_worker(cfg, dtype, partial_dir, sink)
        yield from map(process_unit, units)
        return
    ctx = mp.get_context("fork")  # workers inherit the imported modules (megatron-core import is slow)
    progress_q = ctx.Queue()
    drainer = threading.Thread(target=_drain, args=(progress_q, sink), daemon=True)
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
        pool = ctx.Pool(cfg.workers, _init_worker, (cfg, dtype, partial_dir, progress_q.put))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        for result in pool.imap(process_unit, feed()):
            slots.release()
            yield result
        pool.close()
    finally:
        stop.set()
        slots.release()  # wake a feeder blocked on a slot so the pool can shut down
        pool.terminate()
        pool.join()
        progress_q.put(None)
        drainer.join()


def _drain(q: "mp.Queue", sink: Callable[[tuple], None]) -> None:
    while (item := q.get()) is not None:
        sink(item)


def _remove(paths: list) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def preprocess(cfg: PreprocessConfig) -> Summary:
    """Tokenize ``cfg.inputs`` into ``{output_prefix}_{key}_document.bin/.idx``; see the module docstring."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    cfg.validate()
    outputs = {key: output_prefix(cfg.output_prefix, key) for key in cfg.json_keys}
    existing = [p + ext for p in outputs.values() for ext in (".bin", ".idx") if os.path.lexists(p + ext)]
    if existing and not cfg.overwrite:
        raise LrpathError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite "
                          f"to replace {'it' if len(existing) == 1 else 'them'}, or choose another --output-prefix")
    started = time.monotonic()
    tok = Tokenizer(cfg.tokenizer_model)
    if cfg.append_eod and tok.eod_id < 0:
        raise LrpathError(f"{tok.path} has no eos piece to use as EOD; retrain it or pass --no-append-eod")
    dtype = DType.optimal_dtype(tok.vocab_size)
    files, problems = inp.expand_inputs(cfg.inputs)
    if problems and cfg.on_error == "fail":
        raise LrpathError(f"{problems[0]}; nothing was written")
    if not files:
        raise LrpathError(f"no input files: {'; '.join(map(str, problems))}")
    total_bytes = sum(os.path.getsize(f) for f in files)
    # Several units per worker keep all workers busy to the end; the output does not depend on the size.
    units = inp.iter_units(files, min(cfg.chunk_bytes, max(1 << 20, total_bytes // (4 * cfg.workers))))

    tmp = {key: f"{prefix}.tmp-{os.getpid()}" for key, prefix in outputs.items()}
    parent = Path(cfg.output_prefix).parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]  # leaf first; removed again on failure
    parent.mkdir(parents=True, exist_ok=True)
    partial_dir = f"{cfg.output_prefix}.partials-{os.getpid()}"
    os.makedirs(partial_dir, exist_ok=True)
    builders = {key: IndexedDatasetBuilder(t + ".bin", dtype=dtype) for key, t in tmp.items()}
    tmp_files = [t + ext for t in tmp.values() for ext in (".bin", ".idx")]

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

    documents, tokens, line_base, written = 0, Counter(), Counter(), False
    results = _run_units(cfg, units, dtype, partial_dir, on_progress)
    # add_index runs gc.collect() per unit; with torch and megatron-core loaded that scans millions of
    # objects (~0.2 s). Freezing the objects that exist now makes each collection cheap.
    gc.freeze()
    try:
        for result in results:
            for p in result.problems:  # unit-relative -> file line numbers
                p.line += line_base[result.path] if p.line else 0
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
        if documents == 0:
            raise LrpathError(f"no documents were written from {len(files)} file(s): "
                              f"{'; '.join(map(str, problems[:3]))}")
        for key, builder in builders.items():
            builder.finalize(tmp[key] + ".idx")
            # .bin first: a reader never sees an .idx without its complete .bin.
            os.replace(tmp[key] + ".bin", outputs[key] + ".bin")
            os.replace(tmp[key] + ".idx", outputs[key] + ".idx")
        written = True
    except BaseException:
        for builder in builders.values():
            builder.data_file.close()
        _remove(tmp_files)
        raise
    finally:
        results.close()  # stops the workers before their partial files are removed
        gc.unfreeze()
        bar.close()
        shutil.rmtree(partial_dir, ignore_errors=True)
        if not written:
            for directory in made:
                with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                    directory.rmdir()

    skipped = Counter(p.kind for p in problems)
    listed, per_kind = [], Counter()
    for p in problems:
        per_kind[p.kind] += 1
        if per_kind[p.kind] <= cfg.max_listed:
            listed.append(p)
    return Summary(len(files), documents, {k: tokens[k] for k in cfg.json_keys}, dict(skipped), listed,
                   outputs, np.dtype(dtype).name, time.monotonic() - started)
