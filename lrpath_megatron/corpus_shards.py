"""A corpus made of one or more Megatron ``.bin``/``.idx`` shards, read as one dataset.

``CorpusConfig.prefix`` is a path prefix, a glob, or a list of either. Each entry stands for its shards,
in order: a prefix is one shard, or the shards its corpus manifest lists (sharded preprocessing output); a
glob (an entry holding ``*``, ``?`` or ``[``) is every ``PREFIX.idx`` it matches, sorted by path. The
corpus is the documents of its shards in that order, exactly as if they were one ``.bin``/``.idx`` pair:
megatron-core's split, document shuffle and sample windows run over the concatenation, so a corpus cut
into shards gives the samples of the same documents in one file, each shard contributing in proportion to
its tokens.

Every shard gets the checks of :mod:`lrpath_megatron.indexed`, and the shards of a corpus must agree on
the token dtype and, where a tokenizer sidecar records it, on the tokenizer (:func:`check_tokenizers`).
A run records each corpus's shards (:meth:`ShardedIndexed.identity`) in its data state; a resume or a
branch whose corpus resolves to other shards is refused (:func:`check_same_shards`).
"""
from __future__ import annotations

import glob
import os

import numpy as np

from lrpath_megatron.errors import LrpathError
from lrpath_megatron.indexed import check_indexed, check_token_ids

GLOB_CHARS = frozenset("*?[")


def resolve_shards(prefix: str | list, where: str) -> list[str]:
    """The shard prefixes of a ``CorpusConfig.prefix`` (validated: a non-empty string or list of them)."""
    head = f"{where}: " if where else ""
    shards: list[str] = []
    for entry in [prefix] if isinstance(prefix, str) else prefix:
        if GLOB_CHARS.isdisjoint(entry):
            shards.extend(_listed_shards(entry))
            continue
        # Matched against the .idx (written last by preprocess): a .bin match would name every shard twice.
        matches = sorted(path[:-len(".idx")] for path in glob.glob(entry + ".idx"))
        if not matches:
            raise LrpathError(f"{head}the glob {entry!r} matches no shard: no file matches {entry + '.idx'!r}; "
                              f"point it at the PREFIX of PREFIX.bin/.idx shards (e.g. data/web_text_document_*)")
        shards.extend(matches)
    seen: set[str] = set()
    for shard in shards:
        if os.path.normpath(shard) in seen:
            raise LrpathError(f"{head}the shard {shard} is listed twice (its documents would count twice); "
                              f"list each shard once in the corpus's prefix")
        seen.add(os.path.normpath(shard))
    return shards


def _listed_shards(prefix: str) -> list[str]:
    """``prefix`` itself, or the shards its corpus manifest lists: sharded ``lrpath data preprocess`` output
    is ``PREFIX.meta.json`` listing shards ``PREFIX_FFFFF_PPPPP`` next to it, without a ``PREFIX.bin``/``.idx``."""
    from lrpath_megatron.data_tools.corpus_meta import read_corpus_meta

    if os.path.exists(prefix + ".idx"):
        return [prefix]
    meta = read_corpus_meta(prefix)
    if meta is None or not meta.shards:
        return [prefix]  # missing: check_indexed says so
    return [os.path.join(os.path.dirname(prefix), shard["prefix"]) for shard in meta.shards]


def check_shards(prefix: str | list, where: str, vocab_size: int | None = None) -> tuple[list[str], np.dtype]:
    """The shard prefixes and their common token dtype, after every check that reads the files only:
    each pair (:func:`~lrpath_megatron.indexed.check_indexed`), one dtype, the tokenizer sidecars, and
    with ``vocab_size`` a sample of each shard's token ids."""
    head = f"{where}: " if where else ""
    shards = resolve_shards(prefix, where)
    dtypes = [check_indexed(shard, where) for shard in shards]
    for shard, dtype in zip(shards, dtypes):
        if dtype != dtypes[0]:
            raise LrpathError(
                f"{head}the shard {shard} holds {dtype.name} tokens but {shards[0]} holds {dtypes[0].name}; the "
                f"shards of one corpus are one token stream: make them with one tokenizer (which fixes the "
                f"dtype), or make them separate corpora")
    check_tokenizers(shards, where, vocab_size)
    if vocab_size is not None:
        for shard in shards:
            check_token_ids(shard, dtypes[0], vocab_size, where)
    return shards, dtypes[0]


def check_corpora(train_config, names: set) -> None:
    """Raise unless every shard of each corpus of ``train_config.data`` named in ``names`` is a consistent
    ``PREFIX.bin``/``PREFIX.idx`` pair whose tokenizer and sampled token ids fit ``model.vocab_size`` (the
    checks training runs when it opens the data); one line per corpus."""
    problems = []
    for corpus in train_config.data.corpora:
        if corpus.name in names:
            try:
                check_shards(corpus.prefix, f"corpus {corpus.name!r}", train_config.model.vocab_size)
            except LrpathError as exc:
                problems.append(str(exc))
    if problems:
        raise LrpathError("\n".join(problems))


def check_tokenizers(shards: list[str], where: str, vocab_size: int | None) -> None:
    """Refuse shards whose sidecars name different tokenizers, or a tokenizer with more ids than
    ``vocab_size`` (``model.vocab_size``: the embedding's padded rows past it are no token ids, and the
    token-id checks use the same bound). A shard without a sidecar (data made before they were written) is
    accepted as before."""
    from lrpath_megatron.data_tools.corpus_meta import check_same_tokenizer, read_corpus_meta

    head = f"{where}: " if where else ""
    metas = [meta for shard in shards if (meta := read_corpus_meta(shard)) is not None]
    check_same_tokenizer(metas, where)
    for meta in metas:
        ids = meta.tokenizer["vocab_size"]
        if vocab_size is not None and ids > vocab_size:
            raise LrpathError(
                f"{head}the shard {meta.prefix} was made by the tokenizer {meta.tokenizer['path']} with {ids} ids, "
                f"more than model.vocab_size={vocab_size}; set model.vocab_size to at least {ids} (the model's "
                f"tokenizer must be the data's), or tokenize the data with the model's tokenizer")


def open_shards(prefix: str | list, where: str, vocab_size: int | None = None) -> "ShardedIndexed":
    """The corpus's shards as one :class:`ShardedIndexed`, after :func:`check_shards`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards, dtype = check_shards(prefix, where, vocab_size)
    return ShardedIndexed(shards, [IndexedDataset(s, multimodal=False, mmap=True) for s in shards], dtype)


class ShardedIndexed:
    """megatron-core ``IndexedDataset`` shards read as one: the sequences of shard 0, then of shard 1, ...

    ``GPTDataset`` (megatron-core 0.16.1) reads its low-level dataset through ``sequence_lengths`` (int32)
    and ``get(idx, offset, length)`` only; ``document_indices`` and item access serve ``lrpath data
    inspect``. One shard is served from megatron-core's own arrays, without a copy.
    """

    def __init__(self, prefixes: list[str], datasets: list, dtype: np.dtype) -> None:
        self.prefixes, self.datasets, self.dtype = prefixes, datasets, np.dtype(dtype)
        lengths = [d.sequence_lengths for d in datasets]
        self.sequence_lengths = lengths[0] if len(lengths) == 1 else np.concatenate(lengths)
        # starts[k]: the global index of shard k's first sequence; starts[-1]: the sequence count.
        self.starts = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)
        docs = [d.document_indices for d in datasets]
        self.document_indices = docs[0] if len(docs) == 1 else np.concatenate(
            [d[:-1] + start for d, start in zip(docs, self.starts)] + [self.starts[-1:]])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, idx, side="right")) - 1
        return self.datasets[shard].get(int(idx) - int(self.starts[shard]), offset=offset, length=length)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def identity(self) -> list[dict]:
        """Each shard's prefix, documents and tokens, in order: what ``lrpath data inspect`` lists, and what
        a resume must find again to continue the same samples."""
        return [{"prefix": p, "documents": len(d.document_indices) - 1,
                 "tokens": int(d.sequence_lengths.sum(dtype=np.int64))} for p, d in zip(self.prefixes, self.datasets)]


def check_same_shards(corpus: str, saved: list[dict], now: list[dict], source: str) -> None:
    """Refuse to continue ``corpus`` from a state saved (in ``source``) on other shards, naming the first
    that was removed, added, moved or changed: the samples would not be the ones the state counts."""
    if saved == now:
        return
    before, after = [s["prefix"] for s in saved], [s["prefix"] for s in now]
    if removed := [p for p in before if p not in after]:
        what = f"{_shards(removed)} {'are' if len(removed) > 1 else 'is'} gone"
    elif added := [p for p in after if p not in before]:
        what = f"{_shards(added)} {'were' if len(added) > 1 else 'was'} added"
    elif before != after:
        i = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
        what = f"the shard {after[i]} is now number {i} of the corpus's shards but was number {before.index(after[i])}"
    else:
        old, new = next((a, b) for a, b in zip(saved, now) if a != b)
        what = (f"the shard {new['prefix']} held {old['documents']} documents and {old['tokens']} tokens but holds "
                f"{new['documents']} and {new['tokens']} now")
    raise LrpathError(
        f"cannot continue the data of corpus {corpus!r} saved in {source}: {what}; a run continues the same "
        f"shards in the same order (data.corpora prefix: list order, or a glob's sorted matches); restore them, "
        f"or start in a new --run-dir")


def _shards(prefixes: list[str]) -> str:
    return f"the shard{'s' if len(prefixes) > 1 else ''} {', '.join(prefixes)}"
