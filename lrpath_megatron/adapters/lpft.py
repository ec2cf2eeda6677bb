"""LP-FT: train only the output layer (and the final norm) first, then everything, on any path.

:func:`lpft_phases` splits one :class:`~lrpath_megatron.trainer.PathRun` into two runs of the same
trainer: phase 1 (the first ``probe_steps`` steps) with a transform that freezes all but the head; phase 2
(the rest of the path) starting from phase 1's last checkpoint with the path's step, data position and
LR schedule, and a fresh optimizer for the now-larger set of trainable parameters.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lrpath_megatron.adapters.lora import head_weight
from lrpath_megatron.checkpoint import iter_name
from lrpath_megatron.config import ConfigError


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


def lpft_phases(run, probe_steps: int, train_final_norm: bool = True):
    """(phase 1, phase 2) PathRuns, in ``run.run_dir/lp`` and ``run.run_dir/ft``; run them in order."""
    first, last = run.start_step, run.end_step
    if not 0 < probe_steps < last - first:
        raise ConfigError(f"adapt.lpft.probe_steps={probe_steps} must be in (0, {last - first}): the path has "
                          f"{last - first} steps and phase 2 needs at least one")
    switch = first + probe_steps
    inner_transform = run.model_transform

    def probe_transform(model) -> None:
        if inner_transform is not None:
            inner_transform(model)
        freeze_all_but_head(model, train_final_norm)

    root = Path(run.run_dir)
    probe = dataclasses.replace(
        run, name=f"{run.name}-lp", run_dir=root / "lp", end_step=switch, model_transform=probe_transform,
        save_steps=frozenset(s for s in run.save_steps if s <= switch),
        reset_optimizer=True,  # a parent's optimizer state covers other parameters
        lineage={**run.lineage, "lpft_phase": "probe"})
    finetune = dataclasses.replace(
        run, name=f"{run.name}-ft", run_dir=root / "ft", start_step=switch,
        parent_checkpoint=root / "lp" / "checkpoints" / iter_name(switch), init_weights_only=False,
        reset_optimizer=True, save_steps=frozenset(s for s in run.save_steps if s > switch),
        lineage={**run.lineage, "lpft_phase": "finetune"})
    return probe, finetune
