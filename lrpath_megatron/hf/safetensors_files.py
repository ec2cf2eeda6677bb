"""The weights of a Hugging Face checkpoint directory: ``model.safetensors``, or shards listed in
``model.safetensors.index.json``. Read with safetensors' ``safe_open`` one tensor at a time; written
tensor by tensor as they come, so neither side holds more than the tensors in hand.

Only safetensors are read: ``pytorch_model.bin`` files are pickles, which can run code when loaded.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from lrpath_megatron.errors import LrpathError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


class HfWeights:
    """Names, shapes, dtypes and files of every tensor of ``hf_dir``. Every header is read when it is
    made, so a missing, truncated or inconsistent file is refused before anything is converted."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        listed = self._listed_files()
        for name in sorted(set(listed.values())):
            self._read_header(name)
        wrong = sorted(n for n, f in listed.items() if self.file_of.get(n) != f)
        if wrong:
            raise LrpathError(f"{self.dir / INDEX} places {len(wrong)} tensors in files that do not hold them "
                              f"(e.g. {wrong[0]} in {listed[wrong[0]]}); the index and the shards disagree")

    def _listed_files(self) -> dict[str, str]:
        """tensor name -> file, from the index; without one, the single file's own names."""
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LrpathError(f"{index} is not a safetensors index (no weight_map: {exc})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise LrpathError(f"{self.dir} lacks {len(missing)} of the shards its {INDEX} lists "
                                  f"({', '.join(missing[:3])}); copy the whole checkpoint directory")
            return dict(weight_map)
        if (self.dir / SINGLE).is_file():
            with self._open(SINGLE) as f:
                return {name: SINGLE for name in f.keys()}
        pickles = sorted(p.name for p in self.dir.glob("*.bin"))
        hint = (f"it has {', '.join(pickles[:2])}: pickle files, which lrpath never loads; save the model with "
                f"safetensors (transformers' save_pretrained does by default)") if pickles else "nothing to import"
        raise LrpathError(f"{self.dir} has neither {SINGLE} nor {INDEX}: {hint}")

    def _open(self, name: str):
        try:
            return safe_open(str(self.dir / name), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise LrpathError(f"{self.dir / name} is not a readable safetensors file ({exc}): truncated or "
                              f"damaged; copy it again") from None

    def _read_header(self, name: str) -> None:
        with self._open(name) as f:
            for tensor in f.keys():
                part = f.get_slice(tensor)
                code = part.get_dtype()
                if code not in DTYPES:
                    raise LrpathError(f"{self.dir / name}: tensor {tensor} is {code}; lrpath reads floating-point "
                                      f"weights ({', '.join(DTYPES)})")
                self.file_of[tensor] = name
                self.shapes[tensor] = tuple(part.get_shape())
                self.dtypes[tensor] = DTYPES[code]

    def read(self, names: Iterable[str]) -> list[torch.Tensor]:
        """The tensors ``names``, in that order; each file is opened once per call and closed after, so
        its mapped pages are released."""
        names = list(names)
        out: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(self.file_of[n] for n in names):
            with self._open(file) as f:
                out.update({n: f.get_tensor(n) for n in names if self.file_of[n] == file})
        return [out[n] for n in names]


def write_safetensors(out_dir: Path, shapes: dict[str, tuple[int, ...]], dtype_of: dict[str, torch.dtype],
                      tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` (name, tensor), which must come in the order of ``shapes``, as safetensors files of
    at most ``max_shard_bytes`` each (a larger tensor gets a file of its own), with an index when there is
    more than one. Every header is known from ``shapes`` up front, so each tensor is written as it comes
    (safetensors' save_file would need the whole shard in memory). Returns the files written."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = _nbytes(shape, dtype_of[name])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, names in zip(files, shards):
        with (out_dir / file).open("wb") as f:
            f.write(_header(names, shapes, dtype_of))
            for expected in names:
                name, tensor = next(tensors)
                if name != expected or tuple(tensor.shape) != shapes[name] or tensor.dtype != dtype_of[name]:
                    raise AssertionError(f"writing {expected}: got {name} {tuple(tensor.shape)} {tensor.dtype}")
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    if len(files) > 1:
        total = sum(_nbytes(s, dtype_of[n]) for n, s in shapes.items())
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
    return files + ([INDEX] if len(files) > 1 else [])


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _header(names: list[str], shapes: dict, dtype_of: dict) -> bytes:
    """The safetensors header: little-endian u64 length, then JSON (space-padded to 8 bytes) giving each
    tensor's dtype, shape and byte range in the data that follows."""
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + _nbytes(shapes[name], dtype_of[name])
        entries[name] = {"dtype": DTYPE_CODES[dtype_of[name]], "shape": list(shapes[name]),
                         "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
