"""Does a WSM merge of main-path checkpoints beat the main path itself on held-out loss?

A tiny GPT trains on the demo corpora at a constant, deliberately high LR until its loss is on a noisy
plateau, saving every few steps. At the last step T, the last k+1 checkpoints over a window of W steps
are merged with decay-emulating weights (``lrpath_megatron.merge``); each merge, the main path's own
checkpoint at T, and (as a reference) a real cosine-decay branch trained from T - W to T are evaluated
with the trainer's own validation (the same fixed held-out batches for all).

    python benchmarks/merge_vs_main.py            # writes benchmarks/results/merge_vs_main.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402
from conftest import free_port, losses, run_lrpath, tiny_config  # noqa: E402

CORPORA = ("docs", "code_a", "code_b", "c_headers")


@dataclass(frozen=True)
class Settings:
    steps: int = 600
    warmup_steps: int = 10
    lr: float = 1e-2
    save_interval: int = 10
    windows: tuple = (40, 100, 200)  # steps before T merged (k + 1 = window / save_interval + 1 checkpoints)
    weights: tuple = ("linear", "1-sqrt")
    num_layers: int = 2
    hidden_size: int = 64
    seq_length: int = 128
    micro_batch_size: int = 4
    global_batch_size: int = 8
    eval_batches: int = 16  # micro-batches per corpus
    valid_fraction: float = 0.05  # enough held-out text for eval_batches of the smallest corpus
    decay_branch: bool = True
    seed: int = 1234  # model initialisation (the data order and held-out split stay fixed)


def train_main(s: Settings, data: dict, work: Path) -> tuple[Path, Path]:
    cfg = tiny_config(
        data, work / "main.yaml", corpora=CORPORA,
        model={"num_layers": s.num_layers, "hidden_size": s.hidden_size, "seq_length": s.seq_length},
        parallel={"micro_batch_size": s.micro_batch_size, "global_batch_size": s.global_batch_size},
        optimizer={"lr": s.lr, "min_lr": 0.0},
        schedule={"style": "constant", "warmup_steps": s.warmup_steps, "train_steps": s.steps},
        data={"valid_fraction": s.valid_fraction},
        checkpoint={"save_interval": s.save_interval},
        logging={"log_interval": 1, "eval_interval": 0, "eval_batches": s.eval_batches, "tensorboard": False},
    )
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "seed": s.seed}))
    run_lrpath(["train", str(cfg), "--run-dir", str(work / "main")], timeout=3600)
    return cfg, work / "main"


class Evaluator:
    """Validation loss of any checkpoint through the trainer itself: a path initialised from the checkpoint's
    weights (a ``weights`` start), then ``Trainer.evaluate``."""

    def __init__(self, cfg_path: Path, work: Path):
        from lrpath_megatron.config import load_train_config

        self.cfg = load_train_config(str(cfg_path), [])
        self.work = work
        self.count = 0

    def __call__(self, ckpt: Path) -> dict:
        from lrpath_megatron import distributed
        from lrpath_megatron.path import WEIGHTS, Start, standalone_run
        from lrpath_megatron.trainer import Trainer

        self.count += 1
        run = dataclasses.replace(standalone_run(self.cfg, self.work / f"eval_{self.count}"),
                                  origin=Start(WEIGHTS, ckpt))
        trainer = Trainer(self.cfg, run)
        try:
            trainer.setup()
            return trainer.evaluate()
        finally:
            distributed.shutdown()

    def decay_branch(self, fork_ckpt: Path, fork: int, end: int) -> dict:
        """Train T - W .. T from the main path's checkpoint (with its Adam state and data position), LR
        cosine from the main LR to 0 over the window, then evaluate."""
        from lrpath_megatron import distributed
        from lrpath_megatron.path import FORK, Start, standalone_run
        from lrpath_megatron.trainer import Trainer

        run = standalone_run(self.cfg, self.work / f"decay_{end - fork}")
        lr, span = self.cfg.optimizer.lr, end - 1 - fork
        path = dataclasses.replace(
            run.path, fork_step=fork, end_step=end, parent="main",
            lr=lambda step: lr * 0.5 * (1 + math.cos(math.pi * min(step - fork, span) / span)))
        run = dataclasses.replace(run, path=path, origin=Start(FORK, fork_ckpt))
        trainer = Trainer(self.cfg, run)
        try:
            trainer.setup()
            trainer.train()
            return trainer.evaluate()
        finally:
            distributed.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--lr", type=float, default=Settings.lr)
    ap.add_argument("--save-interval", type=int, default=Settings.save_interval)
    ap.add_argument("--seq-length", type=int, default=Settings.seq_length)
    ap.add_argument("--windows", default=",".join(map(str, Settings.windows)))
    ap.add_argument("--seed", type=int, default=Settings.seed)
    ap.add_argument("--no-decay-branch", action="store_true")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "merge_vs_main.json"))
    args = ap.parse_args(argv)
    s = Settings(steps=args.steps, lr=args.lr, save_interval=args.save_interval, seq_length=args.seq_length,
                 seed=args.seed,
                 windows=tuple(int(w) for w in args.windows.split(",")), decay_branch=not args.no_decay_branch)
    work = Path(args.work or tempfile.mkdtemp(prefix="merge_vs_main_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(s, work)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


def run(s: Settings, work: Path) -> dict:
    from lrpath_megatron.data_tools.demo import prepare_demo_data
    from lrpath_megatron.run_layout import PathDirs
    from lrpath_megatron.merge import merge_checkpoints
    from lrpath_megatron.merge_weights import merge_weights

    t0 = time.time()
    data = prepare_demo_data(work / "demo_data")
    cfg_path, main_dir = train_main(s, data, work)
    train_s = time.time() - t0
    main = PathDirs(main_dir)
    evaluate = Evaluator(cfg_path, work)
    T = s.steps

    # The main path near T: how much its held-out loss moves between checkpoints (the plateau noise).
    main_steps = [T - i * s.save_interval for i in range(min(8, T // s.save_interval))][::-1]
    main_eval = {step: evaluate(main.checkpoint(step)) for step in main_steps}
    at_T = main_eval[T]["val_loss"]

    variants = []
    for window in tqdm(s.windows, desc="windows (merge, evaluate, decay branch)"):
        steps = list(range(T - window, T + 1, s.save_interval))
        for spec in s.weights:
            out = work / "merges" / f"w{window}_{spec}"
            out.parent.mkdir(exist_ok=True)
            merge_checkpoints([main.checkpoint(x) for x in steps], merge_weights(spec, len(steps)), out,
                              progress=False)
            ev = evaluate(out)
            variants.append({"kind": "merge", "window_steps": window, "weights": spec, "num_checkpoints": len(steps),
                             **ev, "delta_vs_main": ev["val_loss"] - at_T})
        if s.decay_branch:
            ev = evaluate.decay_branch(main.checkpoint(T - window), T - window, T)
            variants.append({"kind": "cosine_decay_branch", "window_steps": window, **ev,
                             "delta_vs_main": ev["val_loss"] - at_T})

    train_loss = losses(main_dir)
    tail = [train_loss[x] for x in range(T - 50, T + 1) if x in train_loss]
    summary = {
        "main_val_loss_at_T": at_T,
        "main_val_loss_last_checkpoints": {str(k): v["val_loss"] for k, v in main_eval.items()},
        "variants": {f"{v['kind']}:w{v['window_steps']}:{v.get('weights', 'cosine')}": round(v["delta_vs_main"], 4)
                     for v in variants},
    }
    return {
        "benchmark": "merge_vs_main",
        "question": "val loss of a WSM merge of the last checkpoints at step T vs the main path's checkpoint at T",
        "settings": {**s.__dict__, "corpora": list(CORPORA), "schedule": "constant", "min_lr_decay_branch": 0.0},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "train_loss_every_25": {str(k): round(v, 4) for k, v in train_loss.items() if k % 25 == 0},
        "train_loss_last_50_mean_std": [sum(tail) / len(tail),
                                        (sum((x - sum(tail) / len(tail)) ** 2 for x in tail) / len(tail)) ** 0.5],
        "main": {str(k): v for k, v in main_eval.items()},
        "variants": variants,
        "summary": summary,
    }


if __name__ == "__main__":
    raise SystemExit(main())
