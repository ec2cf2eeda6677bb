"""The on-disk layout of checkpoints, without torch: names, completeness, ``latest``, manifests, fork
references, checksums. Light enough for ``lrpath status`` next to a running job; :mod:`tensors`
writes and reads the tensors.

A checkpoint ``iter_NNNNNNN`` (steps completed) counts once its ``manifest.json`` exists: it is written
last, inside a temporary directory that is then renamed, and ``latest`` is replaced after the rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterator

from lrpath_megatron.config import with_model_defaults
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.run_layout import iter_name

MANIFEST = "manifest.json"
LATEST = "latest"
MODEL_DIR = "model"  # the model's dist checkpoint inside a checkpoint (trained, merged or imported)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MANIFEST).is_file()


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``: the ``latest`` pointer, else a scan."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        ckpt = root / pointer.read_text().strip()
        if is_complete(ckpt):
            return ckpt
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and is_complete(p))
    return complete[-1] if complete else None


def has_optimizer_state(ckpt: Path) -> bool:
    """Whether training can continue exactly from ``ckpt``: it holds the optimizer state, or it is a step-0
    checkpoint (a fresh optimizer is its state). Merge inputs and weights-only releases are not."""
    return (Path(ckpt) / "optimizer").is_dir() or read_manifest(ckpt)["step"] == 0


def _resumable(root: Path) -> Iterator[Path]:
    """The complete checkpoints under ``root`` that training can continue from, newest first."""
    for ckpt in sorted((p for p in Path(root).glob("iter_*") if p.is_dir() and is_complete(p)), reverse=True):
        if has_optimizer_state(ckpt):
            yield ckpt


def find_resumable(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` that training can continue from."""
    return next(_resumable(root), None)


def delete_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d)


def prune(root: Path, keep_last: int, protected: set,
          remove: Callable[[list[Path]], None] = delete_dirs) -> list[Path]:
    """Delete all but the ``keep_last`` newest resumable checkpoints, never a step in ``protected`` (fork
    points, merge inputs, the path's end) nor a weights-only one (always a merge input or a release).
    Each is renamed out of sight first, so a kill mid-delete leaves only a leftover that
    :func:`remove_stale_temporaries` removes; ``remove`` deletes the renamed directories (it may do so
    later). Returns the deleted checkpoints."""
    doomed = [p for p in list(_resumable(root))[keep_last:] if read_manifest(p)["step"] not in protected]
    hidden = [ckpt.with_name(f".del_{ckpt.name}") for ckpt in doomed]
    for ckpt, gone in zip(doomed, hidden):
        os.rename(ckpt, gone)
    remove(hidden)
    return doomed


def checkpoint_at(root: Path, step: int) -> Path | None:
    ckpt = Path(root) / iter_name(step)
    return ckpt if is_complete(ckpt) else None


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / MANIFEST
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:  # it is written atomically: a broken one is damage, not a save in progress
        raise LrpathError(f"{path} is damaged (not valid JSON: {exc}); move {ckpt} aside or restore it "
                          f"from a copy") from None


def model_differences(saved: dict, current: dict) -> list[str]:
    """The settings in which two model sections (``config.model`` of manifests, ``to_dict(ModelConfig)``)
    differ: a checkpoint loads only into the model it was saved from. A setting missing from a manifest
    written before it existed counts as its default."""
    saved, current = with_model_defaults(saved), with_model_defaults(current)
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def read_fork(record_file: Path) -> dict | None:
    """A path's fork record (parent checkpoint, fork step, parent manifest digest), None before it forked."""
    path = Path(record_file)
    return json.loads(path.read_text()) if path.is_file() else None


def record_fork(record_file: Path, parent: Path, fork_step: int, write: bool = True) -> dict:
    """Reference (never copy) the checkpoint a branch starts from, in its ``fork.json`` (``record_file``):
    O(1) in the model size. The parent's manifest digest (which covers every file's checksum) is recorded;
    if the branch already forked, the parent must still be the same checkpoint."""
    parent = Path(parent)
    if not is_complete(parent):
        raise LrpathError(
            f"branch start {parent} is not a complete checkpoint (yet): train the parent path to step "
            f"{fork_step} first (it saves there because the plan knows its fork steps)"
        )
    record = {"parent_checkpoint": str(parent.resolve()), "fork_step": fork_step,
              "parent_manifest_sha256": sha256_file(parent / MANIFEST)}
    existing, old = Path(record_file), read_fork(record_file)
    if old is not None:
        if old["parent_manifest_sha256"] != record["parent_manifest_sha256"]:
            raise LrpathError(
                f"{parent} changed since this branch forked from it ({existing}); the branch can no longer "
                f"be reproduced from its lineage: restore the original checkpoint or start the branch in a new --run-dir"
            )
        return old
    if write:
        existing.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(existing, record)
    return record


def remove_stale_temporaries(root: Path) -> None:
    """Leftovers of saves and deletes that were killed: never loadable, safe to delete (rank 0, before
    training)."""
    for pattern in (".tmp_iter_*", ".del_iter_*"):
        for tmp in Path(root).glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(ckpt: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Files whose checksum does not match the manifest (empty list = intact). With
    ``rank`` of ``world``: only that rank's share (every world-th file), so ranks can check in parallel."""
    files = sorted(read_manifest(ckpt).get("files", {}).items())
    return [name for i, (name, digest) in enumerate(files)
            if i % world == rank and (not (ckpt / name).is_file() or sha256_file(ckpt / name) != digest)]


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    # Named per process (host and pid: containers on a shared filesystem repeat pids) so that writers of the
    # same file at once each replace it whole.
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def code_version() -> str:
    """The package version plus the git commit of the source tree when there is one (for manifests)."""
    from lrpath_megatron import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__
