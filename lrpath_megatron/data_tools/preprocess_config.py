"""What a preprocessing run is asked to do (:class:`PreprocessConfig`, validated) and what its outputs are named."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lrpath_megatron.config import ConfigError


@dataclass
class PreprocessConfig:
    inputs: list
    output_prefix: str
    tokenizer_model: str
    json_keys: list = field(default_factory=lambda: ["text"])
    workers: int = 1
    append_eod: bool = True
    on_error: str = "skip"  # skip | fail
    max_doc_chars: int = 0  # 0 = no limit
    input_format: str = "auto"  # auto (.txt[.gz] = text, else JSONL) | jsonl | text (one document per line)
    chunk_bytes: int = 64 << 20  # largest work unit (bytes of input); does not change the output
    progress: bool = True
    overwrite: bool = False  # replace existing output files (else refuse before reading any input)
    max_listed: int = 10  # problems listed per kind in the summary (all are counted)
    backend: str = "exact"  # exact | fast | auto (see encoders); the CLI defaults to auto
    eod_token: str | None = None  # the EOD token's text; default: the tokenizer's eos
    # None: auto / fast check the verification sample (sample_check); N: also re-encode about N documents while
    # tokenizing and report them; -1: every document; 0: no check
    verify: int | None = None
    shard_tokens: int = 0  # sharded output: a new shard after a document brings one to this many tokens
    sharded: bool = False  # one output shard (or more, with shard_tokens) per input file; resumable
    task_index: int = 0  # this task's share of the input files (file i goes to task i % task_count)
    task_count: int = 1

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("--input: give at least one file or glob")
        if not self.output_prefix:
            raise ConfigError("--output-prefix is empty")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ConfigError(f"--json-keys={self.json_keys}: give one or more distinct keys")
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"--on-error={self.on_error!r}: choose skip or fail")
        if self.input_format not in ("auto", "jsonl", "text"):
            raise ConfigError(f"--input-format={self.input_format!r}: choose auto, jsonl or text")
        if self.workers < 1 or self.chunk_bytes < 1 or self.max_doc_chars < 0:
            raise ConfigError("--workers and --chunk-bytes must be >= 1, --max-doc-chars >= 0")
        if (self.verify is not None and self.verify < -1) or self.shard_tokens < 0:
            raise ConfigError("--verify takes a count or 'all'; --shard-tokens must be >= 0")
        if not 0 <= self.task_index < self.task_count:
            raise ConfigError(f"--task-index {self.task_index} must be in [0, --task-count {self.task_count})")
        if self.task_count > 1 and not self.is_sharded:
            raise ConfigError("--task-count > 1 splits input files into shards: add --sharded or --shard-tokens")

    @property
    def is_sharded(self) -> bool:
        return self.sharded or self.shard_tokens > 0


def output_prefix(prefix: str | Path, key: str) -> str:
    return f"{prefix}_{key}_document"
