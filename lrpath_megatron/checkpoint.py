"""Checkpoints: megatron-core dist-checkpointing, atomic commit, ``latest`` pointer, lineage manifest.

Layout of one checkpoint (``iter_NNNNNNN`` = steps completed)::

    model/              dist checkpoint of model.sharded_state_dict() (any TP/PP can load it)
    optimizer/          dist checkpoint of the optimizer state; absent from weights-only checkpoints (merge
                        inputs, releases saved with checkpoint.save_optimizer=false), which training
                        does not resume from
    trainer_state.pt    step and data-sampler state (identical on all ranks)
    rng/rank_R.pt       each rank's RNG states (restored only when the world shape is unchanged)
    manifest.json       written last: config, lineage, file checksums

Everything is written under ``.tmp_iter_NNNNNNN`` and renamed when complete; ``latest`` is replaced after
the rename. A process killed at any point leaves either the previous checkpoint or the new one visible,
never half of one.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from lrpath_megatron import ranks
from lrpath_megatron.checkpoint_layout import LATEST, MANIFEST, iter_name, model_differences, read_manifest, sha256_file, verify, write_json_atomic, write_text_atomic
from lrpath_megatron.config import with_model_defaults
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mcore_patches import gathered_state_offsets, prepare_torch_adam_load, restore_steps

# The distributed optimizer's state in its canonical per-parameter form, so a checkpoint resumes at any
# TP/PP/DP (megatron-core 0.16's default, fully_sharded_model_space, cannot be saved by its own
# dist-checkpointing; dp_reshardable reshards only in DP). The other optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def unwrap(model):
    """The GPTModel inside its wrappers (DDP, bf16's Float16Module): checkpoint keys carry no wrapper prefix."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save(root: Path, step: int, model, optimizer, trainer_state: dict, manifest: dict,
         save_optimizer: bool = True) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    model = unwrap(model)
    root = Path(root)
    final = root / iter_name(step)
    tmp = root / f".tmp_{iter_name(step)}"
    rank = ranks.rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("rng", "model", "optimizer"):
            (tmp / sub).mkdir(parents=True)
    ranks.barrier()
    model_sd = model.sharded_state_dict()
    # The optimizer's sharded state maps its params through model_sd, which save() consumes: build it first.
    save_optimizer = save_optimizer and optimizer is not None
    optim_sd = None
    if save_optimizer:
        with gathered_state_offsets(optimizer):
            optim_sd = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(model_sd, str(tmp / "model"))
    if optim_sd is not None:
        dist_checkpointing.save(optim_sd, str(tmp / "optimizer"))
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        if not save_optimizer:
            (tmp / "optimizer").rmdir()
        torch.save(trainer_state, tmp / "trainer_state.pt")
    ranks.barrier()
    checksums = _distributed_checksums(tmp)
    if rank == 0:
        manifest = dict(manifest, step=step, world_size=ranks.world(), optimizer_state=save_optimizer, files=checksums)
        write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists():  # a re-save of the same step (e.g. a resumed run stopped at the same point)
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_text_atomic(root / LATEST, final.name)
    ranks.barrier()
    return final


def _distributed_checksums(ckpt: Path) -> dict[str, str]:
    """sha256 of every written file, the files split across ranks so no rank reads the whole checkpoint."""
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    rank, world = ranks.rank(), ranks.world()
    mine = {name: sha256_file(ckpt / name) for i, name in enumerate(files) if i % world == rank}
    return {k: v for part in ranks.gather(mine) for k, v in sorted(part.items())}


# What to do about a damaged checkpoint when the caller has nothing more specific to say.
DAMAGED_FIX = "restore it from a copy, or use another checkpoint"
T = TypeVar("T")


def _explain_load_failure(ckpt: Path, fix: str, read: Callable[[], T]) -> T:
    """Collective. ``read()``; if it fails on any rank, compare the files with the checksums of the
    manifest (split across ranks) and name the damaged ones in one error, instead of the reader's
    traceback (a truncated file reads as EOFError). Only after a failure: an intact load reads nothing more."""
    error = None
    try:
        result = read()
    except LrpathError:
        raise  # a refusal from the manifest or layout, the same on every rank
    # Any reader error (torch's CheckpointException, a reader error gathered from the ranks, is a
    # BaseException); the checksums decide what it means.
    except (Exception, CheckpointException) as exc:
        result, error = None, exc
    if not any(ranks.gather(error is not None)):
        return result
    damaged = sorted(name for part in ranks.gather(verify(ckpt, ranks.rank(), ranks.world())) for name in part)
    if damaged:
        raise LrpathError(f"checkpoint {ckpt} is damaged (truncated, changed or missing against the checksums in "
                          f"its {MANIFEST}: {', '.join(damaged)}); {fix}") from None
    if error is not None:
        raise error
    raise LrpathError(f"loading {ckpt} failed on another rank (its files match their checksums); see that "
                      f"rank's error")


def _read_model(ckpt: Path, model) -> None:
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(Path(ckpt) / "model")))


def load_model(ckpt: Path, model, fix: str = DAMAGED_FIX) -> None:
    """Collective. Model weights only, at whatever TP/PP the live model has. ``fix``: what the error
    of a damaged checkpoint tells the user to do."""
    _explain_load_failure(Path(ckpt), fix, lambda: _read_model(ckpt, unwrap(model)))


def load(ckpt: Path, model, optimizer, load_optimizer: bool = True, restore_rng: bool = True,
         fix: str = DAMAGED_FIX) -> dict:
    """Collective. Loads model (and optimizer) state into the live objects; returns the trainer state."""
    return _explain_load_failure(Path(ckpt), fix, lambda: _load(Path(ckpt), unwrap(model), optimizer,
                                                                load_optimizer, restore_rng))


def _load(ckpt: Path, model, optimizer, load_optimizer: bool, restore_rng: bool) -> dict:
    _read_model(ckpt, model)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    # A step-0 checkpoint has no optimizer state: a fresh optimizer is exactly its state.
    if load_optimizer and optimizer is not None and state["step"] > 0:
        if not (ckpt / "optimizer").is_dir():
            raise LrpathError(
                f"{ckpt} holds model weights only (a merge input, or a path end saved with "
                f"checkpoint.save_optimizer=false), so training cannot continue from it; list its step in "
                f"plan.main.save_steps, or retrain its path with checkpoint.save_optimizer=true"
            )
        held = prepare_torch_adam_load(optimizer)
        opt_sd = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                             metadata=OPTIMIZER_METADATA)
        optimizer.load_state_dict(dist_checkpointing.load(opt_sd, str(ckpt / "optimizer")))
        restore_steps(held)
    rng_file = ckpt / "rng" / f"rank_{ranks.rank()}.pt"
    if restore_rng and read_manifest(ckpt).get("world_size") == ranks.world() and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def check_model(ckpt: Path, model: dict, what: str, fix: str) -> dict:
    """Raise if the checkpoint's model settings differ from ``model`` (a ``to_dict(ModelConfig)``): a
    checkpoint only loads into the model it was saved from. ``what`` says what was attempted, ``fix`` the
    caller's way out. Returns the checkpoint's manifest."""
    manifest = read_manifest(ckpt)
    saved = with_model_defaults(manifest["config"]["model"])
    diff = model_differences(saved, model)
    if diff:
        changes = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {model.get(k)!r}" for k in diff)
        raise LrpathError(f"cannot {what} {ckpt}: the model differs ({changes}); {fix}")
    return manifest


def code_version() -> str:
    """The package version plus the git commit of the source tree when there is one."""
    from lrpath_megatron import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__
