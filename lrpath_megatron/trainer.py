"""The training loop of one path: megatron-core GPTModel + DDP + Megatron optimizer, LR from the path.

Read top-down: :class:`PathRun` says what to train (steps, LR and data-blend functions, where to start),
:class:`Trainer` builds the parallel model, restores state, and runs steps until the path ends, a
``--stop-at-step`` is reached, or a signal asks it to save and leave.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from lrpath_megatron import checkpoint, distributed, forward
from lrpath_megatron.config import ConfigError, TrainConfig, to_dict
from lrpath_megatron.data import TrainData, ValidData
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.metrics import MetricsLogger, peak_flops
from lrpath_megatron.model import build_model, transformer_config, with_precision

# Exit code that asks the launcher to requeue the job (the trainer saved and stopped on a signal).
EXIT_REQUEUE = 3


@dataclass
class PathRun:
    """One path of training: what the trainer needs beyond the model/optimizer config."""

    name: str
    run_dir: Path  # this path's directory: checkpoints/, metrics.jsonl, tensorboard/
    end_step: int  # global step index after the last step
    lr_at_step: Callable[[int], float]
    weights_at_step: Callable[[int], tuple]  # step -> (stage label, {corpus: weight})
    start_step: int = 0  # the fork step of a branch
    save_steps: frozenset = frozenset()  # checkpoints with optimizer state (forks, segment ends)
    weights_only_steps: frozenset = frozenset()  # checkpoints that are only merged: weights only
    parent_checkpoint: Optional[Path] = None  # a branch starts here until it has checkpoints of its own
    reset_optimizer: bool = False  # start a branch with fresh Adam moments
    # Start from the parent's model weights only (step 0, fresh optimizer and data): adapters, LP-FT.
    init_weights_only: bool = False
    # Applied to the GPTModel after the parent weights are loaded and before DDP wraps it (e.g. add LoRA
    # modules and freeze the base); it must also be the same on resume, so it is part of the path.
    model_transform: Optional[Callable] = None
    lineage: dict = field(default_factory=dict)  # extra manifest fields (plan hash, parent, release)
    source: str = "config"  # what the user edits to change this path: "config" (stand-alone) or "plan"


# The fixed inputs of Trainer._schedule_hash by config field, and the key each has in the hash (the
# original names: checkpoints written before the inputs were recorded keep their digest).
SCHEDULE_INPUTS = {"parallel.global_batch_size": "global_batch_size", "model.seq_length": "seq_length",
                   "data.seed": "data_seed", "data.corpora": "corpora", "data.valid_fraction": "valid_fraction"}


class Trainer:
    def __init__(self, cfg: TrainConfig, run: PathRun, stop_at_step: int | None = None):
        self.cfg, self.run = cfg, run
        self.stop_at_step = stop_at_step
        self.ckpt_root = Path(run.run_dir) / "checkpoints"
        self._signal: int | None = None
        self.schedule_hash = None  # running hash of the trained steps' schedule (see _schedule_hash)

    # ---------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        self.env = distributed.initialize(cfg.parallel, cfg.seed)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_rank0 = self.env.rank == 0
        gpu = torch.cuda.get_device_name() if distributed.use_cuda() else None
        self.peak_flops = peak_flops(gpu, cfg.precision.dtype, cfg.logging.peak_tflops)
        # Every input is checked (the data opens, the start checkpoint fits and loads) before anything is
        # written: a refused start leaves no run directory behind.
        p = cfg.parallel
        self.train_data = TrainData(cfg.data, cfg.model.seq_length, p.global_batch_size, p.micro_batch_size,
                                    self.dp_rank, self.dp_size, self.run.weights_at_step, cfg.data.seed,
                                    vocab_size=cfg.model.vocab_size)
        self.valid_data = ValidData(cfg.data, cfg.model.seq_length, p.micro_batch_size, cfg.data.seed,
                                    vocab_size=cfg.model.vocab_size)
        own = self._choose_start()
        weights_only = self.resume_from is not None and not own and self.run.init_weights_only
        self._build_model_and_optimizer(load_weights_first=weights_only)
        self.step = 0
        if weights_only:
            self._print(f"[{self.run.name}] initialised from the weights of {self.resume_from}")
        elif self.resume_from is not None:
            # An own checkpoint without optimizer state is the end of a finished path: nothing to continue.
            load_optimizer = checkpoint.has_optimizer_state(self.resume_from) if own else not self.run.reset_optimizer
            state = checkpoint.load(self.resume_from, self.model, self.optimizer, load_optimizer=load_optimizer,
                                    restore_rng=own, fix=self._damaged_fix(own))
            self.step = state["step"]
            self.train_data.load_state_dict(state["data"])
            where = "resumed" if own else f"branched from {self.resume_from}"
            self._print(f"[{self.run.name}] {where} at step {self.step}")
        if self.is_rank0:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_temporaries(self.ckpt_root)
            if self.resume_from is not None and not own:
                checkpoint.record_fork(self.run.run_dir, self.resume_from, self.run.start_step)
        self.logger = MetricsLogger(self.run.run_dir, self.is_rank0, cfg.logging.tensorboard, self.step)
        if self.schedule_hash is None:  # not resumed from an own checkpoint (which computed it)
            self.schedule_hash = self._schedule_hash(self.step)

    def _choose_start(self) -> bool:
        """Sets ``resume_from``: the path's latest checkpoint, else its parent's (a branch). Returns whether
        the checkpoint is the path's own. Refuses an incompatible start; reads only.
        Training continues only from a checkpoint with optimizer state; a newer weights-only one (a merge
        input) is trained again, identically. A weights-only one at or past the stop means: done."""
        resume = checkpoint.find_latest(self.ckpt_root)
        if resume is not None and checkpoint.read_manifest(resume)["step"] < self._end():
            resume = checkpoint.find_resumable(self.ckpt_root)
        self.resume_from, own = (resume, True) if resume else (self.run.parent_checkpoint, False)
        if self.resume_from is None:
            return own
        if not own:  # complete, and the same checkpoint the branch forked from before (if it did)
            checkpoint.record_fork(self.run.run_dir, self.resume_from, self.run.start_step, write=False)
        self._check_compatible(self.resume_from, own)
        return own

    def _damaged_fix(self, own: bool) -> str:
        """What to do when the start checkpoint turns out damaged."""
        if not own:
            return "restore it from a copy: this path starts from that checkpoint"
        ckpt = self.resume_from
        return (f"move it aside (mv {ckpt} {ckpt.parent / ('damaged_' + ckpt.name)}) and rerun: training then "
                f"resumes from the previous checkpoint (from the start if there is none)")

    def _build_model_and_optimizer(self, load_weights_first: bool) -> None:
        from lrpath_megatron import performance

        cfg, perf = self.cfg, self.cfg.performance
        tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision, perf)
        dist_opt = cfg.parallel.use_distributed_optimizer
        if dist_opt is None:
            dist_opt = distributed.use_cuda()
        if perf.overlap_param_gather and not dist_opt:
            raise ConfigError("performance.overlap_param_gather gathers the distributed optimizer's parameter "
                              "shards; set parallel.use_distributed_optimizer=true or the lever to false")
        module = build_model(cfg.model, cfg.parallel, cfg.precision, tcfg)
        if load_weights_first:  # base weights go in before the transform adds modules the base never had
            checkpoint.load_model(self.resume_from, module, fix=self._damaged_fix(own=False))
        if self.run.model_transform is not None:
            self.run.model_transform(module)
        if perf.compile_layers:  # after the transform: the compiled layers include its modules
            self._print(f"[{self.run.name}] torch.compile: {performance.compile_layers(module, perf)} layers")
        module = with_precision(module, tcfg)
        self.model = DistributedDataParallel(
            config=tcfg,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt,
                overlap_grad_reduce=perf.overlap_grad_reduce, overlap_param_gather=perf.overlap_param_gather,
                bucket_size=perf.ddp_bucket_size),
            module=module,
        )
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
                bf16=cfg.precision.dtype == "bf16", params_dtype=tcfg.params_dtype,
                use_distributed_optimizer=dist_opt,
            ),
            [self.model],
        )
        if perf.fused_adam and not performance.use_fused_adam(self.optimizer):
            self._print(f"[{self.run.name}] performance.fused_adam: megatron-core's optimizer is already fused "
                        f"(Transformer Engine or apex) or has no torch Adam here; left as built")
        if perf.foreach_grad_norm and not performance.use_foreach_grad_norm():
            self._print(f"[{self.run.name}] performance.foreach_grad_norm: megatron-core uses the multi-tensor "
                        f"kernels of Transformer Engine or apex; left as is")
        # The schedules call these (loss scaling, grad all-reduce + clipping inputs) after backward.
        tcfg.grad_scale_func = self.optimizer.scale_loss
        tcfg.finalize_model_grads_func = finalize_model_grads
        if perf.overlap_grad_reduce:  # reduce each bucket once, in the last micro-batch's backward
            tcfg.no_sync_func = self.model.no_sync

    def _check_compatible(self, ckpt: Path, own: bool) -> None:
        """Refuse, before building anything, a checkpoint this run cannot continue."""
        source = self.run.source
        manifest = checkpoint.check_model(
            ckpt, to_dict(self.cfg.model), "resume from" if own else "branch from",
            f"use the model settings of the {source} it was trained with (or a new --run-dir for a different model)")
        if not own:
            return
        self.schedule_hash = self._schedule_hash(manifest["step"])
        if manifest.get("schedule_digest") == self.schedule_hash.hexdigest()[:16]:
            return
        steps = f"steps {self.run.start_step}..{manifest['step'] - 1}"
        extend = " (extending it with later versions is fine)" if source == "plan" else ""
        restore = f"restore the original {source}{extend}, or use a new --run-dir"
        trained, now = manifest.get("schedule_inputs"), self._schedule_inputs()
        if trained is None:  # written before the inputs were recorded: only the digest tells
            raise LrpathError(f"cannot resume path {self.run.name!r} from {ckpt}: the LR schedule, data blend or "
                              f"data settings of {steps} differ from what was trained; {restore}")
        changed = [f"{k}: checkpoint {trained.get(k)!r} vs {source} {v!r}" for k, v in now.items()
                   if trained.get(k) != v]
        what = ("; ".join(changed) if changed
                else f"the LR schedule or data blend of {steps} differ from what was trained")
        raise LrpathError(f"cannot resume path {self.run.name!r} from {ckpt}: {what}; {restore}")

    def _schedule_inputs(self) -> dict:
        """The settings besides the per-step LR and blend that decide which data the steps see."""
        cfg = to_dict(self.cfg)
        return {key: cfg[section][name] for key in SCHEDULE_INPUTS for section, name in [key.split(".")]}

    def _schedule_hash(self, upto: int):
        """Hash of everything that decided steps start_step..upto-1 besides the model: LR and blend per
        step, and the :meth:`_schedule_inputs`. A plan extended with new versions keeps the digest of the
        steps already trained, so the main path can resume; a changed past cannot. Computed once at start;
        each trained step then extends it (``_extend_schedule_hash``), so saves cost O(1)."""
        inputs = {SCHEDULE_INPUTS[k]: v for k, v in self._schedule_inputs().items()}
        h = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
        for step in range(self.run.start_step, upto):
            self._extend_schedule_hash(h, step)
        return h

    def _extend_schedule_hash(self, h, step: int) -> None:
        h.update(repr((self.run.lr_at_step(step), self.run.weights_at_step(step))).encode())

    # ---------------------------------------------------------------------------------------- loop
    def _end(self) -> int:
        return self.run.end_step if self.stop_at_step is None else min(self.run.end_step, self.stop_at_step)

    def train(self) -> int:
        """Runs to the end of the path (or the stop step). Returns 0, or EXIT_REQUEUE after a signal."""
        end = self._end()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            if self.step >= end:
                if checkpoint.checkpoint_at(self.ckpt_root, self.step) is None:
                    self.save(end)  # e.g. --stop-at-step 0: the initial weights, to start other layouts from
                self._print(f"[{self.run.name}] at step {self.step}, stop at {end}: nothing to train")
                return 0
            last_saved = self.step if self.resume_from is not None else -1
            while self.step < end:
                record = self._train_step()
                self._extend_schedule_hash(self.schedule_hash, self.step)
                self.step += 1
                interval = self.cfg.logging.eval_interval
                if interval and (self.step % interval == 0 or self.step == end):
                    record.update(self.evaluate())
                if self.step % self.cfg.logging.log_interval == 0 or self.step == end or "val_loss" in record:
                    # The blend realised since the last logged step, its stage, switches and epoch wraps.
                    stats = self.train_data.pop_stats()
                    record.update(samples_per_corpus=stats["samples"], mix_fractions=stats["fractions"],
                                  stage=stats["stage"], events=stats["events"])
                    self.logger.log(record)
                signalled = self._signal_received()
                if signalled or self._should_save(end):
                    self.save(end, for_resume=signalled)
                    last_saved = self.step
                if signalled:
                    self._print(f"[{self.run.name}] signal received: saved at step {self.step}, exiting for requeue")
                    return EXIT_REQUEUE
            if last_saved != self.step:
                self.save(end)
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()

    def _should_save(self, end: int) -> bool:
        return self.step == end or self.step in self.run.save_steps | self.run.weights_only_steps or self._interval_save()

    def _interval_save(self) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return interval > 0 and self.step % interval == 0

    def _saves_optimizer(self, end: int, for_resume: bool) -> bool:
        """Whether the checkpoint at the current step keeps the optimizer state: every checkpoint training
        may continue from does; merge inputs and (with checkpoint.save_optimizer=false) the path's final
        checkpoint hold the weights only."""
        step = self.step
        if step == 0:  # a fresh optimizer has no state to save
            return False
        if for_resume or step in self.run.save_steps:
            return True
        if step == self.run.end_step:
            return self.cfg.checkpoint.save_optimizer
        return step == end or self._interval_save() or step not in self.run.weights_only_steps

    def _train_step(self) -> dict:
        step, cfg = self.step, self.cfg
        lr = self.run.lr_at_step(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = cfg.optimizer.weight_decay * group.get("wd_mult", 1.0)
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        microbatches = self.train_data.microbatches(step)
        losses = self._forward_backward(microbatches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise LrpathError(f"optimizer step {step} failed (non-finite gradients)")
        loss = forward.global_mean(losses)
        elapsed = time.perf_counter() - start
        tokens = cfg.parallel.global_batch_size * cfg.model.seq_length
        tps = tokens / elapsed
        return {
            "path": self.run.name,
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": (step + 1) * tokens,
            "tokens_per_s": tps,
            "mfu": (tps * cfg.model.flops_per_token() / (self.peak_flops * self.env.world_size)
                    if self.peak_flops else None),
        }

    def _forward_backward(self, microbatches: list[dict], forward_only: bool) -> list[float]:
        return forward.forward_backward(self.model, microbatches, self.cfg.model.seq_length,
                                        self.cfg.parallel.micro_batch_size, forward_only)

    def evaluate(self) -> dict:
        """Validation loss per corpus on fixed held-out micro-batches (the same for every layout)."""
        with self._parameters_gathered():
            return forward.validation_losses(self.model, self.valid_data, self.cfg.logging.eval_batches,
                                             self.cfg.model.seq_length, self.cfg.parallel.micro_batch_size)

    @contextlib.contextmanager
    def _parameters_gathered(self):
        """With performance.overlap_param_gather an optimizer step leaves the other ranks' parameter shards
        to be gathered by the next training forward. Saves (and evaluations) read whole parameters: gather
        them now, with the gathering hooks off meanwhile, as Megatron-LM does."""
        if not self.model.use_forward_hook:
            yield
            return
        self.model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            self.model.enable_forward_pre_hook()

    # ---------------------------------------------------------------------------------------- state
    def save(self, end: int, for_resume: bool = False) -> Path:
        cfg = self.cfg
        manifest = {
            "path": self.run.name,
            "schedule_digest": self.schedule_hash.hexdigest()[:16],
            "schedule_inputs": self._schedule_inputs(),
            "config": to_dict(cfg),
            "code_version": checkpoint.code_version(),
            "parent": str(self.run.parent_checkpoint) if self.run.parent_checkpoint else None,
            "consumed_samples": self.step * cfg.parallel.global_batch_size,
            "data_state": self.train_data.state_dict(),
            **self.run.lineage,
        }
        state = {"step": self.step, "data": self.train_data.state_dict()}
        with self._parameters_gathered():
            saved = checkpoint.save(self.ckpt_root, self.step, self.model, self.optimizer, state, manifest,
                                    save_optimizer=self._saves_optimizer(end, for_resume))
        if cfg.checkpoint.keep_last and self.is_rank0:
            # A merge input on an interval step keeps its optimizer state but must stay for the merge.
            protected = self.run.save_steps | self.run.weights_only_steps | {self.run.end_step}
            for old in checkpoint.prune(self.ckpt_root, cfg.checkpoint.keep_last, protected):
                self._print(f"[{self.run.name}] deleted {old.name} (checkpoint.keep_last={cfg.checkpoint.keep_last})")
        return saved

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def _signal_received(self) -> bool:
        """All ranks agree: one rank signalled means everyone saves (SLURM signals ranks at slightly different times)."""
        flag = torch.tensor([1 if self._signal is not None else 0])
        if distributed.use_cuda():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _print(self, msg: str) -> None:
        if self.is_rank0:
            print(msg, flush=True)


def run_path(cfg: TrainConfig, run: PathRun, stop_at_step: int | None = None) -> int:
    trainer = Trainer(cfg, run, stop_at_step)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        distributed.shutdown()

