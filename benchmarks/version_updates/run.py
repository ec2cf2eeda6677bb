"""PTFS vs CPT vs path switching (decay branches, WSM merges) over four data increments.

From one plan template (model, batch, LRs) and four increments, the driver trains every version of the
release train each way with the lrpath trainer (`lrpath train`, `lrpath merge`, `lrpath eval`: the
product's own commands, in this process or under torchrun), evaluates every released version on the
held-out split of every increment, and writes a table, a plot and a JSON.

Methods (every one trains the same tokens per increment):
- ``ptfs``: version v from scratch on D_1..D_v (`lrpath train PLAN --path ptfs/vN`);
- ``cpt``: version v from version v-1 on D_v, re-warmup + cosine (`--path cpt/vN`);
- ``switch/<main>-main/<release>``: one main path at eta_max (``new``: each segment on its new increment
  only; ``replay``: ``--replay`` of each later segment from older increments) and per version a
  release: a decay branch (``<shape>-tail-F``: forks at 1-F of the version's segment and decays on the
  rest of it; ``<shape>-replay-F``: forks at the segment's end and decays for F of a segment on the
  cumulative blend) or a WSM merge of main-path checkpoints over the last F of the segment;
- ``main/<main>-main``: the main path's own checkpoint at each version's end - not a release (never
  decayed), shown to measure what the release adds.

    python benchmarks/version_updates/run.py --size cpu                 # minutes on CPU (demo corpora)
    python benchmarks/version_updates/run.py --size gpu                 # one H100, machine increments
Rerunning resumes: finished paths, merges and evaluations are reused.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE.parent)]

import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from version_updates import increments  # noqa: E402
from version_updates.results import auto_summary, choice_summary, plot, table  # noqa: E402

SIZES = {
    "cpu": {"plan": HERE / "plan_cpu.yaml", "steps_per_version": 150, "data": "demo",
            "branch_data": ["tail", "replay", "lrmix"]},
    # PTFS sees >= 20 tokens per parameter by the last version: the regime where the release method matters
    "cpu-converged": {"plan": HERE / "plan_cpu_converged.yaml", "steps_per_version": 350, "data": "demo",
                      "branch_data": ["tail"]},
    # lrmix matched plain replay within 0.05% at CPU size: left out of the time-boxed GPU run by default
    "gpu": {"plan": HERE / "plan_gpu.yaml", "steps_per_version": 300, "data": "machine",
            "branch_data": ["tail", "replay"]},
}
# A version's release is "comparable" to PTFS when its loss on the data it has seen is within this
# relative gap (stated with the result; the paper gives no number).
COMPARABLE = 0.01


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # ptfs | cpt | switch | main
    main: Optional[str] = None  # main-path variant: "new" | "replay"
    release: Optional[dict] = None  # the release every version gets (kind switch)
    first: Optional[dict] = None  # the first version's release instead, where it differs

    @property
    def slug(self) -> str:
        return self.name.replace("/", "__")


# ------------------------------------------------------------------------------------------ the methods
def build_methods(fractions: list[float], shapes: list[str], branch_data: list[str], merge_weights: str,
                  merge_checkpoints: int, mains: list[str], steps_per_version: int,
                  decays: tuple = ("fixed",)) -> list[Method]:
    """``decays``: ``fixed`` (one method per fraction) and/or ``auto`` (decay_steps: auto at its default bounds:
    the release forecast choosing among the plan's candidate lengths, 10%..100% of a version, less those whose
    branch would fork inside the warmup or before the main path evaluated the version twice)."""
    methods = [Method("ptfs", "ptfs"), Method("cpt", "cpt")]

    def merge_window(f: float) -> int:
        return max(merge_checkpoints - 1, round(f * steps_per_version))

    for main in mains:
        for shape in shapes:
            for data in branch_data:
                for f in fractions if "fixed" in decays else ():
                    release = {"method": "decay", "shape": shape, "decay_fraction": f, "data": data}
                    methods.append(Method(f"switch/{main}-main/{shape}-{data}-{f:g}", "switch", main, release))
                if "auto" in decays:
                    release = {"method": "decay", "shape": shape, "decay_steps": "auto", "data": data}
                    methods.append(Method(f"switch/{main}-main/{shape}-{data}-auto", "switch", main, release))
                if "method-auto" in decays:  # the release forecast chooses a decay length or a merge window
                    release = {"method": "auto", "shape": shape, "data": data,
                               "merge": {"weights": merge_weights, "num_checkpoints": merge_checkpoints}}
                    methods.append(Method(f"switch/{main}-main/auto-{shape}-{data}", "switch", main, release))
                    # The first release has no forecast (no release has been measured before it) and takes the
                    # longest decay; a team writes it instead: here a decay over the first fraction, whose
                    # finished branch the next choice fits the law to.
                    first = {"method": "decay", "shape": shape, "decay_fraction": fractions[0], "data": data}
                    methods.append(Method(f"switch/{main}-main/auto-{shape}-{data}-after-{fractions[0]:g}",
                                          "switch", main, release, first))
        for f in fractions:
            release = {"method": "merge", "merge": {"num_checkpoints": merge_checkpoints, "weights": merge_weights,
                                                     "window_steps": merge_window(f)}}
            methods.append(Method(f"switch/{main}-main/wsm-{merge_weights}-{f:g}", "switch", main, release))
        methods.append(Method(f"main/{main}-main", "main", main))
    return methods


def plan_dict(template: dict, corpora: dict, steps_per_version: int, replay: float,
              release: Optional[dict], main_save_steps: list[int] = (), main_weights_only_steps: list[int] = (),
              first: Optional[dict] = None) -> dict:
    """The plan of one method: the template, one corpus and one version per increment, the main path's
    replay share, and the same release for every version (the first: ``first``, where given)."""
    plan = copy.deepcopy(template)
    plan.setdefault("data", {})["corpora"] = [{"name": n, "prefix": p} for n, p in corpora.items()]
    # A main-path-only plan still needs releases: branches at each segment's end (never trained here).
    release = release or {"method": "decay", "shape": "cosine", "decay_steps": 2, "data": "replay"}
    plan["plan"]["main"] = {**plan["plan"].get("main", {}), "replay": replay, "save_steps": sorted(main_save_steps),
                            "weights_only_steps": sorted(set(main_weights_only_steps) - set(main_save_steps))}
    plan["plan"]["versions"] = [{"name": f"v{i + 1}", "corpora": [n], "steps": steps_per_version,
                                 "release": version_release(first if i == 0 and first else release,
                                                            list(corpora)[: i + 1])}
                                for i, n in enumerate(corpora)]
    return plan


def release_plan(plan: dict) -> dict:
    """A switch method's plan, which trains only its branches (its main path is the shared main plan's): a
    release is only evaluated, so no optimizer state (a third of the disk on the GPU run). Written into the
    plan rather than given as ``--set`` to the branch jobs, so that the plan file is the plan that trained
    (its hash is the one decay_steps: auto choices record, read back by this driver and forecast_accuracy.py)."""
    plan.setdefault("checkpoint", {})["save_optimizer"] = False
    return plan


def version_release(release: dict, seen: list[str]) -> dict:
    """``data: lrmix`` is a replay branch with an LR-triggered blend (the continued-pretraining recipe):
    the cumulative blend first, then half of the samples from the newest increment once the LR is below
    eta_max/5."""
    release = copy.deepcopy(release)
    if release.get("data") != "lrmix":
        return release
    release["data"] = "replay"
    if len(seen) > 1:
        old, new = seen[:-1], seen[-1]
        release["mix"] = {"stages": [
            {"weights": {c: 1.0 for c in seen}},
            {"lr_below": "eta_max/5", "weights": {new: 0.5, **{c: 0.5 / len(old) for c in old}}},
        ], "ramp_steps": 2}
    return release


# ------------------------------------------------------------------------------------------ running lrpath
class Lrpath:
    """Runs ``lrpath`` commands: in this process (one device) or under torchrun (``nproc`` > 1)."""

    def __init__(self, nproc: int):
        self.nproc = nproc

    def __call__(self, *argv: str) -> None:
        if self.nproc > 1 and argv[0] in ("train", "eval"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                   "-m", "lrpath_megatron.cli", *argv]
            code = subprocess.call(cmd, cwd=REPO)
        else:
            from lrpath_megatron.cli import main

            code = main(list(argv))
            gc.collect()
            _empty_cuda_cache()
        if code != 0:
            raise SystemExit(f"lrpath {' '.join(argv)} exited {code}; rerun the benchmark to resume")


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ the benchmark
class Benchmark:
    def __init__(self, args, template: dict, data: dict):
        self.args, self.template, self.data = args, template, data
        self.run = Path(args.run_dir).resolve()
        self.lrpath = Lrpath(args.nproc)
        self.corpora = data["prefixes"]
        self.spv = args.steps_per_version
        self.replay = {"new": 0.0, "replay": args.replay}
        self.methods = build_methods(args.fractions, args.shapes, args.branch_data, args.merge_weights,
                                     args.merge_checkpoints, args.mains, self.spv, args.decay)
        if args.only:
            self.methods = [m for m in self.methods if m.kind in ("ptfs", "cpt") or m.name in args.only]
        self.plans: dict[str, Path] = {}
        self.loaded = {}

    # Every plan is written and validated before anything trains.
    def write_plans(self) -> None:
        """One plan per switch method, the baselines' plan and one per main path: all validated before any
        is written."""
        plans = {m.slug: release_plan(plan_dict(self.template, self.corpora, self.spv, self.replay[m.main],
                                                m.release, first=m.first))
                 for m in self.methods if m.kind == "switch"}
        plans["baselines"] = plan_dict(self.template, self.corpora, self.spv, 0.0, None)
        self._load(plans)
        for main in {m.main for m in self.methods if m.main}:
            # The main path saves at every step any method of it forks or merges from, and at each version's
            # end; checkpoints that are only merged hold the weights only.
            save, weights_only = set(), set()
            for m in self.methods:
                if m.main == main and m.kind == "switch":
                    save |= self.loaded[m.slug].path("main").save_steps
                    weights_only |= self.loaded[m.slug].path("main").weights_only_steps
            plans[f"main-{main}"] = plan_dict(self.template, self.corpora, self.spv, self.replay[main], None,
                                              sorted(save), sorted(weights_only))
        self._load(plans)
        (self.run / "plans").mkdir(parents=True, exist_ok=True)
        for name, plan in plans.items():
            self.plans[name] = self.run / "plans" / f"{name}.yaml"
            self.plans[name].write_text(yaml.safe_dump(plan, sort_keys=False))

    def _load(self, plans: dict) -> None:
        from lrpath_megatron.config import ConfigError
        from lrpath_megatron.plan import Plan

        for name, plan in plans.items():
            if name not in self.loaded:
                try:
                    self.loaded[name] = Plan.from_dict(copy.deepcopy(plan), name)
                except ConfigError as exc:
                    raise ConfigError(f"the plan of {name}: {exc}") from None

    def jobs(self) -> list[tuple[str, tuple]]:
        """(label, lrpath argv) in dependency order."""
        from lrpath_megatron.launch.jobs import build_jobs, merge_args

        versions = self.loaded["baselines"].versions
        base = str(self.run / "baselines")
        jobs = [(f"ptfs/{v.name}", ("train", str(self.plans["baselines"]), "--path", f"ptfs/{v.name}",
                                    "--run-dir", base)) for v in versions]
        jobs += [(f"cpt/{v.name}", ("train", str(self.plans["baselines"]), "--path", f"cpt/{v.name}",
                                    "--run-dir", base)) for v in versions[1:]]
        for main in sorted({m.main for m in self.methods if m.main}):
            jobs.append((f"main ({main})", ("train", str(self.plans[f"main-{main}"]), "--path", "main",
                                            "--run-dir", str(self.run / "mains" / main))))
        for m in self.methods:
            if m.kind != "switch":
                continue
            plan, run_dir = self.loaded[m.slug], self.run / "switch" / m.slug
            for job in build_jobs(plan.paths(), plan.releases()):
                if job.kind == "merge":
                    jobs.append((f"{m.name} {job.path}", tuple(merge_args(run_dir, job)) + ("--no-progress",)))
                elif job.path != "main":
                    jobs.append((f"{m.name} {job.path}", ("train", str(self.plans[m.slug]), "--path", job.path,
                                                         "--run-dir", str(run_dir))))
        return jobs

    def link_shared_paths(self) -> None:
        """CPT's first version is PTFS's; every switch method uses its main path's run."""
        cpt1 = self.run / "baselines" / "cpt" / "v1"
        if not cpt1.exists():
            cpt1.parent.mkdir(parents=True, exist_ok=True)
            cpt1.symlink_to(Path("..") / "ptfs" / "v1")
        for m in self.methods:
            if m.kind == "switch":
                link = self.run / "switch" / m.slug / "main"
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(self.run / "mains" / m.main / "main")

    def release_checkpoints(self, m: Method) -> list[Path]:
        from lrpath_megatron.run_layout import RunLayout

        versions = self.loaded["baselines"].versions
        if m.kind in ("ptfs", "cpt"):
            layout = RunLayout(self.run / "baselines")
            return [layout.checkpoint(f"{m.kind}/{v.name}", v.end_step) for v in versions]
        if m.kind == "main":
            return [RunLayout(self.run / "mains" / m.main).checkpoint("main", v.end_step) for v in versions]
        plan, layout = self.as_trained(m), RunLayout(self.run / "switch" / m.slug)
        return [layout.checkpoint(v.name, v.branch_end) for v in plan.versions]

    def as_trained(self, m: Method):
        """The plan of a switch method with the decay lengths its decay_steps: auto branches chose."""
        from lrpath_megatron.plan_decisions import with_choices

        return with_choices(self.loaded[m.slug], self.run / "switch" / m.slug)

    def evaluate(self) -> dict:
        """{method: {version: lrpath eval result}}; one `lrpath eval` over the checkpoints not evaluated yet
        (results are kept in RUN/eval.json by checkpoint path)."""
        cache = self.run / "eval.json"
        done = json.loads(cache.read_text()) if cache.is_file() else {}
        wanted = {m.name: [str(c) for c in self.release_checkpoints(m)] for m in self.methods}
        todo = sorted({c for ckpts in wanted.values() for c in ckpts} - set(done))
        if todo:
            part = self.run / "eval.new.json"
            part.unlink(missing_ok=True)  # left by a killed run; `lrpath eval` refuses to overwrite it
            self.lrpath("eval", str(self.plans["baselines"]), *todo, "--batches", str(self.args.eval_batches),
                        "--json", str(part))
            done.update(json.loads(part.read_text()))
            cache.write_text(json.dumps(done, indent=1))
            part.unlink()
        names = [v.name for v in self.loaded["baselines"].versions]
        return {m: dict(zip(names, (done[c] for c in ckpts))) for m, ckpts in wanted.items()}

    def decay_choice(self, m: Method, version: str) -> Optional[dict]:
        """What a decay_steps: auto release chose when its branch started (RUN/vN/decay_choice.json)."""
        from lrpath_megatron.run_layout import RunLayout

        if m.kind != "switch" or "auto" not in (m.release.get("decay_steps"), m.release.get("method")):
            return None
        record = RunLayout(self.run / "switch" / m.slug).path(version).decay_choice
        return json.loads(record.read_text()) if record.is_file() else None

    def costs(self, m: Method) -> tuple[list[int], int]:
        """Cumulative tokens trained when each version is released, and the PTFS total."""
        base = self.loaded["baselines"].costs()
        rows = base["versions"]
        if m.kind == "ptfs":
            cumulative = [r["ptfs_cumulative_tokens"] for r in rows]
        elif m.kind == "cpt":
            cumulative = [r["cpt_cumulative_tokens"] for r in rows]
        elif m.kind == "main":
            cumulative = [v.end_step * base["tokens_per_step"] for v in self.loaded["baselines"].versions]
        else:
            cumulative = [r["cumulative_tokens"][0] for r in self.as_trained(m).costs()["versions"]]
        return cumulative, base["ptfs_tokens"]


# ------------------------------------------------------------------------------------------ results
def summarize(bench: Benchmark, evals: dict, elapsed: float) -> dict:
    corpora = list(bench.corpora)
    methods = {}
    for m in bench.methods:
        cumulative, ptfs_total = bench.costs(m)
        versions = {}
        for i, (name, r) in enumerate(evals[m.name].items()):
            seen = corpora[: i + 1]
            per = r["val_loss_per_corpus"]
            versions[name] = {
                "val_loss": per,
                "val_loss_seen": sum(per[c] for c in seen) / len(seen),
                "val_loss_all": r["val_loss"],
                "cumulative_tokens": cumulative[i],
                "cumulative_cost_vs_ptfs_total": cumulative[i] / ptfs_total,
            }
            choice = bench.decay_choice(m, name)
            if choice is not None:
                versions[name]["decay_choice"] = choice_summary(choice, versions[name]["val_loss_seen"])
        methods[m.name] = {"kind": m.kind, "main": m.main, "release": m.release, "first_release": m.first,
                           "tokens": cumulative[-1], "cost_ratio_vs_ptfs": cumulative[-1] / ptfs_total,
                           "versions": versions}
    ptfs = methods["ptfs"]["versions"]
    for row in methods.values():
        for name, v in row["versions"].items():
            v["gap_vs_ptfs"] = v["val_loss_seen"] - ptfs[name]["val_loss_seen"]
            v["relative_gap_vs_ptfs"] = v["gap_vs_ptfs"] / ptfs[name]["val_loss_seen"]
        gaps = [v["relative_gap_vs_ptfs"] for v in row["versions"].values()]
        row["mean_relative_gap_vs_ptfs"] = sum(gaps) / len(gaps)
        row["max_relative_gap_vs_ptfs"] = max(gaps)
        row["comparable_to_ptfs"] = row["max_relative_gap_vs_ptfs"] <= COMPARABLE
        # What the release's decay or merge gained over the never-decayed main path it came from, per version.
        main = methods.get(f"main/{row['main']}-main") if row["kind"] == "switch" else None
        if main is not None:
            for name, v in row["versions"].items():
                at = main["versions"][name]["val_loss_seen"]
                v["annealing_gain_vs_main"] = (at - v["val_loss_seen"]) / at
            row["min_annealing_gain_vs_main"] = min(v["annealing_gain_vs_main"] for v in row["versions"].values())
    return {
        **auto_summary(methods, bench.run),
        "benchmark": "version_updates",
        "size": bench.args.size,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": _versions(),
        "device": _device(),
        "data": {k: bench.data[k] for k in ("source", "tokens", "documents", "vocab_size")},
        "increments": corpora,
        "steps_per_version": bench.spv,
        "tokens_per_version": bench.spv * bench.loaded["baselines"].tokens_per_step,
        "model": bench.loaded["baselines"].train_config.model.__dict__,
        "parameters": _parameters(bench.loaded["baselines"].train_config.model),
        # PTFS of the last version trains on every version's tokens: how far from converged the model is.
        "ptfs_tokens_per_parameter": len(corpora) * bench.spv * bench.loaded["baselines"].tokens_per_step
                                     / _parameters(bench.loaded["baselines"].train_config.model),
        "eval_batches": bench.args.eval_batches,
        "comparable_criterion": f"max over versions of (seen-data loss - PTFS) / PTFS <= {COMPARABLE}",
        "methods": methods,
        "paper_setting": _paper_setting(methods),
        "recommended": _recommend(methods),
        "seconds_this_invocation": round(elapsed, 1),  # a rerun reuses finished runs
    }


def _paper_setting(methods: dict) -> Optional[dict]:
    """The paper's configuration: new-data main path, cosine branches on the last 60% of each segment."""
    name = "switch/new-main/cosine-tail-0.6"
    if name not in methods:
        return None
    row = methods[name]
    return {"method": name, "cost_ratio_vs_ptfs": row["cost_ratio_vs_ptfs"],
            "max_relative_gap_vs_ptfs": row["max_relative_gap_vs_ptfs"], "holds": row["comparable_to_ptfs"]}


def _recommend(methods: dict) -> dict:
    """The default the example plans should take: the cheapest switch setting comparable to PTFS at every
    version (ties: the smaller mean gap); if none is, the one with the smallest mean gap. The setting with
    the smallest mean gap is reported beside it."""
    switch = {n: r for n, r in methods.items() if r["kind"] == "switch"}
    best = min(switch, key=lambda n: (switch[n]["mean_relative_gap_vs_ptfs"], switch[n]["cost_ratio_vs_ptfs"]))
    comparable = [n for n, r in switch.items() if r["comparable_to_ptfs"]]
    pick = min(comparable, key=lambda n: (switch[n]["cost_ratio_vs_ptfs"], switch[n]["mean_relative_gap_vs_ptfs"])) \
        if comparable else best
    reason = (f"the cheapest setting within {COMPARABLE:.0%} of PTFS at every version" if comparable
              else f"no setting stays within {COMPARABLE:.0%} of PTFS at every version; smallest mean gap")
    return {"method": pick, "reason": reason, "cost_ratio_vs_ptfs": switch[pick]["cost_ratio_vs_ptfs"],
            "mean_relative_gap_vs_ptfs": switch[pick]["mean_relative_gap_vs_ptfs"],
            "max_relative_gap_vs_ptfs": switch[pick]["max_relative_gap_vs_ptfs"],
            "lowest_gap": {"method": best, "cost_ratio_vs_ptfs": switch[best]["cost_ratio_vs_ptfs"],
                           "mean_relative_gap_vs_ptfs": switch[best]["mean_relative_gap_vs_ptfs"]}}


def _parameters(model) -> int:
    h, layers, ffn, v = model.hidden_size, model.num_layers, model.ffn_size, model.padded_vocab_size
    per_layer = 4 * h * h + (3 if model.activation == "swiglu" else 2) * h * ffn + 2 * h
    return layers * per_layer + v * h * (2 if model.untie_embeddings else 1) + h


def _versions() -> dict:
    import torch

    from lrpath_megatron.checkpoint.layout import code_version
    from lrpath_megatron.mcore_api import versions

    return {"python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": versions()["megatron_core"], "lrpath_megatron": code_version()}


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def fit_steps(requested: int, template: dict, data: dict) -> int:
    """Steps per version, fewer than requested if the smallest increment's training split holds fewer
    tokens: every method then reads each increment at most once in its own segment."""
    from lrpath_megatron.config import TrainConfig, from_dict

    cfg = from_dict(TrainConfig, {k: v for k, v in template.items() if k != "plan"})
    tokens_per_step = cfg.parallel.global_batch_size * cfg.model.seq_length
    smallest = min(data["tokens"].values())
    fit = int(smallest * (1 - cfg.data.valid_fraction) * 0.98) // tokens_per_step
    if fit < requested:
        print(f"the smallest increment holds {smallest:,} tokens: {fit} steps per version instead of {requested}")
    return min(requested, fit)


# ------------------------------------------------------------------------------------------ entry point
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--plan", type=Path, help="plan template (default: plan_<size>.yaml)")
    p.add_argument("--data", choices=("demo", "demo-mixed", "machine"),
                   help="increments (default: demo on cpu, machine on gpu; demo-mixed: the demo corpora cut into four "
                        "increments of the same sources)")
    p.add_argument("--data-dir", type=Path, default=REPO / "runs" / "version_updates_data")
    p.add_argument("--max-chars", type=int, default=60_000_000, help="machine increments: characters per increment")
    p.add_argument("--steps-per-version", type=int, help="main-path steps per increment (same for every method)")
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.6],
                   help="release lengths as fractions of a version's steps (branch decay, merge window)")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["cosine"], help="branch decay shapes")
    p.add_argument("--decay", type=lambda s: tuple(s.split(",")), default=("fixed",),
                   help="fixed (a decay per --fractions), auto (decay_steps: auto at its default bounds, the release "
                        "forecast choosing the length), method-auto (method: auto, the forecast choosing a decay "
                        "length or a merge window) or several side by side; auto needs validation losses on the "
                        "main path: logging.eval_interval is set to a tenth of a version if the plan has none")
    p.add_argument("--branch-data", type=lambda s: s.split(","),
                   help="branch data: tail, replay, lrmix (default: all on cpu, tail,replay on gpu)")
    p.add_argument("--mains", type=lambda s: s.split(","), default=["new", "replay"], help="main-path variants")
    p.add_argument("--replay", type=float, default=0.2, help="replay share of the 'replay' main path")
    p.add_argument("--merge-weights", default="1-sqrt")
    p.add_argument("--merge-checkpoints", type=int, default=4)
    p.add_argument("--only", type=lambda s: s.split(","), help="switch/main methods to run (PTFS and CPT always run)")
    p.add_argument("--eval-batches", type=int, default=None, help="held-out micro-batches per increment")
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run (torchrun when > 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the plan template, e.g. model.num_layers=4")
    p.add_argument("--run-dir", type=Path, help="default runs/version_updates_<size>")
    p.add_argument("--out", type=Path, help="default benchmarks/results/version_updates_<size>.json (+ .md, .png)")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    args.plan = args.plan or size["plan"]
    args.data = args.data or size["data"]
    args.branch_data = args.branch_data or size["branch_data"]
    if set(args.decay) - {"fixed", "auto", "method-auto"}:
        p.error(f"--decay {','.join(args.decay)}: choose from fixed, auto, method-auto")
    bad = set(args.branch_data) - {"tail", "replay", "lrmix"}
    if bad:
        p.error(f"--branch-data {','.join(sorted(bad))}: choose from tail, replay, lrmix")
    args.steps_per_version = args.steps_per_version or size["steps_per_version"]
    args.run_dir = args.run_dir or REPO / "runs" / f"version_updates_{args.size}"
    args.out = args.out or REPO / "benchmarks" / "results" / f"version_updates_{args.size}.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from lrpath_megatron.config import apply_overrides, read_yaml

    start = time.time()
    template = read_yaml(args.plan)
    apply_overrides(template, args.overrides)
    if {"auto", "method-auto"} & set(args.decay) and not template.get("logging", {}).get("eval_interval"):
        # The forecast reads the main path's validation losses (not hashed: the main path trains the same).
        template.setdefault("logging", {})["eval_interval"] = max(1, args.steps_per_version // 10)
    args.eval_batches = args.eval_batches or template.get("logging", {}).get("eval_batches", 4)
    vocab = template["model"]["vocab_size"]
    data = (increments.demo_increments(args.data_dir, vocab) if args.data == "demo" else
            increments.mixed_demo_increments(args.data_dir, vocab) if args.data == "demo-mixed" else
            increments.build_machine_increments(args.data_dir, args.max_chars, vocab, os.cpu_count() or 1))
    args.steps_per_version = fit_steps(args.steps_per_version, template, data)
    bench = Benchmark(args, template, data)
    bench.write_plans()
    bench.link_shared_paths()
    for label, argv_ in tqdm(bench.jobs(), desc="version-update runs", unit="run"):
        tqdm.write(f"== {label}")
        bench.lrpath(*argv_)
    evals = bench.evaluate()
    result = summarize(bench, evals, time.time() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(text)
    rec, paper = result["recommended"], result["paper_setting"]
    low = rec["lowest_gap"]
    print(f"\nrecommended release setting: {rec['method']} ({rec['reason']}: cost {rec['cost_ratio_vs_ptfs']:.2f} of "
          f"PTFS, mean gap {rec['mean_relative_gap_vs_ptfs']:+.2%}, max {rec['max_relative_gap_vs_ptfs']:+.2%}); "
          f"smallest mean gap: {low['method']} ({low['mean_relative_gap_vs_ptfs']:+.2%} at "
          f"{low['cost_ratio_vs_ptfs']:.2f} of PTFS)")
    if paper:
        print(f"paper setting {paper['method']}: cost {paper['cost_ratio_vs_ptfs']:.2f} of PTFS, max gap "
              f"{paper['max_relative_gap_vs_ptfs']:+.2%} -> the claim {'holds' if paper['holds'] else 'does not hold'} "
              f"at this scale (criterion: {result['comparable_criterion']})")
    print(f"wrote {args.out} (+ .md, .png) in {result['seconds_this_invocation']:.0f} s")
    return result


if __name__ == "__main__":
    from lrpath_megatron.errors import USER_ERRORS

    try:
        main()
    except USER_ERRORS as exc:
        print(f"version_updates: error: {exc}", file=sys.stderr)
        sys.exit(2)
