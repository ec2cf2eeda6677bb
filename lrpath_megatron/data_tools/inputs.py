"""Input files -> work units -> documents, with every bad line reported by file and line.

A work unit is a byte range of an uncompressed file (it owns the lines that *start* in the range) or a
batch of lines of a compressed file. Units are merged in order, so neither their size nor the number of
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
    disk_bytes: int = 0  # compressed bytes this unit accounts for (progress)
    error: str = ""  # the file could not be read past `data`


@dataclass
class Document:
    line: int  # line number within the unit, 1-based
    fields: dict = field(default_factory=dict)  # json key -> text


def expand_inputs(patterns: list[str]) -> tuple[list[str], list[Problem]]:
    """Globs and paths -> (existing files in order, problems for the ones that do not exist).

    Each pattern's matches are sorted; patterns keep the order given; a file named twice is read once.
    """
    files, problems, seen = [], [], set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches or not os.path.exists(matches[0]):
            problems.append(Problem(MISSING_FILE, pattern, 0, "no such file (or the glob matched nothing)"))
            continue
        for m in matches:
            if m not in seen:
                seen.add(m)
                files.append(m)
    return files, problems


def is_compressed(path: str) -> bool:
    return path.endswith(".gz")


def is_plain_text(path: str, input_format: str) -> bool:
    if input_format != "auto":
        return input_format == "text"
    name = path[:-3] if is_compressed(path) else path
    return name.endswith(".txt")


def iter_units(files: list[str], chunk_bytes: int) -> Iterator[WorkUnit]:
    """Work units in file order. Uncompressed files are cut into byte ranges that workers read themselves;
    compressed files cannot be cut, so they are decompressed here and handed out as line batches, which
    keeps a single large .gz file parallel too. Every file yields at least one unit."""
    index = 0
    for path in files:
        if not is_compressed(path):
            size = os.path.getsize(path)
            for start in range(0, max(size, 1), chunk_bytes):
                yield WorkUnit(index, path, start, min(start + chunk_bytes, size))
                index += 1
            continue
        with open(path, "rb") as raw:
            stream, batch, size, consumed, error, first = gzip.GzipFile(fileobj=raw), [], 0, 0, "", True
            while True:
                try:
                    line = stream.readline()
                except (OSError, EOFError) as exc:  # corrupt or truncated gzip
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
    """Non-empty texts of ``key`` from JSONL / text inputs, in order; bad lines and empty files are
    appended to ``problems``, as preprocessing reports them."""
    files, missing = expand_inputs(patterns)
    if missing:
        raise LrpathError(f"{missing[0]}; fix --input")
    problems = [] if problems is None else problems
    count = 0
    for path in files:
        plain = is_plain_text(path, input_format)
        line_no = 0

        def report(kind: str, detail: str) -> None:
            problems.append(Problem(kind, path, line_no, detail))

        try:
            with (gzip.open(path, "rb") if is_compressed(path) else open(path, "rb")) as lines:
                for line_no, raw in enumerate(lines, 1):
                    fields = parse_line(raw, [key], plain, report)
                    if fields is None:
                        continue
                    if not fields[key].strip():
                        report(EMPTY_DOCUMENT, f"{key!r} is empty or whitespace only")
                        continue
                    yield fields[key]
                    count += 1
                    if max_docs and count >= max_docs:
                        return
        except (OSError, EOFError) as exc:  # a corrupt or truncated .gz: the lines before it are kept
            problems.append(Problem(UNREADABLE, path, line_no + 1, f"cannot read: {exc}"))
        else:
            if line_no == 0:
                problems.append(Problem(EMPTY_FILE, path, 0, "the file has no lines"))
