"""The sidecar of a dataset, ``PREFIX.meta.json`` next to ``PREFIX.bin``/``PREFIX.idx``: how it was made.

``lrpath data preprocess`` writes it last, after the ``.bin`` and ``.idx``: the tokenizer (``kind``,
``path``, ``sha256`` of the tokenizer file, ``vocab_size``, ``eod_id``), the backend and why it was chosen
(``backend_choice``: the ``--backend`` requested, the reason, the verification sample and its result), dtype,
EOD setting, document and token counts and the files' checksums; a shard also records the input lines it holds, a
corpus manifest (``{output}.meta.json`` of sharded output, without a ``.bin``/``.idx`` of its own) lists
its shards. Training reads the tokenizer of every shard (:func:`lrpath_megatron.corpus_shards.check_tokenizers`).
Datasets made before sidecars were written have none: :func:`read_corpus_meta` returns None, and the data
is used as before.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lrpath_megatron.errors import LrpathError

SUFFIX = ".meta.json"


@dataclass(frozen=True)
class CorpusMeta:
    prefix: str
    tokenizer: dict  # kind, path, sha256, vocab_size, eod_id (encoders.TokenizerInfo)
    backend: str = ""  # what wrote it: exact, fast or fast-normalized
    backend_choice: dict = field(default_factory=dict)  # requested, reason, sample (sample_check.SampleCheck)
    dtype: str = ""
    append_eod: bool = True
    documents: int = 0
    tokens: int = 0
    files: dict = field(default_factory=dict)  # file_checksums(prefix); empty: a shard without documents
    source: dict = field(default_factory=dict)  # a shard's input file and lines
    inputs: list = field(default_factory=list)  # a manifest's input files
    shards: list = field(default_factory=list)  # a manifest's shards


def meta_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(prefix: str | Path) -> dict:
    """Size and sha256 of ``prefix``'s .bin and .idx: a shard whose files still match them is complete."""
    return {ext: {"size": os.path.getsize(str(prefix) + ext), "sha256": file_sha256(str(prefix) + ext)}
            for ext in (".bin", ".idx")}


def write_meta(prefix: str | Path, meta: dict) -> Path:
    """Write ``meta`` as the sidecar of ``prefix``, atomically (a reader sees all of it or none)."""
    path = meta_path(prefix)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_corpus_meta(prefix: str | Path) -> CorpusMeta | None:
    """The sidecar of ``prefix``; None without one (data made before sidecars were written)."""
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tokenizer = data["tokenizer"]  # what training reads: its sha256 and vocab_size
        if not isinstance(tokenizer.get("sha256"), str) or not isinstance(tokenizer.get("vocab_size"), int):
            raise ValueError("its tokenizer has no sha256 or no integer vocab_size")
        return CorpusMeta(prefix=str(prefix),
                          **{k: data[k] for k in CorpusMeta.__dataclass_fields__ if k in data and k != "prefix"})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LrpathError(f"{path} is not a readable dataset sidecar ({type(exc).__name__}: {exc}); make the "
                          f"dataset again with `lrpath data preprocess`, or remove the sidecar to use the data "
                          f"without the tokenizer checks") from None


def check_same_tokenizer(metas: list, where: str = "") -> None:
    """Refuse sidecars (of the shards of one corpus) that name different tokenizers, naming each shard."""
    if len({m.tokenizer["sha256"] for m in metas}) <= 1:
        return
    head = f"{where}: " if where else ""
    made = "; ".join(f"{m.prefix} by {m.tokenizer['path']} (sha256 {m.tokenizer['sha256'][:12]})" for m in metas)
    raise LrpathError(f"{head}its shards were made with different tokenizers: {made}; one corpus is one token "
                      f"stream: tokenize all its shards with one tokenizer, or make them separate corpora")
