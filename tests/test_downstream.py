"""Downstream tasks per release: a tiny Llama plan launched locally with plan.evaluate (lm-evaluation-harness on
the shipped tasks through lrpath's own forward) and plan.export.hf; the harness's log-likelihoods equal those
of HFLM on the release's Hugging Face export; accuracy is the count of documents whose real choice scores
highest; the gate holds a release that fell below the previous one and its export does not run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from conftest import run_lrpath

# The harness is the extra `eval`, installed in the primary lane (requirements.txt); the compatibility lane
# (megatron-core 0.16.1) may leave it out.
if importlib.util.find_spec("lm_eval") is None:
    from importlib.metadata import version

    if Version(version("megatron-core")) >= Version("0.19"):
        raise ImportError("lm-evaluation-harness is missing from the primary lane: pip install -r requirements.txt")
    pytest.skip("lm-evaluation-harness (extra `eval`) is not installed in this lane", allow_module_level=True)

LIMIT = 20
TASKS = ["code_next_line", "docstring_match"]


def _plan(demo_data: dict, **evaluate) -> dict:
    prefixes = demo_data["prefixes"]
    release = {"decay_steps": 4, "data": "replay"}
    return {
        # a Llama (RMSNorm, SwiGLU): its releases export to Hugging Face
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 64,
                  "vocab_size": demo_data["vocab_size"], "normalization": "RMSNorm", "activation": "swiglu"},
        "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"corpora": [{"name": n, "prefix": prefixes[n]} for n in ("docs", "code_a")]},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 5, "eval_interval": 0, "tensorboard": False},
        "plan": {"main": {"eta_max": 3e-3, "eta_min": 3e-4, "warmup_steps": 2, "save_steps": [2]},
                 "versions": [{"name": "v1", "corpora": ["docs"], "steps": 12, "release": release},
                              {"name": "v2", "corpora": ["code_a"], "steps": 12, "release": release}],
                 "export": {"hf": True, "tokenizer": demo_data["tokenizer_model"]},
                 "evaluate": {"tasks": TASKS, "limit": LIMIT, **evaluate}},
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def launched(demo_data, tmp_path_factory) -> dict:
    """The plan run by `lrpath launch --local`: train, evaluate each release, export those the gate passes."""
    root = tmp_path_factory.mktemp("downstream")
    # a wide bound: every release of this run passes (test_gate_holds_... makes one fail)
    plan = _write(root / "plan.yaml", _plan(demo_data, gate={"task": "docstring_match", "max_drop_points": 100}))
    run = root / "run"
    proc = run_lrpath(["launch", str(plan), "--local", "--run-dir", str(run)], timeout=900)
    return {"plan": plan, "run": run, "root": root, "stdout": proc.stdout}


def _record(run: Path, path: str) -> dict:
    return json.loads((run / path / "downstream.json").read_text())


def test_launch_scores_each_release_logs_the_metrics_and_shows_the_table(launched):
    run = launched["run"]
    v1, v2 = _record(run, "v1"), _record(run, "v2")
    for record in (v1, v2):
        assert set(record["tasks"]) == set(TASKS) and not record["held"]
        for result in record["tasks"].values():
            assert result["n"] == LIMIT
            acc = result["metrics"]["acc"]
            # the harness's standard error of a mean of LIMIT 0/1 outcomes
            assert acc["stderr"] == pytest.approx((acc["value"] * (1 - acc["value"]) / (LIMIT - 1)) ** 0.5)
    assert "the first release evaluated" in v1["gate"]["evidence"]["text"]
    assert v2["gate"]["evidence"]["previous"] == "v1" and "passes" in v2["gate"]["evidence"]["text"]
    assert (run / "v1" / "hf" / "model.safetensors").is_file() and (run / "v2" / "hf" / "model.safetensors").is_file()
    # metrics at the release step
    logged = [json.loads(line) for line in (run / "v2" / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in logged if "downstream" in r]
    assert len(scores) == 1 and scores[0]["step"] == v2["step"]
    assert scores[0]["downstream"]["docstring_match"]["acc"] == v2["tasks"]["docstring_match"]["metrics"]["acc"]["value"]

    # PTFS of v1, trained and scored once: the table's change vs PTFS
    run_lrpath(["train", str(launched["plan"]), "--path", "ptfs/v1", "--run-dir", str(run)])
    run_lrpath(["downstream", str(launched["plan"]), "ptfs/v1", "--run-dir", str(run)])
    ptfs = _record(run, "ptfs/v1")
    assert ptfs["gate"] is None and not ptfs["held"]
    vs_ptfs = v1["tasks"]["code_next_line"]["metrics"]["acc"]["value"] - ptfs["tasks"]["code_next_line"]["metrics"]["acc"]["value"]

    status = run_lrpath(["status", str(launched["plan"]), "--run-dir", str(run)]).stdout
    assert "downstream tasks per release" in status and f"{vs_ptfs:+.4f} vs ptfs/v1" in status
    change = v2["tasks"]["docstring_match"]["metrics"]["acc"]["value"] - v1["tasks"]["docstring_match"]["metrics"]["acc"]["value"]
    assert f"{change:+.4f} vs v1" in status
    out = launched["root"] / "report.html"
    run_lrpath(["report", str(launched["plan"]), "--run-dir", str(run), "--out", str(out)])
    page = out.read_text()
    assert "Downstream tasks per release" in page and "code_next_line" in page and f"{change:+.4f} vs v1" in page


def test_harness_loglikelihoods_equal_lrpath_forward_on_the_hf_export(launched):
    from lrpath_megatron.data_tools.demo import iter_corpus
    from lrpath_megatron.downstream import parity
    from lrpath_megatron.plan import load_plan

    plan, run = load_plan(launched["plan"]), launched["run"]
    pairs = parity.task_pairs(5) + [("", "def main():\n    return 0")]  # an empty context too
    texts = [t[:1500] for _, t in zip(range(3), iter_corpus("docs"))]  # perplexity: several windows each
    ckpt = Path(_record(run, "v2")["checkpoint"])
    ours = parity.lrpath_loglikelihoods(plan.train_config, ckpt, Path(plan.config.export.tokenizer), pairs, texts=texts)
    theirs = parity.hf_loglikelihoods(run / "v2" / "hf", pairs, texts=texts)
    result = parity.compare(ours, theirs)
    assert result["requests"] == len(pairs) + len(texts) and result["greedy_flags_equal"]
    assert result["max_abs_loglik_diff"] <= 1e-5


def test_eval_tasks_accuracy_counts_the_documents_whose_real_choice_scores_highest(launched, demo_data, tmp_path):
    """`lrpath eval --tasks` on a shipped task and a user's task directory: acc is the share of documents
    whose labelled choice has the highest log-likelihood, recomputed here from lrpath's forward."""
    from lrpath_megatron.downstream import parity
    from lrpath_megatron.plan import load_plan

    docs = [json.loads(line) for line in (Path(parity.SHIPPED_DIR) / "docstring_match.jsonl").read_text().splitlines()]
    mine = tmp_path / "my_tasks"
    mine.mkdir()
    (mine / "docs.jsonl").write_text("".join(json.dumps({"q": d["context"], "options": d["choices"], "gold": d["label"]})
                                             + "\n" for d in docs[LIMIT:2 * LIMIT]))
    _write(mine / "mine.yaml", {"task": "my_docstrings", "dataset_path": "json", "test_split": "test",
                                "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}},  # beside the YAML
                                "output_type": "multiple_choice", "doc_to_text": "q", "doc_to_choice": "options",
                                "doc_to_target": "gold", "target_delimiter": "",
                                "metric_list": [{"metric": "acc"}]})
    plan, run = load_plan(launched["plan"]), launched["run"]
    ckpt = _record(run, "v1")["checkpoint"]
    out = tmp_path / "scores.json"
    proc = run_lrpath(["eval", str(launched["plan"]), ckpt, "--tasks", f"docstring_match,{mine}", "--limit", str(LIMIT),
                       "--json", str(out)])
    assert "docstring_match" in proc.stdout and "my_docstrings" in proc.stdout
    tasks = json.loads(out.read_text())[ckpt]["tasks"]
    assert tasks["docstring_match"] == _record(run, "v1")["tasks"]["docstring_match"]  # the job's scores

    lls = parity.lrpath_loglikelihoods(plan.train_config, Path(ckpt), Path(demo_data["tokenizer_model"]),
                                       [(d["context"], c) for d in docs[:2 * LIMIT] for c in d["choices"]])
    right = [max(range(4), key=lambda k: lls[4 * i + k][0]) == d["label"] for i, d in enumerate(docs[:2 * LIMIT])]
    assert tasks["docstring_match"]["metrics"]["acc"]["value"] == pytest.approx(sum(right[:LIMIT]) / LIMIT)
    assert tasks["my_docstrings"]["metrics"]["acc"]["value"] == pytest.approx(sum(right[LIMIT:]) / LIMIT)


def test_gate_holds_a_release_that_fell_below_the_previous_and_skips_its_export(launched, demo_data, tmp_path):
    """The better of two real checkpoints (the v2 release, main after 2 steps) is released as v1, the other as
    v2; a gate of 0 points on the task where they differ holds v2 with the evidence, and v2 is not exported."""
    from lrpath_megatron.launch.local import plan_commands
    from lrpath_megatron.plan import load_plan

    run = launched["run"]
    trained, early = Path(_record(run, "v2")["checkpoint"]), run / "main" / "checkpoints" / "iter_0000002"
    out = tmp_path / "both.json"
    run_lrpath(["eval", str(launched["plan"]), str(trained), str(early), "--tasks", ",".join(TASKS),
                "--limit", str(LIMIT), "--json", str(out)])
    scores = json.loads(out.read_text())
    gaps = {(t, m): scores[str(trained)]["tasks"][t]["metrics"][m]["value"] - scores[str(early)]["tasks"][t]["metrics"][m]["value"]
            for t in TASKS for m in ("acc", "acc_norm")}
    (task, metric), gap = max(gaps.items(), key=lambda kv: abs(kv[1]))
    assert gap != 0, f"the two checkpoints score alike on every task: {gaps}"
    better, worse = (trained, early) if gap > 0 else (early, trained)

    plan_file = _write(tmp_path / "plan.yaml",
                       _plan(demo_data, gate={"task": task, "metric": metric, "max_drop_points": 0}))
    plan, gated = load_plan(plan_file), tmp_path / "run"
    for version, ckpt in (("v1", better), ("v2", worse)):  # the releases' checkpoints, where launch puts them
        step = plan.path(version).end_step
        shutil.copytree(ckpt, gated / version / "checkpoints" / f"iter_{step:07d}")
    commands = dict(plan_commands(plan, plan_file, [], gated, 1))
    for job in ("v1-eval", "v2-eval", "v1-hf", "v2-hf"):
        run_lrpath(commands[job][3:])  # `python -m lrpath_megatron.cli` ARGS
    v2 = _record(gated, "v2")
    assert v2["held"] and v2["gate"]["evidence"]["previous"] == "v1"
    assert v2["gate"]["evidence"]["drop"] == pytest.approx(abs(gap)) and "held" in v2["gate"]["evidence"]["text"]
    assert (gated / "v1" / "hf" / "config.json").is_file() and not (gated / "v2" / "hf").exists()
    status = run_lrpath(["status", str(plan_file), "--run-dir", str(gated)]).stdout
    assert "v2 (held)" in status and f"drop {abs(gap):+.4f}" in status


@pytest.mark.parametrize("evaluate, match", [
    ({"tasks": ["no_such_task"]}, "neither a shipped task"),
    ({"tasks": ["/no/such/dir/"]}, "neither a shipped task"),
    ({"tasks": TASKS, "gate": {"task": "other", "max_drop_points": 1}}, "gate.task 'other' is not evaluated"),
    ({"tasks": TASKS, "gate": {"task": "code_next_line"}}, "exactly one of max_drop_stderr, max_drop_points"),
    ({"tasks": TASKS, "limit": 0}, "limit 0"),
    ({"tasks": TASKS, "device": "tpu"}, "device 'tpu': give cpu or gpu"),
])
def test_plan_refuses_bad_evaluate_settings(demo_data, tmp_path, evaluate, match):
    data = _plan(demo_data)
    data["plan"]["evaluate"] = evaluate
    proc = run_lrpath(["plan", str(_write(tmp_path / "plan.yaml", data))], check=False)
    assert proc.returncode != 0 and match in proc.stderr and "Traceback" not in proc.stderr


def test_task_directory_with_python_code_or_remote_data_is_refused(demo_data, tmp_path):
    from lrpath_megatron.task_dirs import task_configs
    from lrpath_megatron.errors import LrpathError

    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs: {data_files: x.jsonl}\n"
                                     "process_docs: !function utils.process\n")
    (tmp_path / "x.jsonl").write_text("{}\n")
    with pytest.raises(LrpathError, match="process_docs name Python code"):
        task_configs([str(tmp_path)])
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: some/hub_dataset\n")
    with pytest.raises(LrpathError, match="nothing is downloaded"):
        task_configs([str(tmp_path)])


def test_slurm_evaluates_each_release_after_it_and_exports_after_the_evaluation(demo_data, tmp_path):
    """On SLURM each release's evaluation is a one-task CPU job after its release and the previous release's
    evaluation; the export waits for the evaluation and exports nothing if the gate held the release."""
    from lrpath_megatron.cli import main as lrpath_main

    plan = _write(tmp_path / "plan.yaml", _plan(demo_data, gate={"task": "code_next_line", "max_drop_stderr": 2}))
    out, run = tmp_path / "out", tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    assert lrpath_main(["launch", str(plan), "--slurm", "--cluster", str(repo / "examples" / "cluster_local.yaml"),
                        "--run-dir", str(run), "--out", str(out)]) == 0
    submit = (out / "submit.sh").read_text()
    assert "--dependency=afterok:$job_v1 v1-eval.sbatch" in submit
    assert "--dependency=afterok:$job_v2:$job_v1_eval v2-eval.sbatch" in submit
    assert "--dependency=afterok:$job_v2_eval v2-hf.sbatch" in submit
    evaluation, export = (out / "v2-eval.sbatch").read_text(), (out / "v2-hf.sbatch").read_text()
    assert f"downstream {plan} v2 --run-dir {run}" in evaluation and "--gpus" not in evaluation
    assert f"--unless-held {run}/v2" in export
    for script in out.iterdir():
        subprocess.run(["bash", "-n", str(script)], check=True)

    on_gpu = _plan(demo_data, device="gpu")  # one GPU per evaluation job
    assert lrpath_main(["launch", str(_write(tmp_path / "gpu.yaml", on_gpu)), "--slurm", "--cluster",
                        str(repo / "examples" / "cluster_local.yaml"), "--cluster-set", "request_gpus=true",
                        "--run-dir", str(run), "--out", str(out)]) == 0
    assert "#SBATCH --gpus-per-node=1" in (out / "v2-eval.sbatch").read_text()
    assert "--gpus" not in (out / "v2-hf.sbatch").read_text()


def test_without_the_harness_eval_tasks_names_the_extra_to_install(launched, tmp_path):
    from conftest import REPO, lrpath_command

    hidden = tmp_path / "hidden"  # shadows the installed harness: this lane without the extra
    hidden.mkdir()
    (hidden / "lm_eval.py").write_text("raise ImportError('No module named lm_eval')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")])))
    ckpt = _record(launched["run"], "v1")["checkpoint"]
    proc = subprocess.run(lrpath_command(["eval", str(launched["plan"]), ckpt, "--tasks", "code_next_line"]),
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and "pip install 'lrpath_megatron[eval]'" in proc.stderr
    assert "Traceback" not in proc.stderr
