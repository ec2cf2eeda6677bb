#!/usr/bin/env python3
"""Megatron-LM's ``tools/preprocess_data.py`` command line, run by ``lrpath data preprocess``.

Writes ``{output-prefix}_{key}_document.bin/.idx`` from JSONL (``.gz``, ``.zst`` and globs too) with a
SentencePiece model or a Hugging Face tokenizer.json, always with the exact (reference) backend, so the
output is that of Megatron-LM's tool. Flags keep Megatron-LM's names and meaning, ``--append-eod`` included (off unless given); flags of
that tool this one does not implement are refused with the reason. Bad input lines are skipped and counted,
and existing outputs are refused unless ``--overwrite``, as in ``lrpath data preprocess`` (docs/data.md).

    python data_tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model --workers 8 --append-eod
"""
from __future__ import annotations

import argparse
import os
import sys

from lrpath_megatron import cli
from lrpath_megatron.data_tools.tokenizer_types import TOKENIZER_TYPES

# Flags of Megatron-LM's tool that change what it does in ways this one does not: flag -> why refused.
REFUSED = {
    "--split-sentences": "sentence splitting (NLTK) is not supported: every document is tokenized whole",
    "--find-optimal-num-workers": "there is no worker-count search: the output is byte-identical for any "
                                  "--workers, so pick the number of cores",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s) or globs (.gz ok)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the documents")
    p.add_argument("--output-prefix", required=True, help="outputs are PREFIX_{key}_document.bin/.idx")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                   help="optional; must match --tokenizer-model. The SentencePiece types tokenize alike here and "
                        "in Megatron-LM: the model's ids, EOD = its eos id")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model or Hugging Face tokenizer.json (or its directory)")
    p.add_argument("--append-eod", action="store_true", help="append the EOD (eos) id after every document")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--partitions", type=int, default=1,
                   help="only 1: the input is split into work units for --workers without partition files")
    p.add_argument("--keep-sequential-samples", action="store_true", help="always so: documents keep input order")
    p.add_argument("--keep-newlines", action="store_true", help="no effect (applies to --split-sentences only)")
    p.add_argument("--lang", help="no effect (applies to --split-sentences only)")
    p.add_argument("--log-interval", type=int, help="no effect: a progress bar reports throughput")
    for flag in REFUSED:
        p.add_argument(flag, action="store_true", help=f"refused: {REFUSED[flag]}")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (else refused)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag, why in REFUSED.items():
        if getattr(args, flag[2:].replace("-", "_")):
            p.error(f"{flag}: {why}")
    if args.partitions != 1:
        p.error(f"--partitions {args.partitions}: drop it; the input is split into work units for --workers "
                f"without partition files, and the output is the same for any number of them")
    lrpath = ["data", "preprocess", "--input", *args.input, "--json-keys", *args.json_keys,
              "--output-prefix", args.output_prefix, "--tokenizer-model", args.tokenizer_model,
              "--workers", str(args.workers), "--append-eod" if args.append_eod else "--no-append-eod",
              "--input-format", "jsonl", "--backend", "exact"]
    if args.tokenizer_type:
        lrpath += ["--tokenizer-type", args.tokenizer_type]
    if args.overwrite:
        lrpath.append("--overwrite")
    return cli.main(lrpath)


if __name__ == "__main__":
    sys.exit(main())
