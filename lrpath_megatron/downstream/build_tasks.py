"""Builds the shipped tasks (``lrpath_megatron/task_data/*.jsonl``) from the shipped Python corpora,
deterministically: ``python -m lrpath_megatron.downstream.build_tasks`` rewrites the same files.

code_next_line: three lines of a file, then four candidate next lines: the real one and three lines of the
same indentation from other files. docstring_match: a function's ``def`` line and the opening quotes of its
docstring, then four first docstring lines: its own and three of other functions.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lrpath_megatron.data_tools.demo import iter_corpus
from lrpath_megatron.task_dirs import SHIPPED_DIR

SOURCES = ("code_a", "code_b")  # the shipped Python corpora
DOCS = 100  # documents per task
CHOICES = 4
CONTEXT_LINES = 3
SEED = 0
_DEF = re.compile(r'^([ \t]*)(def \w+\([^\n]{0,60}\)(?: -> [^\n:]+)?:)\n\1[ \t]+"""([^\n]{10,80})$', re.M)


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _code_next_line(files: list[str], rng: random.Random) -> list[dict]:
    # A candidate next line says something of its own: long enough, not a comment or a lone bracket.
    usable = lambda s: len(s.strip()) >= 20 and not s.strip().startswith(("#", '"', "'"))  # noqa: E731
    lines = [f.split("\n") for f in files]
    by_indent: dict[str, list[tuple[int, str]]] = {}
    for i, file_lines in enumerate(lines):
        for line in file_lines:
            if usable(line):
                by_indent.setdefault(_indent(line), []).append((i, line))
    spots = [(i, n) for i, file_lines in enumerate(lines) for n in range(CONTEXT_LINES, len(file_lines))
             if usable(file_lines[n]) and all(s.strip() for s in file_lines[n - CONTEXT_LINES:n])]
    docs = []
    for i, n in rng.sample(spots, len(spots)):
        real = lines[i][n]
        others = sorted({s for j, s in by_indent.get(_indent(real), []) if j != i and s != real})
        if len(others) < CHOICES - 1:
            continue
        docs.append(_doc("\n".join(lines[i][n - CONTEXT_LINES:n]) + "\n", real, rng.sample(others, CHOICES - 1), rng))
        if len(docs) == DOCS:
            break
    return docs


def _docstring_match(files: list[str], rng: random.Random) -> list[dict]:
    found: dict[str, tuple[int, str, str]] = {}  # summary -> (file, indent, def line); a summary counts once
    for i, text in enumerate(files):
        for m in _DEF.finditer(text):
            summary = m.group(3).strip().removesuffix('"""').strip()
            found.setdefault(summary, (i, m.group(1), m.group(2)))
    summaries = sorted(found)
    docs = []
    for summary in rng.sample(summaries, min(DOCS, len(summaries))):
        i, indent, signature = found[summary]
        others = [s for s in summaries if found[s][0] != i]
        docs.append(_doc(f'{indent}{signature}\n{indent}    """', summary, rng.sample(others, CHOICES - 1), rng))
    return docs


def _doc(context: str, real: str, others: list[str], rng: random.Random) -> dict:
    label = rng.randrange(CHOICES)
    return {"context": context, "choices": others[:label] + [real] + others[label:], "label": label}


BUILDERS = {"code_next_line": _code_next_line, "docstring_match": _docstring_match}


def build(out_dir: Path = SHIPPED_DIR) -> dict[str, int]:
    """Writes ``<task>.jsonl`` per shipped task into ``out_dir``; returns the documents per task."""
    files = [text for name in SOURCES for text in iter_corpus(name)]
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, builder in BUILDERS.items():
        docs = builder(files, random.Random(f"{SEED}:{name}"))
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        counts[name] = len(docs)
    return counts


if __name__ == "__main__":
    for task, n in build().items():
        print(f"{task}: {n} documents -> {SHIPPED_DIR / task}.jsonl")
