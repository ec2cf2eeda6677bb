"""``lrpath``: one subcommand per module in :mod:`lrpath_megatron.commands`, each a thin call into the library."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lrpath_megatron.errors import USER_ERRORS

# Each module defines ``register(subparsers)`` which adds its parser and sets ``func``.
COMMAND_MODULES = [
    "lrpath_megatron.commands.plan",
    "lrpath_megatron.commands.train",
    "lrpath_megatron.commands.branch",
    "lrpath_megatron.commands.launch",
    "lrpath_megatron.commands.merge",
    "lrpath_megatron.commands.data",
    "lrpath_megatron.commands.adapt",
    "lrpath_megatron.commands.status",
    "lrpath_megatron.commands.export",
    "lrpath_megatron.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrpath", description="Version updates of GPT models on megatron-core."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        # Every rank of a distributed run hits the same check; one message is enough.
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"lrpath {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
