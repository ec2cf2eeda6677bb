"""Tokenization is exact by default: ``--backend auto`` writes what ``--backend exact`` writes, on tokenizers
with SentencePiece's default normalisation (nmt_nfkc) and on adversarial documents; the verification sample
catches a fast path that differs, and the choice is recorded in the summary and the sidecars."""
from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from lrpath_megatron import cli
from lrpath_megatron.config import ConfigError
from lrpath_megatron.data_tools import demo, fast_paths
from lrpath_megatron.data_tools.corpus_meta import read_corpus_meta
from lrpath_megatron.data_tools.encoders import Encoder, fast_available
from lrpath_megatron.data_tools.preprocess import preprocess
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig
from lrpath_megatron.data_tools.sample_check import draw_sample
from lrpath_megatron.data_tools.tokenizer import TokenizerSpec, train_tokenizer
from lrpath_megatron.errors import LrpathError

pytestmark = pytest.mark.skipif(not fast_available(), reason="gigatoken (extra 'fast') is not installed")

# Where gigatoken 0.10's own normaliser, whitespace handling or special-token matching differ from
# sentencepiece's, and characters outside a small vocabulary (byte fallback).
ADVERSARIAL = [
    "Combining marks: A\u030a \u1e9b\u0323 q\u0307\u0323 e\u0301\u0301 o\u0308\u0304 \u0301 at the start",
    "Fullwidth ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３！ and halfwidth ｶﾀｶﾅ",
    "Ligatures ﬁ ﬂ ﬀ ﬃ ﬆ, compatibility Ω K ㎏ ½ ① ™ ㈱",
    "Hangul 한국어 한글 각 and conjoining jamo \u1100\u1161\u11a8 \uac00\u11a8",
    "Byte fallback: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀👍🏽🇩🇪 \U0002a6d6 \ue000 \u0fff",
    "Literal specials <s> </s> <unk> <pad> <s>x</s> stay text",
    "   leading spaces,  runs   of  spaces,\ttabs\t and trailing   ",
    "zero\u200bwidth, soft\u00adhyphen, nbsp\u00a0x, ideographic\u3000space, bom\ufeff",
    "\n\nnewlines\r\nand carriage returns\n\n",
    "Mixed 조합 A\u030a ﬁ ＡＢ <s> 😀 \u1100\u1161",
]
DIFFERS = "ｆｕｌｌ \u1e9b\u0323 a\u030a"  # gigatoken's own nmt_nfkc normaliser differs at the long s


def _texts(n: int) -> list[str]:
    return [t[:2000] for _, t in zip(range(n), demo.iter_corpus("docs"))]


def _train_default_spm(path: Path, vocab_size: int = 800, **kw) -> Path:
    """A BPE model with SentencePiece's default settings (nmt_nfkc, dummy prefix, whitespace removal)."""
    lines = [line for t in _texts(40) + ADVERSARIAL[:4] for line in t.split("\n") if line.strip()]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size,
                                   model_type=kw.pop("model_type", "bpe"), byte_fallback=True, num_threads=1,
                                   minloglevel=2, **kw)
    path.write_bytes(proto.getvalue())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("models")
    spec = TokenizerSpec(vocab_size=700, sample_sentences=0, threads=1)
    spaced = TokenizerSpec(vocab_size=700, sample_sentences=0, threads=1, special_tokens=["    ", "a b"])
    return {"nmt_nfkc": _train_default_spm(d / "nfkc.model"),
            "identity": train_tokenizer(_texts(40), d / "identity", spec),
            "identity_spaced_pieces": train_tokenizer(_texts(40), d / "spaced", spaced),
            "nfkc_no_dummy_prefix": _train_default_spm(d / "nodummy.model", add_dummy_prefix=False,
                                                       remove_extra_whitespaces=False)}


def _corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _documents() -> list[str]:
    body = _texts(12)
    long_doc = "\n".join(_texts(60))[:70_000] + " " + " ".join(ADVERSARIAL)  # over one 64K-char piece
    return body[:6] + ADVERSARIAL + [DIFFERS, long_doc] + body[6:] + [" ".join(ADVERSARIAL)]


def _preprocess_cli(tmp_path: Path, src: Path, model: Path, name: str, *extra: str) -> tuple[int, dict]:
    summary = tmp_path / f"{name}.summary.json"
    code = cli.main(["data", "preprocess", "--input", str(src), "--output-prefix", str(tmp_path / name),
                     "--tokenizer-model", str(model), "--workers", "2", "--chunk-bytes", "20000", "--no-progress",
                     "--summary-json", str(summary), *extra])
    return code, json.loads(summary.read_text()) if code == 0 else {}


def _files(prefix: Path) -> list[bytes]:
    return [Path(f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]


@pytest.mark.parametrize("kind, path", [("nmt_nfkc", "fast-normalized"), ("identity", "fast"),
                                        ("identity_spaced_pieces", "fast-normalized"),
                                        ("nfkc_no_dummy_prefix", "fast-normalized")])
def test_auto_is_byte_identical_to_exact_on_adversarial_documents(models, tmp_path, kind, path):
    src = _corpus(tmp_path / "in.jsonl", _documents())
    assert _preprocess_cli(tmp_path, src, models[kind], "exact", "--backend", "exact")[0] == 0
    code, summary = _preprocess_cli(tmp_path, src, models[kind], "auto")  # the defaults: auto, the sample
    assert code == 0 and summary["backend"] == path
    assert _files(tmp_path / "auto") == _files(tmp_path / "exact")
    sample = summary["sample"]
    assert sample["backend"] == path and sample["differing"] == 0 and sample["documents"] >= 10
    choice = read_corpus_meta(tmp_path / "auto_text_document").backend_choice
    assert choice == {"requested": "auto", "reason": summary["backend_reason"], "sample": sample}
    assert summary["backend_reason"].startswith("auto: ")


def test_the_fast_backend_as_gigatoken_reads_the_model_differs_and_is_refused(models, tmp_path, capsys):
    """The documents above are adversarial: gigatoken's own nmt_nfkc normaliser differs. Under --backend fast
    the verification sample refuses before anything is written; --verify 0 writes it knowingly."""
    src = _corpus(tmp_path / "in.jsonl", _documents())
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _ = _preprocess_cli(tmp_path, src, models["nmt_nfkc"], "fast", "--backend", "fast")
    err = capsys.readouterr().err
    assert code == 2 and "--backend fast: gigatoken differs from the exact backend on the verification sample" in err
    assert "in.jsonl (the line at byte " in err and "nothing was written" in err and "--verify 0" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert _preprocess_cli(tmp_path, src, models["nmt_nfkc"], "exact", "--backend", "exact")[0] == 0
    code, summary = _preprocess_cli(tmp_path, src, models["nmt_nfkc"], "unchecked", "--backend", "fast",
                                    "--verify", "0")
    assert code == 0 and summary["backend"] == "fast" and summary["sample"] is None
    assert _files(tmp_path / "unchecked") != _files(tmp_path / "exact")


def test_exact_backend_encodes_long_normalised_documents_whole(models):
    """Pieces cut at newlines equal the whole text's ids only without normalisation: with nmt_nfkc (dummy
    prefix, whitespace removal) the exact backend encodes a long document whole, as Megatron-LM does."""
    text = "\n".join(_texts(60))[:150_000]
    for kind in ("nmt_nfkc", "identity"):
        sp = spm.SentencePieceProcessor(model_file=str(models[kind]))
        assert Encoder(models[kind], "exact").encode_exact(text).tolist() == sp.encode(text), kind


def test_auto_switches_to_exact_when_the_sample_differs(models, tmp_path, monkeypatch):
    """Were a class rule wrong (injected: nmt_nfkc called identity, so auto takes gigatoken as it reads the
    model), the verification sample finds the difference and the whole run is exact."""
    monkeypatch.setattr(fast_paths, "sentencepiece_path", lambda spec: ("fast", "injected: called identity"))
    src = _corpus(tmp_path / "in.jsonl", _documents())
    assert _preprocess_cli(tmp_path, src, models["nmt_nfkc"], "exact", "--backend", "exact")[0] == 0
    code, summary = _preprocess_cli(tmp_path, src, models["nmt_nfkc"], "auto")
    assert code == 0 and summary["backend"] == "exact"
    assert _files(tmp_path / "auto") == _files(tmp_path / "exact")
    sample = summary["sample"]
    assert sample["backend"] == "fast" and sample["differing"] >= 1
    assert summary["backend_reason"] == (f"auto: fast differs from the exact backend on the verification sample at "
                                         f"{sample['first_difference']}, so the exact backend")
    assert "in.jsonl (the line at byte" in sample["first_difference"]
    assert read_corpus_meta(tmp_path / "auto_text_document").backend_choice["sample"] == sample


@pytest.mark.parametrize("sharded", [False, True])
def test_auto_switches_when_verify_all_finds_what_the_sample_missed(models, tmp_path, monkeypatch, sharded):
    """A difference in a document the sample does not draw (it follows a blank line: drawn with a chance of
    about 300 in the input's size) is found by --verify all, and the run starts again, exact."""
    monkeypatch.setattr(fast_paths, "sentencepiece_path", lambda spec: ("fast", "injected: called identity"))
    lines = [json.dumps({"text": t}) for t in _texts(90)]
    lines[45:45] = ["", json.dumps({"text": DIFFERS})]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shard = ["--shard-tokens", "5000"] if sharded else []
    exact = PreprocessConfig([str(src)], str(tmp_path / "exact"), str(models["nmt_nfkc"]), progress=False,
                             shard_tokens=5000 if sharded else 0)
    preprocess(exact)
    code, summary = _preprocess_cli(tmp_path, src, models["nmt_nfkc"], "auto", "--verify", "all", *shard)
    assert code == 0 and summary["backend"] == "exact" and summary["sample"] is None
    # Its line in the file, though it is found in a later work unit (--chunk-bytes) than the first.
    assert summary["backend_reason"].startswith(f"auto: --verify all: fast differs from the exact backend at "
                                                f"{src}:47 'text' token ")
    made = sorted(p.name.removeprefix("auto") for p in tmp_path.glob("auto_*") if ".summary" not in p.name)
    assert made == sorted(p.name.removeprefix("exact") for p in tmp_path.glob("exact_*"))
    for name in made:
        if name.endswith((".bin", ".idx")):
            assert (tmp_path / f"auto{name}").read_bytes() == (tmp_path / f"exact{name}").read_bytes(), name


def test_auto_decides_by_class_and_says_why(models, tmp_path):
    unigram = _train_default_spm(tmp_path / "uni.model", model_type="unigram")
    enc = Encoder(unigram, "auto")
    assert (enc.backend, enc.reason) == ("exact", "auto: not a BPE model (gigatoken reads BPE models only)")
    enc = Encoder(models["identity"], "auto")
    assert (enc.backend, enc.reason) == ("fast", "auto: identity normalisation, which gigatoken applies as "
                                                 "sentencepiece does")
    assert Encoder(models["identity_spaced_pieces"], "auto").reason == (
        "auto: user-defined pieces holding spaces ('    '): SentencePiece's own normaliser, then gigatoken on the "
        "normalised text")
    assert Encoder(models["identity"], "exact").backend == "exact"


def _hf_tokenizer(directory: Path, normalizer=None, added=(), metaspace: bool = False) -> Path:
    """A BPE tokenizer.json trained here: byte-level (GPT-2 style), or (``metaspace``) SentencePiece-like with
    byte fallback and no pre-tokenizer (Llama-2 style, with its Prepend / Replace normaliser)."""
    from tokenizers import AddedToken, Tokenizer, models as hf_models, pre_tokenizers, trainers

    tok = Tokenizer(hf_models.BPE(byte_fallback=metaspace))
    alphabet = [] if metaspace else pre_tokenizers.ByteLevel.alphabet()
    if not metaspace:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(_texts(30), trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=alphabet))
    tok.add_tokens([AddedToken(text, **flags) for text, flags in added])
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256 if metaspace else 0):  # the byte-fallback pieces, after the learned ones
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab) + len(data["added_tokens"]))
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(data))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


def test_tokenizer_json_classes(tmp_path):
    from tokenizers import normalizers

    src = _corpus(tmp_path / "in.jsonl", _documents())
    llama = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    cases = {"plain": (None, (), False, "fast"), "prepend_replace": (llama, (), True, "fast"),
             "nfkc": (normalizers.NFKC(), (), False, "exact"),
             "rstrip": (None, [("ab cd", {"rstrip": True}), ("  ", {"single_word": True})], False, "exact")}
    for name, (normalizer, added, metaspace, path) in cases.items():
        model = _hf_tokenizer(tmp_path / name, normalizer, added, metaspace)
        for backend in ("exact", "auto"):
            s = preprocess(PreprocessConfig([str(src)], str(tmp_path / f"{name}_{backend}"), str(model),
                                            backend=backend, progress=False))
        assert s.backend == path, (name, s.backend_reason)
        assert _files(tmp_path / f"{name}_auto") == _files(tmp_path / f"{name}_exact"), name
    assert Encoder(tmp_path / "nfkc", "auto").reason == "auto: normaliser NFKC, not shown identical in gigatoken"
    assert Encoder(tmp_path / "rstrip", "auto").reason.startswith("auto: added token 'ab cd' has lstrip/rstrip")


def test_sample_is_seeded_spread_over_files_and_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)  # words that compress little: compressed files get their share of the draws
    texts = [f"document {i} " + " ".join(f"{rng.random():.6f}" for _ in range(i % 7 * 10)) for i in range(400)]
    _corpus(tmp_path / "a.jsonl", texts[:100])
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[100:200]).encode()))
    pq.write_table(pa.table({"text": texts[200:300]}), tmp_path / "c.parquet", row_group_size=30)
    (tmp_path / "d.txt").write_text("\n".join(texts[300:]) + "\n", encoding="utf-8")
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt")]
    sample = draw_sample(files, ["text"])
    assert sample == draw_sample(files, ["text"]) != draw_sample(files, ["text"], seed=1)
    by_file = {Path(doc.path).name: [f["text"] for d, f in sample if d.path == doc.path] for doc, _ in sample}
    assert set(by_file) == {"a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt"}
    assert all(len(set(v)) == len(v) >= 10 for v in by_file.values())  # distinct documents from each
    for doc, fields in sample:  # each is the document it says it is
        index = (doc.line - 1 if doc.line else
                 Path(doc.path).read_bytes()[:doc.byte].count(b"\n")) + 100 * files.index(doc.path)
        assert fields["text"] == texts[index]
    assert draw_sample(files, ["text"], max_doc_chars=20) == [(d, f) for d, f in sample if len(f["text"]) <= 20]


def test_library_keeps_exact_by_default_and_verify_0_means_unchecked(models, tmp_path):
    src = _corpus(tmp_path / "in.jsonl", _documents())
    s = preprocess(PreprocessConfig([str(src)], str(tmp_path / "lib"), str(models["nmt_nfkc"]), progress=False))
    assert (s.backend, s.backend_reason, s.sample) == ("exact", "--backend exact", None)
    s = preprocess(PreprocessConfig([str(src)], str(tmp_path / "v0"), str(models["nmt_nfkc"]), backend="auto",
                                    verify=0, progress=False))
    assert s.backend == "fast-normalized" and s.sample is None and "not verified (--verify 0)" in s.format()
    with pytest.raises(ConfigError, match="--verify takes a count or 'all'"):
        preprocess(PreprocessConfig([str(src)], str(tmp_path / "bad"), str(models["nmt_nfkc"]), verify=-2))
