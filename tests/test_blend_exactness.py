"""The blend that trains is the blend configured: over every prefix of a path, no corpus is a whole sample
ahead of its expected count (the sum of its configured weight over the samples drawn) and none is owed
more than H_k - 1 samples for k corpora, so with up to three corpora every one is within one sample;
through LR-triggered switches, ramps, forks, epoch wraps and resumes at any step (docs/mixing.md)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrpath_megatron.config import MixConfig, MixStage
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mix_policy import MixSchedule, normalize_weights, resolve_stages
from lrpath_megatron.mixing import MixingSampler

ETA_MAX, ETA_MIN = 1e-3, 1e-5
BOUND = 1.0 + 1e-9  # one sample, with room for the rounding of the weight sums


@dataclass(frozen=True)
class Case:
    sizes: dict  # corpus -> training samples (small, so that corpora wrap)
    steps: int
    warmup: int
    shape: str
    batch: int
    main: MixConfig
    fork: int | None  # a branch with its own policy continues the main path's state here
    branch: MixConfig | None
    resumes: tuple  # steps at which the sampler state goes through JSON into a fresh sampler


def lr_function(case: Case):
    """Linear warmup to ETA_MAX, then a decay to ETA_MIN on the last step (non-increasing after warmup);
    the multistep shape lands exactly on ETA_MAX / 5, the edge of an ``eta_max/5`` threshold."""
    span = max(case.steps - 1 - case.warmup, 1)

    def lr(step: int) -> float:
        if step < case.warmup:
            return ETA_MAX * step / case.warmup
        t = min((step - case.warmup) / span, 1.0)
        if case.shape == "multistep":
            return ETA_MAX if t < 0.5 else ETA_MAX / 5 if t < 0.8 else ETA_MIN
        f = 0.5 * (1 + math.cos(math.pi * t)) if case.shape == "cosine" else 1 - t
        return ETA_MIN + (ETA_MAX - ETA_MIN) * f
    return lr


def weights_function(case: Case):
    """step -> (label, weights) of the whole path: the main policy, then the branch's from the fork."""
    lr, corpora = lr_function(case), list(case.sizes)

    def policy(mix: MixConfig, start: int):
        stages = resolve_stages(mix, corpora, ETA_MAX, "mix")
        return MixSchedule(stages, mix.ramp_steps, lr, start, case.steps).weights_at_step

    main = policy(case.main, case.warmup)
    if case.fork is None:
        return main
    branch = policy(case.branch, case.fork)
    return lambda step: main(step) if step < case.fork else branch(step)


def sample(case: Case, resumes=()) -> list[tuple[str, int]]:
    """The path's samples; at each step in ``resumes`` (and at the fork) the state is saved as JSON and
    loaded by a fresh sampler, as the trainer does through a checkpoint."""
    weights = weights_function(case)
    sampler = MixingSampler(case.sizes, weights, case.batch, seed=3)
    out = []
    for step in range(case.steps):
        if step in resumes or step == case.fork:
            state = json.loads(json.dumps(sampler.state_dict()))
            sampler = MixingSampler(case.sizes, weights, case.batch, seed=3)
            sampler.load_state_dict(state)
        out.extend(sampler.global_batch(step))
    return out


def deviations(case: Case, seq: list[tuple[str, int]]):
    """Per prefix: (expected - realised count of the most owed corpus, realised - expected of the most
    served one, how many corpora the blend has weighted so far)."""
    weights = weights_function(case)
    expected = {c: 0.0 for c in case.sizes}
    realised = {c: 0 for c in case.sizes}
    weighted: set = set()
    for n, (corpus, _) in enumerate(seq):
        if n % case.batch == 0:
            blend = weights(n // case.batch)[1]
            weighted.update(blend)
        for c, w in blend.items():
            expected[c] += w
        realised[corpus] += 1
        yield (max(expected[c] - realised[c] for c in case.sizes),
               max(realised[c] - expected[c] for c in case.sizes), len(weighted))


def owed_bound(k: int) -> float:
    """The most a corpus can be owed after any prefix with ``k`` corpora weighted: H_k - 1 (docs/mixing.md);
    below one sample for k <= 3."""
    return sum(1 / i for i in range(2, k + 1))


@st.composite
def mix_configs(draw, corpora: list[str]) -> MixConfig:
    n = draw(st.integers(1, 4))
    # Thresholds as fractions of eta_max, strictly decreasing; 1/5 is the multistep schedule's level.
    fractions = sorted(draw(st.sets(st.sampled_from([0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02]),
                                    min_size=n - 1, max_size=n - 1)), reverse=True)
    stages = []
    for i in range(n):
        shares = draw(st.lists(st.integers(0, 4), min_size=len(corpora), max_size=len(corpora)))
        weights = dict(zip(corpora, shares))
        if not any(weights.values()):
            weights[corpora[0]] = 1
        stages.append(MixStage(lr_below=None if i == 0 else f"eta_max*{fractions[i - 1]}", weights=weights))
    return MixConfig(stages=stages, ramp_steps=draw(st.integers(0, 8)))


@st.composite
def cases(draw) -> Case:
    corpora = [f"c{i}" for i in range(draw(st.integers(1, 5)))]
    sizes = {c: draw(st.integers(1, 40)) for c in corpora}
    steps = draw(st.integers(2, 40))
    warmup = draw(st.integers(0, steps // 3))
    fork = draw(st.none() | st.integers(warmup, steps - 1))
    resumes = tuple(draw(st.lists(st.integers(1, steps - 1), max_size=3)))
    return Case(sizes, steps, warmup, draw(st.sampled_from(["cosine", "linear", "multistep"])),
                draw(st.integers(1, 12)), draw(mix_configs(corpora)), fork,
                None if fork is None else draw(mix_configs(corpora)), resumes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(cases())
def test_every_prefix_keeps_the_blend_bound_and_resume_is_bitwise(case):
    uninterrupted = sample(case)
    assert sample(case, case.resumes) == uninterrupted
    for owed, ahead, k in deviations(case, uninterrupted):
        assert ahead < BOUND and owed <= owed_bound(k) + 1e-9  # owed_bound(k) < 1 for k <= 3


# ------------------------------------------------------------------------------------------ examples
def owed_and_ahead(weights_at_step, sizes: dict, batch: int, steps: int, sampler=None):
    """(most owed, most ahead) over every prefix of ``steps`` steps, in samples."""
    sampler = sampler or MixingSampler(sizes, weights_at_step, batch, seed=1)
    expected, realised = dict.fromkeys(sizes, 0.0), dict.fromkeys(sizes, 0)
    owed = ahead = 0.0
    for step in range(steps):
        blend = weights_at_step(step)[1]
        for corpus, _ in sampler.global_batch(step):
            for c, w in blend.items():
                expected[c] += w
            realised[corpus] += 1
            owed = max(owed, *(expected[c] - realised[c] for c in sizes))
            ahead = max(ahead, *(realised[c] - expected[c] for c in sizes))
    return owed, ahead


def test_a_ramp_trains_the_blend_it_configures():
    """50/50 -> 10/90 over 10 steps of 64 samples: every step's share follows the ramp, and the window as a
    whole takes its configured 0.72 of the new corpus to the sample."""
    mix = MixConfig([MixStage(None, {"old": 1, "new": 1}), MixStage("eta_max/5", {"old": 1, "new": 9})], 10)
    lr = lambda step: ETA_MAX if step < 20 else ETA_MAX / 10  # noqa: E731
    policy = MixSchedule(resolve_stages(mix, ["old", "new"], ETA_MAX, "mix"), 10, lr, 0, 40)
    sampler = MixingSampler({"old": 10**6, "new": 10**6}, policy.weights_at_step, 64, seed=1)
    batches = [sampler.global_batch(step) for step in range(40)]
    ramp = [c for step in range(20, 30) for c, _ in batches[step]]
    assert abs(ramp.count("new") - 0.72 * 640) <= 1
    for step in range(20, 30):  # 0.54, 0.58, ..., 0.90 of each batch, to the sample
        share = policy.weights_at_step(step)[1]["new"]
        assert abs(sum(c == "new" for c, _ in batches[step]) - 64 * share) <= 2
    owed, ahead = owed_and_ahead(policy.weights_at_step, {"old": 10**6, "new": 10**6}, 64, 40)
    assert owed <= 0.5 + 1e-9 and ahead < BOUND  # two corpora: within half a sample


def test_four_corpora_can_be_owed_13_12_of_a_sample_three_stay_within_5_6():
    """Blends that change after each sample, on the corpora not drawn yet, reach the bound H_k - 1: with four
    corpora one is owed 1/4 + 1/3 + 1/2 = 13/12 samples (no sampler that does not know the next blend does
    better); three corpora stay within 5/6 of a sample whatever the blends."""
    sizes = dict.fromkeys("abcd", 100)
    rounds = [{"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, {"b": 1 / 3, "c": 1 / 3, "d": 1 / 3},
              {"c": 0.5, "d": 0.5}, {"c": 1.0}]
    owed, ahead = owed_and_ahead(lambda step: (f"r{step}", rounds[step]), sizes, 1, len(rounds))
    assert owed == pytest.approx(13 / 12) and ahead < 1
    three = [{"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"b": 0.5, "c": 0.5}, {"c": 1.0}]
    owed, ahead = owed_and_ahead(lambda step: (f"r{step}", three[step]), sizes, 1, len(three))
    assert owed == pytest.approx(5 / 6) and ahead < 1


# The corpus sequences of constant blends as the per-stage sampler drew them (120 steps, seed 5),
# pinned before the sampler followed cumulative expected counts: a constant blend must not change.
PER_STAGE_SEQUENCES = {
    "two": ({"general": 1100, "code": 400}, {"general": 0.7, "code": 0.3}, 8, "6b159f7f5a6cbc5d"),
    "thirds": ({"a": 50, "b": 70, "c": 30}, {"a": 1, "b": 1, "c": 1}, 6, "11923326f90d4538"),
    "uneven": ({"a": 90, "b": 13, "c": 200, "d": 41}, {"a": 0.1, "b": 0.05, "c": 0.6, "d": 0.25}, 7,
               "3049b0eecb54fb13"),
    # Seven equal weights sum to 1 - 1 ulp in floats: the sampler's division by the sum is what keeps it.
    "sevenths": ({"a": 9, "b": 13, "c": 20, "d": 41, "e": 5, "f": 7, "g": 11}, {c: 1 for c in "abcdefg"}, 16,
                 "2f99967fc75ea580"),
    "replay": ({"docs": 300, "code_a": 120, "code_b": 80}, {"code_b": 0.8, "docs": 0.1, "code_a": 0.1}, 64,
               "ac8d657de681b3d5"),
}


def digest(seq) -> str:
    return hashlib.sha256(repr(seq).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", PER_STAGE_SEQUENCES)
def test_a_constant_blend_draws_exactly_the_sequence_it_always_drew(name):
    sizes, weights, batch, pinned = PER_STAGE_SEQUENCES[name]
    blend = normalize_weights(weights, list(sizes), "weights")
    sampler = MixingSampler(sizes, lambda step: ("only", dict(blend)), batch, seed=5)
    assert digest([x for step in range(120) for x in sampler.global_batch(step)]) == pinned


# Version-1 states (per-stage counts), written by the per-stage sampler on a 50/50 -> 10/90 policy whose
# ramp runs over steps 20..29 (16 samples a step, seed 2), and on the seven equal weights above.
RAMP_MIX = MixConfig([MixStage(None, {"old": 1, "new": 1}), MixStage("eta_max/5", {"old": 1, "new": 9})], 10)
RAMP_SIZES = {"old": 500, "new": 700}


def legacy_state(step: int, cursors: dict, stage: str, counts: dict) -> dict:
    return {"version": 1, "seed": 2, "global_batch_size": 16, "step": step, "corpus_sizes": dict(RAMP_SIZES),
            "cursors": cursors, "epochs": {"old": 0, "new": 0}, "stage": stage, "stage_counts": counts}


def ramp_policy():
    lr = lambda step: ETA_MAX if step < 20 else ETA_MAX / 10  # noqa: E731
    return MixSchedule(resolve_stages(RAMP_MIX, list(RAMP_SIZES), ETA_MAX, "mix"), 10, lr, 0, 60).weights_at_step


def resumed(state: dict, weights, start: int, stop: int, sizes=RAMP_SIZES, batch: int = 16, seed: int = 2):
    sampler = MixingSampler(sizes, weights, batch, seed=seed)
    sampler.load_state_dict(state, f"checkpoints/iter_{start:07d}")
    return [x for step in range(start, stop) for x in sampler.global_batch(step)]


def test_a_version_1_state_continues_exactly_where_the_blend_is_constant():
    weights = ramp_policy()
    # Step 13, inside the constant first stage: identical up to the switch at step 20 ...
    state = legacy_state(13, {"old": 104, "new": 104}, "stage0", {"old": 104, "new": 104})
    assert digest(resumed(state, weights, 13, 20)) == "3edba7e0cf0181f7"
    # ... and step 35, after the ramp (its counts include the ramp): identical to the end.
    state = legacy_state(35, {"old": 185, "new": 375}, "stage1", {"old": 25, "new": 215})
    assert digest(resumed(state, weights, 35, 60)) == "c50e9f780b78c103"
    # Seven equal weights (their sum is not exactly 1), saved at step 7 with corpora wrapped.
    sizes = {"a": 9, "b": 13, "c": 20, "d": 41, "e": 5, "f": 7, "g": 11}
    blend = normalize_weights({c: 1 for c in sizes}, list(sizes), "weights")
    state = {"version": 1, "seed": 5, "global_batch_size": 16, "step": 7, "corpus_sizes": sizes,
             "cursors": {"a": 7, "b": 3, "c": 16, "d": 16, "e": 1, "f": 2, "g": 5},
             "epochs": {"a": 1, "b": 1, "c": 0, "d": 0, "e": 3, "f": 2, "g": 1}, "stage": "only",
             "stage_counts": dict.fromkeys(sizes, 16)}
    seq = resumed(state, lambda step: ("only", dict(blend)), 7, 120, sizes, 16, 5)
    assert digest(seq) == "d0db8e012dd54367"


@pytest.mark.parametrize("step,state", [
    (20, legacy_state(20, {"old": 160, "new": 160}, "stage0", {"old": 160, "new": 160})),  # the ramp starts
    (25, legacy_state(25, {"old": 184, "new": 216}, "stage1", {"old": 24, "new": 56})),  # half way through
])
def test_a_version_1_state_saved_in_a_ramp_is_refused_naming_the_checkpoint(step, state):
    with pytest.raises(LrpathError, match=rf"checkpoints/iter_{step:07d} \(step {step}\).*stage 'lr<=0\.0002' was "
                                          r"ramping \(from step 20\).*saved before step 20"):
        resumed(state, ramp_policy(), step, step + 1)


def test_a_switch_during_a_ramp_starts_from_the_blend_in_force():
    mix = MixConfig([MixStage(None, {"a": 1}), MixStage(0.5, {"b": 1}), MixStage(0.3, {"c": 1})], 6)
    lr = lambda step: 1.0 if step < 6 else 0.4 if step < 8 else 0.2  # noqa: E731
    policy = MixSchedule(resolve_stages(mix, ["a", "b", "c"], 1.0, "mix"), 6, lr, 0, 20)
    assert policy.weights_at_step(7) == ("lr<=0.5", pytest.approx({"a": 2 / 3, "b": 1 / 3}))
    # One sixth of the way from {a: 2/3, b: 1/3} to {c: 1}, not from the second stage's own {b: 1}.
    assert policy.weights_at_step(8) == ("lr<=0.3", pytest.approx({"a": 5 / 9, "b": 5 / 18, "c": 1 / 6}))
    assert policy.weights_at_step(13) == ("lr<=0.3", {"c": 1.0})


def test_the_sampler_takes_normalised_blends_only():
    sampler = MixingSampler({"a": 10, "b": 10}, lambda step: ("x", {"a": 2.0, "b": 2.0}), 4, seed=1)
    with pytest.raises(AssertionError, match="not normalised"):
        sampler.global_batch(0)
