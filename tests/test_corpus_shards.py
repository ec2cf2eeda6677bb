"""A corpus of several .bin/.idx shards (prefix: a list or a glob) is the one dataset of its documents in
order: the same samples as one file, bitwise resume, changed shards refused on resume, tokenizer sidecars
checked when the data opens, `lrpath data inspect` over shards."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lrpath_megatron import cli
from lrpath_megatron.config import CorpusConfig, DataConfig
from lrpath_megatron.data import TrainData, ValidData
from lrpath_megatron.data_tools.corpus_meta import write_meta
from lrpath_megatron.inspect_data import inspect_dataset
from lrpath_megatron.errors import LrpathError

SEQ, GBS, MBS = 16, 8, 2
CUTS = (0, 70, 140, 200)  # corpus "a" (200 documents) as three shards


def write(prefix: Path, docs: list, dtype=np.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc.astype(dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def split_into_shards(prefix: str, out: Path, n: int) -> str:
    """Write the documents of ``prefix`` as ``n`` consecutive shards ``out_00000``, ...; returns their glob."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix, multimodal=False, mmap=True)
    cuts = np.linspace(0, len(data), n + 1).astype(int)
    for k in range(n):
        write(Path(f"{out}_{k:05d}"), [data[i] for i in range(cuts[k], cuts[k + 1])], data.index.dtype)
    return f"{out}_*"


def documents(n: int, offset: int, seed: int) -> list:
    """Every token of document i is i + offset, so a sample's tokens tell its documents."""
    rng = np.random.default_rng(seed)
    return [np.full(int(rng.integers(5, 40)), i + offset, dtype=np.int64) for i in range(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    a = documents(200, 0, seed=0)
    write(root / "a_whole", a)
    for k in range(3):
        write(root / f"a_{k:05d}", a[CUTS[k]:CUTS[k + 1]])
    write(root / "extra_00003", documents(10, 0, seed=1))
    write(root / "b", documents(120, 1000, seed=2))
    return root


def config(root: Path, a) -> DataConfig:
    return DataConfig(corpora=[CorpusConfig("a", a), CorpusConfig("b", str(root / "b"))], valid_fraction=0.1, seed=3)


def mix(step):
    return ("s0", {"a": 0.75, "b": 0.25}) if step < 5 else ("s1", {"a": 0.25, "b": 0.75})


def train(cfg: DataConfig, **kwargs) -> TrainData:
    return TrainData(cfg, SEQ, GBS, MBS, 0, 1, mix, seed=cfg.seed, **kwargs)


def tokens(data: TrainData, steps) -> list:
    return [torch.cat([mb["tokens"] for mb in data.microbatches(s)]) for s in steps]


def shards(root: Path, *numbers) -> list:
    return [str(root / f"a_{k:05d}") for k in numbers]


def test_three_shards_give_the_samples_of_one_file(root):
    whole, listed = train(config(root, str(root / "a_whole"))), train(config(root, shards(root, 0, 1, 2)))
    globbed = train(config(root, str(root / "a_0000[0-2]")))
    steps = range(12)  # through the stage switch at step 5
    expected = tokens(whole, steps)
    assert all(torch.equal(x, y) for x, y in zip(expected, tokens(listed, steps)))
    assert all(torch.equal(x, y) for x, y in zip(expected, tokens(globbed, steps)))
    # Every shard is drawn from: documents of all three turn up (tokens are document ids).
    seen = set(torch.cat(expected).unique().tolist())
    assert all(seen & set(range(lo, hi)) for lo, hi in zip(CUTS, CUTS[1:]))
    state = listed.state_dict()
    assert globbed.state_dict() == state
    assert {k: v for k, v in whole.state_dict().items() if k != "shards"} == {
        k: v for k, v in state.items() if k != "shards"}
    assert state["shards"]["a"] == [{"prefix": p, "documents": hi - lo, "tokens": int(n)} for p, lo, hi, n in zip(
        shards(root, 0, 1, 2), CUTS, CUTS[1:], [sum(len(d) for d in documents(200, 0, 0)[lo:hi])
                                                for lo, hi in zip(CUTS, CUTS[1:])])]
    held = [ValidData(config(root, a), SEQ, MBS, seed=3).batches("a", 2) for a in (str(root / "a_whole"),
                                                                                    shards(root, 0, 1, 2))]
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(*held))


def test_resume_is_bitwise_and_other_shards_are_refused_by_name(root):
    cfg = config(root, shards(root, 0, 1, 2))
    expected = tokens(train(cfg), range(10))
    first = train(cfg)
    tokens(first, range(5))
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = train(cfg)
    resumed.load_state_dict(state, "ckpt/iter_0000005")
    assert all(torch.equal(x, y) for x, y in zip(expected[5:], tokens(resumed, range(5, 10))))
    changed = {  # shards now -> what the refusal says
        (1, 0, 2): rf"the shard {root}/a_00001 is now number 0 of the corpus's shards but was number 1",
        (0, 1): rf"the shard {root}/a_00002 is gone",
        (0, 1, 2, 3): rf"the shard {root}/extra_00003 was added",
    }
    for numbers, what in changed.items():
        prefixes = [str(root / ("extra_00003" if k == 3 else f"a_{k:05d}")) for k in numbers]
        with pytest.raises(LrpathError, match=rf"^cannot continue the data of corpus 'a' saved in ckpt/iter_0000005: "
                                              rf"{what}; a run continues the same shards in the same order"):
            train(config(root, prefixes)).load_state_dict(state, "ckpt/iter_0000005")
    old = {k: v for k, v in state.items() if k != "shards"}  # saved before shards were recorded
    train(config(root, shards(root, 0, 1, 2))).load_state_dict(old)


def test_bad_shard_lists_are_one_error_naming_the_shard(root, tmp_path):
    with pytest.raises(LrpathError, match=r"^corpus 'a': the glob '.*/nope_\*' matches no shard"):
        train(config(root, str(root / "nope_*")))
    with pytest.raises(LrpathError, match=r"^corpus 'a': the shard .*/a_00001 is listed twice"):
        train(config(root, [str(root / "a_0000[0-1]"), str(root / "a_00001")]))
    wide = write(tmp_path / "wide", documents(10, 0, seed=4), dtype=np.int32)
    with pytest.raises(LrpathError, match=r"^corpus 'a': the shard .*/wide holds int32 tokens but .*/a_00000 holds "
                                          r"uint16; the shards of one corpus are one token stream"):
        train(config(root, [*shards(root, 0), wide]))
    with pytest.raises(LrpathError, match=r"^corpus 'a': .*/gone\.bin does not exist"):
        train(config(root, [*shards(root, 0), str(tmp_path / "gone")]))


def sidecar(prefix: str, sha256: str, vocab_size: int) -> None:
    tokenizer = {"kind": "sentencepiece", "path": f"tok/{sha256}.model", "sha256": sha256 * 8,
                 "vocab_size": vocab_size, "eod_id": 3}
    write_meta(prefix, {"tokenizer": tokenizer, "documents": 0, "tokens": 0})


def test_tokenizer_sidecars_are_checked_when_the_data_opens(root, tmp_path):
    # Copies of the shards: the sidecars must not reach the other tests' corpora.
    docs = documents(200, 0, seed=0)
    prefixes = [write(tmp_path / f"a_{k}", docs[CUTS[k]:CUTS[k + 1]]) for k in range(3)]
    sidecar(prefixes[0], "aaaa", 300)
    assert train(config(root, prefixes), vocab_size=1200)  # the other shards have none: accepted as before
    with pytest.raises(LrpathError, match=rf"^corpus 'a': the shard {tmp_path}/a_0 was made by the tokenizer "
                                          rf"tok/aaaa\.model with 300 ids, more than model\.vocab_size=250; set "
                                          rf"model\.vocab_size to at least 300"):
        train(config(root, str(tmp_path / "a_*")), vocab_size=250)  # every id in the data is < 200: only it tells
    sidecar(prefixes[1], "aaaa", 300)
    sidecar(prefixes[2], "bbbb", 300)
    message = (rf"^corpus 'a': its shards were made with different tokenizers: {tmp_path}/a_0 by tok/aaaa\.model "
               rf"\(sha256 a+\); {tmp_path}/a_1 by tok/aaaa\.model \(sha256 a+\); {tmp_path}/a_2 by tok/bbbb\.model "
               rf"\(sha256 b+\); one corpus is one token stream")
    with pytest.raises(LrpathError, match=message):
        ValidData(config(root, prefixes), SEQ, MBS, seed=3, vocab_size=1200)


def test_inspect_reports_shards_as_one_corpus(root, capsys):
    whole, sharded = inspect_dataset(str(root / "a_whole"), valid_fraction=0.1), inspect_dataset(
        shards(root, 0, 1, 2), valid_fraction=0.1)
    assert (sharded.documents, sharded.tokens, sharded.histogram, sharded.held_out) == (
        whole.documents, whole.tokens, whole.histogram, whole.held_out)
    assert [s["documents"] for s in sharded.shards] == [70, 70, 60]
    assert sum(s["tokens"] for s in sharded.shards) == whole.tokens
    # Sharded preprocessing leaves a corpus manifest (PREFIX.meta.json, no PREFIX.bin) listing its shards.
    tokenizer = {"kind": "sentencepiece", "path": "tok.model", "sha256": "c" * 64, "vocab_size": 256, "eod_id": 3}
    write_meta(root / "a", {"tokenizer": tokenizer, "shards": [{"prefix": f"a_{k:05d}"} for k in range(3)]})
    assert inspect_dataset(str(root / "a")).shards == sharded.shards
    assert cli.main(["data", "inspect", str(root / "a_0000*")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{root}/a_0000*: 200 documents, {whole.tokens:,} tokens (uint16), 3 shards"
    assert re.fullmatch(rf"  shard 2: {root}/a_00002: 60 documents, [\d,]+ tokens", out[3])



def test_a_plain_string_prefix_hashes_as_before_and_lists_or_globs_are_validated():
    import yaml

    from lrpath_megatron.config import ConfigError
    from lrpath_megatron.plan import Plan

    written = yaml.safe_load(open(Path(__file__).parents[1] / "examples" / "demo_plan.yaml"))
    hashed = Plan.from_dict(written).resolved()["train_config"]["data"]["corpora"]
    assert hashed == written["data"]["corpora"]  # {name, prefix: str}: no new key, so plan hashes stay
    written["data"]["corpora"][0]["prefix"] = ["data/docs_*", "more/docs_text_document"]
    assert Plan.from_dict(written).resolved()["train_config"]["data"]["corpora"][0]["prefix"] == [
        "data/docs_*", "more/docs_text_document"]
    for bad in ([], ["a", ""], 7):
        written["data"]["corpora"][0]["prefix"] = bad
        with pytest.raises(ConfigError, match=r"data\.corpora\[0\]\.prefix=.*: point it at a Megatron \.bin/\.idx "
                                              r"prefix \(PREFIX of PREFIX\.bin\), a glob of shard prefixes, or a"):
            Plan.from_dict(written)
