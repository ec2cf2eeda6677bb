"""lrpath_megatron.data_tools: shipped corpora, demo data, tokenizer, preprocessing, inspect, split-versions, CLI."""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lrpath_megatron import cli
from lrpath_megatron.config import ConfigError
from lrpath_megatron.data_tools import demo, make_corpora, tokenizer
from lrpath_megatron.data_tools.preprocess import preprocess
from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig
from lrpath_megatron.data_tools.tokenizer import Tokenizer, TokenizerSpec, train_tokenizer
from lrpath_megatron.data_tools.versions import parse_version, split_versions
from lrpath_megatron.errors import LrpathError
from lrpath_megatron.held_out import held_out_range, split_string
from lrpath_megatron.inspect_data import inspect_dataset
from lrpath_megatron.mcore_api import null_tokenizer_library
from conftest import COMPAT_PYTHON, run_lrpath
from test_data import BROKEN, broken_pair

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A small tokenizer trained on a slice of the docs corpus, with one extra special token."""
    texts = [t for _, t in zip(range(60), demo.iter_corpus("docs"))]
    spec = TokenizerSpec(vocab_size=600, sample_sentences=0, special_tokens=["<|sep|>"], threads=1)
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "small", spec)


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -------------------------------------------------------------------------------------------------- corpora
def test_make_corpora_reproduces_shipped_files(tmp_path):
    """The shipped corpora are the Python 3.11.7 standard library's: rebuilt by that interpreter (the
    compatibility venv's, on the primary lane), byte for byte."""
    script = (f"from pathlib import Path; from lrpath_megatron.data_tools import make_corpora; "
              f"make_corpora.write_corpora(Path({str(tmp_path)!r}))")
    python = sys.executable if sys.version_info[:3] == (3, 11, 7) else str(COMPAT_PYTHON)
    proc = subprocess.run([python, "-c", f"import sys; assert sys.version_info[:3] == (3, 11, 7), sys.version; {script}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in demo.CORPORA:
        assert (tmp_path / f"{name}.jsonl.gz").read_bytes() == demo.corpus_path(name).read_bytes(), name


def test_shipped_corpora_are_real_and_distinct():
    total = sum(demo.corpus_path(n).stat().st_size for n in demo.CORPORA)
    assert total < 4e6 and (REPO / "data/corpora/LICENSE").is_file()
    docs = {n: list(demo.iter_corpus(n)) for n in demo.CORPORA}
    assert all(len(d) > 50 and sum(map(len, d)) > 5e5 for d in docs.values())
    assert not set(docs["code_a"]) & set(docs["code_b"])  # disjoint package groups
    assert any("def " in t for t in docs["code_a"]) and any("#define" in t for t in docs["c_headers"])


# -------------------------------------------------------------------------------------------------- demo data
def test_demo_data_round_trips_every_document(demo_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = Tokenizer(demo_data["tokenizer_model"])
    assert (demo_data["vocab_size"], demo_data["eod_id"]) == (2048, tokenizer.EOS_ID) == (tok.vocab_size, tok.eod_id)
    for name in demo.CORPORA:
        ds = IndexedDataset(demo_data["prefixes"][name])
        texts = list(demo.iter_corpus(name))
        assert len(ds) == len(texts) == demo_data["documents"][name]
        assert int(ds.sequence_lengths.sum()) == demo_data["tokens"][name]
        assert ds.index.dtype == np.uint16
        for i, text in enumerate(texts):
            ids = ds[i]
            assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
            assert tok.decode(ids[:-1]) == text, f"{name} document {i} does not round-trip"


def test_demo_data_is_cached_and_waits_for_a_concurrent_build(demo_data):
    out = Path(demo_data["tokenizer_model"]).parent
    before = {p: os.path.getmtime(p) for p in out.iterdir()}
    assert demo.prepare_demo_data(out) == demo_data
    assert {p: os.path.getmtime(p) for p in out.iterdir()} == before  # nothing rebuilt
    code = ("import json; from lrpath_megatron.data_tools.demo import prepare_demo_data; "
            f"print(json.dumps(prepare_demo_data({str(out)!r})))")
    with open(out / ".demo_data.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build in progress elsewhere
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
        time.sleep(1.5)
        assert proc.poll() is None, "a second caller must wait for the lock"
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and json.loads(stdout) == demo_data


def test_outputs_feed_megatron_gpt_datasets(demo_data):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers import MegatronTokenizer

    prefixes = [demo_data["prefixes"]["docs"], demo_data["prefixes"]["code_a"]]
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=64, blend=(prefixes, [0.5, 0.5]), split=split_string(0.1),
        path_to_cache=None, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        tokenizer=MegatronTokenizer.from_pretrained(metadata_path={"library": null_tokenizer_library()}, vocab_size=2048))
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [200, 20, 0], lambda: True, config).build()
    assert len(train) >= 200 and len(valid) >= 20
    sample = train[0]["tokens"].numpy()
    assert sample.shape == (64,) and 0 <= sample.min() and sample.max() < 2048
    # The held-out documents reported by inspect are the ones megatron-core's builder puts in "valid".
    docs = IndexedDataset(prefixes[0])
    beg, end = held_out_range(len(docs), 0.1)
    valid_docs = valid.datasets[0].indices
    assert (valid_docs.min(), valid_docs.max() + 1) == (beg, end) and end - beg == round(0.1 * len(docs))


# -------------------------------------------------------------------------------------------------- tokenizer
def test_trained_tokenizer_conventions_and_round_trip(small_model):
    tok = Tokenizer(small_model)
    sp = tok.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(4) == "\n" and sp.id_to_piece(5) == "<|sep|>" and tok.vocab_size == 600
    text = "  Indented\tline\r\nunicode: é中😀 — and <|sep|> too\n\n  trailing  "
    ids = tok.encode(text)
    assert tok.decode(ids) == text and 5 in ids.tolist()
    vocab = Path(small_model).with_suffix(".vocab").read_text().splitlines()
    assert len(vocab) == 600 and vocab[4] == "\\n\t0.0"


def test_long_text_is_encoded_in_chunks_with_identical_ids(small_model, monkeypatch):
    tok = Tokenizer(small_model)
    text = "\n".join(demo.iter_corpus("docs"))[:300_000]
    whole = tok.sp.encode(text)
    monkeypatch.setattr(tokenizer, "CHUNK_CHARS", 7_000)
    assert tok.encode(text).tolist() == whole
    no_breaks = "x" * 20_000  # no newline or space: a hard cut, still lossless
    assert tok.decode(tok.encode(no_breaks)) == no_breaks


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(LrpathError, match="does not exist"):
        Tokenizer(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(LrpathError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(ConfigError, match="reserved"):
        train_tokenizer(["a b c"], tmp_path / "t", TokenizerSpec(vocab_size=200))


# -------------------------------------------------------------------------------------------------- preprocess
def test_output_is_byte_identical_for_any_worker_count(small_model, tmp_path):
    texts = [t for _, t in zip(range(40), demo.iter_corpus("code_b"))]
    src = _write_jsonl(tmp_path / "in.jsonl", texts)
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    runs = {"w1": (src, dict(workers=1, chunk_bytes=1 << 30)), "w2": (src, dict(workers=2, chunk_bytes=20_000)),
            "w2b": (src, dict(workers=2, chunk_bytes=77_777)), "gz_w2": (gz, dict(workers=2, chunk_bytes=30_000))}
    out = {}
    for name, (path, kw) in runs.items():
        s = preprocess(PreprocessConfig([str(path)], str(tmp_path / name), str(small_model), progress=False, **kw))
        assert s.documents == len(texts) and not s.skipped
        out[name] = [Path(s.outputs["text"] + ext).read_bytes() for ext in (".bin", ".idx")]
    assert out["w1"] == out["w2"] == out["w2b"] == out["gz_w2"]
    assert not [f for f in _files(tmp_path) if "tmp" in f or "partial" in f]


def test_work_units_partition_lines_exactly(tmp_path):
    from lrpath_megatron.data_tools import inputs

    rng = random.Random(0)
    for trial in range(200):
        lines = [b"x" * rng.choice([0, 1, 5, 50, 300]) + b"\n" for _ in range(rng.randint(0, 30))]
        if lines and rng.random() < 0.3:
            lines[-1] = lines[-1][:-1] or b"y"  # no final newline
        data = b"".join(lines)
        path = tmp_path / f"f{trial}.jsonl"
        path.write_bytes(data)
        got = [line for u in inputs.iter_units([str(path)], rng.randint(1, 400))
               for line in inputs.read_lines(u, lambda n: None)]
        assert got == data.splitlines(keepends=True), trial


BAD_LINES = [
    b'{"text": "good one"}\n',
    b'{"text": "broken\n',  # malformed JSON
    b'{"body": "no text key"}\n',  # missing key
    b'{"text": "caf\xe9 latin-1"}\n',  # not UTF-8
    b'{"text": ""}\n',  # empty document
    b'{"text": "   \\n  "}\n',  # whitespace only
    b'{"text": 42}\n',  # not a string
    b'{"text": "lone \\ud800 surrogate"}\n',  # not encodable as UTF-8
    b'{"text": "good two"}\n',
]


def _bad_inputs(tmp_path: Path) -> list[str]:
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"".join(BAD_LINES))
    (d / "b.jsonl").write_bytes(b"")  # empty file
    # A 50 MB single document (refused by --max-doc-chars before it is tokenized).
    with gzip.open(d / "c.jsonl.gz", "wb", compresslevel=1) as f:
        f.write(b'{"text": "small"}\n{"text": "' + b"word " * 10_000_000 + b'"}\n{"text": "after"}\n')
    # Truncated gzip: its first two lines decompress, then the stream ends early.
    lines = b"".join(b'{"text": "d%d"}\n' % i for i in range(3000))
    (d / "d.jsonl.gz").write_bytes(gzip.compress(lines)[:-30])
    return [str(d / "*.jsonl*"), str(tmp_path / "missing.jsonl")]


def test_bad_input_is_reported_by_file_and_line_and_skipped(small_model, tmp_path):
    cfg = PreprocessConfig(_bad_inputs(tmp_path), str(tmp_path / "out"), str(small_model), workers=2,
                           chunk_bytes=100, max_doc_chars=1_000_000, progress=False)
    s = preprocess(cfg)
    assert s.skipped == {"malformed_json": 1, "missing_key": 1, "invalid_utf8": 2, "empty_document": 2,
                         "not_a_string": 1, "empty_file": 1, "missing_file": 1, "too_long": 1, "unreadable": 1}
    where = {(p.kind, Path(p.path).name, p.line) for p in s.problems}
    # Exact line numbers, although a.jsonl is cut into several work units.
    assert {("malformed_json", "a.jsonl", 2), ("missing_key", "a.jsonl", 3), ("invalid_utf8", "a.jsonl", 4),
            ("invalid_utf8", "a.jsonl", 8),
            ("empty_document", "a.jsonl", 5), ("empty_document", "a.jsonl", 6), ("not_a_string", "a.jsonl", 7),
            ("empty_file", "b.jsonl", 0), ("too_long", "c.jsonl.gz", 2), ("missing_file", "missing.jsonl", 0)} <= where
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = Tokenizer(small_model)
    ds = IndexedDataset(s.outputs["text"])
    texts = [tok.decode(ds[i][:-1]) for i in range(len(ds))]
    assert texts[:4] == ["good one", "good two", "small", "after"]
    # The truncated file: every line that decompressed is kept, the failure is reported at the next line.
    kept = texts[4:]
    assert len(kept) > 100 and kept == [f"d{i}" for i in range(len(kept))]
    assert ("unreadable", "d.jsonl.gz", len(kept) + 1) in where
    assert "a.jsonl:2: malformed_json" in s.format()


def test_on_error_fail_refuses_and_leaves_no_files(small_model, tmp_path):
    inputs = _bad_inputs(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(LrpathError, match="missing.jsonl: missing_file"):
        preprocess(PreprocessConfig(inputs, str(tmp_path / "out"), str(small_model), on_error="fail", progress=False))
    with pytest.raises(LrpathError, match=r"a\.jsonl:2: malformed_json.*nothing was written"):
        preprocess(PreprocessConfig(inputs[:1], str(tmp_path / "out"), str(small_model), on_error="fail",
                                    workers=2, chunk_bytes=64, progress=False))
    assert _files(tmp_path) == before


def test_plain_text_and_multiple_json_keys(small_model, tmp_path):
    (tmp_path / "t.txt").write_text("first line doc\nsecond line doc\n", encoding="utf-8")
    rows = [{"title": f"T{i}", "text": f"body {i}"} for i in range(3)] + [{"title": "only title"}]
    (tmp_path / "k.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    tok = Tokenizer(small_model)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    s = preprocess(PreprocessConfig([str(tmp_path / "t.txt")], str(tmp_path / "txt"), str(small_model),
                                    append_eod=False, progress=False))
    ds = IndexedDataset(s.outputs["text"])
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["first line doc", "second line doc"]
    s = preprocess(PreprocessConfig([str(tmp_path / "k.jsonl.gz")], str(tmp_path / "k"), str(small_model),
                                    json_keys=["title", "text"], progress=False))
    assert s.documents == 3 and s.skipped == {"missing_key": 1}  # a row lacking a key is skipped for all keys
    titles, bodies = IndexedDataset(s.outputs["title"]), IndexedDataset(s.outputs["text"])
    assert s.outputs["title"].endswith("k_title_document")
    assert [(tok.decode(titles[i][:-1]), tok.decode(bodies[i][:-1])) for i in range(3)] == \
        [(f"T{i}", f"body {i}") for i in range(3)]


# ---------------------------------------------------------------------------------------- inspect / versions / CLI
def test_inspect_reports_counts_histogram_held_out_and_decodes(demo_data):
    prefix = demo_data["prefixes"]["c_headers"]
    r = inspect_dataset(prefix, demo_data["tokenizer_model"], valid_fraction=0.05, samples=2, max_chars=10_000)
    n = demo_data["documents"]["c_headers"]
    assert (r.documents, r.tokens) == (n, demo_data["tokens"]["c_headers"])
    assert sum(c for _, _, c in r.histogram) == n and r.min_len <= r.median_len <= r.max_len
    assert r.held_out["end_doc"] == n and r.held_out["documents"] == round(0.05 * n)
    texts = list(demo.iter_corpus("c_headers"))
    assert len(r.samples) == 2 and all(text == texts[i] or text.endswith("[...]") for i, _, text in r.samples)


def test_split_versions_cuts_consecutive_ranges(demo_data, tmp_path):
    corpora = {"docs": demo_data["prefixes"]["docs"], "code_a": demo_data["prefixes"]["code_a"]}
    result = split_versions(corpora, [parse_version("v1:docs=0.5"), parse_version("v2:docs=0.5,code_a=1")],
                            tmp_path, valid_fraction=0.1)
    docs_parts = [p for p in result.parts if p.corpus == "docs"]
    assert [(p.first_doc, p.end_doc) for p in docs_parts] == [(0, 130), (130, 261)]
    assert sum(p.tokens for p in docs_parts) == demo_data["tokens"]["docs"]
    snippet = result.plan_snippet()
    v2 = snippet["plan"]["versions"][1]
    assert set(v2["corpora"]) == {"docs_v2", "code_a_v2"} and abs(sum(v2["corpora"].values()) - 1) < 1e-5
    assert v2["tokens"] == sum(p.train_tokens for p in result.parts if p.version == "v2")
    assert all(p.train_tokens < p.tokens for p in result.parts)
    assert (tmp_path / "versions.yaml").is_file() and Path(docs_parts[1].prefix + ".idx").is_file()
    with pytest.raises(ConfigError, match="more than 1"):
        split_versions(corpora, [parse_version("v1:docs=0.7"), parse_version("v2:docs=0.5")], tmp_path)
    with pytest.raises(ConfigError, match="NAME:CORPUS=SHARE"):
        parse_version("v1")
    # A rerun refuses to replace the parts (all checked before anything is written) unless told to.
    written = {f: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match=r"docs_v1_text_document.bin, .*versions.yaml already exist; pass --overwrite"):
        split_versions(corpora, [parse_version("v1:docs=0.5"), parse_version("v2:docs=0.5")], tmp_path)
    assert {f: f.stat().st_mtime_ns for f in tmp_path.iterdir()} == written
    again = split_versions(corpora, [parse_version("v1:docs=0.5"), parse_version("v2:docs=0.5,code_a=1")],
                           tmp_path, valid_fraction=0.1, overwrite=True)
    assert again == result


def test_tokenizer_type_means_megatron_lms_sentencepiece_or_is_refused(small_model, tmp_path, capsys):
    """Every accepted --tokenizer-type is, in Megatron-LM's preprocess_data.py (megatron-core's
    build_tokenizer), the tokenizer preprocess uses: the same ids and EOD. Other types are refused."""
    from argparse import Namespace

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:  # megatron-core 0.16
        from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer
    except ModuleNotFoundError:  # 0.17 on; Megatron-LM's defaults for the arguments it reads
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from lrpath_megatron.data_tools.tokenizer_types import SENTENCEPIECE_TYPES

    texts = ["  Indented\tline\n<|sep|> and </s> <s> <pad> as text", "déjà vu 中 😀\n\n"]
    src = _write_jsonl(tmp_path / "in.jsonl", texts)
    args = ["data", "preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
            str(small_model), "--workers", "1", "--no-progress", "--backend", "exact"]
    assert cli.main(args + ["--tokenizer-type", "SentencePieceTokenizer"]) == 0
    ours = IndexedDataset(str(tmp_path / "out_text_document"))
    for kind in SENTENCEPIECE_TYPES:
        theirs = build_tokenizer(Namespace(tokenizer_type=kind, tokenizer_model=str(small_model),
                                           tokenizer_sentencepiece_legacy=False, tokenizer_special_tokens=None,
                                           tokenizer_metadata=None, chat_template=None, special_tokens=None,
                                           tokenizer_sentencepiece_ignore_extra_whitespaces=True,
                                           metadata_path=None, pad_vocab_size=False))
        for i, text in enumerate(texts):
            assert ours[i].tolist() == theirs.tokenize(text) + [theirs.eod], kind
    capsys.readouterr()
    for kind in ("GPT2BPETokenizer", "TikTokenizer"):
        with pytest.raises(SystemExit) as exc:  # a usage error, before any input is read
            cli.main(args + ["--tokenizer-type", kind])
        assert exc.value.code == 2
        assert f"'{kind}' is not supported: preprocess reads a SentencePiece .model" in capsys.readouterr().err
    # HuggingFaceTokenizer names a tokenizer.json: with a .model it would tokenize otherwise in Megatron-LM.
    assert cli.main(args + ["--tokenizer-type", "HuggingFaceTokenizer", "--overwrite"]) == 2
    assert "--tokenizer-type HuggingFaceTokenizer does not match --tokenizer-model" in capsys.readouterr().err


def test_cli_end_to_end(tmp_path, capsys):
    texts = [t[:5000] for _, t in zip(range(30), demo.iter_corpus("code_a"))]
    src = _write_jsonl(tmp_path / "in.jsonl", texts)
    model = tmp_path / "tok"
    assert cli.main(["data", "train-tokenizer", "--input", str(src), "--model-prefix", str(model),
                     "--vocab-size", "500", "--model-type", "unigram", "--threads", "1"]) == 0
    summary_json = tmp_path / "summary.json"
    assert cli.main(["data", "preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "out"),
                     "--tokenizer-model", f"{model}.model", "--tokenizer-type", "GPTSentencePieceTokenizer",
                     "--workers", "2", "--append-eod", "--no-progress", "--summary-json", str(summary_json)]) == 0
    assert json.loads(summary_json.read_text())["documents"] == 30
    capsys.readouterr()
    assert cli.main(["data", "inspect", str(tmp_path / "out_text_document"), "--tokenizer-model", f"{model}.model",
                     "--valid-fraction", "0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 30 and report["held_out"]["documents"] == 3
    assert cli.main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert "nope.bin does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bad input, one error
@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_inspect_refuses_a_broken_pair(demo_data, tmp_path, capsys, kind):
    prefix = broken_pair(demo_data, tmp_path, kind)
    assert cli.main(["data", "inspect", prefix]) == 2
    assert re.fullmatch(f"lrpath data: error: .*{BROKEN[kind]}.*\n", capsys.readouterr().err)
    if kind == "random_idx":  # megatron-core never sees it, so its __del__ has nothing to complain about
        proc = run_lrpath(["data", "inspect", prefix], check=False, timeout=300)
        assert proc.returncode == 2 and re.search(BROKEN[kind], proc.stderr)
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_preprocess_replaces_existing_outputs_only_with_overwrite(small_model, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", ["one document", "another one"])
    args = ["data", "preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-model", str(small_model), "--workers", "1", "--no-progress"]
    assert cli.main(args) == 0
    outputs = [tmp_path / f"out_text_document{ext}" for ext in (".bin", ".idx")]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs}
    files = _files(tmp_path)
    _write_jsonl(src, ["a different text"])
    capsys.readouterr()
    assert cli.main(args) == 2
    assert capsys.readouterr().err == (f"lrpath data: error: {outputs[0]}, {outputs[1]} already exist; pass "
                                       f"--overwrite to replace them, or choose another --output-prefix\n")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs} == before and _files(tmp_path) == files
    assert cli.main(args + ["--overwrite"]) == 0
    assert outputs[0].read_bytes() != before[outputs[0]][0] and _files(tmp_path) == files
    # A failed run removes the directories it made for its output. (Failing this early once hung now and then:
    # pool.terminate() right after the workers' start.)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    args = ["data", "preprocess", "--input", str(tmp_path / "empty.jsonl"), "--output-prefix",
            str(tmp_path / "new" / "dir" / "out"), "--tokenizer-model", str(small_model), "--workers", "2",
            "--no-progress"]
    assert cli.main(args) == 2 and not (tmp_path / "new").exists()


def test_train_tokenizer_without_text_is_one_error_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    before = _files(tmp_path)
    assert cli.main(["data", "train-tokenizer", "--input", str(empty), "--model-prefix", str(tmp_path / "tok" / "spm"),
                     "--vocab-size", "500"]) == 2
    assert capsys.readouterr().err == (f"lrpath data: error: no documents to train on in --input: {empty}: empty_file: "
                                       f"the file has no lines; nothing was written\n")
    assert _files(tmp_path) == before
    with pytest.raises(LrpathError, match="no text to train on: the documents hold no non-empty line"):
        train_tokenizer(["\n\n", "x" * 9000], tmp_path / "tok" / "spm", TokenizerSpec(vocab_size=500))
    assert _files(tmp_path) == before


def test_split_versions_names_the_versions_whose_shares_exceed_1(demo_data, tmp_path, capsys):
    out = tmp_path / "versions"
    args = ["data", "split-versions", "--corpus", f"docs={demo_data['prefixes']['docs']}", "--output-dir", str(out)]
    assert cli.main(args + ["--version", "v1:docs=0.7", "--version", "v2:docs=0.6"]) == 2
    assert capsys.readouterr().err == (
        "lrpath data: error: the shares of 'docs' sum to 1.3 (v1 0.7 + v2 0.6), more than 1: each corpus is taken "
        "once, front to back, so its shares over the versions may sum to at most 1; lower them\n")
    args[3] = f"docs={broken_pair(demo_data, tmp_path, 'truncated_bin')}"
    assert cli.main(args + ["--version", "v1:docs=0.5"]) == 2
    assert re.fullmatch(f"lrpath data: error: --corpus docs: .*{BROKEN['truncated_bin']}.*\n", capsys.readouterr().err)
    assert not out.exists()
