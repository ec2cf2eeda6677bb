"""The version-update benchmark driver at CPU size: PTFS, CPT and path switching (decay and WSM) trained
with the lrpath trainer on the demo increments, every release evaluated on every increment."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from lrpath_megatron.mcore_api import versions

METHODS = ["switch/new-main/cosine-tail-0.5", "switch/replay-main/cosine-replay-0.5",
           "switch/replay-main/wsm-1-sqrt-0.5", "main/new-main"]


@pytest.fixture(scope="module")
def result(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("version_updates")
    data_dir = Path(demo_data["prefixes"]["docs"]).parent
    cmd = [sys.executable, str(REPO / "benchmarks" / "version_updates" / "run.py"), "--size", "cpu",
           "--steps-per-version", "12", "--fractions", "0.5", "--only", ",".join(METHODS), "--eval-batches", "2",
           "--data-dir", str(data_dir), "--run-dir", str(tmp / "run"), "--out", str(tmp / "vu.json"),
           "--set", "logging.log_interval=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"json": json.loads((tmp / "vu.json").read_text()), "run": tmp / "run", "stdout": proc.stdout,
            "out": tmp / "vu.json"}


def test_every_method_releases_four_versions_evaluated_on_every_increment(result):
    r = result["json"]
    assert list(r["methods"])[:2] == ["ptfs", "cpt"] and sorted(r["methods"]) == sorted(["ptfs", "cpt", *METHODS])
    assert r["increments"] == ["docs", "code_a", "code_b", "c_headers"]
    for row in r["methods"].values():
        assert list(row["versions"]) == ["v1", "v2", "v3", "v4"]
        for v in row["versions"].values():
            assert set(v["val_loss"]) == set(r["increments"])
            assert all(math.isfinite(x) and 0 < x < 10 for x in v["val_loss"].values())
    assert result["out"].with_suffix(".png").stat().st_size > 10_000
    assert "| ptfs | v4 |" in result["out"].with_suffix(".md").read_text()


def test_costs_follow_the_plans_arithmetic(result):
    # 4 increments of 12 steps; PTFS trains 12 * (1 + 2 + 3 + 4) = 120 steps.
    ratios = {name: row["cost_ratio_vs_ptfs"] for name, row in result["json"]["methods"].items()}
    assert ratios == pytest.approx({
        "ptfs": 1.0, "cpt": 48 / 120,
        "switch/new-main/cosine-tail-0.5": (48 - 6 + 4 * 6) / 120,  # main stops at the last fork
        "switch/replay-main/cosine-replay-0.5": (48 + 4 * 6) / 120,  # branches decay after each segment
        "switch/replay-main/wsm-1-sqrt-0.5": 48 / 120,  # merges cost no training
        "main/new-main": 48 / 120,
    })
    assert result["json"]["methods"]["ptfs"]["tokens"] == 120 * 1024


def test_each_release_reports_its_gain_over_the_main_path_it_left(result):
    r = result["json"]
    main = r["methods"]["main/new-main"]["versions"]
    row = r["methods"]["switch/new-main/cosine-tail-0.5"]
    for name, v in row["versions"].items():
        at = main[name]["val_loss_seen"]
        assert v["annealing_gain_vs_main"] == pytest.approx((at - v["val_loss_seen"]) / at)
    assert row["min_annealing_gain_vs_main"] == min(v["annealing_gain_vs_main"] for v in row["versions"].values())
    assert "annealing_gain_vs_main" not in r["methods"]["switch/replay-main/cosine-replay-0.5"]["versions"]["v1"]
    assert r["ptfs_tokens_per_parameter"] == pytest.approx(4 * 12 * 1024 / r["parameters"])


def test_baselines_train_what_they_claim(result):
    """PTFS learns each new increment; CPT starts each version from the last one at eta_min on new data only,
    and forgets the first increment that PTFS keeps."""
    methods = result["json"]["methods"]
    ptfs, cpt = methods["ptfs"]["versions"], methods["cpt"]["versions"]
    corpora = result["json"]["increments"]
    for i in range(1, 4):
        new = corpora[i]
        assert ptfs[f"v{i + 1}"]["val_loss"][new] < ptfs[f"v{i}"]["val_loss"][new]
    assert cpt["v4"]["val_loss"]["docs"] > ptfs["v4"]["val_loss"]["docs"]
    assert cpt["v1"] == ptfs["v1"] | {k: cpt["v1"][k] for k in ("cumulative_tokens", "cumulative_cost_vs_ptfs_total")}
    records = [json.loads(line) for line in
               (result["run"] / "baselines" / "cpt" / "v2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(12, 24))
    assert records[0]["lr"] == pytest.approx(3e-4)  # re-warmup from eta_min
    assert all({c for c, n in r["samples_per_corpus"].items() if n} == {"code_a"} for r in records)
    ptfs2 = [json.loads(line) for line in
             (result["run"] / "baselines" / "ptfs" / "v2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ptfs2] == list(range(24)) and ptfs2[0]["lr"] == 0.0
    seen = {c: sum(r["samples_per_corpus"].get(c, 0) for r in ptfs2) for c in ("docs", "code_a")}
    assert seen == {"docs": 96, "code_a": 96}  # the cumulative blend, 24 steps x 8 samples


def test_switch_methods_share_one_main_path_and_report_the_verdicts(result):
    run = result["run"]
    for name in METHODS[:3]:
        link = run / "switch" / name.replace("/", "__") / "main"
        assert link.is_symlink() and link.resolve().parent.name in ("new", "replay")
    out = result["stdout"]
    assert "recommended release setting: switch/" in out
    assert result["json"]["recommended"]["method"] in METHODS[:3]
    assert result["json"]["versions"]["megatron_core"] == versions()["megatron_core"]


def test_mixed_increments_cut_every_corpus_into_four_parts_of_the_same_sources(tmp_path):
    """``--data demo-mixed``: every shipped document lands in exactly one part, each part holds about a quarter
    of every corpus, and each part's held-out tail samples several corpora (not one domain)."""
    from lrpath_megatron.data_tools.demo import CORPORA, iter_corpus
    from lrpath_megatron.held_out import held_out_range
    from version_updates.increments import mixed_demo_increments

    data = mixed_demo_increments(tmp_path, 512)
    assert list(data["prefixes"]) == ["part1", "part2", "part3", "part4"] and data["source"] == "demo-mixed"
    source = {name: list(iter_corpus(name)) for name in CORPORA}
    parts = {name: [json.loads(line)["text"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
             for name in data["prefixes"]}
    assert sorted(t for texts in parts.values() for t in texts) == sorted(t for s in source.values() for t in s)
    for corpus, texts in source.items():
        total, members = sum(map(len, texts)), set(texts)
        shares = [sum(len(t) for t in part if t in members) / total for part in parts.values()]
        assert max(shares) - min(shares) < 0.1, (corpus, shares)
    for name, texts in parts.items():
        assert data["documents"][name] == len(texts)
        beg, end = held_out_range(len(texts), 0.02)
        assert len({c for t in texts[beg:end] for c, s in source.items() if t in s}) >= 3
    assert mixed_demo_increments(tmp_path, 512) == data  # a finished build is reused
