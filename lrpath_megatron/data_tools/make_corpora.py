"""Rebuild the corpora shipped in ``data/corpora/`` from the Python 3.11 standard library (PSF license).

Four domains, each a gzipped JSONL file with one ``{"text": ...}`` document per line:

- ``docs``: English prose - every pydoc topic of ``pydoc_data/topics.py`` (one document per topic), then
  the docstrings (module, class, function) of the standard-library modules used by neither code corpus,
  one document per module.
- ``code_a``: Python source of email, html, http, json, logging, urllib, wsgiref, xml, xmlrpc (one file
  per document; files under 200 characters, i.e. package markers, are left out).
- ``code_b``: Python source of asyncio, concurrent, importlib, multiprocessing, unittest.
- ``c_headers``: the CPython C API headers (``include/python3.11``), one header per document - a fourth,
  distinct style used as the "new" corpus of adapter experiments.

Deterministic: files are visited in sorted order, test packages are skipped, and gzip carries no name or
timestamp, so the same interpreter build produces byte-identical files. The script
``data_tools/make_corpora.py`` runs :func:`write_corpora`.
"""
from __future__ import annotations

import ast
import gzip
import io
import json
import sysconfig
from pathlib import Path

CODE_A = ["email", "html", "http", "json", "logging", "urllib", "wsgiref", "xml", "xmlrpc"]
CODE_B = ["asyncio", "concurrent", "importlib", "multiprocessing", "unittest"]
# Packages that are tests, tools or vendored data rather than library prose/code.
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "lib2to3", "idlelib",
             "turtledemo", "ensurepip", "distutils", "config-3.11-x86_64-linux-gnu", "lib-dynload"}
MIN_CHARS = 200


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _py_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_documents(packages: list[str]) -> list[str]:
    lib = _stdlib()
    # Files under MIN_CHARS are package markers ("# This directory is a Python package."), not code.
    texts = (_read(path) for pkg in packages for path in _py_files(lib / pkg))
    return [text for text in texts if len(text.strip()) >= MIN_CHARS]


def _docstrings(source: str) -> str:
    """Module, class and function docstrings of one module, in source order, blank-line separated."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                   ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    parts = [doc for n in nodes if (doc := ast.get_docstring(n))]
    return "\n\n".join(parts)


def docs_documents() -> list[str]:
    from pydoc_data.topics import topics  # the interpreter's own help() texts

    documents = [topics[name] for name in sorted(topics)]
    lib = _stdlib()
    used = set(CODE_A + CODE_B)
    for path in _py_files(lib):
        top = path.relative_to(lib).parts[0].removesuffix(".py")
        if top in used or top.startswith("_"):
            continue
        text = _docstrings(_read(path))
        if len(text) >= MIN_CHARS:  # a stub docstring adds no prose
            documents.append(text)
    return documents


def header_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["include"])
    return [text for path in sorted(root.rglob("*.h")) if len((text := _read(path)).strip()) >= MIN_CHARS]


def write_jsonl_gz(path: Path, documents: list[str]) -> int:
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: reproducible bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for text in documents:
            gz.write(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def write_corpora(out: Path) -> dict[str, tuple[int, int, int]]:
    """Write every corpus to ``out/{name}.jsonl.gz``; returns {name: (documents, characters, gzipped bytes)}."""
    out.mkdir(parents=True, exist_ok=True)
    corpora = {
        "docs": docs_documents(),
        "code_a": code_documents(CODE_A),
        "code_b": code_documents(CODE_B),
        "c_headers": header_documents(),
    }
    return {name: (len(documents), sum(map(len, documents)), write_jsonl_gz(out / f"{name}.jsonl.gz", documents))
            for name, documents in corpora.items()}
