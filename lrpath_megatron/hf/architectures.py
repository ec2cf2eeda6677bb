"""Which Hugging Face causal LMs lrpath's GPT reproduces exactly, and their ``config.json`` both ways.

Import reads config.json through transformers' own config class, so missing keys take the defaults and
older keys the meaning transformers gives them, then refuses whatever megatron-core 0.16.1 cannot
compute the same way. Export writes the long-standing keys (``rope_theta``, ``rope_scaling``,
``torch_dtype``), which old and new transformers releases (and vLLM) read alike.
"""
from __future__ import annotations

import math

import torch

from lrpath_megatron.config import ModelConfig
from lrpath_megatron.errors import LrpathError

# architecture -> transformers model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# megatron-core 0.16.1 applies Llama 3 RoPE scaling with these fixed; only the factor is a setting.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# config.json keys kept from an imported model on export: its token ids, and the context it was built for
# (a sliding window at least as long as every trained sequence is the same attention for those).
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
CARRIED_WINDOW_KEYS = {
    "MistralForCausalLM": ("sliding_window",),
    "Qwen2ForCausalLM": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
    "Qwen3ForCausalLM": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def architecture_of(raw: dict, where: str) -> str:
    """The one supported architecture ``raw`` (a parsed config.json) declares; refuses any other."""
    names = raw.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise LrpathError(f"{where}: architecture {', '.join(names) or '(none given)'} is not supported; "
                          f"lrpath imports {supported}")
    arch = names[0]
    if raw.get("model_type", ARCHITECTURES[arch]) != ARCHITECTURES[arch]:
        raise LrpathError(f"{where}: model_type {raw.get('model_type')!r} does not match {arch} "
                          f"({ARCHITECTURES[arch]!r}); the config is inconsistent")
    return arch


def model_from_hf(raw: dict, where: str, seq_length: int | None = None) -> tuple[str, ModelConfig]:
    """(architecture, lrpath model section) of a parsed config.json. ``seq_length`` None = the model's
    ``max_position_embeddings``. Raises LrpathError naming the first setting lrpath cannot reproduce."""
    from transformers import CONFIG_MAPPING

    arch = architecture_of(raw, where)
    try:
        cfg = CONFIG_MAPPING[ARCHITECTURES[arch]].from_dict(raw)
    except Exception as exc:  # transformers validates in its own ways
        raise LrpathError(f"{where}: transformers cannot read this {arch} config: {exc}") from None

    if cfg.hidden_act != "silu":
        raise _refusal(where, f"hidden_act={cfg.hidden_act!r} (megatron-core's gated MLP here is SwiGLU: silu only)")
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    seq = seq_length or cfg.max_position_embeddings
    window = _sliding_window(arch, cfg)
    if window is not None and window < seq:
        raise LrpathError(
            f"{where}: sliding-window attention over {window} tokens, but sequences of {seq} tokens; "
            f"megatron-core's attention here is full causal, the same as the window only while sequences fit "
            f"in it: import with --seq-length {window} (or less)")
    rope_scaling, factor = _rope_scaling(cfg.rope_parameters, where)
    theta = cfg.rope_parameters["rope_theta"]
    if float(theta) != int(theta):
        raise _refusal(where, f"rope_theta={theta} is not a whole number (model.rotary_base is an integer)")
    add_bias_linear, add_qkv_bias = _biases(arch, cfg, where)
    model = ModelConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=cfg.num_key_value_heads if cfg.num_key_value_heads not in (None, heads) else None,
        kv_channels=head_dim if head_dim * heads != hidden else None,
        ffn_hidden_size=cfg.intermediate_size,
        seq_length=seq,
        vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=_vocab_multiple(cfg.vocab_size),
        normalization="RMSNorm",
        norm_epsilon=float(cfg.rms_norm_eps),
        activation="swiglu",
        position_embedding="rope",
        rotary_base=int(theta),
        rope_scaling=rope_scaling,
        rope_scaling_factor=factor,
        untie_embeddings=not cfg.tie_word_embeddings,
        add_bias_linear=add_bias_linear,
        add_qkv_bias=add_qkv_bias,
        qk_layernorm=arch == "Qwen3ForCausalLM",
        init_method_std=float(cfg.initializer_range),
        attention_dropout=float(cfg.attention_dropout),
    )
    return arch, model


def _refusal(where: str, problem: str) -> LrpathError:
    return LrpathError(f"{where}: {problem}; lrpath cannot represent this model exactly, so it does not import it")


def _sliding_window(arch: str, cfg) -> int | None:
    if arch == "MistralForCausalLM":
        return cfg.sliding_window
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and "sliding_attention" in (cfg.layer_types or []):
        return cfg.sliding_window
    return None


def _rope_scaling(params: dict, where: str) -> tuple[str | None, float | None]:
    rope_type = params.get("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refusal(where, f"partial_rotary_factor={params['partial_rotary_factor']} (RoPE over part of "
                              f"each head)")
    if rope_type == "default":
        return None, None
    if rope_type == "linear":
        return "linear", float(params["factor"])
    if rope_type == "llama3":
        other = {k: params.get(k) for k, v in LLAMA3_FIXED.items() if float(params.get(k, v)) != v}
        if other:
            raise _refusal(where, f"Llama 3 RoPE scaling with {other} (megatron-core 0.16.1 fixes {LLAMA3_FIXED}; "
                                  f"only the factor is a setting)")
        return "llama3", float(params["factor"])
    raise _refusal(where, f"rope_scaling type {rope_type!r} (megatron-core 0.16.1's GPT does default, linear and "
                          f"llama3 RoPE)")


def _biases(arch: str, cfg, where: str) -> tuple[bool, bool]:
    """(add_bias_linear, add_qkv_bias): megatron-core puts biases on every linear layer, or on q/k/v only."""
    if arch == "Qwen2ForCausalLM":
        return False, True  # q, k and v always have biases, the output projection and the MLP never
    attention = bool(getattr(cfg, "attention_bias", False))
    mlp = bool(getattr(cfg, "mlp_bias", False))
    if attention != mlp:
        raise _refusal(where, f"attention_bias={attention} with mlp_bias={mlp} (megatron-core biases every linear "
                              f"layer or none but q/k/v)")
    return attention, False


def _vocab_multiple(vocab: int) -> int:
    """The largest power of two up to 128 dividing the vocabulary: the padded vocabulary is the vocabulary
    itself, so no padding rows (which would take part in the softmax) are added."""
    return math.gcd(vocab, 128)


def hf_config(model: ModelConfig, dtype: torch.dtype, source: dict | None = None) -> tuple[str, dict]:
    """(architecture, config.json) of an lrpath model. ``source``: the config.json it was imported from,
    whose architecture is kept when it can express the model, and whose token ids and context are kept."""
    arch = _export_architecture(model, source)
    heads = model.num_attention_heads
    rope_scaling = None
    if model.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_FIXED}
    elif model.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": model.rope_scaling_factor}
    config = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.kv_channels or model.hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_length,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": not model.untie_embeddings,
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
    }
    if arch == "LlamaForCausalLM":
        config.update(attention_bias=model.add_bias_linear, mlp_bias=model.add_bias_linear)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=model.num_layers)
    if arch == "Qwen3ForCausalLM":
        config.update(attention_bias=False)
    if arch == "MistralForCausalLM":
        config.update(sliding_window=None)
    source = source or {}
    same_arch = (source.get("architectures") or [None])[0] == arch
    for key in CARRIED_KEYS + (CARRIED_WINDOW_KEYS.get(arch, ()) if same_arch else ()):
        if key in source:
            config[key] = source[key]
    # A model trained at a shorter length than its source still handles the source's context.
    config["max_position_embeddings"] = max(model.seq_length, config["max_position_embeddings"])
    return arch, config


def _export_architecture(model: ModelConfig, source: dict | None) -> str:
    problems = [f"model.{k}={getattr(model, k)!r} (needs {v!r})" for k, v in
                (("normalization", "RMSNorm"), ("activation", "swiglu"), ("position_embedding", "rope"))
                if getattr(model, k) != v]
    if model.hidden_dropout:
        problems.append(f"model.hidden_dropout={model.hidden_dropout} (these architectures have none)")
    if problems:
        raise LrpathError(f"no Hugging Face architecture computes this model: {', '.join(problems)}; the Llama "
                          f"family (Llama, Mistral, Qwen2, Qwen3) is RMSNorm, SwiGLU and RoPE")
    able = [arch for arch in ARCHITECTURES if _expresses(arch, model)]
    if not able:
        raise LrpathError(
            f"no Hugging Face architecture has this combination of biases and norms (add_bias_linear="
            f"{model.add_bias_linear}, add_qkv_bias={model.add_qkv_bias}, qk_layernorm={model.qk_layernorm})")
    declared = (source or {}).get("architectures") or []
    return declared[0] if declared and declared[0] in able else able[0]


def _expresses(arch: str, model: ModelConfig) -> bool:
    if arch == "LlamaForCausalLM":
        return not (model.add_qkv_bias or model.qk_layernorm)
    if arch == "MistralForCausalLM":
        return not (model.add_bias_linear or model.add_qkv_bias or model.qk_layernorm)
    if arch == "Qwen2ForCausalLM":
        return model.add_qkv_bias and not (model.add_bias_linear or model.qk_layernorm)
    return model.qk_layernorm and not (model.add_bias_linear or model.add_qkv_bias)
