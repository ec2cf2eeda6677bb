"""Reading and writing dist checkpoint files directly (torch_dist: PyTorch DCP ``.metadata`` +
``__*.distcp`` files), without a model, a process group or megatron-core: what the merge, the Hugging Face
import and export, and a LoRA update merged into its base stream through.

:class:`DcpTensorReader` reads any region of any stored tensor, whatever TP/PP chunked it; :func:`write_dist`
writes a checkpoint one item at a time from a source that computes each item's data when it is reached, in
files of about ``group_bytes``, so memory holds one group plus a few chunks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from lrpath_megatron.errors import LrpathError

DEFAULT_GROUP_BYTES = 256 * 2**20


class DcpTensorReader:
    """Reads any region of any tensor (or a byte object) of one DCP checkpoint, whatever its chunking."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = FileSystemReader(str(path))
        self.metadata: Metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensor_meta(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def read(self, fqn: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        md = self.metadata.state_dict_metadata[fqn]
        target = _RegionTarget(torch.empty(tuple(sizes), dtype=md.properties.dtype))
        items, covered = [], 0
        for chunk in md.chunks:
            lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            lengths = [h - l for l, h in zip(lo, hi)]
            covered += math.prod(lengths)
            items.append(ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(fqn, torch.Size(offsets)),
                dest_offsets=torch.Size([l - o for l, o in zip(lo, offsets)]),
                storage_index=MetadataIndex(fqn, chunk.offsets),
                storage_offsets=torch.Size([l - o for l, o in zip(lo, chunk.offsets)]),
                lengths=torch.Size(lengths),
            ))
        if covered != math.prod(sizes):
            raise LrpathError(
                f"{self.path}: tensor {fqn} is incomplete (its chunks cover {covered} of {math.prod(sizes)} "
                f"elements at offsets {list(offsets)}); the checkpoint is damaged or was not fully written"
            )
        self.reader.read_data(LoadPlan(items), target).wait()
        return target.tensor

    def read_bytes(self, fqn: str) -> bytes:
        target = _RegionTarget(None)
        index = MetadataIndex(fqn)
        item = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
        self.reader.read_data(LoadPlan([item]), target).wait()
        return target.data


class _RegionTarget:
    """The destination side of ``FileSystemReader.read_data``: one preallocated tensor or a byte blob."""

    def __init__(self, tensor: torch.Tensor | None):
        self.tensor = tensor
        self.data = b""

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        view = self.tensor
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        """The copy into the view already happened in the reader."""

    def load_bytes(self, item: ReadItem, value) -> None:
        self.data = value.read()


def chunk_item(fqn: str, chunk: ChunkStorageMetadata, md: TensorStorageMetadata) -> WriteItem:
    """The write item of one stored chunk of tensor ``fqn``."""
    return WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(ChunkStorageMetadata(chunk.offsets, chunk.sizes), md.properties,
                                                 md.size))


def write_dist(model_out: Path, metadata: dict, items: list[WriteItem], source, group_bytes: int) -> None:
    """Write the DCP directory ``model_out`` of ``metadata`` (fqn -> storage metadata) from ``items``, whose
    data ``source.resolve_data(item)`` computes when the writer reaches it (one item at a time), in files
    of about ``group_bytes``."""
    model_out.mkdir(parents=True)
    writer = FileSystemWriter(str(model_out), single_file_per_rank=True, thread_count=1)
    writer.set_up_storage_writer(is_coordinator=True)
    # One SavePlan per group: the writer names each plan's file __{index}_0.distcp, as for ranks.
    plans = writer.prepare_global_plan([SavePlan(items=g) for g in _groups(items, group_bytes)])
    results = [writer.write_data(plan, source).wait() for plan in plans]
    writer.finish(Metadata(state_dict_metadata=metadata), results)


def _groups(items: list[WriteItem], group_bytes: int) -> list[list[WriteItem]]:
    groups: list[list[WriteItem]] = [[]]
    size = 0
    for item in items:
        n = item.tensor_storage_size() or 0
        if groups[-1] and size + n > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups
