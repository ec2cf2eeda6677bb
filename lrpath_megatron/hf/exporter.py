"""``lrpath hf export``: an lrpath checkpoint (trainer checkpoint at any TP/PP, merge output, HF import, LoRA
update merged into its base) as a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` and vLLM load.

The dist checkpoint is read directly (:class:`checkpoint.dist_files.DcpTensorReader`), one layer at a time
whatever TP/PP it was saved at: no model is built and no process group started, so memory holds one layer.
The directory is assembled under a temporary name and renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from lrpath_megatron.checkpoint.dist_files import DcpTensorReader
from lrpath_megatron.checkpoint.layout import MANIFEST, MODEL_DIR
from lrpath_megatron.config import ModelConfig
from lrpath_megatron.data_tools.encoders import HF_FILE
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.export import read_checkpoint
from lrpath_megatron.hf.adapter_merge import MergedAdapterReader, find_adapter
from lrpath_megatron.hf.architectures import hf_config
from lrpath_megatron.hf.convert import (
    HF_LAYER, LAYERS, from_mcore, hf_shapes, layer_tensors, mcore_shapes, model_tensors,
)
from lrpath_megatron.hf.importer import HF_FILES_DIR, HF_SIDE_FILES
from lrpath_megatron.hf.safetensors_files import write_safetensors

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size


@dataclass(frozen=True)
class HfExportResult:
    output: Path
    architecture: str
    files: list[str]
    tokenizer_files: list[str]
    tokenizer_from: str | None  # where the tokenizer files came from; None = none known


def export_hf(ckpt: Path, out: Path, overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              tokenizer_model: Path | None = None, progress: bool = True) -> HfExportResult:
    """Write HF directory ``out`` from checkpoint ``ckpt``. An existing ``out`` is replaced only with
    ``overwrite``, and only once the new one is complete; on any error nothing new is left behind."""
    ckpt, out = Path(ckpt), Path(out)
    adapter = find_adapter(ckpt)
    if adapter is not None:
        ckpt = _adapter_base(adapter)
    manifest, cfg = read_checkpoint(ckpt)
    if out.exists() and not overwrite:
        raise LrpathError(f"output {out} already exists; choose a new path, or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise LrpathError(f"output directory {out.parent} does not exist; create it first")
    if tokenizer_model is not None and not Path(tokenizer_model).exists():
        raise LrpathError(f"tokenizer {tokenizer_model} does not exist; pass a SentencePiece .model, a Hugging Face "
                          f"{HF_FILE} or a directory holding one")
    model = cfg.model
    reader = DcpTensorReader(ckpt / MODEL_DIR)
    if adapter is not None:
        head = "output_layer.weight" if model.untie_embeddings else "embedding.word_embeddings.weight"
        reader = MergedAdapterReader(reader, adapter, head)
    source, origin = _hf_origin(ckpt, manifest)
    # The architecture first: a model no HF architecture computes is refused as such, not as bad shapes.
    embedding = reader.tensor_meta().get("embedding.word_embeddings.weight")
    arch, config = hf_config(model, embedding.properties.dtype if embedding else torch.float32,
                             source.get("config") or _project_token_ids())
    dtypes = _check_stored(reader, model, ckpt)
    side_dir = _side_files_dir(origin, source)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        # A given tokenizer first (a bad one is refused before any weight is written); it replaces an
        # imported model's own tokenizer files.
        tokenizer = write_tokenizer(Path(tokenizer_model), tmp) if tokenizer_model is not None else []
        side = ("generation_config.json",) if tokenizer_model is not None else HF_SIDE_FILES
        copied = [n for n in side if side_dir and (side_dir / n).is_file()]
        total = sum(torch.Size(s).numel() for s in hf_shapes(model).values())
        with tqdm(total=total, desc="export", unit="param", unit_scale=True, disable=not progress,
                  file=sys.stderr) as bar:
            files = write_safetensors(tmp, hf_shapes(model), dtypes, _counted(_hf_tensors(reader, model), bar),
                                      max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in copied:
            shutil.copyfile(side_dir / name, tmp / name)
        if "generation_config.json" not in copied:
            token_ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
            (tmp / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
        tokenizer += [n for n in copied if n != "generation_config.json"]
        files += ["config.json", "generation_config.json"] + tokenizer
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    tokenizer_from = str(tokenizer_model) if tokenizer_model else (str(side_dir) if tokenizer else None)
    return HfExportResult(out, arch, files, tokenizer, tokenizer_from)


def _adapter_base(adapter: Path) -> Path:
    """The base checkpoint of a LoRA update's adapter; a dynamic ConPET update is no single model."""
    from lrpath_megatron.adapters.lora import ADAPTER_CONFIG, read_adapter_config

    result = adapter.parent / "result.json"  # run_layout.AdaptDirs.result
    if result.is_file() and json.loads(result.read_text()).get("method") == "conpet-dynamic":
        raise LrpathError(f"{adapter.parent} is a dynamic ConPET update: a selector picks one of several adapters "
                          f"per input, so no single model holds it; export a lora or conpet-static update")
    base = read_adapter_config(adapter).get("base_checkpoint")
    if base is None:
        raise LrpathError(f"{adapter / ADAPTER_CONFIG} does not name its base checkpoint (base_checkpoint); "
                          f"export an adapter written by `lrpath adapt`")
    return Path(base)


def write_tokenizer(tokenizer: Path, out: Path) -> list[str]:
    """Tokenizer files for transformers in ``out`` from the tokenizer the data was tokenized with, by its
    kind (a directory holding tokenizer.json, or the file's suffix); returns their names."""
    if tokenizer.is_dir():
        tokenizer = tokenizer / HF_FILE
    writers = {".model": _write_sentencepiece, ".json": _write_hf_tokenizer}
    if tokenizer.suffix not in writers or not tokenizer.is_file():
        raise LrpathError(f"tokenizer {tokenizer} is not a SentencePiece .model or a Hugging Face "
                          f"{HF_FILE}: pass the tokenizer the data was preprocessed with")
    before = set(os.listdir(out))
    writers[tokenizer.suffix](tokenizer, out)
    return sorted(set(os.listdir(out)) - before)


def _write_hf_tokenizer(tokenizer: Path, out: Path) -> None:
    """A Hugging Face tokenizer.json goes out as it is, with the settings files beside it (its special tokens,
    eos included, are what `lrpath data preprocess` read there)."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        HFTokenizer.from_file(str(tokenizer))
    except Exception as exc:  # tokenizers raises its own Exception type for unreadable files
        raise LrpathError(f"tokenizer {tokenizer} is not a Hugging Face {HF_FILE}: {exc}") from None
    shutil.copyfile(tokenizer, out / HF_FILE)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer.parent / name).is_file():
            shutil.copyfile(tokenizer.parent / name, out / name)


def _write_sentencepiece(tokenizer: Path, out: Path) -> None:
    """A SentencePiece model (``lrpath data train-tokenizer``), saved by transformers' own SentencePiece
    tokenizer with the project's special tokens: AutoTokenizer then gives the ids the data holds."""
    import sentencepiece
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from lrpath_megatron.data_tools.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

    try:
        piece = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).id_to_piece
    except (OSError, RuntimeError) as exc:
        raise LrpathError(f"tokenizer {tokenizer} is not a SentencePiece model ({exc}); pass the .model file of "
                          f"`lrpath data train-tokenizer`") from None
    SentencePieceBackend(vocab_file=str(tokenizer), bos_token=piece(BOS_ID), eos_token=piece(EOS_ID),
                         unk_token=piece(UNK_ID), pad_token=piece(PAD_ID)).save_pretrained(out)


def _project_token_ids() -> dict:
    """Token ids of a model trained here from scratch: the conventions of lrpath's SentencePiece tokenizers."""
    from lrpath_megatron.data_tools.tokenizer import BOS_ID, EOS_ID, PAD_ID

    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def _check_stored(reader: DcpTensorReader, model: ModelConfig, ckpt: Path) -> dict[str, torch.dtype]:
    """The stored tensors are those of the manifest's model, in its shapes; returns each HF tensor's dtype."""
    expected = mcore_shapes(model)
    stored = reader.tensor_meta()
    problems = [f"{key} is missing" for key in expected if key not in stored]
    problems += [f"{key} is {list(stored[key].size)}, the model implies {list(shape)}"
                 for key, shape in expected.items() if key in stored and tuple(stored[key].size) != shape]
    problems += [f"{key} has no place in the model" for key in stored if key not in expected]
    if problems:
        raise LrpathError(f"{ckpt}: the stored weights do not match the model its {MANIFEST} describes "
                          f"({len(problems)} problems: {'; '.join(problems[:3])}); the checkpoint is damaged or "
                          f"its manifest belongs to another model")
    dtypes = {t.hf: stored[t.key].properties.dtype for t in model_tensors(model)}
    for t in layer_tensors(model):
        for layer in range(model.num_layers):
            dtypes.update({HF_LAYER.format(layer) + n: stored[LAYERS + t.key].properties.dtype for n in t.hf})
    return dtypes


def _hf_tensors(reader: DcpTensorReader, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in the order of :func:`hf_shapes`, reading one layer at a time."""
    sizes = {key: list(md.size) for key, md in reader.tensor_meta().items()}

    def whole(t) -> torch.Tensor:
        tensor = reader.read(t.key, [0] * len(sizes[t.key]), sizes[t.key])
        return tensor[:model.vocab_size] if t.vocab else tensor  # padding rows are no tokens

    embedding, *rest = model_tensors(model)
    yield embedding.hf, whole(embedding)
    for index in range(model.num_layers):
        for t in layer_tensors(model):
            size = sizes[LAYERS + t.key]
            stored = reader.read(LAYERS + t.key, [index] + [0] * (len(size) - 1), [1, *size[1:]])[0]
            yield from zip((HF_LAYER.format(index) + n for n in t.hf), from_mcore(t, stored, model))
    for t in rest:
        yield t.hf, whole(t)


def _counted(pairs: Iterator[tuple[str, torch.Tensor]], bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in pairs:
        bar.update(tensor.numel())
        yield name, tensor


def _hf_origin(ckpt: Path, manifest: dict) -> tuple[dict, Path]:
    """The open model a checkpoint descends from (its ``hf_source``: path, architecture, config.json) and
    the import checkpoint that recorded it, found along the parents (a branch's fork, a main path's
    init_from, a merge's last input); ({}, ckpt) for a model trained here from scratch."""
    from lrpath_megatron.checkpoint.layout import is_complete, read_manifest
    from lrpath_megatron.hf.importer import read_hf_config
    from lrpath_megatron.hf.start import is_hf_dir

    seen = set()
    while str(ckpt) not in seen:
        seen.add(str(ckpt))
        if manifest.get("hf_source"):
            return manifest["hf_source"], ckpt
        parents = [manifest.get("parent")] + [i["path"] for i in manifest.get("inputs", [])[-1:]]
        parent = next((Path(p) for p in parents if p), None)
        if parent is None:
            break
        if is_hf_dir(parent):  # a path started from the HF directory itself
            return {"path": str(parent), "config": read_hf_config(parent)}, ckpt
        if not is_complete(parent):
            break
        ckpt, manifest = parent, read_manifest(parent)
    return {}, ckpt


def _side_files_dir(ckpt: Path, source: dict) -> Path | None:
    """Where the tokenizer and generation files of an imported model are: copied into the checkpoint at
    import, else still in the source directory."""
    for candidate in (ckpt / HF_FILES_DIR, Path(source["path"]) if source.get("path") else None):
        if candidate is not None and candidate.is_dir() and any((candidate / n).is_file() for n in HF_SIDE_FILES):
            return candidate
    return None


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``; an existing ``out`` is renamed aside first and removed after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
