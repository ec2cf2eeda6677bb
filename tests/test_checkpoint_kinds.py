"""Full and weights-only checkpoints: merge inputs without optimizer state, resuming past them, keep_last."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_lrpath
from lrpath_megatron.checkpoint import layout
from lrpath_megatron.checkpoint.layout import prune, remove_stale_temporaries
from test_status_export import stored_tensors, tiny_plan


def _kinds(root: Path) -> dict[int, bool]:
    """step -> whether the checkpoint holds optimizer state (from the directory and from the manifest)."""
    out = {}
    for ckpt in sorted(root.glob("iter_*")):
        manifest = layout.read_manifest(ckpt)
        assert manifest["optimizer_state"] == (ckpt / "optimizer").is_dir(), ckpt
        out[manifest["step"]] = layout.has_optimizer_state(ckpt)
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_merge_inputs_hold_weights_only_and_a_resume_trains_them_again_bitwise(demo_data, tmp_path):
    plan, run = tiny_plan(demo_data, tmp_path / "plan.yaml"), tmp_path / "run"
    ckpts = run / "main" / "checkpoints"
    run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(run)])
    # v1 forks at 12 (full); v2 merges 20, 22, 24, of which 24 ends the main path (full).
    assert _kinds(ckpts) == {12: True, 20: False, 22: False, 24: True}
    ratio = _size(ckpts / "iter_0000020") / _size(ckpts / "iter_0000024")
    assert ratio < 0.4  # fp32 weights vs weights + two Adam moments
    before = {s: stored_tensors(ckpts / layout.iter_name(s)) for s in (20, 22, 24)}

    # What a kill -9 between the saves of steps 22 and 24 leaves: the newest checkpoint is weights-only.
    shutil.rmtree(ckpts / "iter_0000024")
    assert layout.find_latest(ckpts).name == "iter_0000022"
    status = run_lrpath(["status", str(plan), "--run-dir", str(run)]).stdout
    assert "continue (from iter_0000012: the newer checkpoints hold weights only)" in status
    out = run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(run)]).stdout
    assert "resumed at step 12" in out
    for step, tensors in before.items():
        again = stored_tensors(ckpts / layout.iter_name(step))
        assert tensors.keys() == again.keys()
        assert all(torch.equal(tensors[k], again[k]) for k in tensors), step

    # The merge reads the weights-only inputs; the released version is complete.
    merged = run / "v2" / "checkpoints" / "iter_0000024"
    run_lrpath(["merge", *(str(ckpts / layout.iter_name(s)) for s in (20, 22, 24)), "--weights", "linear",
                "--out", str(merged), "--no-progress"])
    assert [i["step"] for i in layout.read_manifest(merged)["inputs"]] == [20, 22, 24]


def test_keep_last_deletes_only_old_resume_points_and_a_weights_only_release_is_final(demo_data, tmp_path):
    plan, run = tiny_plan(demo_data, tmp_path / "plan.yaml"), tmp_path / "run"
    keep = ["--set", "checkpoint.save_interval=4", "--set", "checkpoint.keep_last=1"]
    out = run_lrpath(["train", str(plan), "--path", "main", "--run-dir", str(run), *keep]).stdout
    # Interval saves at 4, 8, 16 go once newer ones exist; the fork (12), merge inputs (20 is also an
    # interval step, so it holds optimizer state) and the end stay.
    assert _kinds(run / "main" / "checkpoints") == {12: True, 20: True, 22: False, 24: True}
    assert [line.split()[2] for line in out.splitlines() if "deleted" in line] == \
        ["iter_0000004", "iter_0000008", "iter_0000016"]

    branch = ["train", str(plan), "--path", "v1", "--run-dir", str(run), *keep, "--set", "checkpoint.save_optimizer=false"]
    run_lrpath(branch)
    assert _kinds(run / "v1" / "checkpoints") == {16: True, 18: False}  # the interval save stays resumable
    again = run_lrpath(branch).stdout  # the weights-only end is the path done, not a place to resume from
    assert "nothing to train" in again and "resumed at step 18" in again
    assert len((run / "v1" / "metrics.jsonl").read_text().splitlines()) == 6


def _fake(root: Path, step: int, optimizer: bool) -> None:
    ckpt = root / layout.iter_name(step)
    (ckpt / "model").mkdir(parents=True)
    if optimizer:
        (ckpt / "optimizer").mkdir()
    (ckpt / layout.MANIFEST).write_text(json.dumps({"step": step}))


@pytest.mark.parametrize("keep, left", [(1, {5, 15, 30, 40}), (2, {5, 15, 20, 30, 40})])
def test_prune_keeps_the_newest_resume_points_and_every_protected_or_weights_only_one(tmp_path, keep, left):
    # step 0 counts as a resume point (a fresh optimizer is its state); 15 and 40 are weights-only
    for step, optimizer in ((0, False), (5, True), (10, True), (15, False), (20, True), (30, True), (40, False)):
        _fake(tmp_path, step, optimizer)
    (tmp_path / ".del_iter_0000099").mkdir()  # a delete killed half-way
    remove_stale_temporaries(tmp_path)
    deleted = prune(tmp_path, keep, protected={5})
    assert {int(p.name[5:]) for p in tmp_path.glob("iter_*")} == left
    assert {int(p.name[5:]) for p in deleted} == {0, 5, 10, 15, 20, 30, 40} - left
    assert not list(tmp_path.glob(".*"))
