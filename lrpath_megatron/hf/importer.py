"""``lrpath hf import``: a Hugging Face checkpoint directory as an lrpath checkpoint (weights only, step 0).

The output is a weights-only checkpoint like the one ``lrpath merge`` writes, loadable at any TP/PP::

    model/          megatron-core dist checkpoint (torch_dist), one chunk per layer of each stacked tensor
    hf/             the source's tokenizer and generation files, copied as they are (an export writes them back)
    model.yaml      the derived model section, to paste into a plan or config
    manifest.json   written last: kind hf_import, step 0, the full config, the source, checksums

The weights stream: the dist-checkpoint writer asks for one chunk at a time, which is read from its
safetensors shard, fused (q/k/v, gate/up) and written. Everything is checked before anything is written,
and the checkpoint is assembled in a temporary directory renamed into place at the end.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from tqdm import tqdm

from lrpath_megatron.checkpoint.dist_files import DEFAULT_GROUP_BYTES, chunk_item, write_dist
from lrpath_megatron.checkpoint.layout import MANIFEST, MODEL_DIR, code_version, sha256_file, write_json_atomic
from lrpath_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig, to_dict
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.hf.architectures import model_from_hf
from lrpath_megatron.hf.convert import (
    HF_LAYER, IGNORED_HF_SUFFIXES, LAYERS, extra_state_keys, hf_shapes, layer_tensors, mcore_shapes, model_tensors,
    to_mcore,
)
from lrpath_megatron.hf.safetensors_files import HfWeights
from lrpath_megatron.mcore_api import versions

HF_FILES_DIR = "hf"
MODEL_YAML = "model.yaml"
# Copied from the source next to the weights: what an export needs to give back a usable model directory.
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")


@dataclass(frozen=True)
class ImportResult:
    output: Path
    architecture: str
    model: ModelConfig
    dtype: torch.dtype
    parameters: int
    side_files: list[str]


def import_hf(hf_dir: Path, out: Path, tensor_parallel: int = 1, pipeline_parallel: int = 1,
              seq_length: int | None = None, progress: bool = True) -> ImportResult:
    """Write checkpoint ``out`` (a new directory) from HF directory ``hf_dir``. On any error no ``out`` exists."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists():
        raise LrpathError(f"output {out} already exists; choose a new path or remove it")
    if not out.parent.is_dir():
        raise LrpathError(f"output directory {out.parent} does not exist; create it first")
    raw = read_hf_config(hf_dir)
    arch, model = model_from_hf(raw, str(hf_dir / "config.json"), seq_length)
    weights = HfWeights(hf_dir)
    _check_tensors(weights, model, hf_dir)
    dtype = _stored_dtype(weights, model)
    cfg = TrainConfig(model=model, parallel=ParallelConfig(tensor_parallel=tensor_parallel,
                                                           pipeline_parallel=pipeline_parallel),
                      precision=PrecisionConfig(dtype="bf16" if dtype == torch.bfloat16 else "fp32")).validate()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        metadata, items = _dist_layout(model, dtype)
        with tqdm(total=len(items), desc="import", unit="chunk", disable=not progress, file=sys.stderr) as bar:
            write_dist(tmp / MODEL_DIR, metadata, items, _HfSource(weights, model, dtype, bar), DEFAULT_GROUP_BYTES)
        _write_mcore_side_files(tmp / MODEL_DIR)
        side_files = _copy_side_files(hf_dir, tmp / HF_FILES_DIR)
        (tmp / MODEL_YAML).write_text(f"# The model section of {arch} {hf_dir.resolve()}, for a plan or config.\n"
                                      + yaml.safe_dump({"model": to_dict(model)}, sort_keys=False))
        write_json_atomic(tmp / MANIFEST, _manifest(tmp, cfg, hf_dir, arch, raw, dtype, side_files))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    parameters = sum(torch.Size(s).numel() for s in hf_shapes(model).values())
    return ImportResult(out, arch, model, dtype, parameters, side_files)


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise LrpathError(f"{hf_dir} is not a directory; pass a Hugging Face model directory (config.json + "
                          f"safetensors)")
    if not path.is_file():
        raise LrpathError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LrpathError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise LrpathError(f"{path} is not a JSON object")
    return raw


def _check_tensors(weights: HfWeights, model: ModelConfig, hf_dir: Path) -> None:
    """The files hold exactly the tensors config.json describes, in its shapes."""
    expected = hf_shapes(model)
    present = {n for n in weights.shapes if not n.endswith(IGNORED_HF_SUFFIXES)}
    if not model.untie_embeddings:
        present.discard("lm_head.weight")  # a tied model's copy of the embedding; transformers ignores it too
    problems = []
    missing = sorted(set(expected) - present)
    if missing:
        problems.append(f"lacks {len(missing)} tensors its config describes (e.g. {', '.join(missing[:3])})")
    extra = sorted(present - set(expected))
    if extra:
        problems.append(f"has {len(extra)} tensors its config does not describe (e.g. {', '.join(extra[:3])})")
    shapes = [f"{n} is {list(weights.shapes[n])}, the config implies {list(s)}"
              for n, s in expected.items() if n in present and weights.shapes[n] != s]
    if shapes:
        problems.append(f"has {len(shapes)} tensors of other shapes than its config implies "
                        f"({'; '.join(shapes[:3])})")
    if problems:
        raise LrpathError(f"{hf_dir}: the weights do not match config.json: {'; '.join(problems)}")


def _stored_dtype(weights: HfWeights, model: ModelConfig) -> torch.dtype:
    """bf16 weights stay bf16; anything else is stored in fp32, which holds fp16 and fp32 values exactly."""
    dtypes = {weights.dtypes[n] for n in hf_shapes(model)}
    return torch.bfloat16 if dtypes == {torch.bfloat16} else torch.float32


def _dist_layout(model: ModelConfig, dtype: torch.dtype) -> tuple[dict, list[WriteItem]]:
    """The dist checkpoint's metadata (fqn -> storage metadata) and write items, layer by layer."""
    props = TensorProperties(dtype=dtype)
    shapes = mcore_shapes(model)
    metadata: dict = {}
    for t in model_tensors(model):
        shape = torch.Size(shapes[t.key])
        whole = ChunkStorageMetadata(torch.Size([0] * len(shape)), shape)
        metadata[t.key] = TensorStorageMetadata(props, shape, [whole])
    stacked = [LAYERS + t.key for t in layer_tensors(model)]
    for key in stacked:
        shape = torch.Size(shapes[key])
        metadata[key] = TensorStorageMetadata(props, shape, [
            ChunkStorageMetadata(torch.Size([layer] + [0] * (len(shape) - 1)), torch.Size([1, *shape[1:]]))
            for layer in range(model.num_layers)])
    items = [chunk_item(t.key, metadata[t.key].chunks[0], metadata[t.key]) for t in model_tensors(model)]
    for layer in range(model.num_layers):
        items += [chunk_item(key, metadata[key].chunks[layer], metadata[key]) for key in stacked]
    for key in extra_state_keys(model):
        metadata[key] = BytesStorageMetadata()
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
    return metadata, items


def _empty_extra_state() -> bytes:
    """What megatron-core stores for the extra state of a linear layer without FP8 metadata: the list of the
    sharded object's values, here one None."""
    buffer = io.BytesIO()
    torch.save([None], buffer)
    return buffer.getvalue()


class _HfSource:
    """The source side of the dist-checkpoint writer: reads and converts each chunk when it is written."""

    def __init__(self, weights: HfWeights, model: ModelConfig, dtype: torch.dtype, bar: tqdm):
        self.weights, self.model, self.dtype, self.bar = weights, model, dtype, bar
        self.whole = {t.key: t for t in model_tensors(model)}
        self.stacked = {LAYERS + t.key: t for t in layer_tensors(model)}
        self.extra_state = _empty_extra_state()

    def resolve_data(self, item: WriteItem):
        self.bar.update()
        fqn = item.index.fqn
        if item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.extra_state)
        if fqn in self.whole:
            tensor = self.weights.read([self.whole[fqn].hf])[0]
        else:
            t, layer = self.stacked[fqn], item.index.offset[0]
            parts = self.weights.read(HF_LAYER.format(layer) + n for n in t.hf)
            tensor = to_mcore(t, parts, self.model).unsqueeze(0)
        return tensor.to(self.dtype)


def _write_mcore_side_files(model_dir: Path) -> None:
    """megatron-core's backend description (metadata.json) and its common state (empty for a GPTModel)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    save_config(CheckpointingConfig("torch_dist"), str(model_dir))
    torch.save({}, model_dir / COMMON_STATE_FNAME)


def _copy_side_files(hf_dir: Path, dest: Path) -> list[str]:
    names = [n for n in HF_SIDE_FILES if (hf_dir / n).is_file()]
    if names:
        dest.mkdir()
        for name in names:
            shutil.copyfile(hf_dir / name, dest / name)
    return names


def _manifest(ckpt: Path, cfg: TrainConfig, hf_dir: Path, arch: str, raw: dict, dtype: torch.dtype,
              side_files: list[str]) -> dict:
    return {
        "kind": "hf_import",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": 0,
        "config": to_dict(cfg),
        "optimizer_state": False,
        "code_version": code_version(),
        "versions": versions(),
        "hf_source": {"path": str(hf_dir.resolve()), "architecture": arch, "config": raw,
                      "dtype": str(dtype).removeprefix("torch."), "side_files": side_files},
        # The same checksums as a trainer checkpoint, so damage is named instead of failing in the reader.
        "files": {str(f.relative_to(ckpt)): sha256_file(f) for f in sorted(ckpt.rglob("*")) if f.is_file()},
    }
