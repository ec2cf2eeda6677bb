"""``lrpath data {train-tokenizer,preprocess,inspect,split-versions,demo}``: thin calls into
:mod:`lrpath_megatron.data_tools`.

Flags shared with Megatron-LM's ``tools/preprocess_data.py`` keep their names and meaning; ``--tokenizer-type``
is accepted for its command lines only (:mod:`lrpath_megatron.data_tools.tokenizer_types`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
from collections import Counter
from dataclasses import asdict

from lrpath_megatron.config import ConfigError
from lrpath_megatron.data_tools.tokenizer_types import TOKENIZER_TYPES, check_tokenizer_type
from lrpath_megatron.errors import LrpathError


def _tokenizer_type(value: str) -> str:
    if value not in TOKENIZER_TYPES:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not supported: preprocess reads a SentencePiece .model or a Hugging Face tokenizer.json "
            f"(--tokenizer-model); accepted for Megatron-LM compatibility: {', '.join(TOKENIZER_TYPES)}")
    return value


def _verify(value: str) -> int:
    if value == "all":
        return -1
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of documents or 'all'")
    return int(value)


def _slurm_task() -> tuple[int, int]:
    """(index, count) of this task of a SLURM array job; (0, 1) outside one."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return 0, 1
    return int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env["SLURM_ARRAY_TASK_COUNT"])


def register(sub) -> None:
    p = sub.add_parser("data", help="train a tokenizer, preprocess text to .bin/.idx, inspect, split per version",
                       description="Data tools; see docs/data.md.")
    cmds = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    t = cmds.add_parser("train-tokenizer", help="train a SentencePiece model (BPE or unigram) on JSONL/text")
    _inputs(t)
    t.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--character-coverage", type=float, default=0.9999)
    t.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="unknown characters become UTF-8 byte pieces (lossless decode)")
    t.add_argument("--sample-sentences", type=int, default=2_000_000,
                   help="lines sampled for training (reservoir over all lines read; 0 = all)")
    t.add_argument("--max-input-docs", type=int, default=0, help="stop reading after this many documents (0 = all)")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra pieces that never split")
    t.add_argument("--eod-piece", default="</s>", help="name of the eos piece (id 3), appended as EOD")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--threads", type=int, default=0, help="0 = all cores")
    t.set_defaults(func=_train_tokenizer)

    pp = cmds.add_parser("preprocess", help="JSONL (.gz, globs) or text -> {output-prefix}_{key}_document.bin/.idx")
    _inputs(pp)
    pp.add_argument("--output-prefix", required=True)
    pp.add_argument("--tokenizer-model", required=True,
                    help="SentencePiece .model, or a Hugging Face tokenizer.json (or a directory holding one)")
    pp.add_argument("--tokenizer-type", type=_tokenizer_type, metavar="{" + ",".join(TOKENIZER_TYPES) + "}",
                    help="optional; accepted so Megatron-LM command lines run unchanged: must match the kind of "
                         "--tokenizer-model. The three SentencePiece types tokenize alike in Megatron-LM's "
                         "preprocess_data.py (megatron-core 0.16.1): the model's ids as is, EOD = its eos id")
    pp.add_argument("--eod-token", help="text of the EOD token (default: the tokenizer's eos; for a tokenizer.json, "
                                        "the eos_token of the tokenizer_config.json next to it)")
    pp.add_argument("--backend", choices=["exact", "fast", "auto"], default="auto",
                    help="exact: sentencepiece / tokenizers (the reference); fast: gigatoken (extra 'fast') as it "
                         "reads the model; auto: a fast path only for tokenizers shown exact with it, else exact")
    pp.add_argument("--verify", type=_verify, default=None, metavar="N|all",
                    help="default: auto and fast check a sample of 300 documents against the exact backend before "
                         "writing (auto: a difference means exact; fast: an error). N: also re-encode about N "
                         "documents while tokenizing and report the mismatch rate; 'all': every document (fast "
                         "fails at a difference); 0: no check")
    pp.add_argument("--sharded", action="store_true",
                    help="one output shard per input file: {output-prefix}_{key}_document_FFFFF_PPPPP; a rerun "
                         "keeps complete shards (checksummed) and rebuilds the rest")
    pp.add_argument("--shard-tokens", type=int, default=0,
                    help="sharded output, a new shard after a document brings one to this many tokens")
    task = _slurm_task()
    pp.add_argument("--task-index", type=int, default=task[0],
                    help="sharded output: this task makes the shards of input files i with i %% task-count == "
                         "task-index (default: from SLURM_ARRAY_TASK_ID)")
    pp.add_argument("--task-count", type=int, default=task[1], help="default: SLURM_ARRAY_TASK_COUNT, else 1")
    pp.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    pp.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                    help="append the EOD (eos) id after every document (default on)")
    pp.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                    help="bad lines/files: skip and count them, or fail leaving no output")
    pp.add_argument("--max-doc-chars", type=int, default=0,
                    help="treat longer documents as bad input (0 = no limit; long ones are encoded in chunks)")
    pp.add_argument("--chunk-bytes", type=int, default=64 << 20, help="work-unit size (does not change the output)")
    pp.add_argument("--summary-json", help="also write the summary here")
    pp.add_argument("--overwrite", action="store_true",
                    help="replace existing output .bin/.idx files (by default preprocess refuses to)")
    pp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    pp.set_defaults(func=_preprocess)

    i = cmds.add_parser("inspect", help="documents, tokens, length histogram, held-out split, decoded samples")
    i.add_argument("prefix", nargs="+", help="dataset path prefix (without .bin/.idx); a quoted glob or several "
                   "prefixes: the shards of one corpus, reported as one with a line per shard")
    i.add_argument("--tokenizer-model", help="decode samples with this model")
    i.add_argument("--valid-fraction", type=float, help="report the held-out documents (megatron-core split)")
    i.add_argument("--samples", type=int, default=1)
    i.add_argument("--max-chars", type=int, default=400)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=_inspect)

    s = cmds.add_parser("split-versions", help="cut corpora into per-version datasets; print the plan's token counts")
    s.add_argument("--corpus", action="append", required=True, metavar="NAME=PREFIX", help="repeatable")
    s.add_argument("--version", action="append", required=True, metavar="NAME:CORPUS=SHARE[,...]",
                   help="in release order, e.g. --version v1:docs=0.5 --version v2:docs=0.5,code=1")
    s.add_argument("--output-dir", required=True)
    s.add_argument("--valid-fraction", type=float, default=0.02)
    s.add_argument("--overwrite", action="store_true", help="replace existing per-version datasets in --output-dir")
    s.set_defaults(func=_split_versions)

    d = cmds.add_parser("demo", help="tokenizer + datasets of the shipped corpora (cached)")
    d.add_argument("--out-dir", default="runs/demo/data")
    d.add_argument("--vocab-size", type=int, default=2048)
    d.set_defaults(func=_demo)


def _inputs(p) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories or globs: JSONL (.gz, .zst), Parquet (the --json-keys columns) or "
                        ".txt (one document per line)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the documents")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: .txt/.txt.gz are text, anything else JSONL")


def _train_tokenizer(args) -> int:
    from lrpath_megatron.data_tools.inputs import Problem, iter_texts
    from lrpath_megatron.data_tools.tokenizer import TokenizerSpec, train_tokenizer

    if len(args.json_keys) != 1:
        raise ConfigError("train-tokenizer reads one key; give a single --json-keys")
    spec = TokenizerSpec(args.vocab_size, args.model_type, args.character_coverage, args.byte_fallback,
                         args.sample_sentences, eod_piece=args.eod_piece, special_tokens=args.special_tokens,
                         seed=args.seed, threads=args.threads)
    problems: list[Problem] = []
    texts = iter_texts(args.input, args.json_keys[0], args.input_format, args.max_input_docs, problems)
    first = next(texts, None)
    if first is None:  # the message preprocessing gives for input without documents
        raise LrpathError(f"no documents to train on in --input: {'; '.join(map(str, problems[:3]))}; "
                          f"nothing was written")
    path = train_tokenizer(itertools.chain([first], texts), args.model_prefix, spec)
    print(f"wrote {path} and {path.with_suffix('.vocab')}")
    if problems:
        skipped = Counter(p.kind for p in problems)
        print("skipped: " + ", ".join(f"{k}={n}" for k, n in sorted(skipped.items())))
    return 0


def _preprocess(args) -> int:
    from lrpath_megatron.data_tools.preprocess import preprocess
    from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig

    check_tokenizer_type(args.tokenizer_type, args.tokenizer_model)
    cfg = PreprocessConfig(inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
                           json_keys=args.json_keys, workers=args.workers, append_eod=args.append_eod,
                           on_error=args.on_error, max_doc_chars=args.max_doc_chars, input_format=args.input_format,
                           chunk_bytes=args.chunk_bytes, progress=args.progress, overwrite=args.overwrite,
                           backend=args.backend, eod_token=args.eod_token, verify=args.verify, sharded=args.sharded,
                           shard_tokens=args.shard_tokens, task_index=args.task_index, task_count=args.task_count)
    # SIGTERM (scancel, timeout) unwinds like Ctrl-C, so temporary and partial files are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    summary = preprocess(cfg)
    print(summary.format())
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary.to_json(), f, indent=2)
    return 0


def _inspect(args) -> int:
    from lrpath_megatron.inspect_data import inspect_dataset

    prefix = args.prefix[0] if len(args.prefix) == 1 else args.prefix
    report = inspect_dataset(prefix, args.tokenizer_model, args.valid_fraction, args.samples, args.max_chars,
                             args.seed)
    print(json.dumps(asdict(report), indent=2) if args.json else report.format())
    return 0


def _split_versions(args) -> int:
    import yaml

    from lrpath_megatron.data_tools.versions import parse_version, split_versions

    corpora = {}
    for item in args.corpus:
        name, eq, prefix = item.partition("=")
        if not eq or not name or not prefix:
            raise LrpathError(f"--corpus {item!r}: write NAME=PREFIX")
        corpora[name] = prefix
    result = split_versions(corpora, [parse_version(v) for v in args.version], args.output_dir, args.valid_fraction,
                            overwrite=args.overwrite)
    for p in result.parts:
        print(f"{p.version} {p.corpus}: documents {p.first_doc}..{p.end_doc}, {p.tokens:,} tokens "
              f"({p.train_tokens:,} train) -> {p.prefix}")
    print(f"# plan snippet (also in {args.output_dir}/versions.yaml)")
    print(yaml.safe_dump(result.plan_snippet(), sort_keys=False), end="")
    return 0


def _demo(args) -> int:
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    print(json.dumps(prepare_demo_data(args.out_dir, args.vocab_size), indent=2))
    return 0
