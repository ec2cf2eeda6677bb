"""Running a cheap update of a released version (:mod:`lrpath_megatron.adapters.update` says what it trains).

Every method trains ``adapt.steps`` batches through :func:`lrpath_megatron.trainer.run_path`, in
``RUN/adapt/<method>/<V>/``; adapters are exported to ``.../adapter`` apart from the base, and
``.../result.json`` holds parameter counts, optimizer memory, held-out losses per corpus (base and updated
model) and, for dynamic ConPET, the selector's accuracy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch

from lrpath_megatron import distributed, forward
from lrpath_megatron.adapters.lora import (
    DEFAULT_ADAPTER,
    inject_lora,
    load_adapter,
    param_report,
    save_adapter,
    set_active,
)
from lrpath_megatron.adapters.lpft import lpft_phases
from lrpath_megatron.adapters.selector import Selector, pooled_features, routed_token_losses, train_selector
from lrpath_megatron.adapters.update import Update, path_run
from lrpath_megatron.checkpoint.tensors import load_model
from lrpath_megatron.config import TrainConfig
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.path import PathRun
from lrpath_megatron.ranks import rank
from lrpath_megatron.trainer import run_path


@contextlib.contextmanager
def _session(cfg: TrainConfig):
    """torch.distributed + parallel state for work outside the trainer (export, selector, evaluation)."""
    env = distributed.initialize(cfg.parallel, cfg.seed)
    try:
        yield env
    finally:
        distributed.shutdown()


def _base_model(cfg: TrainConfig, ckpt: Path):
    from lrpath_megatron.model import build_model

    if cfg.parallel.pipeline_parallel != 1:
        raise LrpathError("adapter export, evaluation and the selector run with parallel.pipeline_parallel=1; "
                          "training itself may use pipeline parallelism")
    model = build_model(cfg.model, cfg.parallel, cfg.precision)
    load_model(ckpt, model)
    model.eval()
    return model


def _final_checkpoint(run: PathRun) -> Path:
    return run.dirs.checkpoint(run.path.end_step)


def evaluate(update: Update, model, valid, token_losses_of=None) -> dict[str, float]:
    """Held-out loss per corpus, the trainer's validation (``token_losses_of``: routed experts)."""
    cfg = update.train_config
    return forward.validation_losses(model, valid, update.adapt.eval_batches, cfg.model.seq_length,
                                     cfg.parallel.micro_batch_size, token_losses_of)["val_loss_per_corpus"]


def _valid(cfg: TrainConfig, micro_batch_size: Optional[int] = None):
    from lrpath_megatron.data import ValidData

    return ValidData(cfg.data, cfg.model.seq_length, micro_batch_size or cfg.parallel.micro_batch_size,
                     cfg.data.seed, vocab_size=cfg.model.vocab_size)


def run_update(update: Update, progress: bool = True) -> dict:
    """Trains the update, exports its adapter, (dynamic) trains the selector, evaluates; returns and
    writes ``result.json``."""
    cfg, report = update.train_config, {}
    run = path_run(update, report)
    start = time.perf_counter()
    if update.method == "lpft":
        phases = lpft_phases(run, update.adapt.lpft.probe_steps, update.adapt.lpft.train_final_norm)
        for phase in phases:
            _check_exit(run_path(cfg, phase), phase.name)
        final = _final_checkpoint(phases[1])
    else:
        _check_exit(run_path(cfg, run), run.name)
        final = _final_checkpoint(run)
    train_seconds = time.perf_counter() - start
    result = {"method": update.method, "version": update.version, "base": update.base,
              "base_checkpoint": str(update.base_checkpoint), "steps": update.adapt.steps,
              "blend": update.blend, "old_corpora": update.old_corpora, "new_corpora": list(update.new_corpora),
              "train_seconds": train_seconds}
    with _session(cfg) as env:
        valid = _valid(cfg)
        model = _base_model(cfg, update.base_checkpoint)
        result["base_val_loss"] = evaluate(update, model, valid)
        if update.method in ("full", "lpft"):
            load_model(final, model)
            p = param_report(model)  # phase 2 of lpft, like full, trains every parameter
            result["params"] = dataclasses.asdict(p) | {"ratio": p.ratio}
            result["val_loss"] = evaluate(update, model, valid)
        else:
            inject_lora(model, update.adapt.lora, DEFAULT_ADAPTER, cfg.seed)
            load_model(final, model)  # base + adapter as trained
            save_adapter(model, update.dirs().adapter, update.adapt.lora, DEFAULT_ADAPTER,
                         info={"base_checkpoint": str(update.base_checkpoint), "version": update.version})
            p = report["params"]
            result["params"] = dataclasses.asdict(p) | {"ratio": p.ratio}
            # Evaluate what was saved: the exported adapter on a freshly loaded base.
            model = _base_model(cfg, update.base_checkpoint)
            if update.method == "conpet-dynamic":
                result.update(_dynamic(update, cfg, model, valid, progress))
            else:
                load_adapter(model, update.dirs().adapter, DEFAULT_ADAPTER, cfg.seed)
                result["val_loss"] = evaluate(update, model, valid)
        result["summary"] = _summary(result, update)
        if env.rank == 0:
            update.dirs().result.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def _check_exit(code: int, name: str) -> None:
    if code != 0:
        raise LrpathError(f"{name} stopped early (exit code {code}); rerun the same command to resume")


def _summary(result: dict, update: Update) -> dict:
    def mean(losses: dict, names: list[str]) -> float:
        return sum(losses[n] for n in names) / len(names)

    old, new = update.old_corpora, list(update.new_corpora)
    before = result["base_val_loss"]
    return {"old_loss_before": mean(before, old), "new_loss_before": mean(before, new),
            "old_loss_after": mean(result["val_loss"], old), "new_loss_after": mean(result["val_loss"], new)}


# --------------------------------------------------------------------------------------------------
# Dynamic ConPET: experts + selector
# --------------------------------------------------------------------------------------------------
def _dynamic(update: Update, cfg: TrainConfig, model, valid, progress: bool) -> dict:
    """Loads every expert of this base, retrains the selector over [base, updates...], evaluates routed."""
    from lrpath_megatron.data import TrainData

    scfg = update.adapt.selector
    plan_versions = {v.name: v for v in update.plan.versions}
    experts: list[Optional[str]] = [None] + update.updates
    classes = [update.base] + update.updates
    # Class c's stored set: its versions' corpora (the base class holds every version up to the base).
    members = {update.base: [v.name for v in update.plan.versions[:update.base_index + 1]]}
    members.update({u: [u] for u in update.updates})
    corpus_class: dict[str, int] = {}
    for c, name in enumerate(classes):
        for version in members[name]:
            for corpus in plan_versions[version].corpora:
                if corpus_class.setdefault(corpus, c) != c:
                    raise LrpathError(f"conpet-dynamic routes by domain, but corpus {corpus!r} belongs to both "
                                      f"{classes[corpus_class[corpus]]} and {name}; give each update its own corpora")
    for u in update.updates:
        adapter = update.dirs(u).adapter
        if not (adapter / "adapter_config.json").is_file():
            raise LrpathError(f"conpet-dynamic expert {u} is missing ({adapter}); run `lrpath adapt ... --version "
                              f"{u} --method conpet-dynamic` first")
        load_adapter(model, adapter, u, cfg.seed)
    set_active(model, None)

    selector = Selector(cfg.model.hidden_size, len(classes) - 1, scfg.hidden)
    previous = update.dirs(update.updates[-2]).selector if len(update.updates) > 1 else None
    if previous is not None and previous.is_file():  # continue the previous update's selector
        selector.load_state_dict(torch.load(previous, weights_only=True)["state_dict"])
    selector.add_class()
    # Pick a class uniformly, then a sample of its stored set: one sampler over all classes' corpora.
    weights = {}
    for corpus, c in corpus_class.items():
        share = sum(1 for x in corpus_class.values() if x == c)
        weights[corpus] = 1.0 / len(classes) / share
    data = TrainData(cfg.data, cfg.model.seq_length, cfg.parallel.global_batch_size, cfg.parallel.global_batch_size,
                     0, 1, lambda step: ("selector", weights), cfg.data.seed + 1, vocab_size=cfg.model.vocab_size)

    def batches(step: int):
        picked = data.sampler.global_batch(step)
        batch = data.splits.batch(picked)
        return batch, torch.tensor([corpus_class[corpus] for corpus, _ in picked])

    losses = train_selector(selector, model, batches, scfg, progress=progress)
    accuracy = {}
    for corpus, c in corpus_class.items():
        hits = total = 0
        for batch in valid.batches(corpus, scfg.eval_batches):
            predicted = selector(pooled_features(model, batch)).argmax(dim=-1)
            hits += int((predicted == c).sum())
            total += len(predicted)
        accuracy[corpus] = hits / total
    if rank() == 0:
        torch.save({"classes": classes, "experts": experts, "state_dict": selector.state_dict(),
                    "hidden": scfg.hidden}, update.dirs().selector)
    val = evaluate(update, model, valid, lambda batch: routed_token_losses(selector, model, batch, experts, scfg.top_k))
    return {"val_loss": val, "selector": {
        "classes": classes, "class_of_corpus": {k: classes[c] for k, c in corpus_class.items()},
        "heldout_accuracy": accuracy, "train_loss_first": losses[0], "train_loss_last": losses[-1],
        "top_k": scfg.top_k, "forward_passes_per_input": 1 + min(scfg.top_k, len(classes))}}
