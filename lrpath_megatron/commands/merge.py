"""``lrpath merge CKPT... --weights SPEC --out OUT`` (or ``--print``): release a version by merging checkpoints."""
from __future__ import annotations

import sys
from pathlib import Path

from lrpath_megatron.errors import LrpathError
from lrpath_megatron.merge_weights import SPEC_HELP, merge_weights


def register(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge main-path checkpoints into a released version (WSM), or print the merge weights",
        description="Weighted merge of k+1 checkpoints of one constant-LR path, oldest first. The weights emulate "
                    "an LR decay over the window (see docs/merge.md). Dist checkpoints are merged chunk by chunk "
                    "at any TP/PP; exported .pt files merge the same way. Optimizer state is not merged.")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="iter_NNNNNNN directories (or their model/ dirs), or exported .pt files, oldest first")
    p.add_argument("--weights", required=True, metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--out", help="output directory (dist checkpoints) or file (exported checkpoints); must not exist")
    p.add_argument("--skip-existing", action="store_true",
                   help="exit 0 if OUT already holds this merge (OUT/manifest.json of the same checkpoints and "
                        "weights): reruns and requeued jobs do not fail")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the coefficients and emulated LR multipliers, merge nothing")
    p.add_argument("--num-checkpoints", type=int, metavar="N",
                   help="with --print and no CKPT: how many checkpoints the weights are for")
    p.add_argument("--group-mib", type=int, default=256,
                   help="flush an output file every this many MiB (bounds memory; default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    n = len(args.checkpoints) or args.num_checkpoints
    if n is None:
        raise LrpathError("give the checkpoints to merge (oldest first), or --num-checkpoints N with --print")
    if args.checkpoints and args.num_checkpoints not in (None, len(args.checkpoints)):
        raise LrpathError(
            f"--num-checkpoints {args.num_checkpoints} disagrees with the {len(args.checkpoints)} checkpoints given"
        )
    weights = merge_weights(args.weights, n)
    if args.print_only:
        print(weights.table(args.checkpoints or None))
        return 0
    if not args.out:
        raise LrpathError("--out is required to merge (or pass --print to only show the weights)")
    if args.group_mib <= 0:
        raise LrpathError("--group-mib must be > 0")
    from lrpath_megatron.merge import already_merged, merge_checkpoints

    if args.skip_existing and already_merged(args.checkpoints, weights.spec, Path(args.out)):
        print(f"already merged: {args.out}")
        return 0
    result = merge_checkpoints(args.checkpoints, weights, args.out, group_bytes=args.group_mib * 2**20,
                               progress=not args.no_progress)
    print(f"merged {len(args.checkpoints)} checkpoints ({weights.spec}) into {result.output}: "
          f"{len(result.merged)} tensors merged, {len(result.copied)} entries copied from the last checkpoint")
    if result.copied:
        print(f"copied from {args.checkpoints[-1]}: {', '.join(result.copied[:6])}"
              f"{' ...' if len(result.copied) > 6 else ''}", file=sys.stderr)
    return 0
