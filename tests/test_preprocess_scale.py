"""data_tools at corpus scale: Hugging Face tokenizer.json, the fast backend and its verification, JSONL
.zst / Parquet / directory inputs, sharded resumable output, the corpus sidecar."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from lrpath_megatron import cli
from lrpath_megatron.data_tools import demo
from lrpath_megatron.data_tools.corpus_meta import read_corpus_meta
from lrpath_megatron.data_tools.encoders import Encoder, fast_available
from lrpath_megatron.data_tools.preprocess import preprocess
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig
from lrpath_megatron.data_tools.tokenizer import TokenizerSpec, train_tokenizer
from lrpath_megatron.errors import LrpathError

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["exact"] + (["fast"] if fast_available() else [])
HF_SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>"]
needs_fast = pytest.mark.skipif(not fast_available(), reason="gigatoken (extra 'fast') is not installed")


@pytest.fixture(scope="module")
def texts():
    return [t[:3000] for _, t in zip(range(90), demo.iter_corpus("docs"))]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, texts):
    spec = TokenizerSpec(vocab_size=500, sample_sentences=0, special_tokens=["<|sep|>"], threads=1)
    return train_tokenizer(texts[:40], tmp_path_factory.mktemp("sp") / "tok", spec)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, texts):
    """A byte-level BPE tokenizer.json trained here with `tokenizers`, eos named by tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts[:40], trainers.BpeTrainer(vocab_size=450, special_tokens=HF_SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


@pytest.fixture(scope="module")
def nfkc_model(tmp_path_factory, texts):
    """A SentencePiece BPE model with NFKC normalisation, on which gigatoken 0.10 differs from sentencepiece
    around combining marks (the differences --verify measures)."""
    proto = io.BytesIO()
    lines = [line for t in texts[:40] for line in t.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=500,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="nmt_nfkc",
                                   character_coverage=1.0, minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("nfkc") / "nfkc.model"
    path.write_bytes(proto.getvalue())
    return path


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _cfg(inputs, prefix, model, **kw) -> PreprocessConfig:
    return PreprocessConfig([str(i) for i in inputs], str(prefix), str(model), workers=kw.pop("workers", 1),
                            progress=False, **kw)


def _docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _tree(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ output format
@pytest.mark.parametrize("vocab_size", [500, 70000])
def test_dataset_writer_matches_megatron_core_byte_for_byte(vocab_size, tmp_path):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from lrpath_megatron.data_tools.indexed_writer import DatasetWriter, optimal_dtype

    rng = np.random.default_rng(vocab_size)
    docs = [rng.integers(0, vocab_size, int(n)) for n in rng.integers(1, 300, 40)]
    dtype = optimal_dtype(vocab_size)
    assert dtype == DType.optimal_dtype(vocab_size)
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    part = IndexedDatasetBuilder(str(tmp_path / "part.bin"), dtype=dtype)
    ours, ours_part = DatasetWriter(str(tmp_path / "ours.bin"), dtype), DatasetWriter(str(tmp_path / "op.bin"), dtype)
    for d in docs[:25]:
        theirs.add_document(d, [d.size])
        ours.add_documents(d, (d.size,))
    for d in docs[25:]:
        part.add_document(d, [d.size])
        ours_part.add_documents(d, (d.size,))
    part.finalize(str(tmp_path / "part.idx"))
    ours_part.finalize(str(tmp_path / "op.idx"))
    theirs.add_index(str(tmp_path / "part"))
    ours.add_index(str(tmp_path / "op"))
    theirs.finalize(str(tmp_path / "theirs.idx"))
    ours.finalize(str(tmp_path / "ours.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


# ------------------------------------------------------------------------------------- tokenizers, backends
@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_special_tokens_literal_text_never_becomes_a_special_id(kind, sp_model, hf_dir, tmp_path):
    model = sp_model if kind == "sentencepiece" else hf_dir
    enc = Encoder(model, "exact")
    specials = [enc.piece(i) for i in sorted(enc.special_ids)]
    assert set(specials) >= ({"<s>", "</s>", "<pad>"} if kind == "sentencepiece" else set(HF_SPECIALS))
    text = "x " + " and ".join(specials) + " " + "".join(specials) + "\n"
    src = _jsonl(tmp_path / "in.jsonl", [text, "plain"])
    for backend in BACKENDS:
        summary = preprocess(_cfg([src], tmp_path / backend, model, backend=backend, verify=-1))
        assert summary.backend == backend and summary.verification.differing == 0
        docs = _docs(f"{tmp_path / backend}_text_document")
        assert docs[0][-1] == enc.eod_id and not set(docs[0][:-1]) & enc.special_ids, backend
        assert docs[0][:-1] == enc.encode_exact(text).tolist()  # fast = exact here: no special id slipped in


def test_hf_tokenizer_json_preprocess_records_the_tokenizer(hf_dir, tmp_path, capsys):
    from tokenizers import Tokenizer

    texts = ["def f(x):\n    return x  <|endoftext|>", "héllo wörld 中文 😀"]
    src = _jsonl(tmp_path / "in.jsonl", texts)
    args = ["data", "preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
            str(hf_dir / "tokenizer.json"), "--tokenizer-type", "HuggingFaceTokenizer", "--backend", "exact",
            "--no-progress", "--workers", "1"]
    assert cli.main(args) == 0
    assert "backend: exact" in capsys.readouterr().out
    ref = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    eos = ref.token_to_id("<|endoftext|>")
    ref.encode_special_tokens = True
    assert _docs(str(tmp_path / "out_text_document")) == [ref.encode(t, add_special_tokens=False).ids + [eos]
                                                          for t in texts]
    meta = read_corpus_meta(tmp_path / "out_text_document")
    assert meta.tokenizer["kind"] == "huggingface" and meta.tokenizer["eod_id"] == eos
    assert meta.tokenizer["vocab_size"] == ref.get_vocab_size() and meta.backend == "exact"
    assert len(meta.tokenizer["sha256"]) == 64 and meta.files[".bin"]["size"] > 0
    # Without a tokenizer_config.json there is no eos to use: one error, nothing written.
    bare = tmp_path / "bare.json"
    bare.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    args2 = args[:5] + [str(tmp_path / "bare_out")] + ["--tokenizer-model", str(bare)] + args[8:]
    assert cli.main(args2) == 2
    assert "no eos token to use as EOD; pass --eod-token" in capsys.readouterr().err
    assert not list(tmp_path.glob("bare_out*"))
    assert cli.main(args2 + ["--eod-token", "</s>"]) == 0
    assert _docs(str(tmp_path / "bare_out_text_document"))[0][-1] == ref.token_to_id("</s>")


def test_auto_backend_falls_back_to_exact_without_gigatoken():
    """The extra is optional: with gigatoken unimportable, auto is exact and fast is one clear error."""
    code = ("import sys; sys.modules['gigatoken'] = None\n"
            "from lrpath_megatron.data_tools.encoders import resolve_backend\n"
            "from lrpath_megatron.errors import LrpathError\n"
            "assert resolve_backend('auto') == 'exact'\n"
            "try:\n    resolve_backend('fast')\nexcept LrpathError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--backend fast needs gigatoken: pip install 'lrpath_megatron[fast]'" in out


@needs_fast
def test_verify_measures_fast_backend_differences(nfkc_model, texts, tmp_path):
    combining = "Precomposed A\u030a and \u1e9b\u0323 q\u0307\u0323 marks"  # where gigatoken 0.10 differs
    src = _jsonl(tmp_path / "in.jsonl", texts[:20] + [combining] + texts[20:30])
    s = preprocess(_cfg([src], tmp_path / "v", nfkc_model, backend="fast", verify=1000))
    assert s.verification.documents == 31 and s.verification.differing == 1
    m = s.verification.examples[0]
    assert (Path(m.path).name, m.line, m.key) == ("in.jsonl", 21, "text") and m.fast != m.exact
    assert "verified 31 documents with the exact backend: 1 differ (3.226%)" in s.format()
    assert "in.jsonl:21 'text' token" in s.format()
    with pytest.raises(LrpathError, match=r"--verify all: the fast backend differs from the exact one at .*"
                                          r"in.jsonl:21"):
        preprocess(_cfg([src], tmp_path / "all", nfkc_model, backend="fast", verify=-1))
    assert not list(tmp_path.glob("all*"))


# ------------------------------------------------------------------------------------------------- inputs
def test_zst_parquet_gz_and_directories_give_the_same_dataset(sp_model, texts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    preprocess(_cfg([_jsonl(tmp_path / "all.jsonl", texts[:30])], tmp_path / "ref", sp_model))
    d = tmp_path / "in" / "sub"
    d.mkdir(parents=True)
    lines = [json.dumps({"text": t}) + "\n" for t in texts[:30]]
    (d / "a.jsonl.gz").write_bytes(gzip.compress("".join(lines[:10]).encode()))
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines[10:20]).encode()))
    pq.write_table(pa.table({"id": list(range(10)), "text": texts[20:30]}), d / "c.parquet")
    (d / "notes.md").write_text("not an input")  # a directory contributes only input files
    preprocess(_cfg([tmp_path / "in"], tmp_path / "dir", sp_model, workers=2))
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path}/dir_text_document{ext}").read_bytes() == \
               Path(f"{tmp_path}/ref_text_document{ext}").read_bytes()


def test_bad_compressed_and_parquet_inputs_are_one_error_naming_the_file(sp_model, texts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    good = _jsonl(tmp_path / "good.jsonl", texts[:3])
    corrupt_zst = tmp_path / "bad.jsonl.zst"
    corrupt_zst.write_bytes(zstandard.ZstdCompressor().compress(good.read_bytes())[:-9] + b"garbage!!")
    corrupt_pq = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": texts[:3]}), corrupt_pq)
    corrupt_pq.write_bytes(corrupt_pq.read_bytes()[:200])
    no_column = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"content": texts[:3]}), no_column)
    for bad, message in [(corrupt_zst, r"bad.jsonl.zst:\d+: unreadable: cannot decompress"),
                         (corrupt_pq, r"bad.parquet:1: unreadable: cannot read Parquet"),
                         (no_column, r"nocol.parquet: no column 'text' \(columns: \['content'\]\); set --json-keys")]:
        for sharded in (False, True):
            out = tmp_path / f"out_{bad.stem}_{sharded}"
            with pytest.raises(LrpathError) as exc:
                preprocess(_cfg([good, bad], out, sp_model, on_error="fail", sharded=sharded))
            assert re.search(message, str(exc.value)), str(exc.value)
            # Nothing half-written: no dataset of the bad file (the good file's shard is complete and kept).
            left = sorted(p.name for p in tmp_path.glob(f"{out.name}*"))
            assert left == ([] if not sharded else [f"{out.name}_text_document_00000_00000{e}"
                                                    for e in (".bin", ".idx", ".meta.json")]), left
    # --on-error skip: the corrupt file's readable lines are kept and the problem is counted.
    s = preprocess(_cfg([good, corrupt_zst], tmp_path / "skip", sp_model))
    assert s.skipped == {"unreadable": 1} and s.documents == 3


# ----------------------------------------------------------------------------------------- sharded output
def _corpus(tmp_path: Path, texts: list[str]) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(4):
        _jsonl(d / f"part{i}.jsonl", texts[i * 20:(i + 1) * 20])
    (d / "part4.jsonl").write_text("")  # a file without documents still completes its shard set
    return d


def test_sharded_output_is_deterministic_split_by_tasks_and_described(sp_model, texts, tmp_path):
    src = _corpus(tmp_path, texts)
    one = preprocess(_cfg([src], tmp_path / "w1" / "c", sp_model, shard_tokens=4000))
    assert one.shards[0] > 5 and one.documents == 80
    preprocess(_cfg([src], tmp_path / "w2" / "c", sp_model, shard_tokens=4000, workers=2))
    # Two SLURM array tasks, each its own files; the one that finishes last writes the manifest.
    for task in (1, 0):
        s = preprocess(_cfg([src], tmp_path / "tasks" / "c", sp_model, shard_tokens=4000, task_index=task,
                            task_count=2))
        assert s.shards[0] > 0
        assert (tmp_path / "tasks" / "c_text_document.meta.json").exists() == (task == 0)
    ref = _tree(tmp_path / "w1")
    ref.pop("c_text_document.meta.json")
    for other in ("w2", "tasks"):
        tree = _tree(tmp_path / other)
        manifest = tree.pop("c_text_document.meta.json")
        assert tree == ref, other
    meta = read_corpus_meta(tmp_path / "w1" / "c_text_document")
    assert meta.documents == 80 and meta.tokens == sum(one.tokens.values())
    shard_names = [s["prefix"] for s in meta.shards]
    assert shard_names == sorted(shard_names) and shard_names[0] == "c_text_document_00000_00000"
    assert sum(len(_docs(str(tmp_path / "w1" / n))) for n in shard_names) == 80
    first = read_corpus_meta(tmp_path / "w1" / shard_names[0])
    assert first.tokens >= 4000 and first.source["input"].endswith("part0.jsonl") and not first.source["last"]
    assert json.loads(manifest)["tokenizer"] == meta.tokenizer


def test_shards_of_another_tokenizer_are_refused(sp_model, texts, tmp_path):
    src = _corpus(tmp_path, texts)
    preprocess(_cfg([src], tmp_path / "out" / "c", sp_model, sharded=True))
    before = _tree(tmp_path / "out")
    other = train_tokenizer(texts[40:70], tmp_path / "other", TokenizerSpec(vocab_size=450, sample_sentences=0,
                                                                           threads=1))
    with pytest.raises(LrpathError, match=r"c_text_document_00000_00000.meta.json was made with tokenizer .*tok.model"
                                          r".* this run uses .*other.model"):
        preprocess(_cfg([src], tmp_path / "out" / "c", other, sharded=True))
    assert _tree(tmp_path / "out") == before


def test_resume_after_kill_9_at_random_moments_is_byte_identical(sp_model, texts, tmp_path):
    """kill -9 a sharded run (and its workers) at 12 random moments; each rerun resumes. A shard whose
    files were damaged (an .idx of another shard, a truncated .bin) is rebuilt, not kept."""
    src = _corpus(tmp_path, texts)
    preprocess(_cfg([src], tmp_path / "ref" / "c", sp_model, shard_tokens=3000, workers=2))
    ref = _tree(tmp_path / "ref")
    shards = len([n for n in ref if n.endswith(".meta.json")]) - 1  # (one is the manifest)
    rng, out = random.Random(7), tmp_path / "run" / "c"
    # Kill points: when the run has completed `target` shards, plus 0-4 ms (mid-write of the next one; a
    # work unit's shards follow each other about 2.5 ms apart, so a longer wait often outlives the run).
    targets = sorted(rng.choices(range(shards - 2), k=12))
    done = lambda: len(list(out.parent.glob("c_text_document_*.meta.json")))  # noqa: E731
    states = []
    for i, target in enumerate(targets):
        # The run: `lrpath data preprocess` in its own process group, workers and all killed with -9.
        cmd = [sys.executable, "-m", "lrpath_megatron.cli", "data", "preprocess", "--input", str(src),
               "--output-prefix", str(out), "--tokenizer-model", str(sp_model), "--shard-tokens", "3000",
               "--workers", str(1 + i % 2), "--backend", "exact", "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
        while done() < target and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.004))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        states.append(done())
    assert sum(0 < n < shards for n in states) >= 9, states  # killed midway, at different shards
    assert len(set(states)) >= 3, states  # (a file's documents are encoded in one batch, then written)
    damaged = sorted(out.parent.glob("c_text_document_*.idx"))
    damaged[0].write_bytes(damaged[1].read_bytes())
    Path(str(damaged[-1])[:-4] + ".bin").write_bytes(b"\0" * 7)
    s = preprocess(_cfg([src], out, sp_model, shard_tokens=3000, workers=2))
    assert 0 < s.shards[1] < shards  # complete shards were kept, the others (re)built
    tree = _tree(out.parent)
    assert not [n for n in tree if ".tmp" in n]
    assert tree == ref
