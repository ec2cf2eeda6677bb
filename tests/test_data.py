"""TrainData / ValidData on real megatron-core .bin/.idx corpora built here."""
import json

import numpy as np
import pytest
import torch

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
    with pytest.raises(LrpathError, match="not divisible"):
        TrainData(data_cfg, SEQ, 6, 4, 0, 1, mix, seed=1)
