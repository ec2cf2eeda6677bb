"""Input files -> work units -> documents, with every bad line reported by file and line.

Inputs: JSONL or text, plain, ``.gz`` or ``.zst``, and Parquet (the ``--json-keys`` columns); files,
directories (their input files, recursively, sorted) and globs. A work unit is a byte range of an
uncompressed file (it owns the lines that *start* in the range), a batch of lines of a compressed file,
or a batch of rows of a Parquet file. Units are merged in order, so neither their size nor the number of
workers changes the output.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import zstandard

from lrpath_megatron.errors import LrpathError

# Problem kinds: what the summary counts (each also names a file and line).
MALFORMED_JSON = "malformed_json"
MISSING_KEY = "missing_key"
NOT_A_STRING = "not_a_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY_DOCUMENT = "empty_document"
TOO_LONG = "too_long"
EMPTY_FILE = "empty_file"
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable"


@dataclass
class Problem:
    kind: str
    path: str
    line: int  # 1-based; 0 = the whole file
    detail: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class WorkUnit:
    """A byte range [start, end) of an uncompressed file, or (compressed files) lines read by the main process."""

    index: int
    path: str
    start: int = 0
    end: int = 0
    data: bytes | None = None  # complete decompressed lines; None = read the byte range from disk
    rows: list | None = None  # Parquet: one tuple of --json-keys column values per row
    disk_bytes: int = 0  # compressed bytes this unit accounts for (progress)
    error: str = ""  # the file could not be read past `data`


@dataclass
class Document:
    line: int  # line number within the unit, 1-based
    fields: dict = field(default_factory=dict)  # json key -> text


TEXT_UNIT_BYTES = 16 << 20  # work-unit size when reading texts in one process (tokenizer training)
PARQUET_ROWS = 8192  # rows per Parquet work unit (does not change the output)
INPUT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".gz", ".zst")  # what a directory contributes


def _directory_files(path: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                  if name.endswith(INPUT_SUFFIXES))


def expand_inputs(patterns: list[str]) -> tuple[list[str], list[Problem]]:
    """Globs, directories and paths -> (existing files in order, problems for the ones that do not exist).

    Each pattern's matches are sorted (a directory stands for its input files, recursively); patterns keep
    the order given; a file named twice is read once.
    """
    files, problems, seen = [], [], set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [f for m in matches for f in (_directory_files(m) if os.path.isdir(m) else [m])]
        if not matches or not os.path.exists(matches[0]):
            problems.append(Problem(MISSING_FILE, pattern, 0, "no such file (or the glob matched nothing)"))
            continue
        for m in matches:
            if m not in seen:
                seen.add(m)
                files.append(m)
    return files, problems


def is_compressed(path: str) -> bool:
    return path.endswith((".gz", ".zst"))


def is_parquet(path: str) -> bool:
    return path.endswith(".parquet")


def is_plain_text(path: str, input_format: str) -> bool:
    if input_format != "auto":
        return input_format == "text"
    return path.removesuffix(".gz").removesuffix(".zst").endswith(".txt")


def open_decompressed(raw) -> io.BufferedIOBase:
    """A line-readable stream of the decompressed bytes of an open .gz / .zst file."""
    if getattr(raw, "name", "").endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return gzip.GzipFile(fileobj=raw)


def _parquet_units(path: str, keys: list[str], index: int) -> Iterator[WorkUnit]:
    """Row batches of the ``keys`` columns; a missing column is an error (a wrong --json-keys, not bad data)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        yield WorkUnit(index, path, error=f"cannot read Parquet: {exc}")
        return
    missing = [k for k in keys if k not in names]
    if missing:
        raise LrpathError(f"{path}: no column {missing[0]!r} (columns: {names[:8]}); set --json-keys to the "
                          f"text column; nothing was written")
    first, bytes_per_row = True, os.path.getsize(path) / max(1, table.metadata.num_rows)
    try:
        for batch in table.iter_batches(batch_size=PARQUET_ROWS, columns=keys):
            yield WorkUnit(index, path, rows=list(zip(*(batch.column(k).to_pylist() for k in keys))),
                           disk_bytes=int(batch.num_rows * bytes_per_row))
            index, first = index + 1, False
    except (pa.ArrowException, OSError) as exc:  # a corrupt page: the rows before it are kept
        yield WorkUnit(index, path, rows=[], error=f"cannot read Parquet: {exc}")
        return
    if first:
        yield WorkUnit(index, path, rows=[])


def iter_units(files: list[str], chunk_bytes: int, keys: list[str] | None = None) -> Iterator[WorkUnit]:
    """Work units in file order. Uncompressed files are cut into byte ranges that workers read themselves;
    compressed files cannot be cut, so they are decompressed here and handed out as line batches, which
    keeps a single large .gz file parallel too; Parquet files are read here in row batches of the ``keys``
    columns. Every file yields at least one unit."""
    index = 0
    for path in files:
        if is_parquet(path):
            for unit in _parquet_units(path, keys or ["text"], index):
                yield unit
                index = unit.index + 1
            continue
        if not is_compressed(path):
            size = os.path.getsize(path)
            for start in range(0, max(size, 1), chunk_bytes):
                yield WorkUnit(index, path, start, min(start + chunk_bytes, size))
                index += 1
            continue
        with open(path, "rb") as raw:
            stream, batch, size, consumed, error, first = open_decompressed(raw), [], 0, 0, "", True
            while True:
                try:
                    line = stream.readline()
                except (OSError, EOFError, zstandard.ZstdError) as exc:  # corrupt or truncated
                    line, error = b"", f"cannot decompress: {exc}"
                if line:
                    batch.append(line)
                    size += len(line)
                if size >= chunk_bytes or not line:
                    if batch or first or error:
                        yield WorkUnit(index, path, data=b"".join(batch), disk_bytes=raw.tell() - consumed,
                                       error=error)
                        index, consumed, first = index + 1, raw.tell(), False
                    batch, size = [], 0
                if not line:
                    break


def iter_records(unit: WorkUnit, keys: list[str], plain_text: bool, report: Callable[[str, str], None],
                 progress: Callable[[int], None]) -> Iterator[dict | None]:
    """{key: text} per line / row of ``unit`` (None after reporting why one is unusable)."""
    if unit.rows is None:
        for raw in read_lines(unit, progress):
            yield parse_line(raw, keys, plain_text, report)
        return
    for row in unit.rows:
        bad = next((k for k, v in zip(keys, row) if not isinstance(v, str)), None)
        if bad is not None:
            report(NOT_A_STRING, f"column {bad!r} is {'null' if row[keys.index(bad)] is None else 'not a string'}")
            yield None
        else:
            yield dict(zip(keys, row))
    progress(unit.disk_bytes)


def read_lines(unit: WorkUnit, progress: Callable[[int], None]) -> Iterator[bytes]:
    """Raw lines (with their newline) of ``unit``; ``progress`` gets the bytes accounted on disk."""
    if unit.data is not None:
        yield from io.BytesIO(unit.data)
        progress(unit.disk_bytes)
        return
    with open(unit.path, "rb") as raw:
        pos = unit.start if unit.start == 0 else _first_line_start(raw, unit.start, unit.end)
        raw.seek(pos)
        while pos < unit.end:
            line = raw.readline()
            if not line:
                break
            pos += len(line)
            progress(len(line))
            yield line


def _first_line_start(raw, start: int, end: int) -> int:
    """Offset of the first line starting in [start, end) (``end`` if none): the line straddling ``start``
    belongs to the previous unit. Scans in blocks, never past ``end``, so a huge line is not read whole."""
    pos = start - 1
    raw.seek(pos)
    while pos < end:
        block = raw.read(min(1 << 20, end - pos))
        if not block:
            break
        newline = block.find(b"\n")
        if newline >= 0:
            return pos + newline + 1
        pos += len(block)
    return end


def parse_line(
    raw: bytes, keys: list[str], plain_text: bool, report: Callable[[str, str], None]
) -> dict | None:
    """One raw line -> {key: text}, or None after reporting why it is unusable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report(INVALID_UTF8, f"byte {exc.start} of the line is not UTF-8 ({raw[exc.start:exc.start + 4]!r})")
        return None
    if plain_text:
        return {keys[0]: line[:-1] if line.endswith("\n") else line}
    if not line.strip():
        report(EMPTY_DOCUMENT, "blank line")
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        report(MALFORMED_JSON, f"{exc.msg} at column {exc.colno}")
        return None
    if not isinstance(obj, dict):
        report(MALFORMED_JSON, f"a line must be a JSON object, got {type(obj).__name__}")
        return None
    fields = {}
    for key in keys:
        if key not in obj:
            report(MISSING_KEY, f"no key {key!r} (keys: {sorted(obj)[:8]}); set --json-keys")
            return None
        if not isinstance(obj[key], str):
            report(NOT_A_STRING, f"{key!r} is a {type(obj[key]).__name__}, not a string")
            return None
        fields[key] = obj[key]
    return fields


def iter_texts(patterns: list[str], key: str = "text", input_format: str = "auto", max_docs: int = 0,
               problems: list[Problem] | None = None) -> Iterator[str]:
    """Non-empty texts of ``key`` from the inputs preprocessing reads, in order; bad lines and empty files
    are appended to ``problems``, as preprocessing reports them."""
    files, missing = expand_inputs(patterns)
    if missing:
        raise LrpathError(f"{missing[0]}; fix --input")
    problems = [] if problems is None else problems
    count, line_base = 0, {}
    for unit in iter_units(files, TEXT_UNIT_BYTES, [key]):
        line_no = line_base.get(unit.path, 0)

        def report(kind: str, detail: str) -> None:  # (called before the record is counted)
            problems.append(Problem(kind, unit.path, line_no + 1, detail))

        try:
            for fields in iter_records(unit, [key], is_plain_text(unit.path, input_format), report, lambda n: None):
                line_no += 1
                if fields is None:
                    continue
                if not fields[key].strip():
                    problems.append(Problem(EMPTY_DOCUMENT, unit.path, line_no, f"{key!r} is empty or whitespace only"))
                    continue
                yield fields[key]
                count += 1
                if max_docs and count >= max_docs:
                    return
        except OSError as exc:
            problems.append(Problem(UNREADABLE, unit.path, line_no + 1, f"cannot read: {exc}"))
        if unit.error:  # corrupt/truncated: the lines before are kept
            problems.append(Problem(UNREADABLE, unit.path, line_no + 1, unit.error))
        if unit.path not in line_base and line_no == 0 and not unit.error:
            problems.append(Problem(EMPTY_FILE, unit.path, 0, "the file has no lines"))
        line_base[unit.path] = line_no
