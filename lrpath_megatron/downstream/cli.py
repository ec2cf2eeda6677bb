"""What ``lrpath eval --tasks`` and ``lrpath downstream`` print: task scores with their standard errors."""
from __future__ import annotations

from pathlib import Path

from lrpath_megatron.errors import LrpathError


def format_scores(tasks: dict) -> list[str]:
    """One line per task and metric: ``task metric value ± stderr (n documents)``."""
    return [f"  {task:<24} {metric:<10} {s['value']:.4f} ± {s['stderr'] if s['stderr'] is not None else float('nan'):.4f}"
            f"  ({r['n']} documents)" for task, r in tasks.items() for metric, s in r["metrics"].items()]


def run_tasks(args) -> int:
    """``lrpath eval CONFIG CKPT... --tasks T1,T2 [--tokenizer M] [--limit N] [--json FILE]``."""
    from lrpath_megatron.commands.eval import load_config
    from lrpath_megatron.config import read_yaml
    from lrpath_megatron.downstream.run import evaluate_tasks

    if args.batches is not None:
        raise LrpathError("--batches counts held-out micro-batches of the loss; with --tasks give --limit "
                          "(documents per task) instead")
    tokenizer = args.tokenizer or _plan_tokenizer(read_yaml(args.config))
    if tokenizer is None:
        raise LrpathError(f"--tasks needs the tokenizer the data was tokenized with: give --tokenizer MODEL (or "
                          f"plan.evaluate.tokenizer / plan.export.tokenizer in {args.config})")
    cfg = load_config(args.config, args.overrides)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate_tasks(cfg, args.checkpoints, tokenizer, tasks, args.limit)
    for ckpt, r in results.items():
        print(f"{ckpt} (step {r['step']}):")
        print("\n".join(format_scores(r["tasks"])))
    if args.json_out:
        from lrpath_megatron.checkpoint.layout import write_json_atomic

        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json_out), results)
    return 0


def _plan_tokenizer(data: dict):
    plan = data.get("plan") or {}
    return (plan.get("evaluate") or {}).get("tokenizer") or (plan.get("export") or {}).get("tokenizer")
