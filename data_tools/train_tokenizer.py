#!/usr/bin/env python3
"""Train a SentencePiece model (BPE or unigram) for preprocessing: ``lrpath data train-tokenizer``.

The options are that command's, parsed by its own argparse parser (``--help`` lists them), so the two
never differ. Every model gets the project's fixed ids: 0 pad, 1 unk, 2 bos, 3 eos = EOD, 4 newline.

    python data_tools/train_tokenizer.py --input 'raw/*.jsonl.gz' --model-prefix tok/spm32k --vocab-size 32000
"""
from __future__ import annotations

import sys

from lrpath_megatron import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["data", "train-tokenizer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
