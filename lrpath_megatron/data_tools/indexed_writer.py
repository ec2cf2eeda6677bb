"""Writes ``PREFIX.bin``/``PREFIX.idx`` byte for byte as megatron-core's ``IndexedDatasetBuilder`` does.

Why not that class: importing ``megatron.core.datasets.indexed_dataset`` pulls in torch and megatron-core,
~9 CPU-seconds per process, more than the fast backend needs to tokenize 20 M tokens. The layout is the
one :mod:`lrpath_megatron.indexed` checks (one sequence per document); a test compares this writer's files
with megatron-core's on the same documents.
"""
from __future__ import annotations

import shutil
import struct

import numpy as np

from lrpath_megatron.indexed import DTYPES, HEADER, MAGIC

CODES = {np.dtype(t): code for code, t in DTYPES.items()}


def optimal_dtype(vocab_size: int) -> type:
    """megatron-core's ``DType.optimal_dtype``: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class DatasetWriter:
    """Documents appended in order to ``bin_path``; :meth:`finalize` writes the index."""

    def __init__(self, bin_path: str, dtype: type):
        self.dtype = np.dtype(dtype)
        self.data_file = open(bin_path, "wb")
        self.lengths: list = []  # arrays of document lengths, in order

    def add_documents(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """``ids``: the documents' tokens back to back; ``lengths``: tokens per document."""
        self.data_file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.lengths.append(np.asarray(lengths, dtype=np.int32))

    def add_index(self, prefix: str) -> None:
        """Append the documents of another dataset of the same dtype (a worker's partial output)."""
        header = np.fromfile(prefix + ".idx", dtype=HEADER, count=1)[0]
        self.lengths.append(np.fromfile(prefix + ".idx", dtype=np.int32, count=int(header["sequences"]),
                                        offset=HEADER.itemsize))
        with open(prefix + ".bin", "rb") as src:
            shutil.copyfileobj(src, self.data_file, 16 << 20)

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(idx_path, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", 1, CODES[self.dtype], len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
