"""``lrpath adapt PLAN.yaml --version V --method M``: a cheap update of a released version (LoRA, ConPET, LP-FT)."""
from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    from lrpath_megatron.adapters import METHODS

    p = sub.add_parser("adapt", help="update a released version cheaply: LoRA, ConPET (static/dynamic), LP-FT, full",
                       description="Train version V's data as an update of the base release (adapt.base, default "
                                   "the version before V); settings in the plan's adapt: section.")
    p.add_argument("plan", help="version plan YAML (with an optional adapt: section)")
    p.add_argument("--version", required=True, help="the plan version whose data the update learns")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--run-dir", default="runs/train", help="the plan's run directory (updates go to RUN/adapt/)")
    p.add_argument("--base-checkpoint", type=Path, default=None,
                   help="release checkpoint to adapt (default: the base's release as `lrpath status` finds it, "
                        "RUN/<base>/checkpoints/iter_<step> of its decay branch or merge)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set adapt.lora.rank=8 (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.adapt import run_update
    from lrpath_megatron.adapters.update import load_adapt_plan, resolve_update
    from lrpath_megatron.config import config_source

    plan, adapt = load_adapt_plan(args.plan, args.overrides)
    with config_source(args.plan, args.overrides):  # settings checked only when the update runs
        update = resolve_update(plan, adapt, args.version, args.method, Path(args.run_dir), args.base_checkpoint)
        result = run_update(update)
    print(format_result(result))
    sys.stdout.flush()
    return 0


def format_result(result: dict) -> str:
    p = result["params"]
    lines = [f"{result['method']} update {result['version']} on {result['base']} ({result['steps']} steps, "
             f"{result['train_seconds']:.0f} s)",
             f"trainable parameters {p['trainable']:,} of {p['total']:,} (ratio {p['ratio']:.4%}); optimizer state "
             f"{p['optimizer_state_bytes'] / 2**20:.3f} MiB, grad buffer {p['grad_buffer_bytes'] / 2**20:.3f} MiB",
             f"{'corpus':<12}{'before':>10}{'after':>10}"]
    for corpus, after in result["val_loss"].items():
        tag = " (new)" if corpus in result["new_corpora"] else ""
        lines.append(f"{corpus:<12}{result['base_val_loss'][corpus]:>10.4f}{after:>10.4f}{tag}")
    if "selector" in result:
        acc = ", ".join(f"{k} {v:.0%}" for k, v in result["selector"]["heldout_accuracy"].items())
        lines.append(f"selector held-out accuracy: {acc}")
    return "\n".join(lines)
