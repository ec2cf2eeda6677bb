"""SentencePiece tokenizers: training with the project's conventions, and a loader for preprocessing.

Conventions of every model trained here (fixed ids, so configs and datasets agree across tokenizers):

    0 = pad "<pad>"   1 = unk "<unk>"   2 = bos "<s>"   3 = eos "</s>" = EOD (appended after every document)
    4 = "\\n" (a user-defined piece: newlines never merge, so long documents can be encoded in chunks)
    then any extra special tokens, then 256 byte pieces when byte fallback is on, then learned pieces.

Normalisation is the identity, no dummy prefix is added and whitespace runs are kept, so with byte
fallback ``decode(encode(text)) == text`` for any text that does not itself contain U+2581 ("▁", the
piece-internal space marker, which decodes to a plain space).
"""
from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from lrpath_megatron.config import ConfigError
from lrpath_megatron.errors import LrpathError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE = "\n"
# Long documents are encoded in pieces of about this many characters, cut after a newline. SentencePiece
# encodes 64K-character pieces about twice as fast per character as 1M-character ones (measured).
CHUNK_CHARS = 1 << 16


@dataclass
class TokenizerSpec:
    vocab_size: int = 32000
    model_type: str = "bpe"  # bpe | unigram
    character_coverage: float = 0.9999
    byte_fallback: bool = True
    sample_sentences: int = 2_000_000  # lines sampled (reservoir) for training; 0 = all lines read
    max_sentence_length: int = 8192  # bytes; longer lines are left out of training
    eod_piece: str = "</s>"  # the eos piece, used as end-of-document
    special_tokens: list = field(default_factory=list)  # extra user-defined pieces, e.g. "<|sep|>"
    seed: int = 1234
    threads: int = 0  # 0 = all cores

    def validate(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ConfigError(f"model_type={self.model_type!r}: choose bpe or unigram")
        reserved = 5 + len(self.special_tokens) + (256 if self.byte_fallback else 0)
        if self.vocab_size <= reserved:
            raise ConfigError(
                f"vocab_size={self.vocab_size} leaves no learned pieces: {reserved} ids are reserved "
                f"(specials, newline{', 256 byte pieces' if self.byte_fallback else ''}); raise it"
            )
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError(f"character_coverage={self.character_coverage} must be in [0.9, 1.0]")
        if self.sample_sentences < 0:
            raise ConfigError("sample_sentences must be >= 0 (0 = use every line)")
        if not self.eod_piece or self.eod_piece in self.special_tokens:
            raise ConfigError("eod_piece must be a non-empty piece that is not also in special_tokens")


def training_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """SentencePiece trains on lines; newlines are a fixed piece, so documents are split at them."""
    for doc in documents:
        for line in doc.split(NEWLINE):
            try:
                size = len(line.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form to train on
                continue
            if 0 < size <= max_bytes:
                yield line


def train_tokenizer(documents: Iterable[str], model_prefix: str | Path, spec: TokenizerSpec) -> Path:
    """Train a model on ``documents``; writes ``{model_prefix}.model`` atomically and returns its path."""
    spec.validate()
    model_path = Path(f"{model_prefix}.model")
    lines = training_lines(documents, spec.max_sentence_length)
    first = next(lines, None)
    if first is None:  # SentencePiece would fail with an internal check message
        raise LrpathError(f"no text to train on: the documents hold no non-empty line of at most "
                          f"{spec.max_sentence_length} bytes; nothing was written")
    proto = io.BytesIO()
    spm.set_random_generator_seed(spec.seed)  # the sentence sampling is reservoir sampling
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines),
            model_writer=proto,
            vocab_size=spec.vocab_size,
            model_type=spec.model_type,
            character_coverage=spec.character_coverage,
            byte_fallback=spec.byte_fallback,
            input_sentence_size=spec.sample_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=spec.max_sentence_length,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=False,
            user_defined_symbols=[NEWLINE, *spec.special_tokens],
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece=spec.eod_piece,
            num_threads=spec.threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except (RuntimeError, OSError) as exc:  # how sentencepiece reports bad settings / too little text
        raise LrpathError(f"SentencePiece training failed: {exc}; check the inputs and --vocab-size") from exc
    model_path.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed training creates nothing
    tmp = model_path.with_name(f"{model_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(proto.getvalue())
    os.replace(tmp, model_path)
    # A .vocab listing (piece<TAB>score, one line per id) for humans; newline and tab pieces are escaped.
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    escape = str.maketrans({"\n": "\\n", "\t": "\\t"})
    vocab = "".join(f"{sp.id_to_piece(i).translate(escape)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
    model_path.with_suffix(".vocab").write_text(vocab, encoding="utf-8")
    return model_path


class Tokenizer:
    """A loaded SentencePiece model: encode documents to token arrays, decode ids back to text."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise LrpathError(f"tokenizer model {path} does not exist; train one with `lrpath data train-tokenizer`")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise LrpathError(f"{path} is not a SentencePiece model: {exc}") from exc
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.eod_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as int64; texts over CHUNK_CHARS are encoded piecewise (bounded memory).

        Chunks end just after a newline (else after a space), where the "\\n" piece and whitespace
        splitting already separate pieces, so the ids equal those of encoding the whole text at once.
        """
        if len(text) <= CHUNK_CHARS:
            return np.asarray(self.sp.encode(text), dtype=np.int64)
        parts, pos = [], 0
        while pos < len(text):
            end = min(pos + CHUNK_CHARS, len(text))
            if end < len(text):
                cut = text.rfind(NEWLINE, pos, end)
                cut = cut + 1 if cut >= 0 else text.rfind(" ", pos + 1, end)
                end = cut if cut > pos else end
            parts.append(np.asarray(self.sp.encode(text[pos:end]), dtype=np.int64))
            pos = end
        return np.concatenate(parts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])
