"""TrainData / ValidData on real megatron-core .bin/.idx corpora built here."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lrpath_megatron import indexed
from lrpath_megatron.config import CorpusConfig, DataConfig
from lrpath_megatron.data import TrainData, ValidData
from lrpath_megatron.errors import LrpathError

SEQ = 16
GBS, MBS = 8, 2
# Corpus "a": 200 documents whose tokens are all the document id; "b": 120 documents, id + 1000. A sample's
# tokens therefore tell which documents it came from.
CORPORA = {"a": (200, 0), "b": (120, 1000)}


def write_corpus(prefix: str, num_docs: int, offset: int, seed: int = 0) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in range(num_docs):
        length = int(rng.integers(5, 40))
        builder.add_document(np.full(length, doc + offset, dtype=np.uint16), [length])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("corpora")
    corpora = []
    for name, (docs, offset) in CORPORA.items():
        write_corpus(str(root / name), docs, offset)
        corpora.append(CorpusConfig(name=name, prefix=str(root / name)))
    return DataConfig(corpora=corpora, valid_fraction=0.1, seed=3)


def mix(step):
    return ("s0", {"a": 0.75, "b": 0.25}) if step < 5 else ("s1", {"a": 0.25, "b": 0.75})


def train(cfg, dp_rank=0, dp_size=1):
    return TrainData(cfg, SEQ, GBS, MBS, dp_rank, dp_size, mix, seed=cfg.seed)


def test_microbatches_have_the_trainer_layout_and_follow_the_mix(data_cfg):
    data = train(data_cfg)
    mbs = data.microbatches(0)
    assert len(mbs) == GBS // MBS
    for mb in mbs:
        assert set(mb) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert mb["tokens"].shape == (MBS, SEQ) and mb["tokens"].dtype == torch.int64
        assert mb["labels"].dtype == torch.int64 and mb["position_ids"].dtype == torch.int64
        assert mb["loss_mask"].dtype == torch.float32 and bool((mb["loss_mask"] == 1).all())
        assert torch.equal(mb["labels"][:, :-1], mb["tokens"][:, 1:])  # labels are the next tokens
        assert torch.equal(mb["position_ids"][0], torch.arange(SEQ))
    # Each sample comes from exactly the corpus the sampler chose (token ranges are disjoint).
    state = json.loads(json.dumps(data.state_dict()))  # JSON-able
    assert state["step"] == 1
    tokens = torch.cat([mb["tokens"] for mb in mbs])
    from_b = (tokens >= 1000).all(dim=1)
    assert int(from_b.sum()) == 2 and bool(((tokens < 1000).all(dim=1) | from_b).all())
    stats = data.pop_stats()
    assert stats["fractions"] == {"a": 0.75, "b": 0.25} and stats["stage"] == "s0"


def test_train_and_valid_use_disjoint_document_ranges(data_cfg):
    data = train(data_cfg)
    seen = set()
    for step in range(12):
        for mb in data.microbatches(step):
            seen.update(mb["tokens"].unique().tolist())
    # valid_fraction 0.1: the last 10% of documents of each corpus are held out.
    assert seen and all(t < 180 or 1000 <= t < 1108 for t in seen)
    valid = ValidData(data_cfg, SEQ, MBS, seed=data_cfg.seed)
    held = set()
    for corpus in valid.corpora:
        for mb in valid.batches(corpus, 3):
            held.update(mb["tokens"].unique().tolist())
    assert held and all(180 <= t < 200 or 1108 <= t < 1120 for t in held)


def test_dp1_and_dp2_see_the_same_global_batches(data_cfg):
    single = train(data_cfg)
    ranks = [train(data_cfg, r, 2) for r in range(2)]
    for step in range(8):  # crosses the stage switch at step 5
        whole = torch.cat([mb["tokens"] for mb in single.microbatches(step)])
        split = torch.cat([mb["tokens"] for rank in ranks for mb in rank.microbatches(step)])
        assert torch.equal(whole, split)


def test_resume_reproduces_the_batches(data_cfg):
    full = train(data_cfg)
    expected = [torch.cat([mb["tokens"] for mb in full.microbatches(s)]) for s in range(10)]
    first = train(data_cfg)
    for s in range(5):
        first.microbatches(s)
    resumed = train(data_cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for s in range(5, 10):
        assert torch.equal(torch.cat([mb["tokens"] for mb in resumed.microbatches(s)]), expected[s])


def test_validation_batches_are_fixed_for_any_dp_size(data_cfg):
    valid = ValidData(data_cfg, SEQ, MBS, seed=data_cfg.seed)
    n = valid.num_batches("b")
    assert n >= 3
    alone = valid.batches("b", 3)
    shared = [valid.batches("b", 3, dp_rank=r, dp_size=2) for r in range(2)]
    assert len(shared[0]) == 2 and len(shared[1]) == 1
    interleaved = [shared[0][0], shared[1][0], shared[0][1]]
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(alone, interleaved))
    again = ValidData(data_cfg, SEQ, MBS, seed=data_cfg.seed).batches("b", 3)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(alone, again))


def test_missing_or_too_small_corpus_is_a_clear_error(data_cfg, tmp_path):
    missing = DataConfig(corpora=[CorpusConfig(name="gone", prefix=str(tmp_path / "gone"))])
    with pytest.raises(LrpathError, match=r"corpus 'gone'.*gone\.bin does not exist"):
        train(missing)
    write_corpus(str(tmp_path / "small"), num_docs=2, offset=0)  # at most 78 tokens
    small = DataConfig(corpora=[CorpusConfig(name="small", prefix=str(tmp_path / "small"))], valid_fraction=0.5)
    with pytest.raises(LrpathError, match=r"corpus 'small' \(.*small\): its train split .* fewer than one sample"):
        TrainData(small, 128, GBS, MBS, 0, 1, lambda s: ("x", {"small": 1.0}), seed=1)


# ------------------------------------------------------------------------------------- broken corpora, vocab
BROKEN = {  # kind -> what the one error says
    "truncated_bin": r"truncated_bin\.bin is 500,000 bytes, but .*truncated_bin\.idx describes [\d,]+ uint16 tokens "
                     r"= [\d,]+ bytes: the \.bin is truncated, or the two files come from different datasets; rebuild",
    "other_idx": r"other_idx\.bin is [\d,]+ bytes, but .*other_idx\.idx describes .* different datasets; rebuild",
    "random_idx": r"random_idx\.idx is not a Megatron index file \(no MMIDIDX header\); rebuild",
}


def broken_pair(demo_data: dict, directory, kind: str) -> str:
    """A copy of the demo docs corpus broken as ``kind`` (see BROKEN); returns its prefix."""
    docs, code = demo_data["prefixes"]["docs"], demo_data["prefixes"]["code_a"]
    prefix = str(directory / kind)
    data = open(docs + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:500_000] if kind == "truncated_bin" else data)
    index = open((code if kind == "other_idx" else docs) + ".idx", "rb").read()
    if kind == "random_idx":
        index = np.random.default_rng(0).bytes(len(index))
    open(prefix + ".idx", "wb").write(index)
    return prefix


def test_check_indexed_refuses_inconsistent_indices(tmp_path):
    good = str(tmp_path / "good")
    write_corpus(good, num_docs=5, offset=0)
    assert indexed.check_indexed(good) == np.uint16
    index = np.fromfile(good + ".idx", dtype=np.uint8)
    seqs = 5
    pointers = indexed.HEADER.itemsize + 4 * seqs  # byte offset of the sequence pointers
    cases = {  # (byte offset, new bytes) -> message
        (9, (2).to_bytes(8, "little")): "has version 2 and dtype code 8",
        (17, bytes([9])): "has version 1 and dtype code 9",
        (pointers + 8, (3).to_bytes(8, "little")): "has sequence 1 at a pointer or length that does not follow",
        (indexed.HEADER.itemsize + 2 * 4, (2**32 - 1).to_bytes(4, "little")): "has sequence 2 at a pointer or length",
        (len(index) - 8, (4).to_bytes(8, "little")): "has document indices that do not run from 0 to its 5 sequences",
    }
    for (offset, value), message in cases.items():
        broken = index.copy()
        broken[offset:offset + len(value)] = np.frombuffer(value, np.uint8)
        broken.tofile(tmp_path / "bad.idx")
        (tmp_path / "bad.bin").write_bytes((tmp_path / "good.bin").read_bytes())
        with pytest.raises(LrpathError, match=f"^corpus 'x': .*bad\\.idx {message}.*; rebuild it"):
            indexed.check_indexed(str(tmp_path / "bad"), "corpus 'x'")
    index[:-1].tofile(tmp_path / "bad.idx")  # one byte short
    with pytest.raises(LrpathError, match=r"bad\.idx is 141 bytes, but its header \(5 sequences, 6 document indices\) "
                                          r"implies 142: truncated or corrupt"):
        indexed.check_indexed(str(tmp_path / "bad"))


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_corpus_is_refused_when_the_data_is_opened(demo_data, tmp_path, kind):
    cfg = DataConfig(corpora=[CorpusConfig(name="docs", prefix=broken_pair(demo_data, tmp_path, kind))])
    with pytest.raises(LrpathError, match=f"^corpus 'docs': .*{BROKEN[kind]}"):
        TrainData(cfg, SEQ, GBS, MBS, 0, 1, lambda s: ("x", {"docs": 1.0}), seed=1, vocab_size=2048)
    with pytest.raises(LrpathError, match=f"^corpus 'docs': .*{BROKEN[kind]}"):
        ValidData(cfg, SEQ, MBS, seed=1)


def test_token_ids_beyond_the_vocabulary_are_refused(data_cfg, tmp_path, monkeypatch):
    # Opening reads the first and last tokens of each corpus: corpus "a" ends with id 199.
    with pytest.raises(LrpathError, match=r"^corpus 'a': .*a\.bin holds token id 199, outside model\.vocab_size=150; "
                                          r"set model\.vocab_size to at least the vocabulary size of the tokenizer"):
        TrainData(data_cfg, SEQ, GBS, MBS, 0, 1, mix, seed=1, vocab_size=150)
    # Ids only in the middle of a corpus pass the sample and are refused in the micro-batch that holds them.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    monkeypatch.setattr(indexed, "TOKEN_SAMPLE", 8)
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for doc in range(100):
        builder.add_document(np.full(20, 500 if 30 <= doc < 60 else 5, dtype=np.uint16), [20])
    builder.finalize(str(tmp_path / "m.idx"))
    cfg = DataConfig(corpora=[CorpusConfig(name="m", prefix=str(tmp_path / "m"))], valid_fraction=0.1)
    data = TrainData(cfg, SEQ, GBS, MBS, 0, 1, lambda s: ("x", {"m": 1.0}), seed=1, vocab_size=100)
    with pytest.raises(LrpathError, match=r"^corpus 'm': train sample \d+ holds token id 500, outside "
                                          r"model\.vocab_size=100; set model\.vocab_size"):
        for step in range(20):
            data.microbatches(step)
    assert ValidData(cfg, SEQ, MBS, seed=1, vocab_size=100).batches("m", 1)  # its held-out documents are fine


def test_train_refuses_broken_data_and_a_small_vocabulary_with_one_error(demo_data, tmp_path):
    from conftest import run_lrpath, tiny_config

    prefix = broken_pair(demo_data, tmp_path, "truncated_bin")
    runs = {  # config -> message
        tiny_config(dict(demo_data, prefixes={**demo_data["prefixes"], "docs": prefix}), tmp_path / "trunc.yaml"):
            f"corpus 'docs': .*{BROKEN['truncated_bin']}",
        tiny_config(demo_data, tmp_path / "vocab.yaml", model={"vocab_size": 512}):
            # The demo data's sidecars name its 2048-id tokenizer: refused before any token id is read.
            r"corpus '\w+': the shard \S+ was made by the tokenizer \S+ with 2048 ids, more than model\.vocab_size=512",
    }
    for cfg, message in runs.items():
        run = tmp_path / f"run_{cfg.stem}"
        proc = run_lrpath(["train", str(cfg), "--run-dir", str(run)], check=False, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert re.search(f"^lrpath train: error: {message}", proc.stderr, re.M), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
        assert not [p for p in run.rglob("*") if p.is_file()]  # no checkpoint, log or metrics


def test_plan_check_data_reads_the_indices(demo_data, tmp_path, capsys):
    import yaml

    from lrpath_megatron import cli

    plan = yaml.safe_load(open(Path(__file__).parents[1] / "examples" / "demo_plan.yaml"))
    for corpus in plan["data"]["corpora"]:
        corpus["prefix"] = demo_data["prefixes"][corpus["name"]]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert cli.main(["plan", str(path), "--check-data"]) == 0
    plan["data"]["corpora"][0]["prefix"] = broken_pair(demo_data, tmp_path, "truncated_bin")
    plan["data"]["corpora"][1]["prefix"] = broken_pair(demo_data, tmp_path, "other_idx")
    path.write_text(yaml.safe_dump(plan))
    capsys.readouterr()
    assert cli.main(["plan", str(path), "--check-data"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"^lrpath plan: error: corpus 'docs': .*{BROKEN['truncated_bin']}", err, re.M), err
    assert re.search(f"^corpus 'code_a': .*{BROKEN['other_idx']}", err, re.M), err
    plan["data"]["corpora"][:2] = [{"name": n, "prefix": demo_data["prefixes"][n]} for n in ("docs", "code_a")]
    plan["model"]["vocab_size"] = 1000
    path.write_text(yaml.safe_dump(plan))
    assert cli.main(["plan", str(path), "--check-data"]) == 2
    assert "with 2048 ids, more than model.vocab_size=1000" in capsys.readouterr().err
