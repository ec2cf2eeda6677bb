"""Checks of a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) before megatron-core opens it.

megatron-core's ``IndexedDataset`` trusts its files: a truncated ``.bin`` or an ``.idx`` of another dataset
opens fine and fails later, mid-training, as a ``ValueError`` deep in a worker; a corrupt ``.idx`` fails
with an assertion and then ``__del__`` noise. :func:`check_indexed` reads only the index (numpy, O(index
size); the ``.bin`` is only stat'ed) and refuses such a pair with one message saying what and where.

``.idx`` layout (megatron-core's ``_IndexWriter``): 9-byte magic, ``<Q`` version 1, ``<B`` dtype code,
``<Q`` sequence count S, ``<Q`` document-index count D, then S int32 sequence lengths, S int64 sequence
pointers (byte offsets into the ``.bin``) and D int64 document indices. Multimodal indices (S int8 modes
more) are not used here and are refused by the size check.
"""
from __future__ import annotations

import os

import numpy as np

from lrpath_megatron.errors import LrpathError

MAGIC = b"MMIDIDX\x00\x00"
HEADER = np.dtype([("magic", "u1", 9), ("version", "<u8"), ("code", "u1"), ("sequences", "<u8"),
                   ("documents", "<u8")])
# megatron-core's DType codes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
FIX = "rebuild it with `lrpath data preprocess` (or restore the .bin and .idx made together)"
CHUNK = 1 << 22  # sequences per vectorised step: bounds the temporaries for indices of any size
TOKEN_SAMPLE = 1 << 20  # tokens read from each end of a .bin by check_token_ids


def check_indexed(prefix: str, where: str = "") -> np.dtype:
    """The token dtype of ``prefix``'s .bin/.idx pair; :class:`LrpathError` unless the pair is consistent.

    ``where`` (e.g. ``"corpus 'docs'"``) starts every message.
    """
    head = f"{where}: " if where else ""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            raise LrpathError(f"{head}{path} does not exist; {prefix!r} must be the path prefix (without .bin/.idx) "
                              f"of a Megatron .bin/.idx pair made by `lrpath data preprocess`")

    def bad(what: str) -> LrpathError:
        return LrpathError(f"{head}{idx} {what}; {FIX}")

    try:
        index = np.memmap(idx, dtype=np.uint8, mode="r") if os.path.getsize(idx) else np.zeros(0, np.uint8)
        bin_size = os.path.getsize(bin_)
    except OSError as exc:
        raise LrpathError(f"{head}cannot read {prefix}.bin/.idx: {exc}") from None
    if len(index) < HEADER.itemsize or bytes(index[:len(MAGIC)]) != MAGIC:
        raise bad("is not a Megatron index file (no MMIDIDX header)")
    header = index[:HEADER.itemsize].view(HEADER)[0]
    if header["version"] != 1 or int(header["code"]) not in DTYPES:
        raise bad(f"has version {header['version']} and dtype code {header['code']}; megatron-core reads "
                  f"version 1 with codes {sorted(DTYPES)}")
    dtype = np.dtype(DTYPES[int(header["code"])])
    seqs, docs = int(header["sequences"]), int(header["documents"])
    expected = HEADER.itemsize + 12 * seqs + 8 * docs
    if len(index) != expected:
        raise bad(f"is {len(index):,} bytes, but its header ({seqs:,} sequences, {docs:,} document indices) "
                  f"implies {expected:,}: truncated or corrupt")
    lengths = index[HEADER.itemsize:HEADER.itemsize + 4 * seqs].view("<i4")
    pointers = index[HEADER.itemsize + 4 * seqs:HEADER.itemsize + 12 * seqs].view("<i8")
    doc_idx = index[HEADER.itemsize + 12 * seqs:].view("<i8")
    if docs == 0 or doc_idx[0] != 0 or doc_idx[-1] != seqs:
        raise bad(f"has document indices that do not run from 0 to its {seqs:,} sequences: corrupt")
    end = 0  # byte offset the next sequence must start at
    for lo in range(0, seqs, CHUNK):
        size = lengths[lo:lo + CHUNK].astype(np.int64) * dtype.itemsize
        starts = end + np.cumsum(size) - size
        wrong = np.flatnonzero((size < 0) | (pointers[lo:lo + CHUNK] != starts))
        if len(wrong):
            raise bad(f"has sequence {lo + int(wrong[0]):,} at a pointer or length that does not follow the ones "
                      f"before it: corrupt")
        end = int(starts[-1] + size[-1])
    for lo in range(0, docs - 1, CHUNK):
        if (np.diff(doc_idx[lo:lo + CHUNK + 1]) < 0).any():
            raise bad("has decreasing document indices: corrupt")
    if bin_size != end:
        raise LrpathError(
            f"{head}{bin_} is {bin_size:,} bytes, but {idx} describes {end // dtype.itemsize:,} {dtype.name} tokens "
            f"= {end:,} bytes: the .bin is {'truncated' if bin_size < end else 'longer than that'}, or the two "
            f"files come from different datasets; {FIX}")
    return dtype


def check_token_ids(prefix: str, dtype: np.dtype, vocab_size: int, where: str) -> None:
    """Refuse a corpus whose first or last :data:`TOKEN_SAMPLE` tokens hold ids outside [0, vocab_size).

    A bounded sample keeps opening cheap; it catches the usual cause (a tokenizer larger than
    model.vocab_size) at once, and the trainer checks every micro-batch for the rest.
    """
    path = prefix + ".bin"
    count = os.path.getsize(path) // dtype.itemsize
    for offset in sorted({0, max(count - TOKEN_SAMPLE, 0)}):
        ids = np.fromfile(path, dtype=dtype, count=min(TOKEN_SAMPLE, count), offset=offset * dtype.itemsize)
        if len(ids) and not 0 <= ids.min() <= ids.max() < vocab_size:
            found = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
            raise LrpathError(token_id_error(where, f"{path} holds token id {found}", vocab_size))


def token_id_error(where: str, found: str, vocab_size: int) -> str:
    """The message of both token-id checks (on opening, and per micro-batch in :mod:`lrpath_megatron.data`)."""
    return (f"{where}: {found}, outside model.vocab_size={vocab_size}; set model.vocab_size to at least the "
            f"vocabulary size of the tokenizer that made the data (the lines of its .vocab file)")


def open_indexed(prefix: str, where: str = ""):
    """megatron-core's ``IndexedDataset`` of ``prefix`` (memory-mapped), after :func:`check_indexed`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_indexed(prefix, where)
    return IndexedDataset(prefix, multimodal=False, mmap=True)
