"""A LoRA update (``lrpath adapt``) as one model: its base checkpoint's tensors with the adapter merged in,
``W + alpha / r * B A`` per target linear (and the adapter's output layer when it trained one), read through
the same interface as the base's :class:`checkpoint.dist_files.DcpTensorReader`, one layer at a time.

The adapter is stored at its global (unsplit) shapes in the layouts of the base's tensors (GLU ``fc1`` rows
as [gate; up] in both), so the product adds to the stored base tensor as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from lrpath_megatron.errors import LrpathError
from lrpath_megatron.hf.convert import LAYERS
from lrpath_megatron.checkpoint.dist_files import DcpTensorReader

ADAPTER_DIR = "adapter"  # run_layout.AdaptDirs.adapter: the exported adapter beside the update's checkpoints


def find_adapter(path: Path) -> Path | None:
    """The adapter directory ``path`` names: an update's directory (RUN/adapt/<method>/<version>) or its
    adapter/ itself; None for anything else."""
    from lrpath_megatron.adapters.lora import ADAPTER_CONFIG

    for candidate in (Path(path), Path(path) / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


class MergedAdapterReader:
    """Tensors of ``base`` (a DcpTensorReader of the base checkpoint) with the adapter in ``adapter_dir``."""

    def __init__(self, base: DcpTensorReader, adapter_dir: Path, head_key: str):
        from lrpath_megatron.adapters.lora import HEAD_KEY, read_adapter_config

        config = read_adapter_config(adapter_dir)
        self.base, self.head_key = base, head_key
        self.adapter = DcpTensorReader(Path(adapter_dir) / "weights")
        self.scaling = config["lora"]["alpha"] / config["lora"]["rank"]
        self.adapter_meta = self.adapter.tensor_meta()
        self.has_head = HEAD_KEY in self.adapter_meta
        self._check(adapter_dir, config["shapes"])

    def _check(self, adapter_dir: Path, shapes: dict) -> None:
        """Every adapter tensor fits a base tensor, before anything is read."""
        from lrpath_megatron.adapters.lora import HEAD_KEY

        base = {k: list(md.size) for k, md in self.base.tensor_meta().items()}
        problems = []
        for key, shape in shapes.items():
            if key == HEAD_KEY:
                want = base.get(self.head_key)
            else:
                module, kind = key.rsplit(".lora_", 1)
                stacked, layer = self._target(module)
                size = base.get(stacked)
                want = None
                if size is not None and len(size) == 3 and layer < size[0]:  # A: [r, in], B: [out, r]
                    want = [shape[0], size[2]] if kind.startswith("A") else [size[1], shape[1]]
            if want != shape:
                problems.append(f"{key}: adapter {shape}, base {want or 'none'}")
        if problems:
            raise LrpathError(f"adapter {adapter_dir} does not fit its base checkpoint ({'; '.join(problems[:3])}); "
                              f"export it with the base it was trained on")

    @staticmethod
    def _target(module: str) -> tuple[str, int]:
        """``decoder.layers.3.mlp.linear_fc1`` -> (``decoder.layers.mlp.linear_fc1.weight``, 3)."""
        layer, name = module[len(LAYERS):].split(".", 1)
        return f"{LAYERS}{name}.weight", int(layer)

    def tensor_meta(self) -> dict:
        return self.base.tensor_meta()

    def read(self, fqn: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        from lrpath_megatron.adapters.lora import HEAD_KEY

        if fqn == self.head_key and self.has_head:
            return self.adapter.read(HEAD_KEY, offsets, sizes)
        tensor = self.base.read(fqn, offsets, sizes)
        if not fqn.startswith(LAYERS) or not fqn.endswith(".weight"):
            return tensor
        for i, layer in enumerate(range(offsets[0], offsets[0] + sizes[0])):
            module = f"{LAYERS}{layer}.{fqn[len(LAYERS):].removesuffix('.weight')}"
            a, b = self._whole(f"{module}.lora_A.weight"), self._whole(f"{module}.lora_B.weight")
            if a is None:
                continue
            # in fp32, once: a bf16 base rounds the merged weight once, as a merged bf16 model would
            delta = self.scaling * (b.float() @ a.float())
            tensor[i] = (tensor[i].float() + delta[offsets[1]:offsets[1] + sizes[1], offsets[2]:offsets[2] + sizes[2]]
                         ).to(tensor.dtype)
        return tensor

    def _whole(self, key: str) -> torch.Tensor | None:
        md = self.adapter_meta.get(key)
        return None if md is None else self.adapter.read(key, [0] * len(md.size), list(md.size))
