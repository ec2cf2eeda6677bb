"""Downstream task scores of checkpoints: each loaded into the config's model on one rank (whatever TP/PP it
was saved with), scored by lm-evaluation-harness on local tasks through :class:`harness_model.LrpathLM`.

A result per checkpoint: ``{"step", "tasks": {task: {"n": documents, "metrics": {metric: {"value",
"stderr"}}}}}``, the harness's own metrics and standard errors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lrpath_megatron.config import TrainConfig
from lrpath_megatron.errors import LrpathError

EXTRA = "pip install 'lrpath_megatron[eval]'"
BATCH_SIZE = 16
# Closed-form standard errors cover acc and acc_norm; the bootstrap serves other aggregations only.
BOOTSTRAP_ITERS = 1000


def require_harness() -> None:
    """lm-evaluation-harness is the optional extra ``eval``: a clear error where it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LrpathError(f"downstream tasks need lm-evaluation-harness, the extra `eval`: {EXTRA}") from None


def offline() -> None:
    """Nothing is fetched at run time: the task data are local files and the model is ours. Set before
    the harness (and datasets, which reads it at import) is imported."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@contextlib.contextmanager
def lrpath_logits(cfg: TrainConfig) -> Iterator[tuple[list, Callable]]:
    """(model chunks, tokens -> fp32 logits over the vocabulary) of the config's model on one rank
    (TP = PP = 1: :func:`~lrpath_megatron.checkpoint.tensors.load_model` reads any saved layout); load
    weights into the chunks before calling it."""
    from lrpath_megatron import distributed
    from lrpath_megatron.model import build_model, transformer_config, with_precision

    if distributed.read_env().world_size != 1:
        raise LrpathError("downstream evaluation runs on one rank (it loads any TP/PP checkpoint whole); run it "
                          "without torchrun")
    parallel = dataclasses.replace(cfg.parallel, tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None,
                                   context_parallel=1, sequence_parallel=False, micro_batch_size=1,
                                   global_batch_size=1)
    distributed.initialize(parallel, cfg.seed)
    try:
        tcfg = transformer_config(cfg.model, parallel, cfg.precision)
        model = with_precision(build_model(cfg.model, parallel, cfg.precision, tcfg), tcfg)
        model.eval()
        device = next(model.parameters()).device

        @torch.no_grad()
        def logits(tokens: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(tokens.shape[1], device=device).expand(tokens.shape[0], -1)
            return model(tokens.to(device), positions, None)[..., :cfg.model.vocab_size].float()

        yield [model], logits
    finally:
        distributed.shutdown()


def evaluate_tasks(cfg: TrainConfig, checkpoints: Sequence, tokenizer: str | Path, tasks: Sequence[str],
                   limit: int | None = None) -> dict:
    """``{str(ckpt): {"step", "tasks": {...}}}`` for each checkpoint on ``tasks`` (shipped task names or task
    directories), the first ``limit`` documents of each task (None: all)."""
    from lrpath_megatron.checkpoint.tensors import load_model
    from lrpath_megatron.data_tools.tokenizer import Tokenizer
    from lrpath_megatron.task_dirs import resolve_tasks
    from lrpath_megatron.evaluate import checked_steps

    require_harness()
    if limit is not None and limit <= 0:
        raise LrpathError(f"limit {limit}: give a positive number of documents per task")
    checkpoints = [Path(c) for c in checkpoints]
    steps = checked_steps(cfg, checkpoints)
    sp = Tokenizer(tokenizer)
    if sp.vocab_size > cfg.model.vocab_size:
        raise LrpathError(f"tokenizer {tokenizer} has {sp.vocab_size} tokens, the model {cfg.model.vocab_size}: "
                          f"give the tokenizer the model's data was tokenized with")
    offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lrpath_megatron.downstream.harness_model import LrpathLM

    results = {}
    with tempfile.TemporaryDirectory(prefix="lrpath-tasks-") as tmp, lrpath_logits(cfg) as (model, logits):
        task_set = resolve_tasks(list(tasks), Path(tmp))
        manager = TaskManager(include_path=str(task_set.include_dir), include_defaults=False, verbosity="ERROR")
        lm = LrpathLM(logits, sp, cfg.model.seq_length, BATCH_SIZE)
        for ckpt in checkpoints:
            load_model(ckpt, model[0])
            out = simple_evaluate(model=lm, tasks=list(task_set.names), task_manager=manager, limit=limit,
                                  bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, verbosity="ERROR")
            results[str(ckpt)] = {"step": steps[ckpt], "tasks": harness_scores(out, task_set.names)}
    return results


def harness_scores(out: dict, names: Sequence[str]) -> dict:
    """``{task: {"n", "metrics": {metric: {"value", "stderr"}}}}`` from the harness's results."""
    scores = {}
    for task in names:
        row = out["results"][task]
        metrics = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{filt}")
            metrics[metric] = {"value": float(value),
                               "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        scores[task] = {"n": int(out["n-samples"][task]["effective"]), "metrics": metrics}
    return scores
