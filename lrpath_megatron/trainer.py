"""The training loop of one path: megatron-core GPTModel + DDP + Megatron optimizer, LR from the path.

Read top-down: a :class:`~lrpath_megatron.path.PathRun` says what to train; :class:`Trainer` imports a
Hugging Face ``init_from`` (:func:`~lrpath_megatron.hf.start.with_imported_origin`), asks its
:class:`~lrpath_megatron.checkpoint.policy.Checkpointer` where to start, builds the parallel model,
restores state, and runs steps until the path ends, a ``--stop-at-step`` is reached, or a signal asks it
to save and leave.
"""
from __future__ import annotations

import contextlib
import statistics
import signal
import time

import torch
from megatron.core import parallel_state

from lrpath_megatron import distributed, forward, ranks
from lrpath_megatron.checkpoint.policy import Checkpointer
from lrpath_megatron.config import TrainConfig
from lrpath_megatron.data import TrainData, ValidData
from lrpath_megatron.errors import EXIT_REQUEUE, LrpathError
from lrpath_megatron.hang_guard import StepWatchdog, is_peer_failure, leave_for_requeue
from lrpath_megatron.hf.start import with_imported_origin
from lrpath_megatron.metrics import MetricsLogger, peak_flops
from lrpath_megatron.model import build_model_chunks, check_parallel_features, transformer_config
from lrpath_megatron.parallel_training import check_levers, wrap_for_training
from lrpath_megatron.path import WEIGHTS, PathRun


class Trainer:
    def __init__(self, cfg: TrainConfig, run: PathRun, stop_at_step: int | None = None):
        self.cfg, self.run, self.path = cfg, run, run.path
        self.stop_at_step = stop_at_step
        self._signal: int | None = None
        self._phase = "setup"  # what the loop is doing, for the message when a collective fails
        self._step_times: list[float] = []  # this rank's step times since the last logged step

    # ---------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        check_parallel_features(cfg.parallel)  # before any process group: refused alike on every rank
        self.env = distributed.initialize(cfg.parallel, cfg.seed)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        if cfg.logging.eval_interval:
            cfg.parallel.check_eval_batches(cfg.logging.eval_batches, self.dp_size)
        self.is_rank0 = self.env.rank == 0
        gpu = torch.cuda.get_device_name() if distributed.use_cuda() else None
        self.peak_flops = peak_flops(gpu, cfg.precision.dtype, cfg.logging.peak_tflops)
        # Every input is checked (the data opens, the start checkpoint fits and loads) before anything is
        # written: a refused start leaves no run directory behind.
        p = cfg.parallel
        self.train_data = TrainData(cfg.data, cfg.model.seq_length, p.global_batch_size, p.micro_batch_size,
                                    self.dp_rank, self.dp_size, self.path.weights_at_step, cfg.data.seed,
                                    vocab_size=cfg.model.vocab_size)
        self.valid_data = ValidData(cfg.data, cfg.model.seq_length, p.micro_batch_size, cfg.data.seed,
                                    vocab_size=cfg.model.vocab_size)
        # Collective: the import of a Hugging Face origin, once the data opened, before the policy chooses.
        self.run = with_imported_origin(self.run, cfg)
        self.checkpointer = Checkpointer(cfg, self.run, self.stop_at_step, log=self._print)
        self.end = self.checkpointer.end
        self.start = start = self.checkpointer.choose_start()
        self._build_model_and_optimizer()
        state = self.checkpointer.load(start, self.model, self.optimizer)
        self.step = 0
        if start.kind == WEIGHTS:
            self._print(f"[{self.run.name}] initialised from the weights of {start.checkpoint}")
        elif state is not None:
            self.step = state["step"]
            self.train_data.load_state_dict(state["data"], str(start.checkpoint))
            where = "resumed" if start.own else f"branched from {start.checkpoint}"
            self._print(f"[{self.run.name}] {where} at step {self.step}")
        self.checkpointer.prepare(start, self.step, self.is_rank0)
        self.logger = MetricsLogger(self.run.dirs, self.is_rank0, cfg.logging.tensorboard, self.step)

    def _build_model_and_optimizer(self) -> None:
        cfg = self.cfg
        check_levers(cfg)
        tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision, cfg.performance)
        chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, tcfg)
        if self.start.kind == WEIGHTS:  # base weights go in before the transform adds modules the base never had
            self.checkpointer.load_weights(self.start, chunks)
        if self.run.model_transform is not None:
            for chunk in chunks:
                self.run.model_transform(chunk)
        # self.model: the stage's DDP model chunks (one unless parallel.virtual_pipeline is set)
        self.model, self.optimizer = wrap_for_training(cfg, tcfg, chunks, lambda m: self._print(f"[{self.run.name}] {m}"))

    # ---------------------------------------------------------------------------------------- loop
    def train(self) -> int:
        """Runs to the end of the path (or the stop step). Returns 0, or EXIT_REQUEUE after a signal."""
        end = self.end
        if self.run.pause and end == self.run.pause[0]:
            self._print(f"[{self.run.name}] {self.run.pause[1]}")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        watchdog = StepWatchdog(60 * self.cfg.parallel.distributed_timeout_minutes, self._where)
        try:
            if self.step >= end:
                if not self.checkpointer.has_checkpoint(self.step):
                    self.save()  # e.g. --stop-at-step 0: the initial weights, to start other layouts from
                self._print(f"[{self.run.name}] at step {self.step}, stop at {end}: nothing to train")
                return 0
            last_saved = self.step if self.start.checkpoint is not None else -1
            while self.step < end:
                self._phase = "training step"
                self.checkpointer.poll()  # a background write that finished is committed; one that failed stops here
                record = self._train_step()
                self.checkpointer.trained(self.step)
                self.step += 1
                watchdog.progress()
                interval = self.cfg.logging.eval_interval
                if interval and (self.step % interval == 0 or self.step == end):
                    self._phase = "evaluation"
                    record.update(self.evaluate())
                    watchdog.progress()
                if self.step % self.cfg.logging.log_interval == 0 or self.step == end or "val_loss" in record:
                    # The blend realised since the last logged step, its stage, switches and epoch wraps.
                    stats = self.train_data.pop_stats()
                    record.update(samples_per_corpus=stats["samples"], mix_fractions=stats["fractions"],
                                  stage=stats["stage"], events=stats["events"], **self._stragglers())
                    self._phase = "metrics write"
                    self.logger.log(record)
                # One rank's signal (SLURM signals ranks at slightly different times) or wall clock saying
                # "save" means every rank saves.
                signalled, time_due = ranks.on_any_rank(self._signal is not None, self.checkpointer.time_due())
                if signalled or time_due or self.checkpointer.should_save(self.step):
                    self._phase = "checkpoint save"
                    self.save(for_resume=signalled)
                    watchdog.progress()
                    last_saved = self.step
                if signalled:
                    self.checkpointer.finish()
                    self._print(f"[{self.run.name}] signal received: saved at step {self.step}, exiting for requeue")
                    return EXIT_REQUEUE
            self._phase = "checkpoint save"
            if last_saved != self.step:
                self.save()
            self.checkpointer.finish()
            return 0
        except BaseException as exc:
            self.checkpointer.abort()  # a background write of a failed run is not waited for
            if is_peer_failure(exc):
                # Nothing half-written becomes visible: a background write is committed only after every
                # rank reported it complete, which a rank that is gone never will.
                self.logger.close()
                leave_for_requeue(f"{self._where()}: a collective failed, another rank stopped answering or is "
                                  f"gone ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")
            raise
        finally:
            watchdog.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()

    def _train_step(self) -> dict:
        step, cfg = self.step, self.cfg
        lr = self.path.lr_at_step(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = cfg.optimizer.weight_decay * group.get("wd_mult", 1.0)
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        microbatches = self.train_data.microbatches(step)
        losses = self._forward_backward(microbatches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise LrpathError(f"optimizer step {step} failed (non-finite gradients)")
        loss = forward.global_mean(losses)
        elapsed = time.perf_counter() - start
        self._step_times.append(elapsed)
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
        if not self.model[0].use_forward_hook:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    # ---------------------------------------------------------------------------------------- state
    def save(self, for_resume: bool = False):
        with self._parameters_gathered():
            self.checkpointer.save(self.step, self.model, self.optimizer, self.train_data.state_dict(), for_resume)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def _where(self) -> str:
        return f"[{self.run.name}] rank {self.env.rank}: {self._phase} at step {self.step}"

    def _stragglers(self) -> dict:
        """Collective, on logged steps only: the rank whose steps since the last log were slowest on average,
        that mean step time and its lag behind the median rank's."""
        mine = sum(self._step_times) / max(1, len(self._step_times))
        self._step_times = []
        if self.env.world_size == 1:
            return {}
        times = ranks.gather(mine)
        slowest = max(range(len(times)), key=times.__getitem__)
        median = statistics.median(times)
        return {"slowest_rank": slowest, "slowest_step_s": times[slowest], "straggler_lag_s": times[slowest] - median}

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

