"""Streaming weighted merge of checkpoints (WSM release): megatron-core dist checkpoints or exported files.

A dist checkpoint (torch_dist: PyTorch DCP ``.metadata`` + ``__*.distcp`` files, megatron-core's
``metadata.json`` and ``common.pt``) is merged stored chunk by stored chunk: for each chunk of the last
checkpoint's layout, the same region is read from every input (whatever TP/PP it was saved at),
accumulated in fp32 with the coefficients, cast back to the stored dtype and written
(:mod:`lrpath_megatron.checkpoint.dist_files` reads and writes the files). Output files are flushed every
``group_bytes``, so memory stays at about one group plus a few chunks, never the models.

Floating tensors are merged. Non-floating tensors and byte objects (megatron-core ``_extra_state``) are
copied from the last checkpoint and listed in the manifest. Optimizer state is never merged.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from tqdm import tqdm

from lrpath_megatron.checkpoint.dist_files import DEFAULT_GROUP_BYTES, DcpTensorReader, chunk_item, write_dist
from lrpath_megatron.checkpoint.layout import (MANIFEST, MODEL_DIR, is_complete, model_differences, read_manifest,
                                               sha256_file)
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mcore_api import versions
from lrpath_megatron.merge_weights import MergeWeights

# megatron-core files copied verbatim from the last input (backend config, non-sharded common state).
MCORE_SIDE_FILES = ("metadata.json", "common.pt")
_ITER_RE = re.compile(r"iter_(\d+)$")
OPTIMIZER_NOTE = (
    "model weights only: optimizer state is not merged. Resuming training from this checkpoint starts "
    "with fresh optimizer moments (and the trainer's own step counter/data position); to continue the "
    "main path, resume from the main path's checkpoint, not from a merge."
)


@dataclass(frozen=True)
class MergeInput:
    """One checkpoint to merge: the path given, the directory/file holding the weights, its step."""

    given: Path
    weights: Path  # the DCP directory (…/model) or the exported file
    step: int | None  # from an iter_NNNNNNN name, when there is one


@dataclass(frozen=True)
class MergeResult:
    output: Path
    manifest: dict
    merged: list[str]  # merged tensor keys
    copied: list[str]  # keys copied from the last checkpoint (non-floating tensors, objects)


def resolve_inputs(paths: Sequence[str | os.PathLike]) -> list[MergeInput]:
    """Accept iter directories (with ``model/``), DCP directories themselves, or exported files;
    all inputs must be of one kind and, when their steps are known, given oldest first."""
    inputs = []
    for p in map(Path, paths):
        if not p.exists():
            raise LrpathError(f"{p} does not exist; give existing checkpoints (iter_NNNNNNN directories or "
                              f"exported .pt files), oldest first")
        if p.is_file():
            inputs.append(MergeInput(p, p, None))
        elif (p / MODEL_DIR / ".metadata").is_file():
            inputs.append(MergeInput(p, p / MODEL_DIR, _step_of(p)))
        elif (p / ".metadata").is_file():
            inputs.append(MergeInput(p, p, _step_of(p.parent) if p.name == MODEL_DIR else _step_of(p)))
        else:
            raise LrpathError(
                f"{p} is not a checkpoint: expected an iter_NNNNNNN directory with {MODEL_DIR}/.metadata, a "
                "megatron-core dist checkpoint directory (.metadata), or an exported .pt file"
            )
    kinds = {i.weights.is_file() for i in inputs}
    if len(kinds) > 1:
        raise LrpathError("cannot merge dist checkpoint directories with exported files; pass one kind")
    steps = [i.step for i in inputs]
    if all(s is not None for s in steps) and any(b <= a for a, b in zip(steps, steps[1:])):
        raise LrpathError(f"checkpoints must be given oldest first with distinct steps, got steps {steps}")
    return inputs


def merge_checkpoints(
    paths: Sequence[str | os.PathLike],
    weights: MergeWeights,
    output: str | os.PathLike,
    *,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: bool = True,
) -> MergeResult:
    """Write ``sum_j c_j * checkpoint_j`` to ``output`` (a directory for dist checkpoints, a file for
    exported ones). Everything is validated before anything is written; on any error no output exists."""
    inputs = resolve_inputs(paths)
    if len(inputs) != weights.num_checkpoints:
        raise LrpathError(
            f"{len(inputs)} checkpoints given for {weights.num_checkpoints} merge coefficients "
            f"({weights.spec}); give one checkpoint per coefficient, oldest first"
        )
    output = Path(output)
    if output.exists():
        raise LrpathError(f"output {output} already exists; choose a new path or remove it")
    _check_configs(inputs)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        if inputs[0].weights.is_file():
            result = _merge_files(inputs, weights, tmp, progress)
        else:
            result = _merge_dist(inputs, weights, tmp, group_bytes, progress)
        os.replace(tmp, output)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
    return MergeResult(output, result.manifest, result.merged, result.copied)


# --------------------------------------------------------------------------------------------------
# Dist checkpoints (DCP)
# --------------------------------------------------------------------------------------------------
class _MergedSource:
    """The source side of ``FileSystemWriter.write_data``: computes each output chunk when it is written."""

    def __init__(self, readers: list[DcpTensorReader], coefficients: Sequence[float], bar: tqdm):
        self.readers, self.coefficients, self.bar = readers, coefficients, bar

    def resolve_data(self, item: WriteItem):
        fqn = item.index.fqn
        self.bar.update(1)
        if item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.readers[-1].read_bytes(fqn))
        chunk = item.tensor_data.chunk
        dtype = item.tensor_data.properties.dtype
        if not dtype.is_floating_point:
            return self.readers[-1].read(fqn, chunk.offsets, chunk.sizes)
        acc = torch.zeros(tuple(chunk.sizes), dtype=torch.float32)
        for reader, c in zip(self.readers, self.coefficients):
            if c:
                acc.add_(reader.read(fqn, chunk.offsets, chunk.sizes).float(), alpha=c)
        return acc.to(dtype)


def _merge_dist(inputs: list[MergeInput], weights: MergeWeights, out: Path, group_bytes: int,
                progress: bool) -> MergeResult:
    readers = [DcpTensorReader(i.weights) for i in inputs]
    last = readers[-1]
    _check_same_tensors(inputs, readers)
    items, merged, copied = [], [], []
    out_md: dict = {}
    for fqn, md in last.metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
            out_md[fqn] = md
            copied.append(fqn)
            continue
        (merged if md.properties.dtype.is_floating_point else copied).append(fqn)
        out_md[fqn] = TensorStorageMetadata(md.properties, md.size, list(md.chunks))
        items += [chunk_item(fqn, chunk, md) for chunk in md.chunks]
    model_out = out / MODEL_DIR
    with tqdm(total=len(items), desc="merge", unit="chunk", disable=not progress, file=sys.stderr) as bar:
        write_dist(model_out, out_md, items, _MergedSource(readers, weights.coefficients, bar), group_bytes)
    for name in MCORE_SIDE_FILES:
        if (inputs[-1].weights / name).is_file():
            shutil.copy2(inputs[-1].weights / name, model_out / name)
    manifest = _manifest(inputs, weights, "dist", merged, copied)
    # The same checksums as a trainer checkpoint, so a damaged merge is named instead of failing in the reader.
    manifest["files"] = {str(f.relative_to(out)): sha256_file(f) for f in sorted(model_out.rglob("*")) if f.is_file()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return MergeResult(out, manifest, merged, copied)


def _check_same_tensors(inputs: list[MergeInput], readers: list[DcpTensorReader]) -> None:
    ref = readers[-1].tensor_meta()
    for inp, reader in zip(inputs[:-1], readers[:-1]):
        meta = reader.tensor_meta()
        missing, extra = sorted(set(ref) - set(meta)), sorted(set(meta) - set(ref))
        if missing or extra:
            raise LrpathError(
                f"mismatched checkpoints: {inp.given} lacks tensors {missing[:3]} and has extra {extra[:3]} "
                f"compared with {inputs[-1].given}; merge only checkpoints of one model"
            )
        for fqn, md in ref.items():
            other = meta[fqn]
            if other.size != md.size or other.properties.dtype != md.properties.dtype:
                raise LrpathError(
                    f"mismatched checkpoints: tensor {fqn} is {tuple(other.size)} {other.properties.dtype} in "
                    f"{inp.given} but {tuple(md.size)} {md.properties.dtype} in {inputs[-1].given}; merge only "
                    "checkpoints of one model configuration"
                )


# --------------------------------------------------------------------------------------------------
# Exported single-file checkpoints: {"config": ..., "model": {name: tensor}}
# --------------------------------------------------------------------------------------------------
def _merge_files(inputs: list[MergeInput], weights: MergeWeights, out: Path, progress: bool) -> MergeResult:
    # mmap keeps every input on disk; only the tensor being merged is paged in.
    states = [_load_export(i.weights) for i in inputs]
    ref = states[-1]["model"]
    for inp, state in zip(inputs[:-1], states[:-1]):
        _check_same_file_tensors(inp, state["model"], inputs[-1], ref)
    merged_model, merged, copied = {}, [], []
    for name in tqdm(ref, desc="merge", unit="tensor", disable=not progress, file=sys.stderr):
        value = ref[name]
        if not (isinstance(value, torch.Tensor) and value.dtype.is_floating_point):
            merged_model[name] = value
            copied.append(name)
            continue
        acc = torch.zeros(value.shape, dtype=torch.float32)
        for state, c in zip(states, weights.coefficients):
            if c:
                acc.add_(state["model"][name].float(), alpha=c)
        merged_model[name] = acc.to(value.dtype)
        merged.append(name)
    manifest = _manifest(inputs, weights, "file", merged, copied)
    torch.save({**states[-1], "model": merged_model, "merge": manifest}, out)
    return MergeResult(out, manifest, merged, copied)


def _load_export(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise LrpathError(f"{path} is not a readable exported checkpoint: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise LrpathError(f"{path} is not an exported checkpoint: expected a dict with a 'model' state dict")
    return state


def _check_same_file_tensors(inp: MergeInput, model: dict, last: MergeInput, ref: dict) -> None:
    if set(model) != set(ref):
        diff = sorted(set(model) ^ set(ref))[:3]
        raise LrpathError(f"mismatched checkpoints: {inp.given} and {last.given} differ in entries {diff}")
    for name, value in ref.items():
        other = model[name]
        if isinstance(value, torch.Tensor) and (
            not isinstance(other, torch.Tensor) or other.shape != value.shape or other.dtype != value.dtype
        ):
            got = f"{tuple(other.shape)} {other.dtype}" if isinstance(other, torch.Tensor) else type(other).__name__
            raise LrpathError(
                f"mismatched checkpoints: {name} is {got} in {inp.given} but {tuple(value.shape)} {value.dtype} "
                f"in {last.given}; merge only checkpoints of one model configuration"
            )


# --------------------------------------------------------------------------------------------------
# Lineage
# --------------------------------------------------------------------------------------------------
def _check_configs(inputs: list[MergeInput]) -> None:
    """Model configs recorded next to the weights (trainer manifest or export) must agree."""
    configs = [(_model_config(i), i) for i in inputs]
    known = [(c, i) for c, i in configs if c is not None]
    for config, inp in known[:-1]:
        ref, last = known[-1]
        keys = model_differences(config, ref)
        if keys:
            raise LrpathError(
                f"mismatched checkpoints: model config of {inp.given} differs from {last.given} in "
                f"{', '.join(f'model.{k}' for k in keys)}; merge only checkpoints of one model"
            )


def _model_config(inp: MergeInput) -> dict | None:
    if inp.weights.is_file():
        config = _load_export(inp.weights).get("config")
    else:
        ckpt = inp.weights.parent if inp.weights.name == MODEL_DIR else inp.weights
        config = read_manifest(ckpt).get("config") if is_complete(ckpt) else None
    return config.get("model") if isinstance(config, dict) and isinstance(config.get("model"), dict) else None


def _manifest(inputs: list[MergeInput], weights: MergeWeights, fmt: str, merged: list[str],
              copied: list[str]) -> dict:
    last = inputs[-1]
    manifest = {
        "kind": "merge",
        "format": fmt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [
            {"path": str(i.given.resolve()), "step": i.step, "coefficient": c}
            for i, c in zip(inputs, weights.coefficients)
        ],
        "weights": weights.to_dict(),
        "step": last.step,
        "merged_tensors": len(merged),
        "copied_from_last": copied,
        "optimizer": OPTIMIZER_NOTE,
        "versions": versions(),
    }
    source = last.weights.parent if fmt == "dist" and last.weights.name == MODEL_DIR else None
    if source is not None and is_complete(source):
        trainer = read_manifest(source)
        manifest.update({k: trainer[k] for k in ("config", "plan_hash", "path") if k in trainer})
    return manifest


def _step_of(path: Path) -> int | None:
    match = _ITER_RE.search(path.name)
    return int(match.group(1)) if match else None


def already_merged(checkpoints: Sequence, spec: str, out: Path) -> bool:
    """True if ``out`` is a finished merge of these checkpoints with these weights (it is renamed into place
    only when complete, so its manifest means done); a different merge there is an error, not a skip."""
    if not is_complete(out):
        return False
    manifest = read_manifest(out)
    have = ([i["path"] for i in manifest.get("inputs", [])], manifest.get("weights", {}).get("spec"))
    want = ([str(Path(c).resolve()) for c in checkpoints], spec)
    if have != want:
        raise LrpathError(
            f"{out} already holds a different merge ({len(have[0])} checkpoints, weights {have[1]}; asked for "
            f"{len(want[0])}, weights {want[1]}); remove it or choose another --out"
        )
    return True
