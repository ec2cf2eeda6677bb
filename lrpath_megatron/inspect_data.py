"""What a .bin/.idx dataset holds: documents, tokens, a length histogram, the held-out split, decoded samples.

A corpus of several shards (a glob or a list of prefixes, as ``data.corpora[].prefix`` takes them) is
reported as the one dataset training reads (:mod:`lrpath_megatron.corpus_shards`): totals, held-out split
and samples over all shards, and one line per shard."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrpath_megatron.corpus_shards import open_shards
from lrpath_megatron.held_out import held_out_range


@dataclass
class InspectReport:
    prefix: str | list  # as given: a prefix, a glob, or a list of them
    dtype: str
    documents: int
    tokens: int
    min_len: int
    median_len: float
    mean_len: float
    max_len: int
    histogram: list  # (low, high, count): document lengths in [low, high), power-of-two buckets
    held_out: dict  # {"valid_fraction", "first_doc", "end_doc", "documents", "tokens"} or {}
    samples: list = field(default_factory=list)  # (document index, n tokens, decoded text)
    shards: list = field(default_factory=list)  # {"prefix", "documents", "tokens"} per shard, in corpus order

    def format(self) -> str:
        name = self.prefix if isinstance(self.prefix, str) else " ".join(self.prefix)
        count = f", {len(self.shards)} shards" if len(self.shards) > 1 else ""
        out = [f"{name}: {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}){count}"]
        if len(self.shards) > 1:
            out += [f"  shard {i}: {s['prefix']}: {s['documents']:,} documents, {s['tokens']:,} tokens"
                    for i, s in enumerate(self.shards)]
        out.append(f"document length: min {self.min_len}, median {self.median_len:.0f}, mean {self.mean_len:.1f}, "
                   f"max {self.max_len}")
        peak = max((c for _, _, c in self.histogram), default=1)
        for low, high, count in self.histogram:
            out.append(f"  [{low:>9}, {high:>9}) {count:>8}  {'#' * max(1 if count else 0, 40 * count // peak)}")
        if self.held_out:
            h = self.held_out
            out.append(f"held out (valid_fraction={h['valid_fraction']}): documents {h['first_doc']}..{h['end_doc']} "
                       f"= {h['documents']:,} documents, {h['tokens']:,} tokens; "
                       f"train {self.documents - h['documents']:,} documents, {self.tokens - h['tokens']:,} tokens")
        for index, n, text in self.samples:
            out.append(f"--- document {index} ({n} tokens) ---\n{text}")
        return "\n".join(out)


def inspect_dataset(prefix: str | Path | list, tokenizer_model: str | None = None,
                    valid_fraction: float | None = None, samples: int = 1, max_chars: int = 400,
                    seed: int = 0) -> InspectReport:
    """Summarise a dataset (or the shards of one corpus); with a tokenizer, decode ``samples`` documents
    drawn with ``seed``."""
    prefix = str(prefix) if isinstance(prefix, Path) else prefix
    ds = open_shards(prefix, "")
    doc_idx = ds.document_indices
    lengths = np.add.reduceat(ds.sequence_lengths.astype(np.int64), doc_idx[:-1]) if len(ds) else np.zeros(0)
    # Documents made of one sequence each (the preprocessing here) make this the same as sequence_lengths.
    n_docs = len(doc_idx) - 1
    tokens = int(lengths.sum())
    top = int(np.ceil(np.log2(max(int(lengths.max(initial=1)), 1) + 1)))
    edges = [0] + [2 ** k for k in range(top + 1)]
    counts = np.histogram(lengths, bins=edges)[0]
    nonzero = np.flatnonzero(counts)
    shown_bins = range(nonzero[0], nonzero[-1] + 1) if len(nonzero) else range(0)
    histogram = [(edges[i], edges[i + 1], int(counts[i])) for i in shown_bins]
    held = {}
    if valid_fraction is not None:
        beg, end = held_out_range(n_docs, valid_fraction)
        held = {"valid_fraction": valid_fraction, "first_doc": beg, "end_doc": end, "documents": end - beg,
                "tokens": int(lengths[beg:end].sum())}
    shown = []
    if tokenizer_model and samples and n_docs:
        from lrpath_megatron.data_tools.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_model)
        picks = np.random.default_rng(seed).choice(n_docs, size=min(samples, n_docs), replace=False)
        for i in sorted(int(p) for p in picks):
            ids = ds[doc_idx[i]] if doc_idx[i + 1] - doc_idx[i] == 1 else np.concatenate(
                [ds[j] for j in range(doc_idx[i], doc_idx[i + 1])])
            text = tok.decode(ids[:-1] if len(ids) and ids[-1] == tok.eod_id else ids)
            shown.append((i, int(len(ids)), text if len(text) <= max_chars else text[:max_chars] + " [...]"))
    return InspectReport(prefix, ds.dtype.name, n_docs, tokens,
                         int(lengths.min()) if n_docs else 0, float(np.median(lengths)) if n_docs else 0.0,
                         float(lengths.mean()) if n_docs else 0.0, int(lengths.max()) if n_docs else 0,
                         histogram, held, shown, ds.identity())
