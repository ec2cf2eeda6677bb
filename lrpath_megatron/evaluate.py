"""Validation loss of saved checkpoints (trained paths, merged releases) on every corpus's held-out split.

The same held-out micro-batches as the trainer's periodic evaluation (:class:`data.ValidData`), so the
loss of a path's last checkpoint equals the ``val_loss`` its trainer logged at that step.
"""
from __future__ import annotations

from pathlib import Path

from megatron.core import parallel_state
from tqdm import tqdm

from lrpath_megatron import distributed, forward
from lrpath_megatron.checkpoint.layout import is_complete
from lrpath_megatron.checkpoint.tensors import check_model, load_model
from lrpath_megatron.config import TrainConfig, to_dict
from lrpath_megatron.data import ValidData
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.model import build_model_chunks, transformer_config, with_precision


def evaluate_checkpoints(cfg: TrainConfig, checkpoints: list, num_batches: int | None = None) -> dict:
    """``{str(ckpt): {"step", "val_loss", "val_loss_per_corpus"}}`` for each checkpoint, in one process
    group (collective: run it on every rank of the config's TP x PP x DP layout). ``num_batches``
    defaults to ``logging.eval_batches``."""
    checkpoints = [Path(c) for c in checkpoints]
    steps = checked_steps(cfg, checkpoints)
    batches = num_batches or cfg.logging.eval_batches
    distributed.initialize(cfg.parallel, cfg.seed)
    try:
        cfg.parallel.check_eval_batches(batches, parallel_state.get_data_parallel_world_size())
        tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
        model = [with_precision(chunk, tcfg)
                 for chunk in build_model_chunks(cfg.model, cfg.parallel, cfg.precision, tcfg)]
        valid = ValidData(cfg.data, cfg.model.seq_length, cfg.parallel.micro_batch_size, cfg.data.seed,
                          vocab_size=cfg.model.vocab_size)
        results = {}
        quiet = len(checkpoints) < 2 or distributed.read_env().rank != 0
        for ckpt in tqdm(checkpoints, desc="evaluating", unit="checkpoint", disable=quiet):
            load_model(ckpt, model)
            losses = forward.validation_losses(model, valid, batches, cfg.model.seq_length,
                                               cfg.parallel.micro_batch_size)
            results[str(ckpt)] = {"step": steps[ckpt], **losses}
        return results
    finally:
        distributed.shutdown()


def checked_steps(cfg: TrainConfig, checkpoints: list[Path]) -> dict:
    """``{ckpt: step}``; refuses a checkpoint that is incomplete or of another model (before any process
    group starts)."""
    steps = {}
    for ckpt in checkpoints:
        if not is_complete(ckpt):
            raise LrpathError(f"{ckpt} is not a complete checkpoint (no manifest.json): give an iter_NNNNNNN "
                              f"directory written by `lrpath train` or `lrpath merge`")
        steps[ckpt] = check_model(
            ckpt, to_dict(cfg.model), "evaluate",
            "pass the config (or plan) the checkpoint was trained with, or a checkpoint of this model").get("step")
    return steps
