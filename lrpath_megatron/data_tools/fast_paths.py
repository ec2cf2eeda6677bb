"""Which tokenizers the fast backend (gigatoken 0.10) encodes exactly as the reference does, and how.

``--backend auto`` takes a fast path only for a class of tokenizers shown identical to the reference
(tests/test_tokenize_exact.py; random Unicode documents, 20,000 per SentencePiece class and 5,000 per
tokenizer.json class, showed no difference):

- ``fast``: gigatoken as it reads the model. SentencePiece BPE with byte fallback and identity normalisation
  (no character map, no dummy prefix, no extra-whitespace removal) and no user-defined piece holding a
  space; a tokenizer.json whose normaliser is absent or only Prepend / Replace of a string, and whose added
  tokens have no lstrip / rstrip / single_word.
- ``fast-normalized``: any other SentencePiece BPE model with byte fallback (``nmt_nfkc``, SentencePiece's
  default, included): SentencePiece's own normaliser, then gigatoken on a copy of the model whose normaliser
  is the identity. gigatoken's own normaliser differs around combining marks and Hangul (on 40% of random
  Unicode documents with nmt_nfkc), and it
  matches user-defined pieces holding spaces, which SentencePiece never does (it escapes spaces first).
- ``exact``: everything else (unigram models, other tokenizer.json normalisers, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

# sentencepiece_model.proto: ModelProto fields, and those of its pieces / trainer spec / normalizer spec.
_PIECES, _TRAINER, _NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_TYPE, _USER_DEFINED = 1, 3, 4
_MODEL_TYPE, _BPE, _WHITESPACE_SUFFIX, _BYTE_FALLBACK = 3, 2, 24, 35
_NORM_NAME, _CHARSMAP, _DUMMY_PREFIX, _REMOVE_WHITESPACE, _ESCAPE_WHITESPACE = 1, 2, 3, 4, 5
_VARINT, _LENGTH = 0, 2
_FIXED = {1: 8, 5: 4}  # wire type -> bytes


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes, int, int]]:
    """(field number, value, start, end) of each field of a protobuf message, in order."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, i = _read_varint(buf, i)
        elif wire == _LENGTH:
            length, i = _read_varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire in _FIXED:
            value, i = buf[i:i + _FIXED[wire]], i + _FIXED[wire]
        else:
            raise ValueError(f"not a SentencePiece model: protobuf wire type {wire}")
        yield field, value, start, i


def _message(buf: bytes) -> dict:
    return {field: value for field, value, _, _ in _fields(buf)}  # last value wins, as in protobuf


@dataclass(frozen=True)
class SentencePieceSpec:
    """What decides how a SentencePiece model can be encoded fast (defaults are the proto's)."""

    bpe: bool
    byte_fallback: bool
    normalizer: str  # the rule's name, e.g. nmt_nfkc, identity
    charsmap: bool  # a character map to apply (any normalisation but the identity)
    dummy_prefix: bool
    remove_whitespace: bool
    user_defined: tuple  # user-defined pieces (text by design: "\n", --special-tokens)
    plain_spaces: bool  # spaces are kept as they are (not escaped as U+2581) or mark word ends

    def changes(self) -> list[str]:
        """How the normaliser changes text before encoding (empty: only spaces become U+2581)."""
        changes = [f"normalisation {self.normalizer or '(a character map)'}"] if self.charsmap else []
        changes += ["a dummy prefix"] if self.dummy_prefix else []
        changes += ["extra-whitespace removal"] if self.remove_whitespace else []
        spaced = [p for p in self.user_defined if " " in p]
        return changes + ([f"user-defined pieces holding spaces ({spaced[0]!r})"] if spaced else [])

    @property
    def chunkable(self) -> bool:
        """Encoding a long document in pieces cut at newlines gives the ids of encoding it whole: the text is
        not normalised and "\\n" is a piece of its own that no other piece contains."""
        return (not self.changes() and "\n" in self.user_defined
                and not any("\n" in p for p in self.user_defined if p != "\n"))


def read_sentencepiece_spec(model: bytes) -> SentencePieceSpec:
    trainer, norm, user_defined = {}, {}, []
    for field, value, _, _ in _fields(model):
        if field == _PIECES:
            piece = _message(value)
            if piece.get(_PIECE_TYPE) == _USER_DEFINED:
                user_defined.append(piece[_PIECE_TEXT].decode("utf-8"))
        elif field == _TRAINER:
            trainer = _message(value)
        elif field == _NORMALIZER:
            norm = _message(value)
    return SentencePieceSpec(trainer.get(_MODEL_TYPE, 1) == _BPE, bool(trainer.get(_BYTE_FALLBACK, 0)),
                             norm.get(_NORM_NAME, b"").decode("utf-8"), bool(norm.get(_CHARSMAP)),
                             bool(norm.get(_DUMMY_PREFIX, 1)), bool(norm.get(_REMOVE_WHITESPACE, 1)),
                             tuple(user_defined),
                             not norm.get(_ESCAPE_WHITESPACE, 1) or bool(trainer.get(_WHITESPACE_SUFFIX, 0)))


def identity_normalizer_model(model: bytes) -> bytes:
    """The model with its normaliser replaced by the identity (spaces still become U+2581): what gigatoken
    encodes text already normalised by SentencePiece with (only for models whose spaces are escaped)."""
    spec = (_varint(_NORM_NAME << 3 | _LENGTH) + _varint(8) + b"identity" + _varint(_DUMMY_PREFIX << 3) + b"\0"
            + _varint(_REMOVE_WHITESPACE << 3) + b"\0")  # escape_whitespaces: unset, i.e. true
    kept = b"".join(model[start:end] for field, _, start, end in _fields(model) if field != _NORMALIZER)
    return kept + _varint(_NORMALIZER << 3 | _LENGTH) + _varint(len(spec)) + spec


def sentencepiece_path(spec: SentencePieceSpec) -> tuple[str, str]:
    """(fast | fast-normalized | exact, why) for a SentencePiece model."""
    if not spec.bpe:
        return "exact", "not a BPE model (gigatoken reads BPE models only)"
    if not spec.byte_fallback:
        return "exact", "a BPE model without byte fallback (gigatoken needs byte fallback)"
    if spec.plain_spaces:
        return "exact", "spaces not escaped, or marking word ends (gigatoken reads neither)"
    changes = spec.changes()
    if not changes:
        return "fast", "identity normalisation, which gigatoken applies as sentencepiece does"
    return "fast-normalized", (f"{', '.join(changes)}: SentencePiece's own normaliser, then gigatoken on the "
                               f"normalised text")


def huggingface_path(tokenizer: dict) -> tuple[str, str]:
    """(fast | exact, why) for the contents of a tokenizer.json."""
    norm = tokenizer.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    odd = [s.get("type") for s in steps
           if s.get("type") != "Prepend" and not (s.get("type") == "Replace" and "String" in s.get("pattern", {}))]
    if odd:
        return "exact", f"normaliser {odd[0]}, not shown identical in gigatoken"
    flagged = [t["content"] for t in tokenizer.get("added_tokens", []) if not t.get("special")
               and any(t.get(flag) for flag in ("lstrip", "rstrip", "single_word"))]
    if flagged:
        return "exact", f"added token {flagged[0]!r} has lstrip/rstrip/single_word, not shown identical in gigatoken"
    return "fast", "no normaliser that gigatoken applies otherwise"
