"""``lrpath``: one subcommand per module in :mod:`lrpath_megatron.commands`, each a thin call into the library."""
from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
import time
import warnings

from lrpath_megatron.errors import USER_ERRORS

# megatron-core warns on every import that it falls back to torch kernels without TE/apex (the README says
# when those are used), about a default of its own config, and torch about APIs megatron-core's checkpoint
# loader still calls; keep logs to what concerns the run.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated", "`load_state_dict` is deprecated",
                 "Please use DTensor instead"):
    warnings.filterwarnings("ignore", message=_message)

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
    "lrpath_megatron.commands.forecast",
    "lrpath_megatron.commands.report",
    "lrpath_megatron.commands.export",
    "lrpath_megatron.commands.hf",
    "lrpath_megatron.commands.eval",
    "lrpath_megatron.commands.downstream",
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
    try:
        code = _run(build_parser().parse_args(argv))
        sys.stdout.flush()  # a reader that has gone away shows here, not in Python's flush at exit
        return code
    except BrokenPipeError:
        if not _reader_gone(sys.stdout):
            raise  # another pipe broke (e.g. to a checkpoint writer): not a reader that has had enough
        # `lrpath plan PLAN | head -1`: end quietly, as other tools do. Python flushes stdout once more at
        # exit, so from here on it writes to devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reading end is closed (poll reports an error on its writing end)."""
    poll = select.poll()
    poll.register(stream.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        # Every rank of a distributed run hits the same check; one message is enough. The other ranks
        # exit a moment later: torchrun and srun kill the remaining ranks as soon as one exits, which
        # could otherwise stop rank 0 before it has printed.
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"lrpath {args.command}: error: {exc}", file=sys.stderr, flush=True)
        else:
            time.sleep(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
