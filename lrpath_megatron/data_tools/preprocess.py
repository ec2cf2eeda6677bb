"""JSONL / plain text -> megatron-core ``IndexedDataset`` files, in parallel, byte-identical for any worker count.

Output names follow Megatron-LM's ``tools/preprocess_data.py``: ``{output_prefix}_{key}_document.bin/.idx``.
Each worker tokenizes whole work units (see :mod:`lrpath_megatron.data_tools.inputs`) into its own small
.bin/.idx (:mod:`indexed_writer`, megatron-core's format byte for byte); the main process appends them in
unit order into ``*.tmp-PID.bin/.idx`` and renames those only when complete, then writes the sidecar
(:mod:`corpus_meta`). ``--backend``: :mod:`encoders`, checked on the verification sample (:mod:`sample_check`)
before anything is written; sharded, resumable output: :mod:`shards`. Workers run :mod:`tokenize_worker`; what
the two kinds of output share is :mod:`preprocess_run`.

Long documents: the text of one document is held in memory once and encoded in ~64 K-character pieces
(exact SentencePiece backend, models without normalisation, see :meth:`Tokenizer.encode`), so a 50 MB document
costs ~50 MB plus its token array. Documents over
``max_doc_chars`` (0 = no limit) are reported and skipped/refused like any other bad input.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator

from lrpath_megatron.data_tools import inputs as inp
from lrpath_megatron.data_tools.corpus_meta import file_checksums, write_meta
from lrpath_megatron.data_tools.encoders import Encoder
from lrpath_megatron.data_tools.indexed_writer import DatasetWriter
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig, output_prefix
from lrpath_megatron.data_tools.preprocess_run import (Summary, dataset_meta, prepare, remove_files, run_tasks,
                                                       summarize, switch_if_differs)
from lrpath_megatron.data_tools.sample_check import FirstDifference, SwitchToExact
from lrpath_megatron.data_tools.shards import preprocess_shards
from lrpath_megatron.data_tools.tokenize_worker import WORKER, UnitResult, Verification, tokenize_unit
from lrpath_megatron.errors import LrpathError


def process_unit(unit: inp.WorkUnit) -> UnitResult:
    """Tokenize one unit into partial datasets (one per key). Runs in a worker (or in-process)."""
    partials = {k: os.path.join(WORKER["partial_dir"], f"u{unit.index:07d}_{k}") for k in WORKER["cfg"].json_keys}
    builders = {k: DatasetWriter(p + ".bin", WORKER["dtype"]) for k, p in partials.items()}

    def write(_line: int, ids_by_key: dict) -> None:
        for key, ids in ids_by_key.items():
            builders[key].add_documents(ids, (ids.size,))

    result = tokenize_unit(unit, write)
    for key, builder in builders.items():
        builder.finalize(partials[key] + ".idx")
    result.partials = partials
    return result


def _file_lines(results: Iterator[UnitResult], line_base: Counter, enc: Encoder) -> Iterator[UnitResult]:
    """``results``; a unit's first difference (--verify all) is raised with its line in the file: the units before
    it in its file are counted in ``line_base`` by then."""
    try:
        yield from results
    except FirstDifference as found:
        found.mismatch.line += line_base[found.mismatch.path]
        raise found.failure(enc) from None


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
                remove_files([result.partials[key] + ".bin", result.partials[key] + ".idx"])
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
        remove_files(tmp_files)
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
