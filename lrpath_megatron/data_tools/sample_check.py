"""The verification sample: a fast path is checked against the reference before anything is written.

``--backend auto`` and ``fast`` (unless ``--verify 0``) draw ``SAMPLE_DOCS`` seeded random byte positions
over the input files (spread over the files in proportion to their size) and take the document after the
line each falls in (the first line after the last one), so every document can be drawn and long documents
are not favoured; in compressed files positions fall within their first ``WINDOW_BYTES`` of text, in
Parquet files on rows. Documents are kept in the order drawn until their text reaches 5% of the input's
bytes (at least ``SAMPLE_MIN_CHARS``). They are encoded with the fast path and with the reference: under
``auto`` a difference switches the whole run to the exact backend, under ``fast`` it is an error. The
sample depends on the input files alone, so ``--workers``, work units, shards and SLURM tasks all see
the same sample and make the same choice.
"""
from __future__ import annotations

import bisect
import itertools
import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import zstandard

from lrpath_megatron.data_tools import inputs as inp
from lrpath_megatron.data_tools.encoders import Encoder
from lrpath_megatron.errors import LrpathError

SAMPLE_DOCS = 300  # positions drawn; documents drawn twice count once
SAMPLE_MIN_CHARS = 1 << 20  # text the sample may hold at least (else 5% of the input's bytes)
SAMPLE_SEED = 0
WINDOW_BYTES = 8 << 20  # text read from the start of a compressed file (it cannot be entered elsewhere)
SHOWN_PIECES = 6  # pieces around the first difference in a mismatch example


@dataclass
class Mismatch:
    """A document the fast backend encoded differently from the exact one."""

    path: str
    line: int  # 0: not counted (a sampled line of an uncompressed file, found by its byte offset)
    key: str
    position: int  # first differing token
    fast: list  # pieces from there on (a few)
    exact: list
    byte: int = -1  # offset of the line in its file, where its number is not counted

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else f"{self.path} (the line at byte {self.byte})"
        return f"{where} {self.key!r} token {self.position}: fast {self.fast} != exact {self.exact}"


def compare(enc: Encoder, path: str, line: int, key: str, text: str, fast: np.ndarray,
            byte: int = -1) -> Mismatch | None:
    """The first difference between ``fast`` and the exact backend's ids of ``text`` (None if equal)."""
    exact = enc.encode_exact(text)
    if np.array_equal(exact, fast):
        return None
    n = min(len(exact), len(fast))
    at = int(np.argmax(exact[:n] != fast[:n])) if (exact[:n] != fast[:n]).any() else n
    return Mismatch(path, line, key, at, enc.pieces(fast[at:at + SHOWN_PIECES]),
                    enc.pieces(exact[at:at + SHOWN_PIECES]), byte)


class SwitchToExact(Exception):
    """auto: the fast path differed from the reference while tokenizing; the run starts again, exact."""


class FirstDifference(Exception):
    """--verify all: the first document encoded differently, raised where it is found (a worker: the line is
    relative to its work unit until the process that knows the lines before adds them)."""

    def __init__(self, mismatch: Mismatch):
        super().__init__(mismatch)
        self.mismatch = mismatch

    def failure(self, enc: Encoder) -> Exception:
        """What the run raises: auto starts again with the exact backend, fast fails."""
        if enc.requested == "auto":
            return SwitchToExact(f"--verify all: {enc.backend} differs from the exact backend at {self.mismatch}")
        return LrpathError(f"--verify all: the fast backend differs from the exact one at {self.mismatch}; "
                           f"use --backend exact")


@dataclass
class SampleCheck:
    """What the summary and every sidecar record about the verification sample."""

    backend: str  # the fast path checked
    documents: int  # distinct documents encoded both ways
    characters: int  # their text
    differing: int
    first_difference: str  # "" when none
    draws: int = SAMPLE_DOCS
    seed: int = SAMPLE_SEED

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        result = (f"{self.differing} differ, the first at {self.first_difference}" if self.differing
                  else "identical to the exact backend")
        return (f"verification sample ({self.documents} documents, {self.characters:,} characters, seed "
                f"{self.seed}): {result}")


@dataclass
class Drawn:
    """A sampled line or row: where it is, and what it holds."""

    path: str
    line: int  # 0 = not counted (uncompressed files: found by its byte offset)
    byte: int  # -1 = not known (compressed and Parquet files: found by its line)
    raw: bytes | None  # a line of JSONL / text
    row: tuple | None = None  # a Parquet row of the keys' values


def _plain_lines(path: str, offsets: list[int]) -> list[Drawn | None]:
    drawn = []
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            f.readline()  # the rest of the line holding the offset
            start, raw = f.tell(), f.readline()
            if not raw:  # the offset fell in the last line: the first one follows it
                f.seek(0)
                start, raw = 0, f.readline()
            drawn.append(Drawn(path, 0, start, raw))
    return drawn


def _window_lines(path: str, fractions: list[float]) -> list[Drawn | None]:
    lines, size = [], 0
    try:
        with open(path, "rb") as raw, inp.open_decompressed(raw) as stream:
            while size < WINDOW_BYTES and (line := stream.readline()):
                lines.append(line)
                size += len(line)
    except (OSError, EOFError, zstandard.ZstdError):  # corrupt: the run reports it; lines read so far count
        pass
    return [Drawn(path, int(f * len(lines)) + 1, -1, lines[int(f * len(lines))]) if lines else None
            for f in fractions]


def _parquet_rows(path: str, fractions: list[float], keys: list[str]) -> list[Drawn | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    drawn: list[Drawn | None] = []
    try:
        table = pq.ParquetFile(path)
        starts = list(itertools.accumulate(table.metadata.row_group(g).num_rows
                                           for g in range(table.num_row_groups)))
        read, columns = -1, None
        for fraction in fractions:  # in order: each row group is read once
            row = int(fraction * table.metadata.num_rows)
            group = bisect.bisect_right(starts, row)
            if group != read:
                read, columns = group, table.read_row_group(group, columns=keys)
            offset = row - (starts[group - 1] if group else 0)
            drawn.append(Drawn(path, row + 1, -1, None, tuple(columns.column(k)[offset].as_py() for k in keys)))
    except (pa.ArrowException, OSError, KeyError):  # unreadable or without the keys: the run reports it
        pass
    return drawn + [None] * (len(fractions) - len(drawn))


def _read_drawn(files: list[str], sizes: list[int], offsets: list[int], keys: list[str]) -> list[Drawn | None]:
    """The document at each of the sorted global byte ``offsets``, reading each file once, in order."""
    ends, per_file = list(itertools.accumulate(sizes)), {}
    for offset in offsets:
        i = bisect.bisect_right(ends, offset)
        per_file.setdefault(i, []).append(offset - (ends[i - 1] if i else 0))
    drawn = []
    for i, within in per_file.items():
        path = files[i]
        if inp.is_parquet(path):
            drawn += _parquet_rows(path, [o / sizes[i] for o in within], keys)
        elif inp.is_compressed(path):
            drawn += _window_lines(path, [o / sizes[i] for o in within])
        else:
            drawn += _plain_lines(path, within)
    return drawn


def draw_sample(files: list[str], keys: list[str], input_format: str = "auto", max_doc_chars: int = 0,
                draws: int = SAMPLE_DOCS, seed: int = SAMPLE_SEED) -> list[tuple[Drawn, dict]]:
    """(where, {key: text}) of the sampled documents, in input order. Documents are taken in the order they
    were drawn until their text reaches 5% of the input's bytes (at least SAMPLE_MIN_CHARS): on a small input,
    the sample costs little of what the fast path saves. Unusable lines are left out (the run reports them)."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    if not total:
        return []
    rng = random.Random(seed)
    positions = [rng.randrange(total) for _ in range(draws)]
    order = sorted(range(draws), key=positions.__getitem__)
    at_sorted = _read_drawn(files, sizes, [positions[i] for i in order], keys)
    drawn = dict(zip(order, at_sorted))
    sample, seen, chars, budget = [], set(), 0, max(SAMPLE_MIN_CHARS, total // 20)
    for doc in (drawn[i] for i in range(draws)):
        fields = None if doc is None else _fields(doc, keys, inp.is_plain_text(doc.path, input_format),
                                                   max_doc_chars)
        if fields is None or (doc.path, doc.line, doc.byte) in seen:
            continue
        seen.add((doc.path, doc.line, doc.byte))
        sample.append((doc, fields))
        chars += sum(map(len, fields.values()))
        if chars >= budget:
            break
    rank = {path: i for i, path in enumerate(files)}
    return sorted(sample, key=lambda item: (rank[item[0].path], item[0].line, item[0].byte))


def _fields(doc: Drawn, keys: list[str], plain: bool, max_doc_chars: int) -> dict | None:
    if doc.row is not None:
        fields = dict(zip(keys, doc.row))
    else:
        fields = inp.parse_line(doc.raw, keys, plain, lambda kind, detail: None)
    if fields is None or not all(isinstance(t, str) and t and not t.isspace() for t in fields.values()):
        return None
    return None if max_doc_chars and any(len(t) > max_doc_chars for t in fields.values()) else fields


def check_sample(enc: Encoder, sample: list[tuple[Drawn, dict]]) -> SampleCheck:
    """Encode the sample with the encoder's fast path and with the reference; count the documents that differ."""
    keys = list(sample[0][1]) if sample else []
    ids = {key: enc.encode_batch([fields[key] for _, fields in sample]) for key in keys}
    documents, characters, differing, first = 0, 0, 0, None
    for i, (doc, fields) in enumerate(sample):
        if any(ids[key][i] is None for key in keys):  # no UTF-8 form: the run reports it
            continue
        documents, characters = documents + 1, characters + sum(map(len, fields.values()))
        found = [m for key in keys
                 if (m := compare(enc, doc.path, doc.line, key, fields[key], ids[key][i], doc.byte)) is not None]
        differing += bool(found)
        first = first or (found[0] if found else None)
    return SampleCheck(enc.backend, documents, characters, differing, str(first) if first else "")


def settle_backend(enc: Encoder, files: list[str], keys: list[str], input_format: str, max_doc_chars: int,
                   verify: int | None) -> SampleCheck | None:
    """Check the fast path taken on the verification sample before anything is written: ``auto`` turns to
    the exact backend at a difference, ``fast`` refuses. Not drawn for the exact backend, with ``--verify 0``,
    nor under ``fast`` with ``--verify N`` (then the run measures N documents and reports them)."""
    if enc.backend == "exact" or verify == 0 or (enc.requested == "fast" and verify is not None):
        return None
    check = check_sample(enc, draw_sample(files, keys, input_format, max_doc_chars))
    if check.differing and enc.requested == "fast":
        raise LrpathError(f"--backend fast: gigatoken differs from the exact backend on the verification sample "
                          f"({check.differing} of {check.documents} documents), first at {check.first_difference}; "
                          f"nothing was written. Use --backend auto (an exact path for this tokenizer) or exact; "
                          f"--verify N measures the rate, --verify 0 writes gigatoken's ids unchecked")
    if check.differing:
        enc.use_exact(f"auto: {check.backend} differs from the exact backend on the verification sample at "
                      f"{check.first_difference}, so the exact backend")
    return check
