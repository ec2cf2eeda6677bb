"""Corpora (Megatron .bin/.idx) to micro-batches: megatron-core ``GPTDataset`` per corpus and split.

A corpus of several shards is read as the one dataset of their documents in order
(:mod:`lrpath_megatron.corpus_shards`); everything below sees one dataset per corpus.

Every corpus is split by document range with megatron-core's split semantics (``data.valid_fraction``
-> split ``"1-f,f,0"``): the first documents train, the last ones are held out. Each corpus's train
``GPTDataset`` exposes exactly one epoch of fixed ``seq_length + 1`` token windows (its documents shuffled
once by the seed and concatenated, as megatron-core does); :class:`~lrpath_megatron.mixing.MixingSampler`
decides which window is used when and reshuffles per epoch. megatron-core's own sample shuffle is kept: a
fixed permutation composed with the sampler's per-epoch permutation is still a per-epoch permutation.

The index arrays are built in memory on every rank (one epoch, O(documents), milliseconds for the
C++ helper): no cache directory next to the data, and no collective calls, so any subset of ranks may
build the data.
"""
from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch

from lrpath_megatron.config import CorpusConfig, DataConfig
from lrpath_megatron.corpus_shards import ShardedIndexed, check_same_shards, open_shards, resolve_shards
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.held_out import split_string
from lrpath_megatron.indexed import token_id_error
from lrpath_megatron.mcore_api import null_tokenizer_library
from lrpath_megatron.mixing import MixingSampler, WeightsFn

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def gpt_dataset_config(seq_length: int, valid_fraction: float, seed: int, vocab_size: int):
    """The megatron-core ``GPTDatasetConfig`` every corpus is read with."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        # blend must be set, otherwise megatron-core switches to mock data; the prefix is informational
        # here because the datasets are constructed directly.
        blend=(["<per-corpus>"], None),
        split=split_string(valid_fraction),
        # "" (not None): None means "cache next to the data prefix"; "" keeps the indices in memory.
        path_to_cache="",
        tokenizer=MegatronTokenizer.from_pretrained(metadata_path={"library": null_tokenizer_library()}, vocab_size=vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # The model builds its own causal mask; a [s, s] mask per sample is wasted memory.
        create_attention_mask=False,
    )


def open_corpus(corpus: CorpusConfig, vocab_size: int | None = None) -> ShardedIndexed:
    """The corpus's shards as one dataset, checked first (see :mod:`lrpath_megatron.corpus_shards`). The train
    and valid splits share one open, so the checks read each corpus once per process; the key holds the
    shards and their files' size and mtime, so a rewritten or re-globbed corpus is opened and checked again."""
    shards = tuple(resolve_shards(corpus.prefix, f"corpus {corpus.name!r}"))
    return _open_checked(corpus.name, shards, vocab_size, _files_signature(shards))


def _files_signature(shards: tuple[str, ...]) -> tuple | None:
    from lrpath_megatron.data_tools.corpus_meta import meta_path

    try:
        pairs = tuple((s.st_size, s.st_mtime_ns) for p in shards for s in map(os.stat, (p + ".bin", p + ".idx")))
    except OSError:
        return None  # missing: the check says so
    # The sidecars too: a rewritten one is checked again.
    return pairs + tuple(os.path.exists(meta) and os.stat(meta).st_mtime_ns for meta in map(meta_path, shards))


@functools.lru_cache(maxsize=64)
def _open_checked(name: str, shards: tuple[str, ...], vocab_size: int | None, signature: tuple | None):
    return open_shards(list(shards), f"corpus {name!r}", vocab_size)


def build_split(corpus: CorpusConfig, indexed, config, split_name: str):
    """The corpus's ``GPTDataset`` for ``split_name`` ("train" or "valid"): one epoch, in memory."""
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.utils import Split

    split = Split[split_name]
    num_docs = len(indexed.sequence_lengths)
    begin_end = config.split_matrix[split.value]
    # Same rounding as megatron-core's BlendedMegatronDatasetBuilder, so the ranges match its splits.
    beg, end = (0, 0) if begin_end is None else (int(round(f * num_docs)) for f in begin_end)
    indices = np.arange(beg, end, dtype=np.int32)
    tokens = int(indexed.sequence_lengths[indices].sum()) if len(indices) else 0
    needed = config.sequence_length + 1
    if tokens < needed:
        raise LrpathError(
            f"corpus {corpus.name!r} ({corpus.prefix}): its {split_name} split (documents {beg}..{end} of "
            f"{num_docs}) has {tokens} tokens, fewer than one sample of seq_length + 1 = {needed}; add data, "
            f"lower model.seq_length, or change data.valid_fraction"
        )
    gpt_logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    level = gpt_logger.level
    gpt_logger.setLevel(logging.ERROR)  # silences "unable to save indexes" (in-memory on purpose)
    try:
        return GPTDataset(indexed, str(corpus.prefix), indices, None, split, config)
    finally:
        gpt_logger.setLevel(level)


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


def _default_vocab_size(indexed: ShardedIndexed) -> int:
    # Only the null tokenizer's EOD id depends on it, and EOD is unused here (no resets, no EOD masking).
    return int(np.iinfo(indexed.dtype).max)


class CorpusSplits:
    """Opens every configured corpus and builds one split of each; collates samples of that split."""

    def __init__(self, cfg: DataConfig, seq_length: int, seed: int, split_name: str, vocab_size: int | None):
        assert cfg.corpora, "configs are validated to name at least one corpus"
        indexed = {c.name: open_corpus(c, vocab_size) for c in cfg.corpora}
        vocab = vocab_size or _default_vocab_size(next(iter(indexed.values())))
        config = gpt_dataset_config(seq_length, cfg.valid_fraction, seed, vocab)
        self.datasets = {c.name: build_split(c, indexed[c.name], config, split_name) for c in cfg.corpora}
        self.shards = {name: data.identity() for name, data in indexed.items()}
        self.split_name, self.vocab_size = split_name, vocab_size

    def batch(self, picked: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """The samples ``picked`` ((corpus, index) pairs) collated. Ids outside [0, vocab_size) are refused
        here: the opening check reads only a sample of each corpus, and in the embedding such an id is an
        opaque IndexError (CPU) or device-side assert (CUDA)."""
        batch = collate([self.datasets[corpus][index] for corpus, index in picked])
        if self.vocab_size is not None:
            ids = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)  # every id of every sample
            low, high = torch.aminmax(ids)
            if low < 0 or high >= self.vocab_size:
                row = int(((ids < 0) | (ids >= self.vocab_size)).any(dim=1).nonzero()[0, 0])
                corpus, index = picked[row]
                found = int(high) if high >= self.vocab_size else int(low)
                raise LrpathError(token_id_error(f"corpus {corpus!r}", f"{self.split_name} sample {index} holds "
                                                 f"token id {found}", self.vocab_size))
        return batch


class TrainData:
    """This DP rank's micro-batches of every global batch, blended by a :class:`MixingSampler`.

    Global batch ``step`` is the sampler's list of samples; rank ``r`` takes the contiguous slice
    ``[r * n, (r + 1) * n)`` with ``n = global_batch_size / dp_size`` and cuts it into micro-batches, so
    the union over ranks is the same global batch for any ``dp_size``.
    """

    def __init__(self, cfg: DataConfig, seq_length: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, weights_at_step: WeightsFn, seed: int, *,
                 vocab_size: int | None = None) -> None:
        # The layout is checked once, when the world size is known (ParallelConfig.data_parallel).
        assert 0 <= dp_rank < dp_size and global_batch_size % (micro_batch_size * dp_size) == 0
        self.micro_batch_size = micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.splits = CorpusSplits(cfg, seq_length, seed, "train", vocab_size)
        self.datasets = self.splits.datasets
        self.sampler = MixingSampler({name: len(ds) for name, ds in self.datasets.items()},
                                     weights_at_step, global_batch_size, seed)

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        mine = self.sampler.global_batch(step)[self.dp_rank * self.per_rank:(self.dp_rank + 1) * self.per_rank]
        mbs = self.micro_batch_size
        return [self.splits.batch(mine[i:i + mbs]) for i in range(0, len(mine), mbs)]

    def state_dict(self) -> dict:
        """The sampler's state, and the shards of every corpus it counts samples of."""
        return {**self.sampler.state_dict(), "shards": self.splits.shards}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """``source``: the checkpoint the state comes from, named in a refusal. The shards are compared
        first: a corpus whose shards changed may keep its sample count, which the sampler checks. States
        saved before shards were recorded have none to compare."""
        for corpus, saved in state.get("shards", {}).items():
            if corpus in self.splits.shards:  # one no longer configured: the sampler names it
                check_same_shards(corpus, saved, self.splits.shards[corpus], source)
        self.sampler.load_state_dict(state, source)

    def pop_stats(self) -> dict:
        return self.sampler.pop_stats()


class ValidData:
    """Fixed held-out micro-batches per corpus: the first samples of the corpus's held-out split.

    The set of ``n`` micro-batches depends only on the data, ``seq_length`` and ``seed``; DP ranks take
    interleaved shares of it, so summing losses and token counts over ranks gives the same validation loss
    for every DP size.
    """

    def __init__(self, cfg: DataConfig, seq_length: int, micro_batch_size: int, seed: int, *,
                 vocab_size: int | None = None) -> None:
        self.micro_batch_size = micro_batch_size
        self.splits = CorpusSplits(cfg, seq_length, seed, "valid", vocab_size)
        self.datasets = self.splits.datasets
        self._warned: set[str] = set()

    @property
    def corpora(self) -> list[str]:
        return list(self.datasets)

    def num_batches(self, corpus: str) -> int:
        """How many full micro-batches the corpus's held-out split holds."""
        return len(self._dataset(corpus)) // self.micro_batch_size

    def batches(self, corpus: str, n: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict[str, torch.Tensor]]:
        """This rank's share (micro-batches ``dp_rank, dp_rank + dp_size, ...``) of the first ``n``."""
        dataset = self._dataset(corpus)
        available = self.num_batches(corpus)
        if available == 0:
            raise LrpathError(
                f"corpus {corpus!r}: the held-out split has {len(dataset)} samples, fewer than one "
                f"micro-batch of {self.micro_batch_size}; raise data.valid_fraction or add data"
            )
        if n > available and corpus not in self._warned:
            logger.warning("validation: corpus %r holds only %d held-out micro-batches, %d requested",
                           corpus, available, n)
            self._warned.add(corpus)
        mbs = self.micro_batch_size
        return [self.splits.batch([(corpus, j) for j in range(i * mbs, (i + 1) * mbs)])
                for i in range(dp_rank, min(n, available), dp_size)]

    def _dataset(self, corpus: str):
        if corpus not in self.datasets:
            raise LrpathError(f"no held-out data for corpus {corpus!r}; corpora: {self.corpora}")
        return self.datasets[corpus]
