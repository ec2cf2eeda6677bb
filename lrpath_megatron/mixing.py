"""Deterministic, resumable sampler that blends corpora with weights that change during a run.

The blend policy (which weights are active at a step, e.g. switched when the LR comes down to a
threshold) comes in as ``weights_at_step(step) -> (stage_label, {corpus: weight})``, normalised; this
module turns it into a sample sequence:

* Corpus choice follows the configured blend: every corpus has an expected count, the sum of its weight
  over the samples drawn so far (each sample weighted by its own step's blend), and the next sample goes
  to the corpus whose expected count after it most exceeds its realised count, its deficit (ties: first
  corpus in order). The counts carry over stage switches, ramps, resumes and forks. After every prefix no
  corpus is a whole sample ahead, and none is owed more than H_k - 1 samples for k corpora (1/2, 5/6,
  13/12, ...), so with up to three corpora every corpus is within one sample of its expected count;
  docs/mixing.md has the proof and why no sampler that does not look ahead does better.
* Within a corpus, samples come in the order of a per-epoch permutation seeded by (seed, stable hash of
  the corpus name, epoch); a corpus that runs out wraps to the next epoch with a fresh permutation and a
  log line.

The state is O(number of corpora) and JSON-able, so a run resumes exactly and a branch continues the main
path's sequence from its fork point (it loads the main path's state, then applies its own weights).
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from typing import Callable

import numpy as np

from lrpath_megatron.errors import LrpathError

logger = logging.getLogger(__name__)

WeightsFn = Callable[[int], "tuple[str, dict[str, float]]"]

# Version 1 states (per-stage counts) load where they continue exactly; see _load_legacy_blend.
STATE_VERSION = 2
LEGACY_STATE_VERSION = 1
# How far the sum of a step's weights may be from 1 (the policy normalises; floats round).
WEIGHT_SUM_TOLERANCE = 1e-9
# How states written before blend stages had names call an unnamed stage: by its index.
INDEXED_STAGE = re.compile(r"stage\d+")


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

    Blend accounting: the steps form segments of identical weights (a stage, or one step of a ramp). The
    state holds every corpus's deficit (expected minus realised count) at the start of the current
    segment, the segment's weights and, within it, the samples drawn and each corpus's count. The deficit
    of ``c`` for the segment's ``m``-th sample is then ``deficit_c + w_c * m - count_c``: a product, not a
    running sum, so a constant blend accumulates no rounding and picks exactly as the earlier per-stage
    sampler did.
    """

    def __init__(self, corpus_sizes: dict[str, int], weights_at_step: WeightsFn, global_batch_size: int,
                 seed: int) -> None:
        assert corpus_sizes, "configs are validated to name at least one corpus"
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
        self.deficits = {c: 0.0 for c in self.corpora}  # at the start of the current segment
        self.weights: dict[str, float] | None = None  # the current segment's, as the policy gave them
        self.divisor = 1.0  # the weights' float sum (see _start_segment)
        self.drawn = 0  # samples of the current segment
        self.counts = {c: 0 for c in self.corpora}  # per corpus, in the current segment
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
        if weights != self.weights:
            self._start_segment(weights)
        if label != self.stage:
            if self.stage is not None:
                shown = {c: round(w, 4) for c, w in weights.items()}  # interpolated weights carry float noise
                event = f"step {step}: data mix switches from stage {self.stage!r} to {label!r}, weights {shown}"
                logger.info(event)
                self._stats_events.append(event)
            self.stage = label
        batch = [(corpus, self._next_sample(corpus)) for corpus in self._choose(self.global_batch_size)]
        self.step += 1
        self._stats_samples.update(c for c, _ in batch)
        self._stats_stages[label] += len(batch)
        self._stats_weights = weights
        return batch

    def _choose(self, n: int) -> list[str]:
        """The corpora of the segment's next ``n`` samples: each the largest deficit after it is counted."""
        rows = [(c, self.deficits[c], self.weights.get(c, 0.0) / self.divisor) for c in self.corpora]
        counts = self.counts
        chosen = []
        for _ in range(n):
            self.drawn += 1
            m = self.drawn
            corpus = max(rows, key=lambda r: r[1] + r[2] * m - counts[r[0]])[0]  # max keeps the first tie
            counts[corpus] += 1
            chosen.append(corpus)
        return chosen

    def _start_segment(self, weights: dict[str, float]) -> None:
        """Close the current segment into the deficits and open one with ``weights``.

        The weights are normalised by the policy; their float sum may still be 1 +- a few ulp. Dividing by
        it makes the expected counts of a sample add up to 1 as closely as floats allow, and keeps the
        choices for a constant blend bit-identical to those of the earlier sampler (which divided too).
        """
        if self.weights is not None:
            for c in self.corpora:
                self.deficits[c] += self.weights.get(c, 0.0) / self.divisor * self.drawn - self.counts[c]
        self.weights = dict(weights)
        self.divisor = float(sum(weights.values()))
        self.drawn = 0
        self.counts = {c: 0 for c in self.corpora}

    def _weights(self, step: int) -> tuple[str, dict[str, float]]:
        label, weights = self.weights_at_step(step)
        unknown = sorted(set(weights) - set(self.sizes))
        if unknown:
            raise LrpathError(
                f"the data mix at step {step} (stage {label!r}) names corpora {unknown} that are not "
                f"configured; configured corpora: {self.corpora}"
            )
        # The policy normalises (mix_policy); weights that do not sum to 1 are a bug upstream.
        total = sum(weights.values())
        normalised = all(w >= 0 for w in weights.values()) and abs(total - 1) <= WEIGHT_SUM_TOLERANCE
        assert normalised, f"the data mix at step {step} (stage {label!r}) is not normalised: {weights}"
        return str(label), {c: float(w) for c, w in weights.items()}

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
            "deficits": dict(self.deficits),
            "weights": None if self.weights is None else dict(self.weights),
            "divisor": self.divisor,
            "drawn": self.drawn,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """Continue from ``state`` (this run's, or the main path's at a branch's fork point), saved in
        ``source`` (named in errors).

        Corpora absent from ``state`` start at epoch 0 (a plan may add corpora later); everything else
        must match, or the continuation would repeat or skip samples.
        """
        version = state.get("version")
        if version not in (LEGACY_STATE_VERSION, STATE_VERSION):
            raise LrpathError(f"the sampler state in {source} has version {version}; this sampler reads "
                              f"versions {LEGACY_STATE_VERSION} and {STATE_VERSION}")
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
        self.stage = self._saved_stage(state["stage"])
        if version == LEGACY_STATE_VERSION:
            self._load_legacy_blend(state, source)
        else:
            self.deficits = {c: float(state["deficits"].get(c, 0.0)) for c in self.corpora}
            self.weights = None if state["weights"] is None else dict(state["weights"])
            self.divisor = float(state["divisor"])
            self.drawn = int(state["drawn"])
            self.counts = {c: int(state["counts"].get(c, 0)) for c in self.corpora}
        self._perms.clear()
        self._reset_stats()

    def _saved_stage(self, saved: str | None) -> str | None:
        """The label the policy gives the stage a state records. A path's own state records the stage of the
        step before its step, which an :data:`INDEXED_STAGE` label names by index: that step's label now. A
        branch's first state is its parent's, from before the branch's steps: kept as saved."""
        if saved is None or self.step == 0 or not INDEXED_STAGE.fullmatch(saved):
            return saved
        try:
            return self.weights_at_step(self.step - 1)[0]
        except ValueError:
            return saved

    def _load_legacy_blend(self, state: dict, source: str) -> None:
        """A version-1 state counted samples per stage (restarting at every label change) against the
        weights of the current step. Its stage continues exactly as one segment with zero deficits at the
        stage's start for as long as the weights stay constant; a ramp running at the resume step (the
        weights change within the stage) was sampled differently, and is refused."""
        step, (label, weights) = self.step, self._weights(self.step)
        restart = label != self.stage
        self.counts = {c: 0 if restart else int(state["stage_counts"].get(c, 0)) for c in self.corpora}
        self.drawn = sum(self.counts.values())
        try:
            following = self.weights_at_step(step + 1)
        except ValueError:  # the last step of a path: nothing follows
            following = None
        if following is not None and following[0] == label and dict(following[1]) != weights:
            began = step - self.drawn // self.global_batch_size
            raise LrpathError(
                f"cannot continue the data sampler saved in {source} (step {step}): an earlier version of "
                f"lrpath_megatron wrote it while the blend of stage {label!r} was ramping (from step "
                f"{began}), which that version sampled differently from this one; move this checkpoint and "
                f"any later one saved during the ramp aside so that the path resumes from a checkpoint "
                f"saved before step {began} (one saved after the ramp ended also continues), or start the "
                f"path again with a new --run-dir"
            )
        self.deficits = {c: 0.0 for c in self.corpora}
        self.weights = weights
        self.divisor = float(sum(weights.values()))

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
