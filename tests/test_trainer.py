"""The megatron-core trainer on CPU (gloo): learning, bitwise resume, parallel layouts, resharding, bad configs."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import losses, run_lrpath, side_by_side, stored_tensors, tiny_config
from lrpath_megatron.checkpoint.layout import find_latest


@pytest.fixture(scope="module")
def config(demo_data, tmp_path_factory) -> Path:
    return tiny_config(demo_data, tmp_path_factory.mktemp("trainer") / "tiny.yaml")


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("reference")
    run_lrpath(["train", str(config), "--run-dir", str(run_dir)])
    return losses(run_dir)


def test_loss_falls_on_real_text(reference):
    assert sorted(reference) == list(range(40))
    first = statistics.mean(reference[s] for s in range(5))
    last = statistics.mean(reference[s] for s in range(35, 40))
    assert last < first - 1.0, (first, last)


@pytest.mark.compat
def test_resume_reproduces_the_uninterrupted_run_bitwise(config, reference, tmp_path):
    run_lrpath(["train", str(config), "--run-dir", str(tmp_path), "--stop-at-step", "17"])
    assert find_latest(tmp_path / "checkpoints").name == "iter_0000017"
    assert sorted(losses(tmp_path)) == list(range(17))
    out = run_lrpath(["train", str(config), "--run-dir", str(tmp_path)])
    assert "resumed at step 17" in out.stdout
    assert losses(tmp_path) == reference  # exact float equality, every step


def test_a_corpus_in_three_shards_trains_and_resumes_to_the_losses_of_one_file(demo_data, reference, tmp_path):
    from test_corpus_shards import split_into_shards

    shards = split_into_shards(demo_data["prefixes"]["docs"], tmp_path / "docs", 3)
    config = tiny_config(dict(demo_data, prefixes={**demo_data["prefixes"], "docs": shards}), tmp_path / "c.yaml")
    run_lrpath(["train", str(config), "--run-dir", str(tmp_path), "--stop-at-step", "17"])
    assert "resumed at step 17" in run_lrpath(["train", str(config), "--run-dir", str(tmp_path)]).stdout
    assert losses(tmp_path) == reference  # the same samples as one file: exact float equality, every step


@pytest.fixture(scope="module")
def initial(config, tmp_path_factory) -> Path:
    """Step-0 weights saved at TP=PP=DP=1: every layout starts from the same parameters."""
    run_dir = tmp_path_factory.mktemp("initial")
    run_lrpath(["train", str(config), "--run-dir", str(run_dir), "--stop-at-step", "0"])
    return run_dir / "checkpoints"


def _from_initial(initial: Path, run_dir: Path) -> Path:
    shutil.copytree(initial, run_dir / "checkpoints")
    return run_dir


LAYOUT_STEPS = 6


@pytest.fixture(scope="module")
def single(config, initial, tmp_path_factory) -> dict[int, float]:
    run_dir = _from_initial(initial, tmp_path_factory.mktemp("single"))
    run_lrpath(["train", str(config), "--run-dir", str(run_dir), "--stop-at-step", str(LAYOUT_STEPS)])
    return losses(run_dir)


@pytest.mark.compat
@pytest.mark.parametrize("layout", [
    ["--set", "parallel.tensor_parallel=2"],
    ["--set", "parallel.pipeline_parallel=2"],
    [],  # two processes, TP=PP=1: DP=2
], ids=["tp2", "pp2", "dp2"])
def test_parallel_layouts_match_single_process(config, initial, single, layout, tmp_path):
    run_dir = _from_initial(initial, tmp_path)
    run_lrpath(["train", str(config), "--run-dir", str(run_dir), "--stop-at-step", str(LAYOUT_STEPS), *layout],
               nproc=2)
    got = losses(run_dir)
    assert sorted(got) == sorted(single) == list(range(LAYOUT_STEPS))
    for step in single:
        assert got[step] == pytest.approx(single[step], abs=1e-5), step


def test_resharding_tp2_to_tp1_and_pp1_to_pp2(config, initial, single, tmp_path):
    """Save at TP=2, resume at TP=1, then at PP=2: the losses continue as in the single-process run."""
    run_dir = _from_initial(initial, tmp_path)
    common = ["train", str(config), "--run-dir", str(run_dir)]
    run_lrpath([*common, "--stop-at-step", "2", "--set", "parallel.tensor_parallel=2"], nproc=2)
    run_lrpath([*common, "--stop-at-step", "4"])
    run_lrpath([*common, "--stop-at-step", str(LAYOUT_STEPS), "--set", "parallel.pipeline_parallel=2"], nproc=2)
    got = losses(run_dir)
    assert sorted(got) == list(range(LAYOUT_STEPS))
    for step in single:
        assert got[step] == pytest.approx(single[step], abs=1e-5), step


@pytest.mark.parametrize("overrides, nproc, message", [
    (["model.num_attention_heads=5"], 1, "does not divide model.hidden_size"),
    (["parallel.tensor_parallel=3"], 1, "parallel.tensor_parallel=3 does not divide model.num_attention_heads"),
    (["parallel.tensor_parallel=4"], 2, "world size 2 is not divisible by"),
    (["model.activation=relu"], 1, "model.activation='relu' is not one of"),
    (["model.hidden_sise=32"], 1, "unknown key model.hidden_sise"),
    (["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2", "parallel.global_batch_size=6"], 2,
     "(global_batch_size / (micro_batch_size * data_parallel) = 3) that is a multiple of parallel.pipeline_parallel=2"),
    (["parallel.context_parallel=2"], 1, "parallel.context_parallel needs megatron-core's Transformer Engine layers on "
                                         "GPU, but Transformer Engine is not importable; install the [te] extra"),
    (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], 2,
     "parallel.sequence_parallel needs megatron-core's Transformer Engine layers"),
], ids=["heads-hidden", "tp-heads", "world-tp-pp", "bad-choice", "typo", "vpp-microbatches",
        "cp-without-te", "sp-without-te"])
def test_bad_config_fails_with_one_clear_message(config, tmp_path, overrides, nproc, message):
    args = ["train", str(config), "--run-dir", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    proc = run_lrpath(args, nproc=nproc, check=False, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count(message) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "model.hidden_size=[1,"], "--set 'model.hidden_size=[1,': the value '[1,' is not valid YAML "
                                         "(expected the node content, but found '<stream end>' at character 4)"),
    (["--stop-at-step", "-1"], "argument --stop-at-step: -1 is negative"),
    (["--set", "parallel.global_batch_size=7", "--set", "logging.log_interval=2"],
     "{config} with --set parallel.global_batch_size=7: parallel.global_batch_size=7 is not divisible by "
     "micro_batch_size * data_parallel = 2 * 1"),
], ids=["unparsable-set", "negative-stop", "runtime-check-names-its-set"])
def test_bad_arguments_fail_naming_their_source_and_write_nothing(config, tmp_path, args, message):
    proc = run_lrpath(["train", str(config), "--run-dir", str(tmp_path / "run"), *args], check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count(message.format(config=config)) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_missing_files_fail_clearly(demo_data, tmp_path, capsys):
    from lrpath_megatron.cli import main as lrpath

    # Refused while reading the config: in this process (the exit code is what main returns).
    assert lrpath(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert lrpath(["train", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a directory" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("")
    assert lrpath(["train", str(tmp_path / "empty.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'empty.yaml'}: data.corpora is empty" in capsys.readouterr().err
    bad = dict(demo_data, prefixes={**demo_data["prefixes"], "docs": str(tmp_path / "missing_text_document")})
    cfg = tiny_config(bad, tmp_path / "c.yaml")
    proc = run_lrpath(["train", str(cfg), "--run-dir", str(tmp_path / "run")], check=False, timeout=120)
    assert proc.returncode == 2
    assert "corpus 'docs'" in proc.stderr and "missing_text_document.bin does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the trainer created anything


def test_lr_triggered_switch_shows_in_the_log(demo_data, tmp_path):
    from lrpath_megatron.config import ScheduleConfig
    from lrpath_megatron.metrics import format_line
    from lrpath_megatron.schedules import from_schedule_config

    mix = {"stages": [{"weights": {"docs": 0.75, "code_a": 0.25}},
                      {"lr_below": "eta_max/5", "weights": {"docs": 0.25, "code_a": 0.75}}]}
    schedule = {"style": "cosine", "warmup_steps": 4, "train_steps": 30}
    cfg = tiny_config(demo_data, tmp_path / "c.yaml", data={"mix": mix}, schedule=schedule,
                      logging={"log_interval": 5, "eval_interval": 0, "tensorboard": False})
    run_lrpath(["train", str(cfg), "--run-dir", str(tmp_path)])
    lr = from_schedule_config(ScheduleConfig(**schedule), 3.0e-3, 3.0e-4)
    switch = next(s for s in range(4, 30) if lr(s) <= 3.0e-3 / 5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [e for r in records for e in r["events"]]
    assert events == [f"step {switch}: data mix switches from stage 'lr>0.0006' to 'lr<=0.0006', "
                      f"weights {{'code_a': 0.75, 'docs': 0.25}}"]
    assert sum(sum(r["samples_per_corpus"].values()) for r in records) == 30 * 8  # every sample counted once
    first, last = records[0], records[-1]
    assert first["stage"] == "lr>0.0006" and first["mix_fractions"]["docs"] == pytest.approx(0.75, abs=0.05)
    assert first["mfu"] is None and "mfu" not in format_line(first)  # no known peak on CPU
    assert last["stage"] == "lr<=0.0006" and last["mix_fractions"]["code_a"] == pytest.approx(0.75, abs=0.05)


DIST_OPT = ["--set", "parallel.use_distributed_optimizer=true"]


@pytest.mark.compat
def test_distributed_optimizer_resumes_bitwise_and_reshards(config, initial, single, tmp_path):
    """megatron-core's distributed optimizer (the GPU default) over torch AdamW: stop/resume at one process
    is bit-exact, and its state saved at DP=2 continues at TP=2, then at DP=1, as the single-process run."""
    run_dir = _from_initial(initial, tmp_path / "a")
    whole, split = _from_initial(initial, tmp_path / "b"), _from_initial(initial, tmp_path / "c")
    common = ["train", str(config), "--run-dir", str(run_dir), *DIST_OPT]

    def resharded():
        run_lrpath([*common, "--stop-at-step", "2"], nproc=2)
        run_lrpath([*common, "--stop-at-step", "4", "--set", "parallel.tensor_parallel=2"], nproc=2)
        run_lrpath([*common, "--stop-at-step", str(LAYOUT_STEPS)])

    def stopped_and_resumed():
        run_lrpath(["train", str(config), "--run-dir", str(split), "--stop-at-step", "3", *DIST_OPT])
        run_lrpath(["train", str(config), "--run-dir", str(split), "--stop-at-step", str(LAYOUT_STEPS), *DIST_OPT])

    side_by_side(resharded, stopped_and_resumed, lambda: run_lrpath(
        ["train", str(config), "--run-dir", str(whole), "--stop-at-step", str(LAYOUT_STEPS), *DIST_OPT]))
    got = losses(run_dir)
    assert sorted(got) == list(range(LAYOUT_STEPS))
    for step in single:
        assert got[step] == pytest.approx(single[step], abs=1e-5), step
    assert losses(split) == losses(whole)


@pytest.mark.parametrize("distributed_optimizer", ["false", "true"])
def test_bf16_holds_every_parameter_in_bf16_and_resumes_bitwise(config, reference, tmp_path, distributed_optimizer):
    """bf16 as Megatron-LM runs it (megatron-core's Float16Module: norms too; fp32 master weights in the
    optimizer): a stop/resume is bit-exact with either optimizer, and the losses track the fp32 run."""
    import torch
    from megatron.core import dist_checkpointing

    sets = ["--set", "precision.dtype=bf16", "--set", f"parallel.use_distributed_optimizer={distributed_optimizer}",
            "--set", "schedule.train_steps=8", "--set", "logging.eval_interval=8"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_lrpath(["train", str(config), "--run-dir", str(whole), *sets])
    run_lrpath(["train", str(config), "--run-dir", str(split), "--stop-at-step", "3", *sets])
    run_lrpath(["train", str(config), "--run-dir", str(split), *sets])
    assert losses(split) == losses(whole) and sorted(losses(whole)) == list(range(8))
    assert losses(whole)[0] == pytest.approx(reference[0], abs=0.05)
    model_dir = whole / "checkpoints" / "iter_0000008" / "model"
    dtypes = {t.dtype for t in dist_checkpointing.load_tensors_metadata(str(model_dir)).values()}
    assert dtypes == {torch.bfloat16}
    # `lrpath eval` builds the same bf16 model: it reproduces the trainer's last validation loss.
    logged = json.loads((whole / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "eval.json"
    run_lrpath(["eval", str(config), str(whole / "checkpoints" / "iter_0000008"), "--json", str(out), *sets[:2]])
    assert json.loads(out.read_text())[str(whole / "checkpoints" / "iter_0000008")]["val_loss"] == \
        pytest.approx(logged["val_loss"], abs=1e-6)


VPP = ["--set", "parallel.pipeline_parallel=2", "--set", "parallel.virtual_pipeline=2"]


def _branch_plan(config: Path, path: Path) -> Path:
    """The tiny config as a plan whose version v1 forks from the main path at step 3 and decays from
    eta_max = 1e-3 over 3 steps (replay data: the main path's corpora)."""
    plan = yaml.safe_load(config.read_text())
    del plan["optimizer"], plan["schedule"]
    corpora = [c["name"] for c in plan["data"]["corpora"]]
    plan["plan"] = {"main": {"eta_max": 1.0e-3, "eta_min": 1.0e-4, "warmup_steps": 2},
                    "versions": [{"name": "v1", "corpora": corpora, "tokens": 12 * 8 * 64,
                                  "release": {"method": "decay", "shape": "cosine", "fork_step": 3,
                                              "decay_steps": 3, "data": "replay"}}]}
    path.write_text(yaml.safe_dump(plan))
    return path


def test_interleaved_pipeline_matches_single_process_and_reshards(config, initial, single, tmp_path):
    """megatron-core's interleaved schedule (PP=2, two chunks of one layer per stage): at DP=2 on four
    processes over all steps, every loss as the single-process run. A branch forked from its step-3
    checkpoint saves it without interleaving, identical, and trains on at one process; a branch forked from
    that plain copy trains interleaved at DP=1, with the same losses within 2e-7. `lrpath merge` and the HF
    export's reading give the same tensors from the interleaved checkpoint as from its plain copy. `lrpath
    eval` at one process reads the last checkpoint and gets the validation loss the interleaved run logged."""
    import torch

    from lrpath_megatron.checkpoint.dist_files import DcpTensorReader
    from lrpath_megatron.export import read_checkpoint
    from lrpath_megatron.hf.convert import hf_shapes
    from lrpath_megatron.hf.exporter import _hf_tensors
    from lrpath_megatron.merge import merge_checkpoints
    from lrpath_megatron.merge_weights import merge_weights

    vpp = _from_initial(initial, tmp_path / "vpp")
    run_lrpath(["train", str(config), "--run-dir", str(vpp), "--stop-at-step", str(LAYOUT_STEPS), *VPP,
                "--set", "checkpoint.save_interval=3", "--set", f"logging.eval_interval={LAYOUT_STEPS}"], nproc=4)
    got = losses(vpp)
    assert sorted(got) == list(range(LAYOUT_STEPS))
    for step in single:
        assert got[step] == pytest.approx(single[step], abs=1e-5), step
    inter_ckpt = vpp / "checkpoints" / "iter_0000003"

    # Its step-3 checkpoint read without interleaving, as a branch's fork point: forked at one process and
    # stopped at its fork step, v1 saves the fork checkpoint in its own (plain) layout, tensor for tensor the
    # interleaved one, model and optimizer state. It then resumes and trains on at one process; v1 forked
    # from that plain copy trains interleaved at DP=1. Both start from identical state, so their losses
    # differ only by the float reduction order of the two layouts (the gradient norm differs in the 7th
    # digit; measured on megatron-core 0.16.1: identical at steps 3 and 4, 1.2e-7 apart at step 5).
    # Branches of two main paths trained in different layouts start from weights that already differ by
    # that rounding (1.8e-6 after 6 steps here) and may drift further apart at a high LR.
    plan = _branch_plan(config, tmp_path / "plan.yaml")
    branch = ["train", str(plan), "--path", "v1", "--run-dir"]
    plain, interleaved = tmp_path / "branch_plain", tmp_path / "branch_interleaved"
    shutil.copytree(inter_ckpt, plain / "main" / "checkpoints" / inter_ckpt.name)
    assert "branched from" in run_lrpath([*branch, str(plain), "--stop-at-step", "3"]).stdout
    plain_ckpt = plain / "v1" / "checkpoints" / inter_ckpt.name
    assert json.loads((plain_ckpt / "manifest.json").read_text())["world_size"] == 1
    for part in ("model", "optimizer"):
        want, have = stored_tensors(inter_ckpt, part), stored_tensors(plain_ckpt, part)
        assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want), part
    shutil.copytree(plain_ckpt, interleaved / "main" / "checkpoints" / inter_ckpt.name)
    last = vpp / "checkpoints" / "iter_0000006"
    resumed, branched, _ = side_by_side(
        lambda: run_lrpath([*branch, str(plain)]), lambda: run_lrpath([*branch, str(interleaved), *VPP], nproc=2),
        lambda: run_lrpath(["eval", str(config), str(last), "--json", str(tmp_path / "eval.json")]))
    assert "resumed at step 3" in resumed.stdout and "branched from" in branched.stdout
    got, want = losses(plain / "v1"), losses(interleaved / "v1")
    print(f"branch losses, plain {got}, interleaved {want}: max |diff| = "
          f"{max(abs(got[s] - want[s]) for s in got if s in want):.2e}")
    assert sorted(got) == sorted(want) == [3, 4, 5]
    assert got[3] == pytest.approx(single[3], abs=1e-5)  # the fork's weights on the main path's step-3 batch
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=5e-7), step  # as docs/layout.md states

    # Merges and HF exports read tensors by their global keys, whatever layout wrote them: merged with the
    # initial weights, the interleaved checkpoint and its plain copy give the same tensors (each output
    # takes its last input's layout); the HF export reads the same HF tensors from both, one layer at a
    # time (called directly: no HF architecture computes this GeLU model, so the CLI refuses it).
    merged = {}
    for name, ckpt in (("interleaved", inter_ckpt), ("plain", plain_ckpt)):
        merged[name] = tmp_path / f"merge_{name}"
        merge_checkpoints([initial / "iter_0000000", ckpt], merge_weights("0.25,0.75", 2), merged[name],
                          progress=False)
    want, have = stored_tensors(merged["plain"]), stored_tensors(merged["interleaved"])
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    start, end = stored_tensors(initial / "iter_0000000"), stored_tensors(inter_ckpt)
    for key, tensor in have.items():
        torch.testing.assert_close(tensor, 0.25 * start[key] + 0.75 * end[key], rtol=0, atol=1e-6)
    model = read_checkpoint(inter_ckpt)[1].model
    want = list(_hf_tensors(DcpTensorReader(plain_ckpt / "model"), model))
    have = list(_hf_tensors(DcpTensorReader(inter_ckpt / "model"), model))
    assert [n for n, _ in want] == [n for n, _ in have] == list(hf_shapes(model))
    assert all(torch.equal(w, h) for (_, w), (_, h) in zip(want, have))

    logged = json.loads((vpp / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert json.loads((tmp_path / "eval.json").read_text())[str(last)]["val_loss"] == pytest.approx(logged, abs=1e-6)
