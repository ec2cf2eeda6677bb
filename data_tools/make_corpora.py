#!/usr/bin/env python3
"""Rebuild the corpora shipped in ``data/corpora/`` from this interpreter's standard library.

Four gzipped JSONL corpora (docs, code_a, code_b, c_headers); see
:mod:`lrpath_megatron.data_tools.make_corpora` for what each holds. The shipped files were made with
Python 3.11.7 and are rebuilt byte for byte by the same interpreter build.

    python data_tools/make_corpora.py [--out data/corpora]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrpath_megatron.data_tools.demo import CORPORA_DIR
from lrpath_megatron.data_tools.make_corpora import write_corpora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CORPORA_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print("warning: the shipped corpora were made with Python 3.11; other versions give other text",
              file=sys.stderr)
    for name, (documents, chars, size) in write_corpora(args.out).items():
        print(f"{name}: {documents} documents, {chars / 1e6:.2f} M characters, {size / 1e6:.2f} MB gzipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
