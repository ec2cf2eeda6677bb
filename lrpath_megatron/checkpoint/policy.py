"""The checkpoint policy of one path: where it starts, whether a checkpoint may be continued, which steps
save and with what, the manifest, pruning, and what to do about damage. The trainer keeps the loop and
asks; :mod:`writer` writes (in the foreground or the background), :mod:`tensors` moves the tensors and
:mod:`layout` knows the files. A run's origin is an lrpath checkpoint here: the trainer imports a Hugging
Face ``init_from`` before it asks.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from lrpath_megatron import ranks
from lrpath_megatron.checkpoint import layout, tensors
from lrpath_megatron.checkpoint.writer import CheckpointWriter
from lrpath_megatron.config import TrainConfig, to_dict
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mcore_api import versions
from lrpath_megatron.path import FORK, RESUME, SCRATCH, WEIGHTS, PathRun, Start

# The fixed inputs of the schedule digest by config field, and the key each has in the digest (the
# original names: checkpoints written before the inputs were recorded keep their digest).
SCHEDULE_INPUTS = {"parallel.global_batch_size": "global_batch_size", "model.seq_length": "seq_length",
                   "data.seed": "data_seed", "data.corpora": "corpora", "data.valid_fraction": "valid_fraction"}


class Checkpointer:
    """Collective where it loads or saves (every rank calls it); everything else reads only."""

    def __init__(self, cfg: TrainConfig, run: PathRun, stop_at_step: int | None = None,
                 log: Callable[[str], None] = print):
        self.cfg, self.run, self.log = cfg, run, log
        self.root = run.dirs.checkpoints
        self.end = min(s for s in (run.path.end_step, stop_at_step, run.pause and run.pause[0]) if s is not None)
        self.digest = None  # running hash of the trained steps' schedule (see _schedule_digest)
        self.writer: CheckpointWriter | None = None  # from prepare() on
        self._last_save = time.monotonic()  # for checkpoint.save_interval_minutes

    # ------------------------------------------------------------------------------------ the start
    def choose_start(self) -> Start:
        """The path's newest checkpoint training can continue from, else its origin. Refuses, before
        anything is built or written, a start this run cannot continue. A newer weights-only checkpoint (a
        merge input) is trained again, identically; a weights-only one at or past the stop means: done."""
        self.check_fork_step()
        own = layout.find_latest(self.root)
        if own is not None and layout.read_manifest(own)["step"] < self.end:
            own = layout.find_resumable(self.root)
        start = Start(RESUME, own) if own is not None else self.run.origin
        if start.kind == SCRATCH:
            return start
        if start.kind == WEIGHTS and not layout.is_complete(start.checkpoint):
            raise LrpathError(self._not_a_checkpoint(start.checkpoint))
        if start.kind != RESUME:  # complete, and the same checkpoint the path started from before (if it did)
            layout.record_fork(self.run.dirs.fork_record, start.checkpoint, self.run.path.fork_step,
                               write=False)
        self._check_compatible(start)
        return start

    def check_fork_step(self) -> None:
        """A branch continues from the step it forked at; a plan that now forks it elsewhere (``plan.fork``,
        or changed release settings) would train another branch into the same directory."""
        record, path = self.run.dirs.fork_record, self.run.path
        recorded = layout.read_fork(record) if self.run.origin.kind == FORK else None
        if recorded is None:
            return
        forked, now = recorded["fork_step"], path.fork_step
        if forked == now:
            return
        release = path.release
        if release is not None and forked == release.nominal_step:
            fix = "set plan.fork: nominal (it started from its nominal fork)"
        elif release is not None and now == release.nominal_step:
            fix = "set plan.fork: effective (it started where it first differs from the main path)"
        else:
            fix = f"restore the {self.run.source}'s settings it started with"
        raise LrpathError(f"path {self.run.name!r} forked from step {forked} ({record}), but the {self.run.source} "
                          f"now forks it at step {now}; to continue it, {fix}, or start it again in a new --run-dir")

    def _not_a_checkpoint(self, ckpt: Path) -> str:
        return (f"path {self.run.name!r} starts from the weights of {ckpt}, which is not a complete lrpath "
                f"checkpoint (no {layout.MANIFEST}) nor a Hugging Face model directory (no config.json); "
                f"give an iter_NNNNNNN directory, an `lrpath hf import` output or a Hugging Face model directory")

    def damaged_fix(self, start: Start) -> str:
        """What to do when the start checkpoint turns out damaged."""
        if not start.own:
            return "restore it from a copy: this path starts from that checkpoint"
        ckpt = start.checkpoint
        return (f"move it aside (mv {ckpt} {ckpt.parent / ('damaged_' + ckpt.name)}) and rerun: training then "
                f"resumes from the previous checkpoint (from the start if there is none)")

    def _check_compatible(self, start: Start) -> None:
        source = self.run.source
        manifest = tensors.check_model(
            start.checkpoint, to_dict(self.cfg.model), "resume from" if start.own else "branch from",
            f"use the model settings of the {source} it was trained with (or a new --run-dir for a different model)")
        if not start.own:
            return
        self.digest = self._schedule_digest(manifest["step"])
        if manifest.get("schedule_digest") == self.digest.hexdigest()[:16]:
            return
        ckpt, name = start.checkpoint, self.run.name
        steps = f"steps {self.run.path.fork_step}..{manifest['step'] - 1}"
        extend = " (extending it with later versions is fine)" if source == "plan" else ""
        restore = f"restore the original {source}{extend}, or use a new --run-dir"
        trained, now = manifest.get("schedule_inputs"), self._schedule_inputs()
        if trained is None:  # written before the inputs were recorded: only the digest tells
            raise LrpathError(f"cannot resume path {name!r} from {ckpt}: the LR schedule, data blend or "
                              f"data settings of {steps} differ from what was trained; {restore}")
        changed = [f"{k}: checkpoint {trained.get(k)!r} vs {source} {v!r}" for k, v in now.items()
                   if trained.get(k) != v]
        what = ("; ".join(changed) if changed
                else f"the LR schedule or data blend of {steps} differ from what was trained")
        raise LrpathError(f"cannot resume path {name!r} from {ckpt}: {what}; {restore}")

    def load(self, start: Start, model, optimizer) -> dict | None:
        """Collective. Loads the start into the live model and optimizer; returns the trainer state
        (step, data) of a resume or fork, None for weights only or scratch. Weights only go in before the
        model transform adds modules the base never had: call :meth:`load_weights` then."""
        if start.kind in (SCRATCH, WEIGHTS):
            return None
        # An own checkpoint without optimizer state is the end of a finished path: nothing to continue.
        load_optimizer = (layout.has_optimizer_state(start.checkpoint) if start.own
                          else not start.fresh_optimizer)
        return tensors.load(start.checkpoint, model, optimizer, load_optimizer=load_optimizer,
                            restore_rng=start.own, fix=self.damaged_fix(start))

    def load_weights(self, start: Start, module) -> None:
        tensors.load_model(start.checkpoint, module, fix=self.damaged_fix(start))

    def prepare(self, start: Start, step: int, is_rank0: bool) -> None:
        """Once the start is loaded: the checkpoint directory, without leftovers of killed saves, and the
        branch's reference to its fork checkpoint; then the schedule digest up to ``step``."""
        if is_rank0:
            self.root.mkdir(parents=True, exist_ok=True)
            layout.remove_stale_temporaries(self.root)
            if start.kind in (FORK, WEIGHTS):
                layout.record_fork(self.run.dirs.fork_record, start.checkpoint, self.run.path.fork_step)
        if self.digest is None:  # not resumed from an own checkpoint (which computed it)
            self.digest = self._schedule_digest(step)
        self.writer = CheckpointWriter(self.root, self.cfg.checkpoint.async_save,
                                       lambda msg: self.log(f"[{self.run.name}] {msg}"))
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------------------------ the digest
    def _schedule_inputs(self) -> dict:
        """The settings besides the per-step LR and blend that decide which data the steps see."""
        cfg = to_dict(self.cfg)
        return {key: cfg[section][name] for key in SCHEDULE_INPUTS for section, name in [key.split(".")]}

    def _schedule_digest(self, upto: int):
        """Hash of everything that decided steps fork_step..upto-1 besides the model: LR and blend per step,
        and the :meth:`_schedule_inputs`. A plan extended with new versions keeps the digest of the steps
        already trained, so the main path can resume; a changed past cannot. Computed once at start; each
        trained step then extends it (:meth:`trained`), so saves cost O(1)."""
        inputs = {SCHEDULE_INPUTS[k]: v for k, v in self._schedule_inputs().items()}
        h = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
        for step in range(self.run.path.fork_step, upto):
            self._extend(h, step)
        return h

    def _extend(self, h, step: int) -> None:
        path = self.run.path
        h.update(repr((path.lr_at_step(step), path.weights_at_step(step))).encode())

    def trained(self, step: int) -> None:
        """Step ``step`` was trained: it enters the digest of later checkpoints."""
        self._extend(self.digest, step)

    # ------------------------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        path = self.run.path
        return step == self.end or step in path.save_steps | path.weights_only_steps or self._interval(step)

    def _interval(self, step: int) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return interval > 0 and step % interval == 0

    def saves_optimizer(self, step: int, for_resume: bool) -> bool:
        """Whether the checkpoint at ``step`` keeps the optimizer state: every checkpoint training may
        continue from does; merge inputs and (with checkpoint.save_optimizer=false) the path's final
        checkpoint hold the weights only."""
        path = self.run.path
        if step == 0:  # a fresh optimizer has no state to save
            return False
        if for_resume or step in path.save_steps:
            return True
        if step == path.end_step:
            return self.cfg.checkpoint.save_optimizer
        return step == self.end or self._interval(step) or step not in path.weights_only_steps

    def has_checkpoint(self, step: int) -> bool:
        return layout.checkpoint_at(self.root, step) is not None

    def time_due(self) -> bool:
        """This rank's wall clock says a save is due (``checkpoint.save_interval_minutes``); the trainer
        makes it one decision of all ranks."""
        minutes = self.cfg.checkpoint.save_interval_minutes
        return minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes

    def save(self, step: int, model, optimizer, data_state: dict, for_resume: bool = False) -> None:
        """Collective. The checkpoint at ``step`` with its manifest; once it is visible, pruning
        (``checkpoint.keep_last``). With ``checkpoint.async_save`` the tensors are written in the
        background, after the previous write completed; a checkpoint that another job or the next start
        reads (a fork point, a merge input, the stop step, a signal's save) is complete on return."""
        self._last_save = time.monotonic()
        self.writer.wait(f"step {step} saves next; one write at a time")
        cfg, run = self.cfg, self.run
        manifest = {
            "path": run.name,
            "schedule_digest": self.digest.hexdigest()[:16],
            "schedule_inputs": self._schedule_inputs(),
            "config": to_dict(cfg),
            "code_version": layout.code_version(),
            "versions": versions(),
            "parent": str(run.origin.checkpoint) if run.origin.checkpoint else None,
            "consumed_samples": step * cfg.parallel.global_batch_size,
            "data_state": data_state,
            **run.lineage,
        }
        state = {"step": step, "data": data_state}
        if ranks.rank() == 0:
            self.writer.check_space(step)
        save_optimizer = self.saves_optimizer(step, for_resume)
        self.writer.write(step, lambda: tensors.stage(self.root, step, model, optimizer, state, manifest,
                                                      save_optimizer), self._committed)
        path = self.run.path
        if for_resume or step == self.end:
            self.writer.wait(f"step {step} is where the next start resumes")
        elif step in path.save_steps | path.weights_only_steps:
            self.writer.wait(f"step {step} is read by another job: a fork point or merge input")

    def poll(self) -> None:
        """Collective, every step: commits a finished background write, raises a failed one on every rank."""
        self.writer.poll()

    def finish(self) -> None:
        self.writer.wait("the run ends")
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()

    def _committed(self, ckpt: Path) -> None:
        if ranks.rank() != 0:
            return
        for old in self.prune():
            self.log(f"[{self.run.name}] deleted {old.name} (checkpoint.keep_last={self.cfg.checkpoint.keep_last})")

    def prune(self) -> list[Path]:
        """Rank 0: all but the ``checkpoint.keep_last`` newest resumable checkpoints, never a fork point, a
        merge input (even one on an interval step, which keeps its optimizer state) or the path's end."""
        keep = self.cfg.checkpoint.keep_last
        if not keep:
            return []
        path = self.run.path
        return layout.prune(self.root, keep, path.save_steps | path.weights_only_steps | {path.end_step},
                            self.writer.delete)
