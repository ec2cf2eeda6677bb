"""``lrpath eval CONFIG CKPT...``: validation loss of checkpoints on every corpus's held-out split, or with
``--tasks`` their scores on downstream tasks."""
from __future__ import annotations

from pathlib import Path

from lrpath_megatron.config import config_source, read_yaml


def register(sub) -> None:
    p = sub.add_parser("eval", help="validation loss per corpus of saved checkpoints (trained or merged)",
                       description="Loads each checkpoint into the config's model (any TP/PP it was saved with) "
                                   "and computes the loss on the first N held-out micro-batches of every corpus "
                                   "in data.corpora: the same batches as the trainer's periodic evaluation.")
    p.add_argument("config", help="the training config or version plan the checkpoints belong to")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="iter_NNNNNNN directories")
    p.add_argument("--batches", type=int, default=None, help="held-out micro-batches per corpus "
                                                              "(default: logging.eval_batches)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the results as JSON (must not exist)")
    p.add_argument("--tasks", help="downstream tasks instead of the held-out loss: comma-separated shipped task "
                                   "names or task directories (lm-evaluation-harness, the extra `eval`)")
    p.add_argument("--tokenizer", help="with --tasks: the SentencePiece .model the data was tokenized with "
                                       "(default: the plan's evaluate.tokenizer or export.tokenizer)")
    p.add_argument("--limit", type=int, help="with --tasks: the first N documents of each task (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.errors import LrpathError
    from lrpath_megatron.evaluate import evaluate_checkpoints

    if args.batches is not None and args.batches <= 0:
        raise LrpathError(f"--batches {args.batches}: give a positive number of micro-batches")
    if args.json_out and Path(args.json_out).exists():  # refused before the evaluation, not after it
        raise LrpathError(f"output {args.json_out} already exists; choose a new path or remove it")
    if args.tasks:
        return run_tasks(args)
    if args.tokenizer or args.limit is not None:
        raise LrpathError("--tokenizer and --limit go with --tasks; add --tasks or remove them")
    cfg = load_config(args.config, args.overrides)
    with config_source(args.config, args.overrides):  # settings checked only at run time, e.g. the world size
        results = evaluate_checkpoints(cfg, args.checkpoints, args.batches)
    if _rank() == 0:
        corpora = list(next(iter(results.values()))["val_loss_per_corpus"])
        print(f"{'checkpoint':<48} {'mean':>7} " + " ".join(f"{c:>10}" for c in corpora))
        for ckpt, r in results.items():
            print(f"{ckpt[-48:]:<48} {r['val_loss']:>7.4f} "
                  + " ".join(f"{r['val_loss_per_corpus'][c]:>10.4f}" for c in corpora))
        if args.json_out:
            from lrpath_megatron.checkpoint.layout import write_json_atomic

            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(args.json_out), results)
    return 0


def run_tasks(args) -> int:
    """``lrpath eval CONFIG CKPT... --tasks T1,T2 [--tokenizer M] [--limit N] [--json FILE]``."""
    from lrpath_megatron.downstream.run import evaluate_tasks
    from lrpath_megatron.downstream.table import format_scores
    from lrpath_megatron.errors import LrpathError

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


def load_config(path: str, overrides: list[str]):
    """The TrainConfig of a stand-alone config or of a plan."""
    from lrpath_megatron.config import load_train_config

    if "plan" in read_yaml(path):
        from lrpath_megatron.plan import load_plan

        return load_plan(path, overrides).train_config
    return load_train_config(path, overrides)


def _rank() -> int:
    from lrpath_megatron.distributed import read_env

    return read_env().rank
