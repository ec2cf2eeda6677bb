"""Hugging Face import and export: tiny random transformers models of every supported architecture go to
lrpath checkpoints and back bitwise, compute the same logits in megatron-core (at TP=1 and at TP=2 x PP=2)
as in transformers, and bad input is refused with one clear error and nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from conftest import free_port
from lrpath_megatron import cli
from lrpath_megatron.config import LATER_MODEL_FIELDS, ModelConfig, to_dict
from lrpath_megatron.errors import LrpathError

os.environ["LRPATH_DEVICE"] = "cpu"

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, vocab_size=256, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# name -> (architecture, config overrides, extra import arguments)
MODELS = {
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True, vocab_size=250), []),
    # biases everywhere and Llama 3 RoPE scaling, at a training length shorter than the model's context
    "llama_untied": ("LlamaForCausalLM", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                              rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                              max_position_embeddings=131072), ["--seq-length", "64"]),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1000000.0), []),
    # head_dim 32 != hidden_size / heads: megatron-core's kv_channels
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32, rms_norm_eps=1e-5), []),
    "mistral": ("MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=64), []),
}
TOKENS = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 250, (2, 16), generator=TOKENS)
# fp32 logits, megatron-core vs transformers, as docs/open_models.md states them: bitwise at TP=1; at
# TP=2 x PP=2 the row-parallel sums add two ranks' halves (measured on megatron-core 0.16.1 and 0.19.2:
# 2.26e-6 for qwen3, 1.79e-6 for llama_tied).
TP2_PP2_TOLERANCE = 3e-6
TOLERANCE = 1e-4  # the LoRA export's and init_from's comparisons (test_adapters, test_init_from)


def _hf_model(arch: str, overrides: dict, seed: int):
    import transformers

    config = transformers.CONFIG_MAPPING[_model_type(arch)](**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # every weight random (transformers starts norms at 1 and biases at 0)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def _model_type(arch: str) -> str:
    from lrpath_megatron.hf.architectures import ARCHITECTURES

    return ARCHITECTURES[arch]


def _tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer saved as tokenizer.json + tokenizer_config.json (built here, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    """name -> HF directory, its state dict and its logits on IDS; imported to an lrpath checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, (name, (arch, overrides, args)) in enumerate(MODELS.items()):
        model = _hf_model(arch, overrides, seed)
        directory = root / name
        # qwen2 in shards with an index; the others in one file
        model.save_pretrained(directory, max_shard_size="100KB" if name == "qwen2" else "50MB")
        with torch.no_grad():
            logits = model(IDS).logits
        if name == "llama_tied":
            _tiny_tokenizer(directory)
        ckpt = root / f"{name}.ckpt"
        assert cli.main(["hf", "import", str(directory), "--out", str(ckpt), "--no-progress", *args]) == 0
        out[name] = SimpleNamespace(dir=directory, ckpt=ckpt, state=model.state_dict(), logits=logits)
    ckpt = root / "qwen3_tp2pp2.ckpt"
    assert cli.main(["hf", "import", str(out["qwen3"].dir), "--out", str(ckpt), "--tensor-parallel", "2",
                     "--pipeline-parallel", "2", "--no-progress"]) == 0
    out["qwen3"].ckpt_tp2pp2 = ckpt
    return out


# --------------------------------------------------------------------------------------------------
# megatron-core side: one 4-rank run (gloo) loads the imports, computes logits and saves at TP=2 x PP=2
# --------------------------------------------------------------------------------------------------
def _logits(model, tokens: torch.Tensor):
    """Logits of the full vocabulary on the last pipeline stage (None elsewhere), through megatron-core's
    pipeline schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch = {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens)}

    def step(data_iterator, module):
        data = next(data_iterator)
        output = module(data["tokens"], data["position_ids"], None)
        return output, lambda out, non_loss_data=True: gather_from_tensor_model_parallel_region(out)

    model.eval()
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            collect_non_loss_data=True)
    return store[0] if parallel_state.is_pipeline_last_stage() else None


def lrpath_logits(cfg, ckpt: Path, tokens: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    """Logits of checkpoint ``ckpt`` (with LoRA ``adapter`` loaded on it) in this process, one rank, as
    lrpath evaluates it: the model built from ``cfg`` in its precision."""
    from lrpath_megatron import distributed
    from lrpath_megatron.adapters.lora import load_adapter
    from lrpath_megatron.checkpoint.tensors import load_model
    from lrpath_megatron.model import build_model, transformer_config, with_precision

    cfg = replace(cfg, parallel=replace(cfg.parallel, tensor_parallel=1, pipeline_parallel=1,
                                        micro_batch_size=tokens.shape[0], global_batch_size=tokens.shape[0]))
    distributed.initialize(cfg.parallel, cfg.seed)
    try:
        tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
        model = with_precision(build_model(cfg.model, cfg.parallel, cfg.precision, tcfg), tcfg)
        load_model(ckpt, model)
        if adapter is not None:
            load_adapter(model, adapter, seed=cfg.seed)
        return _logits(model, tokens)[..., :cfg.model.vocab_size].float()
    finally:
        distributed.shutdown()


def _megatron_worker(rank: int, world: int, port: int, jobs: list, result_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LRPATH_DEVICE="cpu")
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from lrpath_megatron import distributed, ranks
    from lrpath_megatron.checkpoint import tensors
    from lrpath_megatron.export import read_checkpoint
    from lrpath_megatron.model import build_model

    results = {}
    for job in jobs:
        _, cfg = read_checkpoint(Path(job["ckpt"]))  # the model as the import derived it
        cfg = replace(cfg, parallel=replace(cfg.parallel, tensor_parallel=job["tp"], pipeline_parallel=job["pp"],
                                            micro_batch_size=2, global_batch_size=8))
        distributed.initialize(cfg.parallel, cfg.seed)
        model = build_model(cfg.model, cfg.parallel, cfg.precision)
        tensors.load_model(Path(job["ckpt"]), model)
        logits = _logits(model, IDS)
        results[job["name"]] = next(x for x in ranks.gather(logits) if x is not None)
        if job.get("save"):
            tensors.save(Path(job["save"]), 0, model, None, {"step": 0}, {"config": to_dict(cfg)},
                         save_optimizer=False)
        parallel_state.destroy_model_parallel()
    if rank == 0:
        torch.save(results, result_file)
    distributed.shutdown()


@pytest.fixture(scope="module")
def megatron(hf, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("megatron")
    jobs = [{"name": name, "ckpt": str(h.ckpt), "tp": 1, "pp": 1} for name, h in hf.items()]
    jobs += [{"name": "qwen3_tp2pp2", "ckpt": str(hf["qwen3"].ckpt_tp2pp2), "tp": 2, "pp": 2,
              "save": str(root / "qwen3_tp2pp2")},
             # imported for TP=1, loaded (resharded) at TP=2 x PP=2, tied embeddings on two stages
             {"name": "llama_tied_tp2pp2", "ckpt": str(hf["llama_tied"].ckpt), "tp": 2, "pp": 2,
              "save": str(root / "llama_tied_tp2pp2")}]
    torch.multiprocessing.spawn(_megatron_worker, args=(4, free_port(), jobs, str(root / "logits.pt")), nprocs=4)
    return SimpleNamespace(logits=torch.load(root / "logits.pt", weights_only=True), root=root)


# --------------------------------------------------------------------------------------------------
# Round trips and logits
# --------------------------------------------------------------------------------------------------
def _safetensors(directory: Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _assert_same_hf_model(directory: Path, original) -> None:
    """``directory`` holds ``original``'s tensors bitwise, and transformers loads it, with no missing or
    unexpected weights, into a model of the same logits."""
    from transformers import AutoModelForCausalLM

    exported, source = _safetensors(directory), _safetensors(original.dir)
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, original.logits, rtol=0, atol=0)


@pytest.mark.compat
@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bitwise_and_transformers_loads_it(hf, tmp_path, name):
    out = tmp_path / "exported"
    assert cli.main(["hf", "export", str(hf[name].ckpt), "--out", str(out), "--no-progress",
                     "--max-shard-size", "150KB"]) == 0
    _assert_same_hf_model(out, hf[name])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [MODELS[name][0]]
    assert (out / "model.safetensors.index.json").is_file()  # sharded past --max-shard-size


@pytest.mark.compat
@pytest.mark.parametrize("name", list(MODELS))
def test_megatron_logits_match_transformers(hf, megatron, name):
    diff = (megatron.logits[name] - hf[name].logits).abs().max().item()
    print(f"{name}: max |logits diff| = {diff:.2e}")
    assert megatron.logits[name].dtype == hf[name].logits.dtype == torch.float32
    assert torch.equal(megatron.logits[name], hf[name].logits)  # TP=1: the same to the last bit


def test_tp2_pp2_loads_imports_and_saves_what_exports_bitwise(hf, megatron, tmp_path):
    pairs = (("qwen3_tp2pp2", "qwen3"), ("llama_tied_tp2pp2", "llama_tied"))
    diffs = {name: (megatron.logits[name] - hf[source].logits).abs().max().item() for name, source in pairs}
    print(", ".join(f"{name}: max |logits diff| = {diff:.2e}" for name, diff in diffs.items()))
    for name, source in pairs:
        assert diffs[name] <= TP2_PP2_TOLERANCE, name
        # the trainer's own checkpoint at TP=2 x PP=2 exports to the same HF model
        saved = megatron.root / name / "iter_0000000"
        out = tmp_path / name
        assert cli.main(["hf", "export", str(saved), "--out", str(out), "--no-progress"]) == 0
        _assert_same_hf_model(out, hf[source])
        # an import is laid out as megatron-core saves: the same keys, shapes and dtypes. (Its common state
        # is a common.pt, as megatron-core 0.16 writes it and every release reads it; 0.17 on keep theirs
        # as common_state/ objects inside the checkpoint instead.)
        from lrpath_megatron.checkpoint.dist_files import DcpTensorReader

        ours, theirs = ({k: v for k, v in DcpTensorReader(c / "model").metadata.state_dict_metadata.items()
                         if not k.startswith("common_state/")} for c in (hf[source].ckpt, saved))
        assert ours.keys() == theirs.keys()
        for key, md in theirs.items():
            assert getattr(md, "size", None) == getattr(ours[key], "size", None), key


@pytest.mark.parametrize("dtype, stored", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_half_precision_weights_are_kept_exactly(tmp_path, dtype, stored):
    from lrpath_megatron.checkpoint.layout import read_manifest

    source = tmp_path / "source"
    _hf_model("Qwen2ForCausalLM", {}, seed=7).to(dtype).save_pretrained(source)
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    assert cli.main(["hf", "import", str(source), "--out", str(ckpt), "--no-progress"]) == 0
    assert read_manifest(ckpt)["config"]["precision"]["dtype"] == ("bf16" if stored == torch.bfloat16 else "fp32")
    assert cli.main(["hf", "export", str(ckpt), "--out", str(out), "--no-progress"]) == 0
    original, exported = _safetensors(source), _safetensors(out)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():  # fp16 comes back as the fp32 of the same values
        assert exported[name].dtype == stored and torch.equal(exported[name], tensor.to(stored)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(stored).removeprefix("torch.")


def test_a_merge_of_imports_exports(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    from lrpath_megatron.merge import merge_checkpoints
    from lrpath_megatron.merge_weights import merge_weights

    source = hf["llama_untied"]
    merged = tmp_path / "merged"
    merge_checkpoints([source.ckpt, source.ckpt], merge_weights("1-sqrt", 2), merged, progress=False)
    out = tmp_path / "exported"
    assert cli.main(["hf", "export", str(merged), "--out", str(out), "--no-progress"]) == 0
    with torch.no_grad():  # a weighted mean of one model twice: the model, up to rounding
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
    torch.testing.assert_close(logits, source.logits, rtol=0, atol=1e-5)


def test_import_records_the_model_and_the_tokenizer_goes_back_out(hf, tmp_path):
    import yaml
    from transformers import AutoTokenizer

    from lrpath_megatron.checkpoint.layout import read_manifest, verify
    from lrpath_megatron.config import from_dict

    ckpt = hf["llama_tied"].ckpt
    manifest = read_manifest(ckpt)
    assert manifest["step"] == 0 and manifest["kind"] == "hf_import" and not verify(ckpt)
    assert manifest["hf_source"]["architecture"] == "LlamaForCausalLM"
    model = from_dict(ModelConfig, yaml.safe_load((ckpt / "model.yaml").read_text())["model"])
    assert to_dict(model) == manifest["config"]["model"]
    assert model.padded_vocab_size == model.vocab_size == 250 and not model.untie_embeddings
    qwen3 = read_manifest(hf["qwen3"].ckpt)["config"]
    assert qwen3["model"]["kv_channels"] == 32 and qwen3["model"]["qk_layernorm"]
    assert read_manifest(hf["qwen3"].ckpt_tp2pp2)["config"]["parallel"]["pipeline_parallel"] == 2
    out = tmp_path / "with_tokenizer"
    assert cli.main(["hf", "export", str(ckpt), "--out", str(out), "--no-progress"]) == 0
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [1, 2]
    # A Hugging Face tokenizer the data was tokenized with goes out as it is (given as its directory); a real
    # SentencePiece tokenizer goes out with a release in test_init_from; anything else is refused.
    out = tmp_path / "with_hf_tokenizer"
    assert cli.main(["hf", "export", str(hf["llama_untied"].ckpt), "--out", str(out), "--no-progress",
                     "--tokenizer-model", str(hf["llama_tied"].dir)]) == 0
    assert AutoTokenizer.from_pretrained(out)("world hello")["input_ids"] == [2, 1]
    assert (out / "tokenizer.json").read_bytes() == (hf["llama_tied"].dir / "tokenizer.json").read_bytes()
    spm = tmp_path / "sp.model"
    spm.write_bytes(b"not a sentencepiece model")
    out = tmp_path / "with_spm"
    assert cli.main(["hf", "export", str(hf["qwen2"].ckpt), "--out", str(out), "--no-progress",
                     "--tokenizer-model", str(spm)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".with_spm.*"))


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error (exit 2), nothing half-written
# --------------------------------------------------------------------------------------------------
def _refused(capsys, argv: list[str], match: str, out: Path) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("error:") == 1, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporaries


def _edited_copy(hf, tmp_path: Path, name: str, **config) -> Path:
    directory = tmp_path / f"{name}_edited"
    shutil.copytree(hf[name].dir, directory)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, **config}))
    return directory


@pytest.mark.parametrize("name, edit, match", [
    ("llama_tied", {"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel is not supported"),
    ("llama_tied", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama_untied", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_scaling type 'yarn'"),
    ("llama_untied", {"rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 2.0}}, "Llama 3 RoPE scaling with"),
    ("llama_untied", {"mlp_bias": False}, "attention_bias=True with mlp_bias=False"),
    ("mistral", {"sliding_window": 16}, "import with --seq-length 16"),
    ("qwen2", {"intermediate_size": 128}, "the weights do not match config.json"),
])
def test_import_refuses_what_it_cannot_represent(hf, tmp_path, capsys, name, edit, match):
    directory = _edited_copy(hf, tmp_path, name, **edit)
    out = tmp_path / "ckpt"
    _refused(capsys, ["hf", "import", str(directory), "--out", str(out), "--no-progress"], match, out)


def test_import_refuses_missing_and_truncated_shards(hf, tmp_path, capsys):
    directory = tmp_path / "qwen2"
    shutil.copytree(hf["qwen2"].dir, directory)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 2
    out = tmp_path / "ckpt"
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    _refused(capsys, ["hf", "import", str(directory), "--out", str(out)], "truncated or damaged", out)
    shards[1].unlink()
    _refused(capsys, ["hf", "import", str(directory), "--out", str(out)], "lacks 1 of the shards", out)
    for shard in directory.glob("*.safetensors*"):
        shard.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    _refused(capsys, ["hf", "import", str(directory), "--out", str(out)], "pickle files", out)


def test_import_refuses_tensor_parallel_the_model_does_not_split_into(hf, tmp_path, capsys):
    out = tmp_path / "ckpt"
    _refused(capsys, ["hf", "import", str(hf["qwen2"].dir), "--out", str(out), "--tensor-parallel", "3"],
             "parallel.tensor_parallel=3 does not divide", out)


def test_export_refuses_shapes_that_disagree_with_the_manifest_and_an_existing_target(hf, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf["mistral"].ckpt, ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["config"]["model"]["ffn_hidden_size"] = 128
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "exported"
    _refused(capsys, ["hf", "export", str(ckpt), "--out", str(out)], "the stored weights do not match", out)

    out.mkdir()
    (out / "keep").write_text("x")
    assert cli.main(["hf", "export", str(hf["mistral"].ckpt), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "keep").is_file()
    assert cli.main(["hf", "export", str(hf["mistral"].ckpt), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_models_no_hf_architecture_computes():
    from lrpath_megatron.hf.architectures import hf_config

    with pytest.raises(LrpathError, match="model.activation='gelu'"):
        hf_config(ModelConfig(), torch.float32)
    with pytest.raises(LrpathError, match="combination of biases and norms"):
        hf_config(ModelConfig(activation="swiglu", qk_layernorm=True, add_qkv_bias=True), torch.float32)


# --------------------------------------------------------------------------------------------------
# The new model settings leave existing checkpoints and plans as they were
# --------------------------------------------------------------------------------------------------
def test_checkpoints_saved_before_the_new_model_settings_still_match(tmp_path):
    from lrpath_megatron.checkpoint.layout import model_differences
    from lrpath_megatron.checkpoint.tensors import check_model

    current = to_dict(ModelConfig(num_layers=4))
    old = {k: v for k, v in current.items() if k not in LATER_MODEL_FIELDS}
    assert model_differences(old, current) == []
    assert model_differences(old, {**current, "qk_layernorm": True}) == ["qk_layernorm"]
    ckpt = tmp_path / "iter_0000010"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(json.dumps({"step": 10, "config": {"model": old}}))
    assert check_model(ckpt, current, "resume from", "fix")["step"] == 10
    with pytest.raises(LrpathError, match="model.norm_epsilon: checkpoint 1e-05 vs config 1e-06"):
        check_model(ckpt, {**current, "norm_epsilon": 1e-6}, "resume from", "fix")


def test_plans_written_before_the_new_model_settings_keep_their_hash():
    from lrpath_megatron.plan import Plan

    def plan(**model) -> dict:
        return {
            "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128, **model},
            "parallel": {"micro_batch_size": 4, "global_batch_size": 8},
            "data": {"corpora": [{"name": n, "prefix": f"runs/demo/data/{n}"} for n in ("docs", "code_a")]},
            "plan": {"main": {"eta_max": 1e-3, "eta_min": 1e-4, "warmup_steps": 10},
                     "versions": [{"name": f"v{i + 1}", "corpora": [c], "steps": 100, "release": {"decay_steps": 40}}
                                  for i, c in enumerate(("docs", "code_a"))]},
        }

    # the model section plans were hashed with before the new settings existed
    before = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": None,
              "ffn_hidden_size": None, "seq_length": 128, "vocab_size": 2048, "make_vocab_size_divisible_by": 128,
              "normalization": "RMSNorm", "activation": "gelu", "position_embedding": "rope", "rotary_base": 10000,
              "untie_embeddings": True, "add_bias_linear": False, "init_method_std": 0.02, "hidden_dropout": 0.0,
              "attention_dropout": 0.0}
    base = Plan.from_dict(plan())
    assert base.resolved()["train_config"]["model"] == before
    # written out at their defaults, the new settings change nothing; set otherwise, they change the plan
    written = plan(norm_epsilon=1e-5, kv_channels=None, qk_layernorm=False)
    assert Plan.from_dict(written).plan_hash() == base.plan_hash()
    assert Plan.from_dict(plan(qk_layernorm=True)).plan_hash() != base.plan_hash()
