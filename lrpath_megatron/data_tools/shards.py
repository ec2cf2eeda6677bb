"""Sharded, resumable preprocessing: one or more output shards per input file.

Input file ``F`` (its index in the expanded ``--input`` list) becomes shards
``{output-prefix}_{key}_document_{F:05d}_{P:05d}.bin/.idx``, P = 0, 1, ...: with ``--shard-tokens N`` a shard
ends after the document that brings it to N tokens (of the first key; all keys share the cuts), else one
shard holds the whole file. Every shard is written as ``*.bin.tmp``/``*.idx.tmp`` (never matched by a shard glob's ``.idx``), renamed, and then gets its sidecar
(:mod:`corpus_meta`) with checksums and the input lines it holds: a shard is complete iff its sidecar exists
and its files match the checksums. A rerun keeps complete shards, re-reads the file only past them and
rebuilds the rest, so a run killed at any moment resumes, and the shards' bytes depend only on the input,
the tokenizer, the backend and N (not on ``--workers`` or where a run stopped). File F belongs to task
``F % --task-count``: the tasks of a SLURM array (or one process with ``--workers``) share nothing but the
file system. Whichever task finds every file's shards complete writes the corpus manifest
``{output-prefix}_{key}_document.meta.json``.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from lrpath_megatron.data_tools import inputs as inp
from lrpath_megatron.data_tools.corpus_meta import (check_same_tokenizer, file_checksums, meta_path,
                                                    read_corpus_meta, write_meta)
from lrpath_megatron.data_tools.encoders import Encoder
from lrpath_megatron.data_tools.indexed_writer import DatasetWriter
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig, output_prefix
from lrpath_megatron.data_tools.preprocess_run import (Summary, dataset_meta, prepare, remove_files, run_tasks,
                                                       summarize, switch_if_differs)
from lrpath_megatron.data_tools.sample_check import FirstDifference
from lrpath_megatron.data_tools.tokenize_worker import WORKER, UnitResult, Verification, tokenize_unit
from lrpath_megatron.errors import LrpathError


def shard_prefix(output: str, file_index: int, part: int) -> str:
    return f"{output}_{file_index:05d}_{part:05d}"


def _intact(prefix: str, meta) -> bool:
    if not meta.files:  # the marker of a file without documents
        return meta.documents == 0
    try:
        return file_checksums(prefix) == meta.files
    except OSError:
        return False


def complete_parts(cfg: PreprocessConfig, base: dict, file_index: int, path: str,
                   check: bool = True) -> list:
    """Sidecars of the leading complete shards of input ``file_index`` (of the first key).

    A shard made with another tokenizer, backend, --shard-tokens or input is an error naming it: a corpus
    is never a mix. ``check=False`` trusts the sidecars (another task checked its own shards)."""
    outputs = {k: output_prefix(cfg.output_prefix, k) for k in cfg.json_keys}
    kept = []
    while True:
        prefixes = {k: shard_prefix(o, file_index, len(kept)) for k, o in outputs.items()}
        metas = {k: read_corpus_meta(p) for k, p in prefixes.items()}
        if any(m is None for m in metas.values()):
            return kept
        for key, meta in metas.items():
            made = (meta.tokenizer["sha256"], meta.backend, meta.source.get("input"),
                    meta.source.get("shard_tokens"))
            wanted = (base["tokenizer"]["sha256"], base["backend"], path, cfg.shard_tokens)
            if made != wanted:
                raise LrpathError(
                    f"{meta_path(prefixes[key])} was made with tokenizer {meta.tokenizer['path']} (sha256 "
                    f"{made[0][:12]}), backend {made[1]}, input {made[2]}, --shard-tokens {made[3]}; this run "
                    f"uses {base['tokenizer']['path']} (sha256 {wanted[0][:12]}), {wanted[1]}, {path}, "
                    f"{wanted[3]}. A corpus must be made one way: rerun with those settings, or pass --overwrite "
                    f"(or another --output-prefix)")
        if check and not all(_intact(prefixes[k], m) for k, m in metas.items()):
            return kept
        kept.append(metas[cfg.json_keys[0]])
        if kept[-1].source["last"]:
            return kept


class _ShardWriter:
    """Writes the documents of one input file into consecutive shards, each committed when the next
    document arrives (or the file ends), so the last shard of a file is known when it is committed."""

    def __init__(self, cfg: PreprocessConfig, base: dict, file_index: int, path: str, part: int,
                 first_line: int):
        self.cfg, self.base, self.file_index, self.path = cfg, base, file_index, path
        self.outputs = {k: output_prefix(cfg.output_prefix, k) for k in cfg.json_keys}
        self.part, self.first_line, self.written = part, first_line, 0
        self.builders, self.docs, self.tokens, self.end_line = None, 0, Counter(), first_line

    def add(self, line: int, ids_by_key: dict) -> None:
        first_key = self.cfg.json_keys[0]
        if self.builders and self.cfg.shard_tokens and self.tokens[first_key] >= self.cfg.shard_tokens:
            self.commit(last=False)
        if self.builders is None:
            self.builders = {k: DatasetWriter(self._prefix(k) + ".bin.tmp", WORKER["dtype"])
                             for k in self.cfg.json_keys}
        for key, ids in ids_by_key.items():
            self.builders[key].add_documents(ids, (ids.size,))
            self.tokens[key] += ids.size
        self.docs, self.end_line = self.docs + 1, line + 1

    def _prefix(self, key: str) -> str:
        return shard_prefix(self.outputs[key], self.file_index, self.part)

    def commit(self, last: bool) -> None:
        source = {"input": self.path, "file_index": self.file_index, "part": self.part,
                  "first_line": self.first_line, "end_line": self.end_line, "last": last,
                  "shard_tokens": self.cfg.shard_tokens}
        for key in self.cfg.json_keys:
            prefix = self._prefix(key)
            files = {}
            if self.builders is not None:
                self.builders[key].finalize(prefix + ".idx.tmp")
                os.replace(prefix + ".bin.tmp", prefix + ".bin")  # .bin first, .idx, then the sidecar
                os.replace(prefix + ".idx.tmp", prefix + ".idx")
                files = file_checksums(prefix)
            write_meta(prefix, self.base | {"documents": self.docs, "tokens": self.tokens[key], "files": files,
                                            "source": source})
        self.written += 1
        self.part, self.first_line = self.part + 1, self.end_line
        self.builders, self.docs, self.tokens = None, 0, Counter()

    def abort(self) -> None:
        for key, builder in (self.builders or {}).items():
            builder.data_file.close()
        remove_files([self._prefix(k) + ext for k in self.cfg.json_keys for ext in (".bin.tmp", ".idx.tmp")])


def process_file(item: tuple) -> UnitResult:
    """Shards of one input file, resuming after its complete shards. Runs in a worker (or in-process)."""
    file_index, path, base = item
    cfg, progress = WORKER["cfg"], WORKER["progress"]
    kept = [] if cfg.overwrite else complete_parts(cfg, base, file_index, path)
    if kept and kept[-1].source["last"]:
        progress.add(nbytes=os.path.getsize(path))
        return UnitResult(file_index, path, 0, 0, {}, [], {}, shards=(0, len(kept)))
    skip = kept[-1].source["end_line"] - 1 if kept else 0
    # Temporary files of a run killed while writing this file's shards (never complete: they are rebuilt).
    remove_files([str(p) for o in cfg.json_keys for p in
                  Path(output_prefix(cfg.output_prefix, o)).parent.glob(
                      f"{Path(output_prefix(cfg.output_prefix, o)).name}_{file_index:05d}_*.tmp*")])
    writer = _ShardWriter(cfg, base, file_index, path, len(kept), skip + 1)
    total = UnitResult(file_index, path, 0, 0, {}, [], {})
    tokens, line_base = Counter(), 0
    try:
        for unit in inp.iter_units([path], cfg.chunk_bytes, cfg.json_keys):
            unit.index = file_index  # seeds the verification sample: the same for any --workers
            result = tokenize_unit(unit, lambda line, ids: writer.add(line_base + line, ids),
                                      max(0, skip - line_base))
            for p in result.problems:
                p.line += line_base if p.line else 0
            for m in result.verification.examples:
                m.line += line_base
            line_base += result.lines
            total.problems += result.problems
            total.documents += result.documents
            tokens.update(result.tokens)
            total.verification.merge(result.verification, cfg.max_listed)
            if cfg.on_error == "fail" and result.problems:
                raise LrpathError(f"{result.problems[0]} (--on-error fail: the shards of this file were not "
                                  f"written; complete shards of other files are kept; fix the input or use "
                                  f"--on-error skip)")
        writer.commit(last=True)
    except FirstDifference as found:  # its line in the file, for the main process
        writer.abort()
        found.mismatch.line += line_base
        raise
    except BaseException:
        writer.abort()
        raise
    total.lines, total.tokens, total.shards = line_base, dict(tokens), (writer.written, len(kept))
    return total


def write_manifests(cfg: PreprocessConfig, base: dict, files: list) -> bool:
    """The corpus manifest of each key, once every input file's shards are complete (any task may)."""
    per_file = []
    for i, path in enumerate(files):
        parts = complete_parts(cfg, base, i, path, check=False)
        if not parts or not parts[-1].source["last"]:
            return False
        per_file.append(parts)
    for key in cfg.json_keys:
        output = output_prefix(cfg.output_prefix, key)
        shards = [read_corpus_meta(shard_prefix(output, i, p.source["part"]))
                  for i, parts in enumerate(per_file) for p in parts]
        shards = [m for m in shards if m.documents]
        check_same_tokenizer(shards)
        listed = [{"prefix": Path(m.prefix).name, "documents": m.documents, "tokens": m.tokens, "files": m.files}
                  for m in shards]
        write_meta(output, base | {"documents": sum(m.documents for m in shards),
                                   "tokens": sum(m.tokens for m in shards), "inputs": files, "shards": listed})
    return True


def _raise_differences(results: Iterator[UnitResult], enc: Encoder) -> Iterator[UnitResult]:
    try:
        yield from results
    except FirstDifference as found:  # --verify all, its line already in the file (process_file)
        raise found.failure(enc) from None


def preprocess_shards(cfg: PreprocessConfig, outputs: dict, switched: str = "") -> Summary:
    setup = prepare(cfg, switched)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    base = dataset_meta(setup, cfg, 0, 0)
    mine = [(i, f, base) for i, f in enumerate(setup.files) if i % cfg.task_count == cfg.task_index]
    documents, tokens, problems, verification = 0, Counter(), list(setup.problems), Verification()
    written = kept = 0
    results = run_tasks(cfg, process_file, iter(mine), setup, "")
    try:
        for result in _raise_differences(results, setup.encoder):
            documents += result.documents
            tokens.update(result.tokens)
            problems += result.problems
            verification.merge(result.verification, cfg.max_listed)
            switch_if_differs(setup, verification)
            written, kept = written + result.shards[0], kept + result.shards[1]
    finally:
        results.close()
        setup.bar.close()
    summary = summarize(cfg, setup, documents, tokens, problems, outputs, verification, (written, kept))
    write_manifests(cfg, base, setup.files)
    return summary
