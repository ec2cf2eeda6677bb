"""Demo data: one SentencePiece model over the shipped corpora and a tokenized dataset per corpus.

Built once per (corpora content, settings) and reused: a manifest holds a content hash, and a file lock
makes concurrent callers (parallel tests, ranks) wait for one build instead of racing.
"""
from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from lrpath_megatron.data_tools.preprocess import preprocess
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig, output_prefix
from lrpath_megatron.data_tools.tokenizer import Tokenizer, TokenizerSpec, train_tokenizer

# data/ of the source tree: the package is installed editable (pip install -e .).
CORPORA_DIR = Path(__file__).resolve().parents[2] / "data" / "corpora"
CORPORA = ("docs", "code_a", "code_b", "c_headers")
FORMAT_VERSION = 1  # bump when the build below changes its output


def corpus_path(name: str) -> Path:
    return CORPORA_DIR / f"{name}.jsonl.gz"


def iter_corpus(name: str) -> Iterator[str]:
    """The texts of one shipped corpus, in file order."""
    with gzip.open(corpus_path(name), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _spec(vocab_size: int) -> TokenizerSpec:
    return TokenizerSpec(vocab_size=vocab_size, model_type="bpe", character_coverage=0.9995,
                         sample_sentences=200_000, threads=2)


def _content_hash(vocab_size: int) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    h.update(json.dumps(dataclasses.asdict(_spec(vocab_size)), sort_keys=True).encode())
    for name in CORPORA:
        h.update(name.encode() + corpus_path(name).read_bytes())
    return h.hexdigest()


def prepare_demo_data(out_dir: str | Path, vocab_size: int = 2048) -> dict:
    """Train (or reuse) the demo tokenizer and tokenize each shipped corpus into ``out_dir``.

    Returns ``{"tokenizer_model": str, "prefixes": {name: prefix}, "tokens": {name: n},
    "documents": {name: n}, "eod_id": int, "vocab_size": int}``; prefixes are
    ``{out_dir}/{name}_text_document`` (megatron-core .bin/.idx path prefixes).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "demo_data.json"
    digest = _content_hash(vocab_size)
    with open(out / ".demo_data.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        cached = _load_manifest(manifest, digest)
        if cached is not None:
            return cached
        model = train_tokenizer(
            (text for name in CORPORA for text in iter_corpus(name)), out / "demo_tokenizer", _spec(vocab_size)
        )
        result = {"tokenizer_model": str(model), "prefixes": {}, "tokens": {}, "documents": {},
                  "eod_id": 0, "vocab_size": 0}
        for name in CORPORA:
            summary = preprocess(PreprocessConfig(inputs=[str(corpus_path(name))], output_prefix=str(out / name),
                                                  tokenizer_model=str(model), workers=1, progress=False,
                                                  overwrite=True))  # a stale build of this cache
            result["prefixes"][name] = output_prefix(out / name, "text")
            result["tokens"][name] = summary.tokens["text"]
            result["documents"][name] = summary.documents
        tok = Tokenizer(model)
        result["eod_id"], result["vocab_size"] = tok.eod_id, tok.vocab_size
        tmp = manifest.with_name(f"{manifest.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"hash": digest, "result": result}, indent=2))
        os.replace(tmp, manifest)  # written last: its presence means every file above is complete
        return result


def _load_manifest(manifest: Path, digest: str) -> dict | None:
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    result = data.get("result", {})
    files = [result.get("tokenizer_model", "")] + [
        p + ext for p in result.get("prefixes", {}).values() for ext in (".bin", ".idx")
    ]
    if data.get("hash") != digest or not all(os.path.isfile(f) for f in files):
        return None
    return result
