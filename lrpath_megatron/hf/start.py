"""A path that starts from a Hugging Face model directory (``plan.main.init_from`` or
``checkpoint.init_from`` naming config.json + safetensors): the model is imported once into the path's
directory (:attr:`run_layout.PathDirs.hf_import`) and the path starts from that checkpoint, as from any
``lrpath hf import`` output. Reruns, resumes and the other ranks reuse the import. The trainer resolves
its run's origin here (:func:`with_imported_origin`) before the checkpoint policy chooses a start, so
the policy sees lrpath checkpoints only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lrpath_megatron import ranks
from lrpath_megatron.checkpoint.layout import find_resumable, is_complete, model_differences, read_manifest
from lrpath_megatron.config import TrainConfig, to_dict
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.path import WEIGHTS, PathRun, Start


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory rather than an lrpath checkpoint."""
    return (Path(path) / "config.json").is_file() and not is_complete(path)


def check_hf_model(hf_dir: Path, cfg: TrainConfig, who: str, source: str) -> None:
    """Raise unless the model ``hf_dir`` describes, at the config's sequence length, is the config's model
    (``who``: what starts from it; ``source``: config or plan)."""
    from lrpath_megatron.hf.architectures import model_from_hf
    from lrpath_megatron.hf.importer import read_hf_config

    _, derived = model_from_hf(read_hf_config(hf_dir), str(Path(hf_dir) / "config.json"), cfg.model.seq_length)
    theirs, ours = to_dict(derived), to_dict(cfg.model)
    diff = model_differences(theirs, ours)
    if diff:
        changes = ", ".join(f"model.{k}: Hugging Face {theirs.get(k)!r} vs {source} {ours.get(k)!r}" for k in diff)
        raise LrpathError(f"{who} starts from the Hugging Face model {hf_dir}, whose settings differ from the "
                          f"{source}'s model section ({changes}); set the model section to the model's (`lrpath "
                          f"hf import {hf_dir} --out CKPT --seq-length {cfg.model.seq_length}` writes it to "
                          f"CKPT/model.yaml)")


def imported_checkpoint(hf_dir: Path, cfg: TrainConfig, target: Path, name: str, source: str) -> Path:
    """Collective: the checkpoint of ``hf_dir`` at ``target``, imported by rank 0 unless already there."""
    from lrpath_megatron.hf.importer import import_hf

    hf_dir, target, who = Path(hf_dir), Path(target), f"path {name!r}"
    check_hf_model(hf_dir, cfg, who, source)
    if is_complete(target):
        imported_from = read_manifest(target).get("hf_source", {}).get("path")
        if imported_from != str(hf_dir.resolve()):
            raise LrpathError(f"{who} starts from {hf_dir}, but {target} holds the import of {imported_from}; "
                              f"restore the {source}'s init_from, or use a new --run-dir")
        return target
    if ranks.rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        import_hf(hf_dir, target, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                  cfg.model.seq_length, progress=False)
        print(f"[{name}] imported {hf_dir} into {target}", flush=True)
    ranks.barrier()
    return target


def with_imported_origin(run: PathRun, cfg: TrainConfig) -> PathRun:
    """Collective: ``run``, its origin a Hugging Face model directory replaced by that model's import
    (:func:`imported_checkpoint`); any other run as it is. A path that resumes from a checkpoint of its own
    reads neither: it names the import it started from."""
    origin = run.origin
    if origin.kind != WEIGHTS or not is_hf_dir(origin.checkpoint):
        return run
    if find_resumable(run.dirs.checkpoints) is not None:
        return dataclasses.replace(run, origin=Start(WEIGHTS, run.dirs.hf_import))
    imported = imported_checkpoint(origin.checkpoint, cfg, run.dirs.hf_import, run.name, run.source)
    return dataclasses.replace(run, origin=Start(WEIGHTS, imported))
