"""MixingSampler: LR-triggered stages, realised fractions, no repeats, exact resume, branches, epochs."""
import json
import logging
import math
from collections import Counter

import numpy as np
import pytest

from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mixing import MixingSampler, epoch_permutation, stable_corpus_hash

GBS = 8
STEPS = 250  # 2,000 samples
ETA_MAX, ETA_MIN = 3e-4, 3e-6
SIZES = {"general": 1100, "code": 400, "new": 150}
STAGES = [  # (lr_below, weights): the active stage is the last whose threshold the LR has come down to
    (None, {"general": 0.7, "code": 0.3}),
    (ETA_MAX / 5, {"new": 0.6, "general": 0.25, "code": 0.15}),
]


def cosine_lr(step: int) -> float:
    return ETA_MIN + (ETA_MAX - ETA_MIN) * (1 + math.cos(math.pi * step / STEPS)) / 2


def two_stage(step: int):
    lr = cosine_lr(step)
    index = max(i for i, (below, _) in enumerate(STAGES) if below is None or lr <= below)
    return f"stage{index}", STAGES[index][1]


SWITCH = next(s for s in range(STEPS) if cosine_lr(s) <= ETA_MAX / 5)


def run(sampler: MixingSampler, start: int, stop: int) -> list[tuple[str, int]]:
    return [sample for step in range(start, stop) for sample in sampler.global_batch(step)]


def audit(seq, switch_step, stage_weights):
    """Realised fractions within 1% per stage, low discrepancy, no sample repeated before its corpus wraps."""
    for stage, (lo, hi) in enumerate([(0, switch_step * GBS), (switch_step * GBS, len(seq))]):
        counts = Counter(c for c, _ in seq[lo:hi])
        for corpus in SIZES:
            realised = counts[corpus] / (hi - lo)
            assert abs(realised - stage_weights[stage].get(corpus, 0.0)) <= 0.01, (stage, corpus, realised)
    # After EVERY prefix of the run, across the switch, each corpus is within one sample of its expected
    # count (the sum of its weight over the samples so far); three corpora stay within 5/6.
    running, expected = Counter(), Counter()
    for n, (corpus, _) in enumerate(seq):
        for c, w in stage_weights[int(n >= switch_step * GBS)].items():
            expected[c] += w
        running[corpus] += 1
        assert all(abs(running[c] - expected[c]) <= 5 / 6 + 1e-9 for c in SIZES)
    wrapped = set()
    for corpus, size in SIZES.items():
        ids = [i for c, i in seq if c == corpus]
        for e in range(0, len(ids), size):  # every epoch of a corpus is a permutation of its indices
            chunk = ids[e:e + size]
            assert len(set(chunk)) == len(chunk) and all(0 <= i < size for i in chunk)
            if len(chunk) == size:
                assert sorted(chunk) == list(range(size))
        if len(ids) > size:
            wrapped.add(corpus)
    assert "new" in wrapped  # the audit exercises wrapping as well


def test_audit_two_stage_fractions_switch_and_no_repeats():
    sampler = MixingSampler(SIZES, two_stage, GBS, seed=7)
    seq = run(sampler, 0, STEPS)
    assert len(seq) == 2000
    assert 0 < SWITCH < STEPS and cosine_lr(SWITCH - 1) > ETA_MAX / 5
    # At the switch "new" is owed 0.6 of a sample at once, more than the others carry over from stage 0, so
    # it is drawn from the switch step's first sample on, never before.
    assert next(i for i, (c, _) in enumerate(seq) if c == "new") == SWITCH * GBS
    audit(seq, SWITCH, [w for _, w in STAGES])


def test_audit_with_the_project_lr_schedule_and_mix_policy():
    """The same audit driven by schedules.ptfs (warmup + cosine) and mix_policy's LR-triggered stages."""
    from lrpath_megatron.config import MixConfig, MixStage
    from lrpath_megatron.mix_policy import MixSchedule, resolve_stages
    from lrpath_megatron.schedules import ptfs

    lr = ptfs(ETA_MAX, ETA_MIN, warmup_steps=10, total_steps=STEPS)
    mix = MixConfig(stages=[MixStage(weights=dict(STAGES[0][1])),
                            MixStage(lr_below="eta_max/5", weights=dict(STAGES[1][1]))])
    policy = MixSchedule(resolve_stages(mix, list(SIZES), ETA_MAX, "data.mix"), 0, lr, 10, STEPS)
    seq = run(MixingSampler(SIZES, policy.weights_at_step, GBS, seed=7), 0, STEPS)
    switch = next(s for s in range(10, STEPS) if lr(s) <= ETA_MAX / 5)
    assert lr(switch - 1) > ETA_MAX / 5 and 10 < switch < STEPS
    assert next(i for i, (c, _) in enumerate(seq) if c == "new") == switch * GBS
    audit(seq, switch, [w for _, w in STAGES])


def test_sequence_is_a_pure_function_of_seed_weights_and_sizes():
    a = run(MixingSampler(SIZES, two_stage, GBS, seed=7), 0, 60)
    b = run(MixingSampler(SIZES, two_stage, GBS, seed=7), 0, 60)
    c = run(MixingSampler(SIZES, two_stage, GBS, seed=8), 0, 60)
    assert a == b
    assert [x for x, _ in a] == [x for x, _ in c]  # the corpus choice does not depend on the seed
    assert a != c


@pytest.mark.parametrize("kill_at", [0, 1, 37, SWITCH - 1, SWITCH, SWITCH + 1, STEPS - 1])
def test_kill_and_resume_through_json_reproduces_the_sequence(kill_at):
    full = run(MixingSampler(SIZES, two_stage, GBS, seed=3), 0, STEPS)
    first = MixingSampler(SIZES, two_stage, GBS, seed=3)
    before = run(first, 0, kill_at)
    state = json.loads(json.dumps(first.state_dict()))
    assert len(json.dumps(state)) < 1000  # O(#corpora), independent of the samples drawn
    resumed = MixingSampler(SIZES, two_stage, GBS, seed=3)
    resumed.load_state_dict(state)
    assert before + run(resumed, kill_at, STEPS) == full


def test_branch_continues_main_state_with_its_own_weights():
    fork = 40
    main = MixingSampler(SIZES, two_stage, GBS, seed=5)
    main_seq = run(main, 0, fork)
    branch_weights = lambda step: ("decay", {"code": 1.0})
    branch = MixingSampler(SIZES, branch_weights, GBS, seed=5)
    branch.load_state_dict(json.loads(json.dumps(main.state_dict())))
    branch_seq = run(branch, fork, fork + 10)
    assert {c for c, _ in branch_seq} == {"code"}
    # The branch picks up "code" where the main path stopped: the next ids of the same epoch permutation.
    used = [i for c, i in main_seq if c == "code"]
    perm = epoch_permutation(SIZES["code"], 5, "code", 0)
    assert used == list(perm[:len(used)])
    assert [i for _, i in branch_seq] == list(perm[len(used):len(used) + 10 * GBS])


def test_epoch_wrap_is_logged_and_reshuffled_deterministically(caplog):
    weights = lambda step: ("only", {"tiny": 1.0})
    with caplog.at_level(logging.WARNING, logger="lrpath_megatron.mixing"):
        sampler = MixingSampler({"tiny": 10}, weights, 4, seed=11)
        ids = [i for _, i in run(sampler, 0, 5)]
    wrap_logs = [r.getMessage() for r in caplog.records if "exhausted" in r.getMessage()]
    assert len(wrap_logs) == 1 and "'tiny'" in wrap_logs[0] and "epoch 1" in wrap_logs[0]
    epoch0, epoch1 = ids[:10], ids[10:20]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert ids == [i for _, i in run(MixingSampler({"tiny": 10}, weights, 4, seed=11), 0, 5)]
    stats = sampler.pop_stats()
    assert stats["epoch_wraps"] == [{"corpus": "tiny", "epoch": 1, "step": 2}]
    assert stats["epochs"] == {"tiny": 1}
    assert stats["events"] == [wrap_logs[0]]


def test_pop_stats_reports_fractions_since_last_call():
    sampler = MixingSampler(SIZES, two_stage, GBS, seed=1)
    run(sampler, 0, 10)
    stats = sampler.pop_stats()
    assert stats["total_samples"] == 80 and stats["stage"] == "stage0"
    assert stats["samples"] == {"general": 56, "code": 24, "new": 0}
    assert stats["fractions"] == {"general": 56 / 80, "code": 24 / 80, "new": 0.0}
    assert stats["stage_samples"] == {"stage0": 80}
    assert stats["events"] == []
    run(sampler, 10, SWITCH + 1)
    stats = sampler.pop_stats()
    assert stats["total_samples"] == (SWITCH + 1 - 10) * GBS
    assert stats["stage"] == "stage1" and stats["stage_samples"] == {"stage0": (SWITCH - 10) * GBS, "stage1": GBS}
    assert [e for e in stats["events"] if "switches" in e] == [
        f"step {SWITCH}: data mix switches from stage 'stage0' to 'stage1', weights {STAGES[1][1]}"]


def test_permutation_uses_a_stable_hash():
    # A process-independent hash (Python's hash() of a str changes with PYTHONHASHSEED).
    # Pinned values: a change here would silently reorder every run's data on resume.
    assert stable_corpus_hash("general") == 0xCF5A36556DE1EA0F
    assert epoch_permutation(8, 1, "code", 0).tolist() == [4, 6, 5, 3, 1, 7, 2, 0]
    assert stable_corpus_hash("general") != stable_corpus_hash("code")
    assert np.array_equal(epoch_permutation(50, 1, "code", 2), epoch_permutation(50, 1, "code", 2))
    assert not np.array_equal(epoch_permutation(50, 1, "code", 2), epoch_permutation(50, 1, "new", 2))


def test_misuse_gives_clear_errors():
    sampler = MixingSampler(SIZES, two_stage, GBS, seed=1)
    with pytest.raises(LrpathError, match="consecutive"):
        sampler.global_batch(3)
    bad = MixingSampler(SIZES, lambda s: ("x", {"nope": 1.0}), GBS, seed=1)
    with pytest.raises(LrpathError, match="nope"):
        bad.global_batch(0)
    state = sampler.state_dict()
    with pytest.raises(LrpathError, match="seed"):
        MixingSampler(SIZES, two_stage, GBS, seed=2).load_state_dict(state)
    with pytest.raises(LrpathError, match="'code' had 400"):
        MixingSampler({**SIZES, "code": 401}, two_stage, GBS, seed=1).load_state_dict(state)
    with pytest.raises(LrpathError, match="'empty'"):
        MixingSampler({"empty": 0}, two_stage, GBS, seed=1)


def test_a_trained_run_logs_the_configured_blend_through_a_ramp_and_a_resume(demo_data, tmp_path):
    """The trainer's metrics: samples per corpus, summed from step 0, stay within 5/6 of a sample (three
    corpora) of the configured schedule at every step, through two switches, a ramp the second switch
    interrupts, and a stop and resume inside that ramp."""
    from conftest import run_lrpath, tiny_config
    from lrpath_megatron.config import load_train_config
    from lrpath_megatron.path import standalone_run

    mix = {"stages": [{"weights": {"docs": 1, "code_a": 1}},
                      {"lr_below": "eta_max/2", "weights": {"code_b": 1}},
                      {"lr_below": "eta_max/5", "weights": {"docs": 3, "code_b": 1}}], "ramp_steps": 8}
    cfg = tiny_config(demo_data, tmp_path / "c.yaml", corpora=("docs", "code_a", "code_b"), data={"mix": mix},
                      schedule={"style": "cosine", "warmup_steps": 2, "train_steps": 24})
    run_lrpath(["train", str(cfg), "--run-dir", str(tmp_path), "--stop-at-step", "17"])
    run_lrpath(["train", str(cfg), "--run-dir", str(tmp_path)])
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(24))
    path = standalone_run(load_train_config(cfg), tmp_path).path
    switches = [s for s in range(1, 24) if path.weights_at_step(s)[0] != path.weights_at_step(s - 1)[0]]
    assert switches == [14, 19]  # the second lands inside the first one's 8-step ramp
    expected, realised = Counter(), Counter()
    for step in range(24):
        for corpus, w in path.weights_at_step(step)[1].items():
            expected[corpus] += 8 * w
        realised.update(records[step]["samples_per_corpus"])
        assert all(abs(realised[c] - expected[c]) <= 5 / 6 + 1e-9 for c in ("docs", "code_a", "code_b")), step


def named_and_unnamed_stages():
    from lrpath_megatron.config import MixConfig, MixStage

    return MixConfig([MixStage(None, dict(STAGES[0][1])), MixStage("eta_max/5", dict(STAGES[1][1])),
                      MixStage(ETA_MAX / 20, {"new": 1.0}, name="new only")])


def test_a_stage_is_labelled_by_its_name_or_else_by_what_triggers_it():
    from lrpath_megatron.config import ConfigError, MixConfig, MixStage
    from lrpath_megatron.mix_policy import resolve_stages

    stages = resolve_stages(named_and_unnamed_stages(), list(SIZES), ETA_MAX, "mix")
    assert [s.label for s in stages] == ["lr>6e-05", "lr<=6e-05", "new only"]
    alone = resolve_stages(MixConfig([MixStage(None, {"new": 1.0})]), list(SIZES), ETA_MAX, "mix")
    assert [s.label for s in alone] == ["all"]
    twice = MixConfig([MixStage(None, {"new": 1.0}, name="x"), MixStage(1e-4, {"code": 1.0}, name="x")])
    with pytest.raises(ConfigError, match=r"mix.stages\[0\] and mix.stages\[1\] are both labelled 'x'"):
        resolve_stages(twice, list(SIZES), ETA_MAX, "mix")
    with pytest.raises(ConfigError, match=r"mix.stages\[0\].name is empty"):
        resolve_stages(MixConfig([MixStage(None, {"new": 1.0}, name=" ")]), list(SIZES), ETA_MAX, "mix")


def test_an_unset_stage_name_is_left_out_of_the_serialised_config():
    """Configs, manifests and plan hashes of blends that name no stage read as they did before names."""
    from lrpath_megatron.config import MixConfig, from_dict, to_dict

    mix = named_and_unnamed_stages()
    assert [sorted(s) for s in to_dict(mix)["stages"]] == [["lr_below", "weights"], ["lr_below", "weights"],
                                                          ["lr_below", "name", "weights"]]
    assert from_dict(MixConfig, to_dict(mix)) == mix


def test_a_state_that_names_its_stage_by_index_resumes_in_that_stage():
    """A state written before stages had names records an unnamed stage as stage<index>: it resumes in the
    stage of that label, with no switch."""
    from lrpath_megatron.mix_policy import MixSchedule, resolve_stages

    policy = MixSchedule(resolve_stages(named_and_unnamed_stages(), list(SIZES), ETA_MAX, "mix"), 0, cosine_lr,
                         0, STEPS).weights_at_step
    sampler = MixingSampler(SIZES, policy, GBS, seed=3)
    run(sampler, 0, SWITCH + 5)
    state = json.loads(json.dumps(sampler.state_dict())) | {"stage": "stage1"}
    resumed = MixingSampler(SIZES, policy, GBS, seed=3)
    resumed.load_state_dict(state)
    assert run(resumed, SWITCH + 5, SWITCH + 10) == run(sampler, SWITCH + 5, SWITCH + 10)
    stats = resumed.pop_stats()
    assert stats["events"] == [] and stats["stage_samples"] == {"lr<=6e-05": 5 * GBS}
