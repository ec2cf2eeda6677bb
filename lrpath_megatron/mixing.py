"""Deterministic, resumable sampler that blends corpora with weights that change during a run.

The blend policy (which weights are active at a step, e.g. switched when the LR falls below a threshold)
comes in as ``weights_at_step(step) -> (stage_label, {corpus: weight})``; this module turns it into a
sample sequence:

* Corpus choice is a low-discrepancy assignment per stage: global sample ``n`` of a stage goes to the
  corpus maximising ``w_c * (n + 1) - count_c`` (ties: first corpus in order), so after any prefix of a
  stage every corpus is within one sample of its share.
* Within a corpus, samples come in the order of a per-epoch permutation seeded by (seed, stable hash of
  the corpus name, epoch); a corpus that runs out wraps to the next epoch with a fresh permutation and a
  log line.

The state is O(number of corpora) and JSON-able, so a run resumes exactly and a branch continues the main
path's sequence from its fork point (it loads the main path's state, then applies its own weights).
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Callable

import numpy as np

from lrpath_megatron.errors import LrpathError

logger = logging.getLogger(__name__)

WeightsFn = Callable[[int], "tuple[str, dict[str, float]]"]

STATE_VERSION = 1


def stable_corpus_hash(name: str) -> int:
    """A 64-bit hash of a corpus name that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def epoch_permutation(size: int, seed: int, corpus: str, epoch: int) -> np.ndarray:
    """The order in which ``corpus`` serves its ``size`` samples in ``epoch``."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stable_corpus_hash(corpus), epoch])))
    perm = rng.permutation(size)
    # int32 halves the memory of large corpora; the values are unchanged.
    return perm.astype(np.int32) if size < np.iinfo(np.int32).max else perm


class MixingSampler:
    """Decides, for every global sample, the corpus and the sample index inside it.

    ``global_batch(step)`` must be called for consecutive steps starting at the state's step (0 for a
    fresh sampler).
    """

    def __init__(self, corpus_sizes: dict[str, int], weights_at_step: WeightsFn, global_batch_size: int,
                 seed: int) -> None:
        if not corpus_sizes:
            raise LrpathError("the mixing sampler needs at least one corpus; data.corpora is empty")
        for name, size in corpus_sizes.items():
            if int(size) <= 0:
                raise LrpathError(f"corpus {name!r} has {size} training samples; it needs at least one")
        if global_batch_size <= 0:
            raise LrpathError(f"global_batch_size must be > 0, got {global_batch_size}")
        self.corpora: list[str] = list(corpus_sizes)
        self.sizes: dict[str, int] = {c: int(s) for c, s in corpus_sizes.items()}
        self.weights_at_step = weights_at_step
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        # Resumable state.
        self.step = 0
        self.cursors = {c: 0 for c in self.corpora}
        self.epochs = {c: 0 for c in self.corpora}
        self.stage: str | None = None
        self.stage_counts = {c: 0 for c in self.corpora}
        # Derived caches (not state): the current epoch's permutation per corpus.
        self._perms: dict[str, np.ndarray] = {}
        self._reset_stats()

    # ---------------------------------------------------------------------------------------------
    def global_batch(self, step: int) -> list[tuple[str, int]]:
        """(corpus, sample index) for every sample of global batch ``step``, in global-sample order."""
        if step != self.step:
            raise LrpathError(
                f"mixing sampler is at step {self.step} but batch {step} was requested; batches must be "
                f"drawn for consecutive steps (resume by loading the sampler state saved with the checkpoint)"
            )
        label, weights = self._weights(step)
        if label != self.stage:
            if self.stage is not None:
                shown = {c: round(w, 4) for c, w in weights.items()}  # interpolated weights carry float noise
                event = f"step {step}: data mix switches from stage {self.stage!r} to {label!r}, weights {shown}"
                logger.info(event)
                self._stats_events.append(event)
            self.stage = label
            self.stage_counts = {c: 0 for c in self.corpora}
        active = [(c, weights[c]) for c in self.corpora if weights.get(c, 0.0) > 0.0]
        counts = self.stage_counts
        n_drawn = sum(counts.values())
        batch = []
        for _ in range(self.global_batch_size):
            n_drawn += 1
            corpus = max(active, key=lambda cw: cw[1] * n_drawn - counts[cw[0]])[0]  # max keeps the first tie
            counts[corpus] += 1
            batch.append((corpus, self._next_sample(corpus)))
        self.step += 1
        self._stats_samples.update(c for c, _ in batch)
        self._stats_stages[label] += len(batch)
        self._stats_weights = weights
        return batch

    def _weights(self, step: int) -> tuple[str, dict[str, float]]:
        label, weights = self.weights_at_step(step)
        unknown = sorted(set(weights) - set(self.sizes))
        if unknown:
            raise LrpathError(
                f"the data mix at step {step} (stage {label!r}) names corpora {unknown} that are not "
                f"configured; configured corpora: {self.corpora}"
            )
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise LrpathError(f"the data mix at step {step} (stage {label!r}) has invalid weights {weights}; "
                              f"weights must be >= 0 with a positive sum")
        total = float(sum(weights.values()))
        return str(label), {c: float(w) / total for c, w in weights.items()}

    def _next_sample(self, corpus: str) -> int:
        if self.cursors[corpus] == self.sizes[corpus]:
            self.epochs[corpus] += 1
            self.cursors[corpus] = 0
            self._perms.pop(corpus, None)
            event = (f"step {self.step}: corpus {corpus!r} exhausted its {self.sizes[corpus]} samples; "
                     f"starting epoch {self.epochs[corpus]} with a fresh shuffle")
            logger.warning(event)
            self._stats_events.append(event)
            self._stats_wraps.append({"corpus": corpus, "epoch": self.epochs[corpus], "step": self.step})
        perm = self._perms.get(corpus)
        if perm is None:
            perm = epoch_permutation(self.sizes[corpus], self.seed, corpus, self.epochs[corpus])
            self._perms[corpus] = perm
        sample = int(perm[self.cursors[corpus]])
        self.cursors[corpus] += 1
        return sample

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "step": self.step,
            "corpus_sizes": dict(self.sizes),
            "cursors": dict(self.cursors),
            "epochs": dict(self.epochs),
            "stage": self.stage,
            "stage_counts": dict(self.stage_counts),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (this run's, or the main path's at a branch's fork point).

        Corpora absent from ``state`` start at epoch 0 (a plan may add corpora later); everything else
        must match, or the continuation would repeat or skip samples.
        """
        if state.get("version") != STATE_VERSION:
            raise LrpathError(f"sampler state has version {state.get('version')}, expected {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size)):
            if state[key] != mine:
                raise LrpathError(
                    f"sampler state was saved with {key}={state[key]} but this run uses {mine}; resume "
                    f"with the same data.seed and parallel.global_batch_size"
                )
        saved_sizes = state["corpus_sizes"]
        missing = sorted(set(saved_sizes) - set(self.sizes))
        if missing:
            raise LrpathError(f"sampler state contains corpora {missing} that are not configured now; "
                              f"configured corpora: {self.corpora}")
        for corpus, size in saved_sizes.items():
            if size != self.sizes[corpus]:
                raise LrpathError(
                    f"corpus {corpus!r} had {size} training samples when the sampler state was saved but "
                    f"has {self.sizes[corpus]} now; its data, data.valid_fraction or model.seq_length changed"
                )
        self.step = int(state["step"])
        self.cursors = {c: int(state["cursors"].get(c, 0)) for c in self.corpora}
        self.epochs = {c: int(state["epochs"].get(c, 0)) for c in self.corpora}
        self.stage = state["stage"]
        self.stage_counts = {c: int(state["stage_counts"].get(c, 0)) for c in self.corpora}
        self._perms.clear()
        self._reset_stats()

    # ---------------------------------------------------------------------------------------------
    def pop_stats(self) -> dict:
        """What was sampled since the previous call: samples and realised fractions per corpus, stages,
        epoch wraps, and ``events`` (stage switches and wraps as log lines)."""
        total = sum(self._stats_samples.values())
        stats = {
            "samples": {c: self._stats_samples[c] for c in self.corpora},
            "total_samples": total,
            "fractions": {c: (self._stats_samples[c] / total if total else 0.0) for c in self.corpora},
            "weights": dict(self._stats_weights),
            "stage": self.stage,
            "stage_samples": dict(self._stats_stages),
            "epochs": dict(self.epochs),
            "epoch_wraps": list(self._stats_wraps),
            "events": list(self._stats_events),
        }
        self._reset_stats()
        return stats

    def _reset_stats(self) -> None:
        self._stats_samples: Counter = Counter()
        self._stats_stages: Counter = Counter()
        self._stats_weights: dict[str, float] = {}
        self._stats_wraps: list[dict] = []
        self._stats_events: list[str] = []
