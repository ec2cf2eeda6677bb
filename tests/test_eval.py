"""`lrpath eval`: a checkpoint's held-out loss equals what its trainer logged, at any layout; bad input refused."""
import json

import pytest

from conftest import run_lrpath, tiny_config


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """12 steps with an evaluation at the last step; the run's final checkpoint."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(demo_data, tmp / "c.yaml", corpora=("docs", "code_a", "c_headers"),
                      schedule={"train_steps": 12, "warmup_steps": 2},
                      logging={"log_interval": 1, "eval_interval": 12, "eval_batches": 3, "tensorboard": False})
    run_lrpath(["train", str(cfg), "--run-dir", str(tmp / "run")])
    logged = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"cfg": cfg, "ckpt": tmp / "run" / "checkpoints" / "iter_0000012", "logged": logged[-1], "tmp": tmp}


def test_eval_reproduces_the_trainers_validation_loss(trained):
    out = trained["tmp"] / "eval.json"
    proc = run_lrpath(["eval", str(trained["cfg"]), str(trained["ckpt"]), "--json", str(out)])
    result = json.loads(out.read_text())[str(trained["ckpt"])]
    logged = trained["logged"]
    assert result["step"] == 12
    assert set(result["val_loss_per_corpus"]) == {"docs", "code_a", "c_headers"}
    for corpus, loss in logged["val_loss_per_corpus"].items():
        assert result["val_loss_per_corpus"][corpus] == pytest.approx(loss, abs=1e-6)
    assert result["val_loss"] == pytest.approx(logged["val_loss"], abs=1e-6)
    assert "iter_0000012" in proc.stdout and "c_headers" in proc.stdout


def test_eval_at_tensor_parallel_2_matches(trained):
    out = trained["tmp"] / "eval_tp2.json"
    run_lrpath(["eval", str(trained["cfg"]), str(trained["ckpt"]), "--json", str(out),
                "--set", "parallel.tensor_parallel=2"], nproc=2)
    result = json.loads(out.read_text())[str(trained["ckpt"])]
    for corpus, loss in trained["logged"]["val_loss_per_corpus"].items():
        assert result["val_loss_per_corpus"][corpus] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize("extra,match", [
    (["--set", "model.hidden_size=128"], "the model differs (model.hidden_size: checkpoint 64 vs config 128); pass "
                                         "the config (or plan) the checkpoint was trained with, or a checkpoint of "
                                         "this model"),
    (["--batches", "0"], "--batches 0: give a positive number"),
])
def test_eval_refuses_a_different_model_or_bad_batches(trained, extra, match):
    proc = run_lrpath(["eval", str(trained["cfg"]), str(trained["ckpt"]), *extra], check=False)
    assert proc.returncode == 2
    assert match in proc.stderr and proc.stderr.count("error:") == 1


def test_eval_refuses_to_overwrite_its_json_output(trained):
    out = trained["tmp"] / "taken.json"
    out.write_text("{}")
    proc = run_lrpath(["eval", str(trained["cfg"]), str(trained["ckpt"]), "--json", str(out)], check=False)
    assert proc.returncode == 2 and f"output {out} already exists; choose a new path or remove it" in proc.stderr
    assert out.read_text() == "{}"


def test_eval_refuses_a_directory_that_is_not_a_checkpoint(trained):
    proc = run_lrpath(["eval", str(trained["cfg"]), str(trained["tmp"])], check=False)
    assert proc.returncode == 2 and "is not a complete checkpoint" in proc.stderr
