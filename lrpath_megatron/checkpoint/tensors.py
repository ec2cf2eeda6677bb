"""Checkpoints: megatron-core dist-checkpointing, atomic commit, ``latest`` pointer, lineage manifest.

Layout of one checkpoint (``iter_NNNNNNN`` = steps completed)::

    model/              dist checkpoint of model.sharded_state_dict() (any TP/PP/VPP can load it)
    optimizer/          dist checkpoint of the optimizer state; absent from weights-only checkpoints (merge
                        inputs, releases saved with checkpoint.save_optimizer=false), which training
                        does not resume from
    trainer_state.pt    step and data-sampler state (identical on all ranks)
    rng/rank_R.pt       each rank's RNG states (restored only when the world shape is unchanged)
    manifest.json       written last: config, lineage, file checksums

Everything is written under ``.tmp_iter_NNNNNNN`` and renamed when complete; ``latest`` is replaced after
the rename. A process killed at any point leaves either the previous checkpoint or the new one visible,
never half of one. :func:`save` writes in the foreground; :func:`stage` and :func:`commit` let
:mod:`writer` write the tensors in the background in between (:mod:`write_requests` reads megatron-core's
write requests). :mod:`layout` knows the files without torch.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from torch.distributed.checkpoint.api import CheckpointException

from lrpath_megatron import ranks
from lrpath_megatron.checkpoint.layout import (LATEST, MANIFEST, model_differences, read_manifest, sha256_file, verify,
                                               write_json_atomic, write_text_atomic)
from lrpath_megatron.checkpoint.write_requests import join
from lrpath_megatron.config import with_model_defaults
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mcore_api import align_scheduler_bounds, async_save_kwargs, check_readable
from lrpath_megatron.mcore_patches import (gathered_state_offsets, prepare_torch_adam_load, restore_steps,
                                         results_queue_dies_with_trainer)
from lrpath_megatron.run_layout import iter_name

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


def model_chunks(model) -> list:
    """The unwrapped GPTModel chunks of ``model``: a module, or a stage's list of (interleaved) chunks."""
    return [unwrap(m) for m in (model if isinstance(model, list) else [model])]


def sharded_state_dict(chunks: list) -> dict:
    """The stage's sharded model state. Tensor keys are global (a layer's number includes its chunk's
    offset), so what matters to another layout is only the keys: chunks go under chunk0, chunk1, ...
    because their local dict keys (decoder.layers.0...) repeat; one chunk stays flat as before."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _load_chunks(chunks: list, state: dict) -> None:
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"])


@dataclass
class StagedSave:
    """A checkpoint whose state is captured but whose tensors are not written yet: ``request`` (megatron-core's
    dist-checkpointing write of every part) writes them, in the foreground or in a background process, then
    :func:`commit` makes it visible."""
    step: int
    tmp: Path
    final: Path
    request: AsyncRequest
    manifest: dict
    optimizer_state: bool


def stage(root: Path, step: int, model, optimizer, trainer_state: dict, manifest: dict,
          save_optimizer: bool = True) -> StagedSave:
    """Collective. Everything of the checkpoint at ``step`` up to the tensor writes: the temporary directory,
    megatron-core's save plans (whose write requests refer to the live tensors: a background write copies
    them when it is handed over, before training changes them), and the small per-rank files."""
    chunks = model_chunks(model)
    root = Path(root)
    tmp = root / f".tmp_{iter_name(step)}"
    rank = ranks.rank()
    save_optimizer = save_optimizer and optimizer is not None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ["rng", "model"] + (["optimizer"] if save_optimizer else []):
            (tmp / sub).mkdir(parents=True)
    ranks.barrier()
    model_sd = sharded_state_dict(chunks)
    # The optimizer's sharded state maps its params through model_sd, which save() consumes: build it first.
    optim_sd = None
    if save_optimizer:
        with gathered_state_offsets(optimizer, model_sd):
            optim_sd = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    results_queue_dies_with_trainer()
    requests = [dist_checkpointing.save(model_sd, str(tmp / "model"), async_sharded_save=True, **async_save_kwargs())]
    if optim_sd is not None:
        requests.append(dist_checkpointing.save(optim_sd, str(tmp / "optimizer"), async_sharded_save=True,
                                                **async_save_kwargs()))
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    request = join(requests, tmp / f"{DIGESTS_PREFIX}{rank}.json")
    return StagedSave(step, tmp, root / iter_name(step), request, manifest, save_optimizer)


def commit(staged: StagedSave) -> Path:
    """Collective, once every rank's writes of ``staged`` completed (megatron-core's finalization ran):
    checksums, the manifest, the rename to ``iter_NNNNNNN`` and ``latest``. Returns the checkpoint."""
    ranks.barrier()
    tmp, final = staged.tmp, staged.final
    checksums = _distributed_checksums(tmp)
    if ranks.rank() == 0:
        manifest = dict(staged.manifest, step=staged.step, world_size=ranks.world(),
                        optimizer_state=staged.optimizer_state, files=checksums)
        write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists():  # a re-save of the same step (e.g. a resumed run stopped at the same point)
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_text_atomic(final.parent / LATEST, final.name)
    ranks.barrier()
    return final


def save(root: Path, step: int, model, optimizer, trainer_state: dict, manifest: dict,
         save_optimizer: bool = True) -> Path:
    """Collective: every rank calls it. Writes in the foreground; returns the final checkpoint directory."""
    staged = stage(root, step, model, optimizer, trainer_state, manifest, save_optimizer)
    staged.request.execute_sync()
    return commit(staged)


# Each rank's writer records the sha256 of the tensor files it wrote in TMP/<prefix><rank>.json (removed
# before the checkpoint becomes visible).
DIGESTS_PREFIX = ".sha256_rank_"


def _distributed_checksums(ckpt: Path) -> dict[str, str]:
    """sha256 of every written file: the writers' records, and the rest (the small files, or everything if
    a record is missing) split across ranks so no rank reads the whole checkpoint."""
    records = sorted(ckpt.glob(f"{DIGESTS_PREFIX}*"))  # written atomically: a .tmp one is no record
    known = {k: v for record in records if record.suffix == ".json" for k, v in json.loads(record.read_text()).items()}
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p not in records)
    rank, world = ranks.rank(), ranks.world()
    todo = [name for name in files if name not in known]
    mine = {name: sha256_file(ckpt / name) for i, name in enumerate(todo) if i % world == rank}
    hashed = {k: v for part in ranks.gather(mine) for k, v in part.items()}
    if rank == 0:  # every rank has read them (the gather above)
        for record in records:
            record.unlink()
    return {name: known.get(name) or hashed[name] for name in files}


# What to do about a damaged checkpoint when the caller has nothing more specific to say.
DAMAGED_FIX = "restore it from a copy, or use another checkpoint"
T = TypeVar("T")


def _explain_load_failure(ckpt: Path, fix: str, read: Callable[[], T]) -> T:
    """Collective. ``read()``; if it fails on any rank, compare the files with the checksums of the
    manifest (split across ranks) and name the damaged ones in one error, instead of the reader's
    traceback (a truncated file reads as EOFError). Only after a failure: an intact load reads nothing more."""
    check_readable(ckpt / "model", read_manifest(ckpt) if (ckpt / MANIFEST).is_file() else {})
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


def _read_model(ckpt: Path, chunks: list) -> None:
    _load_chunks(chunks, dist_checkpointing.load(sharded_state_dict(chunks), str(Path(ckpt) / "model")))


def load_model(ckpt: Path, model, fix: str = DAMAGED_FIX) -> None:
    """Collective. Model weights only, at whatever TP/PP the live model has. ``fix``: what the error
    of a damaged checkpoint tells the user to do."""
    _explain_load_failure(Path(ckpt), fix, lambda: _read_model(ckpt, model_chunks(model)))


def load(ckpt: Path, model, optimizer, load_optimizer: bool = True, restore_rng: bool = True,
         fix: str = DAMAGED_FIX) -> dict:
    """Collective. Loads model (and optimizer) state into the live objects; returns the trainer state."""
    return _explain_load_failure(Path(ckpt), fix, lambda: _load(Path(ckpt), model_chunks(model), optimizer,
                                                                load_optimizer, restore_rng))


def _load(ckpt: Path, chunks: list, optimizer, load_optimizer: bool, restore_rng: bool) -> dict:
    _read_model(ckpt, chunks)
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
        opt_sd = optimizer.sharded_state_dict(sharded_state_dict(chunks), is_loading=True,
                                             metadata=OPTIMIZER_METADATA)
        loaded = dist_checkpointing.load(opt_sd, str(ckpt / "optimizer"))
        align_scheduler_bounds(optimizer, loaded)
        optimizer.load_state_dict(loaded)
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
