"""Tokenizers for preprocessing: SentencePiece ``.model`` or Hugging Face ``tokenizer.json``, two backends.

- ``exact``: the reference libraries (``sentencepiece``; ``tokenizers`` for tokenizer.json).
- ``fast``: gigatoken (optional extra ``pip install lrpath_megatron[fast]``), which reads both formats, as
  it reads the model: its ids differ from the reference for some normalisers (measured with ``--verify``).
- ``auto``: a fast path only for the tokenizers :mod:`fast_paths` shows exact (``fast``, or
  ``fast-normalized``: SentencePiece's own normaliser, then gigatoken), else ``exact``; the verification
  sample (:mod:`sample_check`) then checks the path taken before anything is written.

Document text never becomes a special token's id, with either backend: SentencePiece never maps text to
control ids; the Hugging Face reference is told to encode special tokens' literal text as text
(``encode_special_tokens``); a fast-backend document whose ids hold a special id is re-encoded with the
reference (gigatoken matches special tokens' text, e.g. ``<s>`` -> control id 1).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lrpath_megatron.data_tools import fast_paths
from lrpath_megatron.data_tools.corpus_meta import file_sha256
from lrpath_megatron.data_tools.tokenizer import Tokenizer
from lrpath_megatron.errors import LrpathError

BACKENDS = ("exact", "fast", "auto")  # what --backend takes; what runs: exact, fast or fast-normalized
HF_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the sidecar of a dataset records about the tokenizer that made it."""

    kind: str  # sentencepiece | huggingface
    path: str
    sha256: str  # of the .model / tokenizer.json file
    vocab_size: int
    eod_id: int  # -1 = none

    def to_json(self) -> dict:
        return asdict(self)


def fast_available() -> bool:
    try:
        import gigatoken  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise LrpathError(f"--backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "fast" if fast_available() else "exact"
    if backend == "fast" and not fast_available():
        raise LrpathError("--backend fast needs gigatoken: pip install 'lrpath_megatron[fast]' "
                          "(or use --backend exact / auto)")
    return backend


def _hf_eos(tok_file: Path, tok, eod_token: str | None) -> int:
    """The eos id: ``eod_token`` if given, else ``eos_token`` of the tokenizer_config.json next to the file."""
    if eod_token is None:
        config = tok_file.with_name("tokenizer_config.json")
        if not config.is_file():
            return -1
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        eod_token = eos.get("content") if isinstance(eos, dict) else eos
        if not eod_token:
            return -1
    token_id = tok.token_to_id(eod_token)
    if token_id is None:
        raise LrpathError(f"{tok_file}: the eos token {eod_token!r} is not in its vocabulary; pass --eod-token")
    return token_id


class Encoder:
    """Encodes batches of documents to int64 id arrays with the chosen backend; also names ids as pieces."""

    def __init__(self, model_path: str | Path, backend: str = "exact", eod_token: str | None = None):
        path = Path(model_path)
        if path.is_dir():
            path = path / HF_FILE
        if not path.is_file():
            raise LrpathError(f"tokenizer {model_path} does not exist: give a SentencePiece .model, a Hugging Face "
                              f"{HF_FILE} or a directory holding one")
        self.requested = backend
        resolved = resolve_backend(backend)
        if path.name.endswith(".json"):
            self._init_hf(path, eod_token)
        else:
            self._init_sentencepiece(path, eod_token)
        self.info = TokenizerInfo(self.kind, str(path), file_sha256(path), self.vocab_size, self.eod_id)
        self._special = np.asarray(sorted(self.special_ids), dtype=np.int64)
        self._fast, self._normalize = None, None
        self.backend, self.reason = "exact", f"--backend {backend}"
        if resolved == "exact":
            self.reason = "auto: gigatoken is not installed" if backend == "auto" else self.reason
        elif backend == "fast":
            self._fast, self.backend = self._load_fast(self._model_bytes), "fast"
            self.reason = "--backend fast: gigatoken as it reads the model"
        else:
            self._choose_fast_path()

    def _choose_fast_path(self) -> None:
        """auto: the fast path :mod:`fast_paths` shows exact for this tokenizer, if gigatoken loads it."""
        path, why = self._fast_class
        self.reason = f"auto: {why}"
        if path == "exact":
            return
        model = fast_paths.identity_normalizer_model(self._model_bytes) if path == "fast-normalized" \
            else self._model_bytes
        try:
            self._fast = self._load_fast(model)
        except LrpathError as exc:
            self.reason = f"auto: {exc}"
            return
        self.backend = path
        self._normalize = self.reference.sp.normalize if path == "fast-normalized" else None

    def use_exact(self, reason: str) -> None:
        """Encode with the reference from now on (auto, after the fast path differed from it)."""
        self.backend, self.reason, self._fast, self._normalize = "exact", reason, None, None

    def _init_sentencepiece(self, path: Path, eod_token: str | None) -> None:
        self.kind = "sentencepiece"
        self.reference = Tokenizer(path)
        sp = self.reference.sp
        self.vocab_size = self.reference.vocab_size
        self.eod_id = sp.piece_to_id(eod_token) if eod_token else self.reference.eod_id
        # Control pieces (<s>, </s>, <pad>) are the ids text must never become; user-defined pieces
        # (newline, --special-tokens) are text by design, as SentencePiece itself encodes them.
        self.special_ids = {i for i in range(self.vocab_size) if sp.is_control(i)}
        self.piece = sp.id_to_piece
        self._model_bytes = path.read_bytes()
        spec = fast_paths.read_sentencepiece_spec(self._model_bytes)
        self._fast_class = fast_paths.sentencepiece_path(spec)
        # Long documents in pieces only where that gives the ids of the whole text (Megatron-LM's encoding).
        self._encode_exact = self.reference.encode if spec.chunkable else \
            (lambda text: np.asarray(sp.encode(text), dtype=np.int64))

    def _init_hf(self, path: Path, eod_token: str | None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.kind = "huggingface"
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type for unreadable files
            raise LrpathError(f"{path} is not a Hugging Face tokenizer.json: {exc}") from exc
        tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not the special token
        self.reference = tok
        self._model_bytes = path.read_bytes()
        self._fast_class = fast_paths.huggingface_path(json.loads(self._model_bytes))
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = _hf_eos(path, tok, eod_token)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.piece = lambda i: tok.id_to_token(i)
        self._encode_exact = lambda text: np.asarray(tok.encode(text, add_special_tokens=False).ids,
                                                     dtype=np.int64)

    def _load_fast(self, model: bytes):
        import gigatoken

        try:
            if self.kind == "sentencepiece":
                return gigatoken.Tokenizer.from_sentencepiece(model)
            return gigatoken.Tokenizer.from_json(model)  # from bytes: never a Hub lookup
        except Exception as exc:  # gigatoken reports unsupported models with ValueError / its own errors
            raise LrpathError(f"{self.info.path}: the fast backend (gigatoken) cannot load it "
                              f"({str(exc).splitlines()[0]}); use --backend exact") from exc

    def encode_exact(self, text: str) -> np.ndarray:
        return self._encode_exact(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray | None]:
        """Ids of each text; None for a text with no UTF-8 form (a lone surrogate from a JSON escape)."""
        if self._fast is None:
            return [self._encode_or_none(t) for t in texts]
        data, bad = [], set()
        for i, text in enumerate(texts):
            try:
                raw = text.encode("utf-8")
            except UnicodeEncodeError:
                data.append(b"")
                bad.add(i)
                continue
            data.append(self._normalize(text).encode("utf-8") if self._normalize else raw)
        # parallel=False: processes (--workers) are the one parallelism knob, never extra threads. The
        # result is an awkward ListOffsetArray: its flat ids and offsets are numpy views (no Python ints).
        layout = self._fast.encode_batch(data, parallel=False).layout
        offsets, flat = np.asarray(layout.offsets.data), np.asarray(layout.content.data)
        redo = set(bad)
        if self._special.size:  # documents whose ids hold a special id: the exact backend's ids instead
            hits = np.flatnonzero(np.isin(flat, self._special))
            redo.update((np.searchsorted(offsets, hits, side="right") - 1).tolist())
        return [None if i in bad else self._encode_exact(text) if i in redo
                else flat[offsets[i]:offsets[i + 1]] for i, text in enumerate(texts)]

    def _encode_or_none(self, text: str) -> np.ndarray | None:
        try:
            return self._encode_exact(text)
        except (UnicodeEncodeError, TypeError):  # how sentencepiece / tokenizers refuse lone surrogates
            return None

    def pieces(self, ids: np.ndarray) -> list[str]:
        return [self.piece(int(i)) for i in ids]
