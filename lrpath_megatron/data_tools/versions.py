"""Per-version datasets: cut tokenized corpora into consecutive document ranges, one per version.

A version spec names, for each version in release order, the share of each corpus's documents that
arrives with it, e.g. ``v1: docs=0.5, code_a=1`` / ``v2: docs=0.5, code_b=1``. Shares of one corpus are
taken front to back (data arrives in document order) and may sum to at most 1. Each (corpus, version)
part becomes its own dataset ``{out}/{corpus}_{version}_text_document`` and its own corpus in the
emitted plan snippet, whose version budgets are the parts' train tokens (held-out documents excluded,
by the same megatron-core split rule the training loader uses).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from lrpath_megatron.config import ConfigError
from lrpath_megatron.data_tools.preprocess_config import output_prefix
from lrpath_megatron.held_out import held_out_range
from lrpath_megatron.indexed import open_indexed


@dataclass
class VersionSpec:
    name: str
    shares: dict  # corpus -> share of its documents (0, 1]


@dataclass
class VersionPart:
    version: str
    corpus: str
    name: str  # corpus name in the plan: "{corpus}_{version}"
    prefix: str
    first_doc: int  # document range of the source corpus
    end_doc: int
    tokens: int
    train_tokens: int  # tokens outside the held-out split


@dataclass
class VersionSplit:
    parts: list = field(default_factory=list)  # VersionPart, in version order

    def plan_snippet(self) -> dict:
        """``data.corpora`` and ``plan.versions`` entries (tokens = one pass over each version's train split)."""
        versions: dict = {}
        for p in self.parts:
            versions.setdefault(p.version, {})[p.name] = p.train_tokens
        return {
            "data": {"corpora": [{"name": p.name, "prefix": p.prefix} for p in self.parts]},
            "plan": {"versions": [
                {"name": v, "corpora": {n: round(t / max(sum(parts.values()), 1), 6) for n, t in parts.items()},
                 "tokens": sum(parts.values())}
                for v, parts in versions.items()
            ]},
        }


def parse_version(text: str) -> VersionSpec:
    """``"v1:docs=0.5,code_a=1"`` -> VersionSpec("v1", {"docs": 0.5, "code_a": 1.0})."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or not rest.strip():
        raise ConfigError(f"--version {text!r}: write NAME:CORPUS=SHARE[,CORPUS=SHARE...], e.g. v1:docs=0.5")
    shares = {}
    for item in rest.split(","):
        corpus, eq, value = item.partition("=")
        try:
            shares[corpus.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--version {text!r}: {item!r} is not CORPUS=SHARE") from None
        if not eq or not 0 < shares[corpus.strip()] <= 1:
            raise ConfigError(f"--version {text!r}: share of {corpus.strip()!r} must be in (0, 1]")
    return VersionSpec(name.strip(), shares)


def split_versions(corpora: dict, versions: list, out_dir: str | Path, valid_fraction: float = 0.02,
                   overwrite: bool = False) -> VersionSplit:
    """Write one dataset per (corpus, version) part; ``corpora`` maps corpus name -> dataset prefix.
    Every range is checked, and existing outputs are refused unless ``overwrite``, before anything is written."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    names = [v.name for v in versions]
    if not versions or len(set(names)) != len(names):
        raise ConfigError(f"versions {names}: give at least one version, each name once")
    shares: dict = {c: {} for c in corpora}  # corpus -> {version: share}
    for v in versions:
        for corpus, share in v.shares.items():
            if corpus not in corpora:
                raise ConfigError(f"version {v.name}: unknown corpus {corpus!r}; known: {sorted(corpora)} (--corpus)")
            shares[corpus][v.name] = share
    over = [f"{corpus!r} sum to {sum(s.values()):g} ({' + '.join(f'{v} {x:g}' for v, x in s.items())})"
            for corpus, s in shares.items() if sum(s.values()) > 1 + 1e-9]
    if over:
        raise ConfigError(f"the shares of {'; '.join(over)}, more than 1: each corpus is taken once, front to back, "
                          f"so its shares over the versions may sum to at most 1; lower them")

    datasets = {c: open_indexed(p, f"--corpus {c}") for c, p in corpora.items()}
    out = Path(out_dir)
    ranges, taken = [], {c: 0.0 for c in corpora}  # (version, corpus, first, end, prefix)
    for v in versions:
        for corpus, share in v.shares.items():
            n = len(datasets[corpus].document_indices) - 1
            first, end = int(round(taken[corpus] * n)), int(round((taken[corpus] + share) * n))
            taken[corpus] += share
            if end <= first:
                raise ConfigError(f"version {v.name}: {share} of {corpus!r} ({n} documents) is no document")
            ranges.append((v.name, corpus, first, end, output_prefix(out / f"{corpus}_{v.name}", "text")))
    snippet = out / "versions.yaml"
    outputs = [prefix + ext for *_, prefix in ranges for ext in (".bin", ".idx")] + [str(snippet)]
    existing = [f for f in outputs if os.path.lexists(f)]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite "
                          f"to replace {'it' if len(existing) == 1 else 'them'}, or choose another --output-dir")

    out.mkdir(parents=True, exist_ok=True)
    result = VersionSplit()
    for version, corpus, first, end, prefix in ranges:
        ds = datasets[corpus]
        tmp = f"{prefix}.tmp-{os.getpid()}"
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=ds.index.dtype)
        lengths = []
        for d in range(first, end):
            seqs = [ds[s] for s in range(ds.document_indices[d], ds.document_indices[d + 1])]
            ids = np.concatenate(seqs)
            builder.add_document(ids, [len(s) for s in seqs])
            lengths.append(len(ids))
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
        beg, stop = held_out_range(len(lengths), valid_fraction)
        total = int(sum(lengths))
        result.parts.append(VersionPart(version, corpus, f"{corpus}_{version}", prefix, first, end, total,
                                        total - int(sum(lengths[beg:stop]))))
    snippet.write_text(yaml.safe_dump(result.plan_snippet(), sort_keys=False))
    return result
