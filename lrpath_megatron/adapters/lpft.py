"""LP-FT: train only the output layer (and the final norm) first, then everything, on any path.

:func:`lpft_phases` splits one :class:`~lrpath_megatron.path.PathRun` into two runs of the same
trainer: phase 1 (the first ``probe_steps`` steps) with a transform that freezes all but the head; phase 2
(the rest of the path) starting from phase 1's last checkpoint with the path's step, data position and
LR schedule, and a fresh optimizer for the now-larger set of trainable parameters.
"""
from __future__ import annotations

import dataclasses

from lrpath_megatron.adapters.lora import head_weight
from lrpath_megatron.config import ConfigError
from lrpath_megatron.path import FORK, PathRun, Start


def freeze_all_but_head(model, train_final_norm: bool = True) -> None:
    inner = getattr(model, "module", model)
    for param in inner.parameters():
        param.requires_grad_(False)
    if inner.post_process:
        head_weight(inner).requires_grad_(True)
        norm = getattr(inner.decoder, "final_layernorm", None)
        if train_final_norm and norm is not None:
            for param in norm.parameters():
                param.requires_grad_(True)


def lpft_phases(run: PathRun, probe_steps: int, train_final_norm: bool = True) -> tuple[PathRun, PathRun]:
    """(phase 1, phase 2) PathRuns, in ``run``'s directory's ``lp`` and ``ft``; run them in order."""
    path = run.path
    first, last = path.fork_step, path.end_step
    if not 0 < probe_steps < last - first:
        raise ConfigError(f"adapt.lpft.probe_steps={probe_steps} must be in (0, {last - first}): the path has "
                          f"{last - first} steps and phase 2 needs at least one")
    switch = first + probe_steps
    inner_transform = run.model_transform

    def probe_transform(model) -> None:
        if inner_transform is not None:
            inner_transform(model)
        freeze_all_but_head(model, train_final_norm)

    # A parent's optimizer state covers other parameters than either phase trains: both start fresh.
    origin = run.origin if run.origin.kind != FORK else dataclasses.replace(run.origin, fresh_optimizer=True)
    probe_dirs = run.dirs.sub("lp")
    probe = dataclasses.replace(
        run, path=dataclasses.replace(path, name=f"{path.name}-lp", end_step=switch,
                                      save_steps=frozenset(s for s in path.save_steps if s <= switch)),
        dirs=probe_dirs, origin=origin, model_transform=probe_transform,
        lineage={**run.lineage, "lpft_phase": "probe"})
    finetune = dataclasses.replace(
        run, path=dataclasses.replace(path, name=f"{path.name}-ft", fork_step=switch,
                                      save_steps=frozenset(s for s in path.save_steps if s > switch)),
        dirs=run.dirs.sub("ft"), origin=Start(FORK, probe_dirs.checkpoint(switch), fresh_optimizer=True),
        lineage={**run.lineage, "lpft_phase": "finetune"})
    return probe, finetune
