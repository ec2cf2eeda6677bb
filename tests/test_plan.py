"""Version plans: resolution, costs, LR-triggered blends, validation errors, the ``lrpath plan`` command."""
import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpath_megatron import cli
from lrpath_megatron.config import ConfigError, MixConfig, MixStage, ModelConfig, TrainConfig
from lrpath_megatron.corpus_shards import check_corpora
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mix_policy import MixSchedule, resolve_stages
from lrpath_megatron.plan import MainPause, Plan, load_plan
from test_data import write_corpus

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TPS = 8 * 128  # tokens per step of the tiny plans below


def tiny(**release) -> dict:
    """A 3-version plan of 100 steps per version; ``release`` overrides every version's release."""
    rel = {"method": "decay", "shape": "cosine", "decay_steps": 40, "data": "tail", **release}
    return {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128},
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"corpora": [{"name": n, "prefix": f"runs/demo/data/{n}"} for n in ("docs", "code_a", "code_b")]},
        "logging": {"eval_interval": 10},
        "plan": {
            "main": {"eta_max": 1e-3, "eta_min": 1e-4, "warmup_steps": 10, "replay": 0.2},
            "versions": [{"name": f"v{i + 1}", "corpora": [c], "steps": 100, "release": dict(rel)}
                         for i, c in enumerate(("docs", "code_a", "code_b"))],
        },
    }


def test_paper_plans_cost_of_ptfs():
    # 4 increments of 20000 steps; each branch decays over 0.6 of one (12000 steps). From nominal forks all
    # three cost (4 + 3 * 0.6) / 10 = 0.58 of PTFS; a branch's steps at eta_max are the main path's
    # (knee: its stable half; multistep: up to its first drop at 0.8), so the branches fork later and the
    # main path runs on to the last fork. Cosine decays from its first step on.
    for name, shape, shared, ratio in (("paper_4versions.yaml", "cosine", 0, 0.58),
                                       ("paper_4versions_knee.yaml", "knee", 6000, 0.49),
                                       ("paper_4versions_multistep.yaml", "multistep", 9600, 0.436)):
        plan = load_plan(EXAMPLES / name)
        costs = plan.costs()
        assert costs["total_steps"] == [116000 - 3 * shared] * 2  # [fewest, most]: nothing to choose
        assert costs["cost_ratio_vs_ptfs"] == pytest.approx([ratio] * 2, abs=1e-12)
        assert [v["shared_steps"] for v in costs["versions"]] == [shared] * 4
        assert costs["tokens_saved_by_effective_forks"] == 3 * shared * costs["tokens_per_step"]
        assert [p.name for p in plan.paths()] == ["main", "v1", "v2", "v3", "v4"]
        assert {p.release.shape for p in plan.paths()[1:]} == {shape}
        nominal = load_plan(EXAMPLES / name, ["plan.fork=nominal"]).costs()
        assert nominal["cost_ratio_vs_ptfs"] == pytest.approx([0.58] * 2, abs=1e-12)
        assert nominal["cost_ratio_vs_cpt"] == pytest.approx([1.45] * 2, abs=1e-12)


def test_demo_plan_is_tiny_and_uses_demo_corpora():
    plan = load_plan(EXAMPLES / "demo_plan.yaml")
    cfg = plan.train_config
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.vocab_size,
            cfg.model.seq_length) == (2, 64, 4, 2048, 128)
    assert {c.name: c.prefix.startswith("runs/demo/data/") for c in cfg.data.corpora} == \
        {"docs": True, "code_a": True, "code_b": True}
    assert plan.tokens_per_step == 1024
    assert 200 <= plan.costs()["total_steps"][0] <= 600
    assert [v.corpora for v in plan.versions] == [{"docs": 1.0}, {"code_a": 1.0}, {"code_b": 1.0}]
    # The config the paths train with records the plan's LRs.
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (plan.eta_max, plan.eta_min) == (3e-3, 3e-4)


def test_paths_resolve_forks_ends_and_save_steps():
    plan = Plan.from_dict(tiny())
    main, v1, v2, v3 = plan.paths()
    assert (main.fork_step, main.end_step, main.parent) == (0, 260, None)
    assert [(p.fork_step, p.end_step) for p in (v1, v2, v3)] == [(60, 100), (160, 200), (260, 300)]
    assert main.save_steps == {60, 160, 260} and v1.save_steps == set()
    for branch in (v1, v2, v3):
        assert branch.parent == "main"
        assert branch.lr_at_step(branch.fork_step) == main.lr_at_step(branch.fork_step) == 1e-3
        assert branch.lr_at_step(branch.end_step - 1) == 1e-4
    assert main.lr_at_step(0) == 0.0 and main.lr_at_step(10) == 1e-3
    assert main.lr_at_tokens(5 * TPS + 7) == main.lr_at_step(5)
    with pytest.raises(ValueError, match="outside path"):
        v1.lr_at_step(59)
    assert plan.path("v2") is v2
    with pytest.raises(LrpathError, match="no path"):
        plan.path("v9")


def test_token_positions_round_up_to_whole_steps():
    data = tiny()
    del data["plan"]["versions"][0]["steps"]
    data["plan"]["versions"][0]["tokens"] = 100 * TPS - 5  # not a whole number of steps
    data["plan"]["versions"][0]["release"] = {"decay_tokens": 39 * TPS + 1, "fork_tokens": 59 * TPS + 1}
    v1 = Plan.from_dict(data).versions[0]
    assert (v1.steps, v1.release.step, v1.release.decay_steps) == (100, 60, 40)


def test_weights_main_replay_tail_and_replay_branches():
    plan = Plan.from_dict(tiny())
    assert plan.path("main").weights_at_step(50) == ("main:v1", {"docs": 1.0})
    label, w = plan.path("main").weights_at_step(250)
    assert label == "main:v3"
    assert w == pytest.approx({"code_b": 0.8, "docs": 0.1, "code_a": 0.1})
    assert plan.path("v3").weights_at_step(280) == ("tail", w)  # tail: the version's own data
    data = tiny(data="replay", fork_fraction=1.0)
    plan = Plan.from_dict(data)
    assert plan.path("v2").fork_step == 200
    assert plan.path("v2").weights_at_step(210) == ("replay", pytest.approx({"docs": 0.5, "code_a": 0.5}))


def test_lr_triggered_mix_switches_and_ramps():
    mix = {"stages": [{"weights": {"docs": 1, "code_a": 1}},
                      {"lr_below": "eta_max/5", "weights": {"code_a": 3, "code_b": 1}},
                      {"lr_below": 1.5e-4, "weights": {"code_b": 1}}],
           "ramp_steps": 2}
    v1 = Plan.from_dict(tiny(mix=mix)).path("v1")  # cosine 1e-3 -> 1e-4 over steps 60..99
    assert v1.switch_steps == [(91, "lr<=0.0002"), (94, "lr<=0.00015")]
    assert v1.lr_at_step(90) > 2e-4 >= v1.lr_at_step(91)  # eta_max/5
    assert v1.lr_at_step(93) > 1.5e-4 >= v1.lr_at_step(94)
    assert v1.weights_at_step(60) == v1.weights_at_step(90) == ("lr>0.0002", {"docs": 0.5, "code_a": 0.5})
    label, w = v1.weights_at_step(91)  # first of 2 ramp steps: half way
    assert label == "lr<=0.0002" and w == pytest.approx({"docs": 0.25, "code_a": 0.625, "code_b": 0.125})
    assert v1.weights_at_step(92) == v1.weights_at_step(93) == ("lr<=0.0002", {"code_a": 0.75, "code_b": 0.25})
    assert v1.weights_at_step(94)[1] == pytest.approx({"code_a": 0.375, "code_b": 0.625})
    assert v1.weights_at_step(99) == ("lr<=0.00015", {"code_b": 1.0})


def test_mix_policy_on_a_warmup_schedule_counts_from_the_peak():
    lr = lambda s: min(s, 10) / 10 if s <= 10 else 1.0 - (s - 10) / 100  # noqa: E731
    stages = resolve_stages(MixConfig([MixStage(None, {"a": 1}), MixStage(0.5, {"b": 1})]), ["a", "b"], 1.0, "mix")
    policy = MixSchedule(stages, 0, lr, peak_step=10, end_step=110)
    assert policy.weights_at_step(3) == ("lr>0.5", {"a": 1.0})  # low LR during warmup does not switch
    assert policy.switch_steps == [(60, "lr<=0.5")]


@pytest.mark.parametrize("stages,match", [
    ([{"weights": {"docs": -1}}], "negative"),
    ([{"weights": {"docs": 0, "code_a": 0}}], "all weights are zero"),
    ([{"weights": {"wiki": 1}}], "unknown corpus"),
    ([{"lr_below": 1e-4, "weights": {"docs": 1}}], "first stage"),
    ([{"weights": {"docs": 1}}, {"weights": {"docs": 1}}], "needs an LR threshold"),
    ([{"weights": {"docs": 1}}, {"lr_below": "eta_max/5", "weights": {"docs": 1}},
      {"lr_below": "eta_max/2", "weights": {"docs": 1}}], "thresholds must decrease"),
    ([{"weights": {"docs": 1}}, {"lr_below": "eta_min/5", "weights": {"docs": 1}}], "expression of eta_max"),
])
def test_bad_mix_policies_fail_naming_the_field(stages, match):
    with pytest.raises(ConfigError, match=match) as err:
        Plan.from_dict(tiny(mix={"stages": stages}))
    assert "plan.versions[0].release.mix.stages[" in str(err.value)


@pytest.mark.parametrize("edit,field,match", [
    (lambda d: d["plan"]["versions"][1]["release"].update(fork_step=400), "plan.versions[1].release.fork_step",
     "after the main path ends"),
    (lambda d: d["plan"]["versions"][0]["release"].update(fork_step=80), "plan.versions[0].release",
     "runs past the end of v1's data"),
    (lambda d: d["plan"]["versions"][0]["release"].update(data="replay", fork_step=100, decay_steps=150),
     "plan.versions[0].release", "longer than all data so far"),
    (lambda d: d["plan"]["main"].update(eta_min=2e-3), "plan.main.eta_min", "greater than plan.main.eta_max"),
    (lambda d: d["plan"]["versions"][2]["release"].update(fork_step=150), "plan.versions[2].release.fork_step",
     "before the previous version's release"),
    (lambda d: d["plan"]["versions"][1]["release"].update(shape="exponential"), "plan.versions[1].release.shape",
     "not one of"),
    (lambda d: d["plan"]["versions"][1].pop("corpora"), "plan.versions[1].corpora", "missing"),
    (lambda d: d["plan"]["versions"][1].update(corpora=["wiki"]), "plan.versions[1].corpora.wiki",
     "unknown corpus"),
    (lambda d: d["plan"]["versions"][1]["release"].update(fork_step=210, data="replay"), "plan.versions[1].release",
     "lies outside v2's segment"),
    (lambda d: d["plan"]["versions"][0]["release"].update(fork_step=5, decay_steps=40),
     "plan.versions[0].release.fork_step", "warmup"),
    (lambda d: d["plan"]["versions"][0]["release"].update(decay_fraction=0.5), "plan.versions[0].release",
     "give only one of decay_steps, decay_fraction"),
    (lambda d: d["plan"]["versions"][0]["release"].update(data="old"), "plan.versions[0].release.data",
     "not one of"),
    (lambda d: d["plan"]["versions"][0]["release"].update(shape="multistep", drop_factors=[0.5, 0.2]),
     "plan.versions[0].release", "must end at eta_min"),
    (lambda d: d["plan"]["versions"][0]["release"].update(colour="red"), "plan.versions[0].release.colour",
     "unknown key"),
    (lambda d: d.update(schedule={"style": "cosine"}), "schedule", "not used in a plan"),
    (lambda d: d["plan"]["versions"][1].update(name="v1"), "plan.versions[1].name", "used twice"),
])
def test_contradictory_plans_fail_with_one_clear_message(edit, field, match):
    data = tiny()
    edit(data)
    with pytest.raises(ConfigError, match=match) as err:
        Plan.from_dict(data)
    assert field in str(err.value)


def test_data_mix_is_refused_in_a_plan():
    data = tiny()
    data["data"]["mix"] = {"stages": [{"weights": {"docs": 1}}]}  # only stand-alone runs read data.mix
    with pytest.raises(ConfigError, match="data.mix is not used in a plan") as err:
        Plan.from_dict(data)
    assert "plan.main.replay" in str(err.value) and "plan.versions[i].release.mix" in str(err.value)
    data["data"]["mix"] = {"stages": []}  # the empty default blends nothing
    Plan.from_dict(data)


MERGE = {"method": "merge", "merge": {"num_checkpoints": 4, "window_steps": 30}}


@pytest.mark.parametrize("setting", [
    {"shape": "cosine"}, {"stable_fraction": 0.5}, {"drop_points": [0.8, 0.9]}, {"drop_factors": [0.3, 0.1]},
    {"decay_steps": 40}, {"decay_tokens": 40 * TPS}, {"decay_fraction": 0.4}, {"data": "tail"},
    {"mix": {"stages": [{"weights": {"docs": 1}}]}},
])
def test_decay_settings_on_a_merge_release_are_refused(setting):
    data = tiny()
    data["plan"]["versions"][1]["release"] = {**MERGE, **setting}
    with pytest.raises(ConfigError, match="decay settings do not apply to method: merge") as err:
        Plan.from_dict(data)
    field = f"plan.versions[1].release.{next(iter(setting))}"
    assert str(err.value).startswith(f"{field}: ") and "use method: decay" in str(err.value)


def test_release_settings_that_do_not_apply_are_refused_in_one_message():
    data = tiny()
    data["plan"]["versions"][1]["release"] = {**MERGE, "decay_steps": 40, "data": "replay"}
    with pytest.raises(ConfigError, match=r"^plan.versions\[1\].release.decay_steps, "
                                          r"plan.versions\[1\].release.data: decay settings"):
        Plan.from_dict(data)


@pytest.mark.parametrize("release,field,match", [
    ({"merge": {"num_checkpoints": 4, "window_steps": 30}}, "plan.versions[0].release.merge",
     "merge settings do not apply to method: decay"),
    ({"shape": "multistep", "stable_fraction": 0.5}, "plan.versions[0].release.stable_fraction",
     "does not apply to shape: multistep"),
    ({"shape": "knee", "drop_points": [0.5, 0.9]}, "plan.versions[0].release.drop_points",
     "drop settings apply to shape: multistep only, not knee"),
    ({"shape": None, "drop_factors": [0.3, 0.1]}, "plan.versions[0].release.drop_factors",
     "apply to shape: multistep only, not cosine"),  # the default shape
])
def test_decay_release_settings_for_another_shape_or_method_are_refused(release, field, match):
    with pytest.raises(ConfigError, match=match) as err:
        Plan.from_dict(tiny(**release))
    assert str(err.value).startswith(field)


def test_written_defaults_and_stable_fraction_on_decay_shapes_are_accepted():
    bare = tiny()
    for v in bare["plan"]["versions"]:
        del v["release"]["shape"], v["release"]["data"]
    # "shape: cosine, data: tail" written out or left to the default: the same plan
    assert Plan.from_dict(bare).plan_hash() == Plan.from_dict(tiny()).plan_hash()
    for shape in ("cosine", "linear", "1-sqrt", "knee"):  # WSD-style: hold eta_max, then decay
        v1 = Plan.from_dict(tiny(shape=shape, stable_fraction=0.5)).path("v1")  # decays over steps 60..99
        # The stable half is the main path's own: the branch starts where its LR first drops.
        assert v1.lr(79) == 1e-3 > v1.lr_at_step(81) and v1.fork_step == 80


@pytest.mark.parametrize("name, digest", [("demo_plan", "4569922f989a1775"), ("paper_4versions", "d8bfbd6c2a58c01c"),
                                           ("paper_4versions_knee", "685688656c73c959"),
                                           ("paper_4versions_multistep", "a70004daae7d4a41")])
def test_shipped_plans_keep_their_hash(name, digest):
    # Run directories record the plan hash and refuse a changed plan: a new setting left at its default must not
    # change the hash of plans written before it, or every existing run would refuse to resume.
    assert load_plan(EXAMPLES / f"{name}.yaml").plan_hash() == digest


def test_load_plan_prefixes_the_file_and_applies_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    base = load_plan(path)
    assert load_plan(path).plan_hash() == base.plan_hash()  # stable
    faster = load_plan(path, ["plan.main.eta_max=2.0e-3"])
    assert faster.eta_max == 2e-3 and faster.plan_hash() != base.plan_hash()
    # Reporting and speed settings do not change what trains.
    assert load_plan(path, ["logging.peak_tflops=400", "performance.compile_layers=true"]).plan_hash() == base.plan_hash()
    with pytest.raises(ConfigError) as err:  # the file, and the --set that gave the bad value
        load_plan(path, ["plan.main.eta_min=5.0e-3", "plan.main.replay=0.1"])
    assert str(err.value).startswith(f"{path} with --set plan.main.eta_min=5.0e-3: plan.main.eta_min=0.005 is")


def test_merge_release_costs_no_training_and_marks_a_save_step():
    data = tiny()
    data["plan"]["versions"][1]["release"] = {
        "method": "merge", "merge": {"num_checkpoints": 4, "window_steps": 30, "weights": "linear"}}
    plan = Plan.from_dict(data)
    assert [p.name for p in plan.paths()] == ["main", "v1", "v3"]
    # merge releases default to the end of their segment; the main path saves every merged checkpoint,
    # those before the release step without optimizer state
    assert 200 in plan.path("main").save_steps
    assert plan.path("main").weights_only_steps == {170, 180, 190}
    assert plan.versions[1].release.merge["save_steps"] == [170, 180, 190, 200]
    assert plan.costs()["versions"][1]["tokens"] == [0, 0]
    with pytest.raises(LrpathError, match="released by merge"):
        plan.path("v2")


def test_merge_release_settings_are_validated():
    data = tiny()
    data["plan"]["versions"][1]["release"] = {"method": "merge", "merge": {"num_checkpoints": 4}}
    with pytest.raises(ConfigError, match=r"plan.versions\[1\].release.merge: give exactly one of window_tokens"):
        Plan.from_dict(data)


def test_costs_cumulate_main_and_branches_against_ptfs_and_cpt():
    costs = Plan.from_dict(tiny()).costs()
    assert costs["main"]["steps"] == 260 and costs["branch_tokens"] == [120 * TPS] * 2
    assert costs["ptfs_tokens"] == (100 + 200 + 300) * TPS and costs["cpt_tokens"] == 300 * TPS
    assert costs["cost_ratio_vs_ptfs"] == pytest.approx([380 / 600] * 2)
    assert [v["cumulative_tokens"] for v in costs["versions"]] == [[100 * TPS] * 2, [240 * TPS] * 2, [380 * TPS] * 2]
    assert costs["total_flops"] == [t * costs["flops_per_token"] for t in costs["total_tokens"]]


def test_flops_per_token_is_megatron_formula():
    cfg = TrainConfig().validate()  # 2 layers, h=64, 4 heads, ffn 256, seq 128, padded vocab 2048, gelu
    h, s, f, v, layers = 64, 128, 256, 2048, 2
    # Megatron-LM's num_floating_point_operations per token: 3 passes x 2 FLOPs per multiply-add; per layer
    # the QKV and output projections, causal attention (QK^T and its product with V over half the scores)
    # and a 2-matrix MLP; then the logits.
    per_layer = h * (h + h + h) + h * s / 2 * 2 + h * h + h * f * 2
    assert cfg.model.flops_per_token() == 3 * 2 * (layers * per_layer + h * v)
    # The 1.2B LLaMA-style model of examples/paper_4versions.yaml (SwiGLU, seq 2048), pinned.
    model = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5504,
                        seq_length=2048, vocab_size=32000, activation="swiglu")
    assert model.flops_per_token() == 8_282_701_824


def test_check_data_reports_missing_prefixes(tmp_path):
    data = tiny()
    for corpus in data["data"]["corpora"]:
        corpus["prefix"] = str(tmp_path / corpus["name"])
    plan = Plan.from_dict(data)  # validation does not need the files
    with pytest.raises(LrpathError, match="code_a"):
        check_corpora(plan.train_config, plan.used_corpora())
    for offset, name in enumerate(("docs", "code_a", "code_b")):
        write_corpus(str(tmp_path / name), num_docs=3, offset=offset)  # check_data reads the index
    check_corpora(plan.train_config, plan.used_corpora())


def test_cli_plan_json_and_plot(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert cli.main(["plan", str(EXAMPLES / "demo_plan.yaml"), "--json", "--plot", str(out)]) == 0
    costs = json.loads(capsys.readouterr().out)
    for key in ("versions", "total_tokens", "ptfs_tokens", "cpt_tokens", "cost_ratio_vs_ptfs", "cost_ratio_vs_cpt"):
        assert key in costs
    assert costs["versions"][2]["mix_switch_steps"]  # the demo's last release switches its blend
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20000
    assert cli.main(["plan", str(EXAMPLES / "paper_4versions.yaml")]) == 0
    table = capsys.readouterr().out
    assert "v4" in table and "ratio 0.580" in table


def test_cli_plan_bad_plan_exits_2(tmp_path, capsys):
    data = tiny()
    data["plan"]["versions"][0]["release"]["shape"] = "zigzag"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["plan", str(path)]) == 2
    assert "plan.versions[0].release.shape='zigzag'" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(20, 300), min_size=1, max_size=5),
    warmup=st.integers(0, 15),
    decay=st.floats(0.05, 1.0),
    replay_data=st.booleans(),
    shape=st.sampled_from(["cosine", "linear", "1-sqrt", "knee", "multistep"]),
    eta_max=st.floats(1e-5, 1e-2),
    ratio=st.floats(0.01, 1.0, exclude_max=True),  # eta_min == eta_max: no decay, no fork where it differs
)
def test_property_every_plan_path_is_continuous_and_complete(sizes, warmup, decay, replay_data, shape, eta_max,
                                                              ratio):
    data = copy.deepcopy(tiny())
    data["data"]["corpora"] = [{"name": f"c{i}", "prefix": f"p{i}"} for i in range(len(sizes))]
    data["plan"]["main"] = {"eta_max": eta_max, "eta_min": eta_max * ratio, "warmup_steps": warmup}
    data["plan"]["versions"] = [
        {"name": f"v{i}", "corpora": [f"c{i}"], "steps": n,
         "release": {"shape": shape, "decay_fraction": decay, "data": "replay" if replay_data else "tail",
                     # fork after the warmup; tail branches fork at the end minus the decay by default
                     **({"fork_fraction": 1.0} if replay_data else {})}}
        for i, n in enumerate(sizes)]
    if sizes[0] * (1 - decay) < warmup + 1 or any(n * decay < 2 for n in sizes):
        return  # the plan would (rightly) be refused; validation is tested above
    plan = Plan.from_dict(data)
    main, *branches = plan.paths()
    assert all(main.lr_at_step(s) == eta_max for s in range(warmup, main.end_step))  # constant after warmup
    for b in branches:
        nominal = b.release.nominal_step
        assert b.lr(nominal) == main.lr_at_step(nominal)  # continuous at the nominal fork
        # Up to the effective fork the branch is the main path (its LR; tail data is the main path's data).
        assert all(b.lr(s) == main.lr_at_step(s) for s in range(nominal, b.fork_step))
        assert b.fork_step == nominal or b.lr_at_step(b.fork_step) < main.lr_at_step(b.fork_step)
        assert b.lr_at_step(b.end_step - 1) == plan.eta_min  # complete decay
        lrs = [b.lr_at_step(s) for s in range(b.fork_step, b.end_step)]
        assert all(x >= y for x, y in zip(lrs, lrs[1:]))
        assert b.fork_step in main.save_steps


def test_ptfs_baseline_trains_the_cumulative_blend_from_scratch():
    plan = Plan.from_dict(tiny())
    p = plan.path("ptfs/v2")
    assert (p.parent, p.fork_step, p.end_step) == (None, 0, 200)  # D_1..D_2, one pass
    assert p.lr_at_step(0) == 0.0 and p.lr_at_step(10) == pytest.approx(1e-3)  # warmup to eta_max
    assert p.lr_at_step(199) == pytest.approx(1e-4)  # fully decayed on its last step
    assert all(p.lr_at_step(s + 1) <= p.lr_at_step(s) for s in range(10, 199))
    assert p.weights_at_step(150) == ("ptfs", {"docs": 0.5, "code_a": 0.5})
    assert plan.path("ptfs/v3").end_step == 300


def test_cpt_baseline_continues_the_previous_version_on_new_data_only():
    plan = Plan.from_dict(tiny())
    first, p = plan.path("cpt/v1"), plan.path("cpt/v3")
    assert (first.parent, first.fork_step, first.end_step) == (None, 0, 100)
    assert (p.parent, p.fork_step, p.end_step) == ("cpt/v2", 200, 300)
    assert p.lr_at_step(200) == pytest.approx(1e-4)  # re-warmup from where v2's release ended
    assert p.lr_at_step(210) == pytest.approx(1e-3)
    assert p.lr_at_step(299) == pytest.approx(1e-4)
    assert p.weights_at_step(250) == ("cpt", {"code_b": 1.0})
    with pytest.raises(ValueError, match="outside path"):
        p.lr_at_step(199)
    # Cost accounting agrees with the trained steps: CPT trains each increment once, PTFS the cumulative data.
    costs = plan.costs()
    assert costs["cpt_tokens"] == sum(plan.path(f"cpt/v{i}").steps for i in (1, 2, 3)) * TPS
    assert costs["ptfs_tokens"] == sum(plan.path(f"ptfs/v{i}").steps for i in (1, 2, 3)) * TPS


@pytest.mark.parametrize("name,match", [
    ("ptfs/v9", "no version 'v9'"),
    ("scratch/v1", "baselines are ptfs/<version>, cpt/<version>"),
])
def test_unknown_baselines_are_refused(name, match):
    with pytest.raises(LrpathError, match=match):
        Plan.from_dict(tiny()).path(name)


def test_main_path_extra_save_steps_are_validated_and_saved():
    data = tiny()
    data["plan"]["main"]["save_steps"] = [5, 150]
    plan = Plan.from_dict(data)
    assert {5, 150} <= plan.path("main").save_steps
    data["plan"]["main"]["save_steps"] = [5, 400]
    with pytest.raises(ConfigError, match=r"plan.main.save_steps: \[400\] outside the main path's steps 1..260"):
        Plan.from_dict(data)
    data["plan"]["main"]["save_steps"] = ["x"]
    with pytest.raises(ConfigError, match="must be a list of main-path steps"):
        Plan.from_dict(data)
    data["plan"]["main"]["save_steps"] = [150]
    data["plan"]["main"]["weights_only_steps"] = [7, 150]  # a full checkpoint wins
    assert Plan.from_dict(data).path("main").weights_only_steps == {7}
    data["plan"]["main"]["weights_only_steps"] = [0]
    with pytest.raises(ConfigError, match=r"plan.main.weights_only_steps: \[0\] outside"):
        Plan.from_dict(data)


def test_a_merge_window_reaching_into_the_warmup_is_refused():
    """A WSM merge emulates a decay only from checkpoints taken at the constant peak LR."""
    data = tiny()
    data["plan"]["versions"][0]["release"] = {"method": "merge", "merge": {"num_checkpoints": 4, "window_steps": 90}}
    assert Plan.from_dict(data).versions[0].release.merge["save_steps"] == [10, 40, 70, 100]  # warmup: 0..9
    data["plan"]["versions"][0]["release"]["merge"]["window_steps"] = 93
    with pytest.raises(ConfigError, match=r"plan.versions\[0\].release.merge: merge window of 93 steps starts at "
                                          r"step 7, inside the warmup \(steps 0..9\).*at most 90 steps"):
        Plan.from_dict(data)


def auto_tiny() -> dict:
    """v1, v2: knee decays of auto length forking where they end their version's data; v3 from step 220."""
    data = tiny(shape="knee", decay_steps="auto", decay_bounds=[20, 60])
    data["plan"]["versions"][2]["release"]["fork_step"] = 220
    return data


def test_auto_releases_show_bounds_and_cost_ranges_until_they_choose(tmp_path, capsys):
    plan = Plan.from_dict(auto_tiny())
    assert plan.decay_candidates["v1"] == [20, 30, 40, 50, 60]
    # Tail branches fork half a knee before their version's end: the shortest decay forks last. From a fixed fork
    # the stable half moves the fork later for longer decays: the main path reaches the longest's fork (250).
    assert plan.auto_decays["v1"].fork_span == (70, 90) and plan.auto_decays["v3"].fork_span == (230, 250)
    assert plan.main_end == 250 and {230, 235, 240, 245, 250} <= plan.path("main").save_steps
    # v3 alone decides how far the main path trains: it waits at v3's earliest fork for the choice, which reads
    # v1's and v2's finished branches; once chosen, the main path ends at the chosen fork.
    assert plan.main_pause == MainPause("v3", 230, ("v1", "v2"), 190)
    decided = plan.with_decay("v3", 40)
    assert decided.main_pause is None and decided.main_end == 240 and max(decided.path("main").save_steps) == 240
    costs = plan.costs()
    assert costs["undecided"] == ["v1", "v2", "v3"]
    assert costs["versions"][0]["tokens"] == [10 * TPS, 30 * TPS]
    # fewest: v3's shortest decay forks at 230, where the main path then ends; most: its longest, from 250
    assert costs["total_tokens"] == [(230 + 30) * TPS, (250 + 90) * TPS]
    assert costs["main_pause"] == {"version": "v3", "step": 230, "needs": ("v1", "v2"), "others_end": 190,
                                   "note": plan.main_pause.describe()}
    assert costs["versions"][2]["decay_auto"] == {"bounds": [20, 60], "candidates": [20, 30, 40, 50, 60],
                                                  "dropped": [], "fork_steps": [230, 250], "choice_step": 230,
                                                  "chosen": None,
                                                  "choice": None, "methods": ["decay"], "merge_windows": [],
                                                  "merge_weights": None, "method_auto": False,
                                                  "reads": ["v1", "v2"], "chosen_method": None}
    # A fixed fork leaves 80 steps of tail data: default bounds stop there, written ones past it are refused.
    data = auto_tiny()
    del data["plan"]["versions"][2]["release"]["decay_bounds"]
    assert Plan.from_dict(data).decay_candidates["v3"] == [10, 20, 30, 40, 50, 60, 80]
    data["plan"]["versions"][2]["release"]["decay_bounds"] = [20, 90]
    with pytest.raises(ConfigError, match="decay_bounds up to 90 steps from fork step 220 run past the end"):
        Plan.from_dict(data)

    path, run = tmp_path / "auto.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(auto_tiny()))
    assert cli.main(["plan", str(path)]) == 0
    table = capsys.readouterr().out
    assert "v3: decay auto in [20, 60] steps (forks between step 230 and 250)" in table
    assert "auto 230..250" in table and "ratio 0.433..0.567" in table
    assert ("main: the main path stops at step 230 until version v3 chooses its decay length (decay_steps: auto) "
            "from the run up to there and branches v1, v2 have finished; it then ends at the chosen fork") in table
    (run / "v3").mkdir(parents=True)
    (run / "v3" / "decay_choice.json").write_text(json.dumps(
        {"decay_steps": 40, "predicted_loss": 3.25, "predicted_sd": 0.01}))
    assert cli.main(["plan", str(path), "--run-dir", str(run), "--json"]) == 0
    costs = json.loads(capsys.readouterr().out)
    v3 = costs["versions"][2]
    assert costs["undecided"] == ["v1", "v2"] and costs["plan_hash"] == plan.plan_hash()
    assert v3["decay_steps"] == 40 and v3["fork_step"] == 240 and v3["decay_auto"]["chosen"] == 40
    assert costs["versions"][0]["tokens"] == [10 * TPS, 30 * TPS] and costs["main"]["steps"] == 240  # to v3's choice
    assert cli.main(["plan", str(path), "--run-dir", str(run)]) == 0
    assert "v3: decay auto in [20, 60] steps chose 40: forecast 3.2500 ± 0.0100" in capsys.readouterr().out
