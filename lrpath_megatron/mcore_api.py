"""Where megatron-core's public API differs between the supported releases (0.16.1 on Python 3.11, 0.19.x
on 3.12), decided by what the installed release offers rather than by its version string. Patches of
megatron-core internals are in :mod:`lrpath_megatron.mcore_patches`."""
from __future__ import annotations

import inspect
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

from lrpath_megatron.errors import LrpathError

# From 0.17 on megatron-core keeps a dist checkpoint's common state inside the checkpoint and writes no
# common.pt, which 0.16 needs; 0.17+ still read 0.16's checkpoints.
_COMMON_FILE = "common.pt"
_FIRST_WITHOUT_COMMON_FILE = Version("0.17.0")


def versions() -> dict[str, str]:
    """The megatron-core and torch releases of this process, as every checkpoint manifest records them
    (read from the installed packages: no import of megatron-core needed)."""
    return {"megatron_core": version("megatron-core"), "torch": version("torch")}


def check_readable(part: Path, manifest: dict) -> None:
    """Refuse a dist checkpoint (``part``: its model or optimizer directory) that the installed megatron-core
    cannot read - one written by 0.17 or later, read by 0.16 - naming both releases."""
    installed = versions()["megatron_core"]
    if Version(installed) >= _FIRST_WITHOUT_COMMON_FILE or (part / _COMMON_FILE).is_file():
        return
    written = manifest.get("versions", {}).get("megatron_core", f"{_FIRST_WITHOUT_COMMON_FILE} or later")
    raise LrpathError(f"{part.parent} was written by megatron-core {written}, which the installed megatron-core "
                      f"{installed} cannot read (it has no {_COMMON_FILE}); read it with megatron-core "
                      f">= {_FIRST_WITHOUT_COMMON_FILE} (make setup builds it), or export it with lrpath hf export there")


def null_tokenizer_library() -> str:
    """megatron-core's name for its null tokenizer: "null" up to 0.16, "null-text" from 0.17 on."""
    from megatron.core.tokenizers import megatron_tokenizer

    return "null-text" if "null-text" in getattr(megatron_tokenizer, "TEXT_LIBRARIES", ()) else "null"


@lru_cache(maxsize=None)
def async_save_kwargs() -> dict:
    """Arguments for ``dist_checkpointing.save(..., async_sharded_save=True)``. From 0.17 on megatron-core
    defaults to nvidia-resiliency-ext's writer ("nvrx"); lrpath hands the write request to its own writer
    process and reads megatron-core's write-bucket layout from it
    (:mod:`lrpath_megatron.checkpoint.write_requests`), so it asks for megatron-core's own asynchronous
    writer, the one that layout was audited for."""
    from megatron.core import dist_checkpointing

    return {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}


def optimizer_parts(optimizer) -> list:
    """The optimizers a megatron-core optimizer consists of (a ChainedOptimizer's parts, or itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


# The scheduler bounds megatron-core keeps in each parameter group (read by its OptimizerParamScheduler).
_SCHEDULER_BOUNDS = ("max_lr", "min_lr", "start_wd", "end_wd")


def align_scheduler_bounds(optimizer, loaded) -> None:
    """Give the saved parameter groups of ``loaded`` (an optimizer state dict read for ``optimizer``) the
    live groups' scheduler bounds, before ``optimizer.load_state_dict(loaded)``.

    From 0.17 on megatron-core pairs saved and live groups by their scheduler bounds too
    (``param_group_identifier_keys``). lrpath sets each step's LR and weight decay itself, from the path's
    schedule, and never reads those bounds: a branch that decays to another minimum than the main path
    it forks from must still load the main path's state. Groups are matched on the other identifier keys."""
    try:
        from megatron.core.optimizer.optimizer import param_group_identifier_keys
    except ImportError:  # 0.16: groups are matched on their multipliers only
        return
    keys = [k for k in param_group_identifier_keys if k not in _SCHEDULER_BOUNDS]
    parts = optimizer_parts(optimizer)
    if len(parts) == 1:
        states = [loaded]
    else:  # a ChainedOptimizer's: one state per part, as a list or keyed by the part's index
        states = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, dict) else list(loaded)
    for part, state in zip(parts, states):
        saved = (state.get("optimizer") or state)["param_groups"]
        live = {tuple(g.get(k) for k in keys): g for g in part.optimizer.param_groups}
        for group in saved:
            match = live.get(tuple(group.get(k) for k in keys))
            if match is not None:
                group.update({b: match.get(b) for b in _SCHEDULER_BOUNDS if b in match or b in group})
