"""Export a checkpoint (trainer or ``lrpath merge`` output) to one plain torch file.

The file is ``{"config": TrainConfig dict, "model": {name: tensor}, "source": lineage}``: the GPTModel's
state dict at TP=PP=1, whatever layout the checkpoint was saved with, loadable with ``torch.load`` and
nothing else. ``lrpath merge`` merges files of this form.

One process builds the model at TP=PP=1 from the manifest's config and loads the dist checkpoint into it
(megatron-core reshards on load), so memory is one full model. It always runs on the CPU with the local
layer spec: the parameter names are then the same whichever machine exports (Transformer Engine's spec
names its layers differently), and no GPU is needed.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from lrpath_megatron.checkpoint.layout import MANIFEST, read_manifest
from lrpath_megatron.config import ConfigError, TrainConfig, from_dict, to_dict
from lrpath_megatron.errors import LrpathError

# Manifest fields that say where the weights come from (trainer and merge manifests).
LINEAGE_KEYS = ("kind", "path", "step", "parent", "parent_path", "fork_step", "release", "plan_hash",
                "code_version", "consumed_samples", "inputs", "weights")


@dataclass(frozen=True)
class ExportResult:
    output: Path
    tensors: int
    parameters: int  # elements of the floating-point tensors
    source: dict


def read_checkpoint(ckpt: Path) -> tuple[dict, TrainConfig]:
    """The manifest and config of a complete checkpoint directory; raises LrpathError otherwise."""
    ckpt = Path(ckpt)
    hint = "pass an iter_NNNNNNN directory written by `lrpath train` or `lrpath merge`"
    if not ckpt.is_dir():
        raise LrpathError(f"{ckpt} is not a directory; {hint}")
    if not (ckpt / MANIFEST).is_file():
        raise LrpathError(f"{ckpt} has no {MANIFEST}: not a complete checkpoint (a save still running or "
                          f"killed leaves none); {hint}")
    if not (ckpt / "model" / ".metadata").is_file():
        raise LrpathError(f"{ckpt}/model has no dist-checkpoint .metadata: the model weights are missing; {hint}")
    manifest = read_manifest(ckpt)
    if not isinstance(manifest.get("config"), dict):
        raise LrpathError(f"{ckpt / MANIFEST} has no 'config' (the model settings are needed to rebuild it); {hint}")
    data = manifest["config"].get("data")
    if isinstance(data, dict):  # checkpoints written before data.tokenizer_model (never read) was removed
        data.pop("tokenizer_model", None)
    try:
        cfg = from_dict(TrainConfig, manifest["config"]).validate()
    except ConfigError as exc:
        raise LrpathError(f"{ckpt / MANIFEST}: config is not valid for this version of lrpath: {exc}") from None
    return manifest, cfg


def single_rank_config(cfg: TrainConfig) -> TrainConfig:
    """The same model on one CPU process: TP=PP=CP=1 without interleaving or sequence parallelism, one
    micro-batch per step (no data is read), no FP8 (an FP8 run stores its weights in the params dtype;
    FP8 is a compute setting)."""
    mbs = cfg.parallel.micro_batch_size
    return replace(cfg, parallel=replace(cfg.parallel, tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None,
                                         sequence_parallel=False, context_parallel=1,
                                         global_batch_size=mbs, use_distributed_optimizer=False),
                   precision=replace(cfg.precision, fp8=None))


def export_checkpoint(ckpt: Path, out: Path) -> ExportResult:
    """Write ``out`` (a new file) from checkpoint directory ``ckpt``. On any error no ``out`` exists."""
    ckpt, out = Path(ckpt), Path(out)
    manifest, cfg = read_checkpoint(ckpt)
    if out.exists():
        raise LrpathError(f"output {out} already exists; choose a new path or remove it")
    if not out.parent.is_dir():
        raise LrpathError(f"output directory {out.parent} does not exist; create it first")
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) != 1:
        raise LrpathError("lrpath export runs as one process: start it without torchrun/srun")
    # A stand-alone process has no launcher-assigned port; the default one may belong to a running job.
    os.environ.setdefault("MASTER_PORT", str(_free_port()))

    cfg1 = single_rank_config(cfg)
    source = {k: manifest[k] for k in LINEAGE_KEYS if k in manifest}
    source["checkpoint"] = str(ckpt.resolve())
    with tqdm(total=3, desc="export", unit="stage", file=sys.stderr) as bar:
        model = _load_single_rank(ckpt, cfg1, bar)
        state = {name: t.detach().clone() for name, t in model.state_dict().items()
                 if not name.endswith("_extra_state")}
        bar.update()
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            torch.save({"config": to_dict(cfg), "model": state, "source": source}, tmp)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
        bar.update()
    params = sum(t.numel() for t in state.values() if t.dtype.is_floating_point)
    return ExportResult(out, len(state), params, source)


def _load_single_rank(ckpt: Path, cfg: TrainConfig, bar):
    from lrpath_megatron import distributed
    from lrpath_megatron.checkpoint.tensors import load_model
    from lrpath_megatron.model import build_model

    previous = os.environ.get("LRPATH_DEVICE")
    os.environ["LRPATH_DEVICE"] = "cpu"
    try:
        distributed.initialize(cfg.parallel, cfg.seed)
        model = build_model(cfg.model, cfg.parallel, cfg.precision)
        bar.update()
        try:
            load_model(ckpt, model)
        except Exception as exc:  # megatron-core / DCP raise many types for a damaged or foreign checkpoint
            raise LrpathError(
                f"cannot load the model weights of {ckpt} into the model its manifest describes: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return model
    finally:
        distributed.shutdown()
        if previous is None:
            del os.environ["LRPATH_DEVICE"]
        else:
            os.environ["LRPATH_DEVICE"] = previous


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
