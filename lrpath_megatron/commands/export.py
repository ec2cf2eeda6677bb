"""``lrpath export CKPT_DIR --out FILE.pt``: a checkpoint of any TP/PP as one plain torch file."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint (e.g. a released version) as one plain .pt file",
                       description="Loads the checkpoint at TP=PP=1 in one process and saves "
                                   "{'config', 'model', 'source'} with torch.save; `lrpath merge` accepts these files.")
    p.add_argument("checkpoint", metavar="CKPT_DIR", help="an iter_NNNNNNN directory from `lrpath train` or `lrpath merge`")
    p.add_argument("--out", required=True, metavar="FILE.pt", help="output file (must not exist)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lrpath_megatron.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {result.output}: {result.tensors} tensors, "
          f"{result.parameters:,} parameters")
    return 0
