"""Tensors between Hugging Face's names and layouts and megatron-core's dist-checkpoint keys and layouts.

megatron-core stores each per-layer tensor of the decoder once, stacked over the layers
(``decoder.layers.<name>``, shape [num_layers, ...]), under Transformer Engine's names whichever layer spec
saved it (the local spec maps its norms onto them: ``input_layernorm`` is
``self_attention.linear_qkv.layer_norm_weight``). Two HF tensor groups are fused:

- ``linear_qkv`` holds q, k and v interleaved by query group: for each of the G groups its H/G query
  heads, then its key head, then its value head (head_dim rows each), so every tensor-parallel rank holds
  whole groups;
- ``linear_fc1`` of the SwiGLU MLP holds [gate; up] (megatron-core computes ``silu(gate) * up``).

Every other tensor is the same on both sides, except the vocabulary: lrpath's embedding and output layer
have ``model.padded_vocab_size`` rows, of which an export keeps the first ``model.vocab_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lrpath_megatron.config import ModelConfig

LAYERS = "decoder.layers."
HF_LAYER = "model.layers.{}."
# Linear layers that store an (empty) _extra_state object per layer, one ShardedObject each.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2")
# Buffers some older checkpoints saved; transformers recomputes them from the config.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LayerTensor:
    """One stacked megatron-core tensor and the HF tensors of a layer it is made of."""

    key: str  # after "decoder.layers."
    hf: tuple[str, ...]  # after "model.layers.N."
    fusion: str = "copy"  # copy | qkv | gate_up


@dataclass(frozen=True)
class ModelTensor:
    """A tensor outside the layers; ``vocab``: its rows are the (padded) vocabulary."""

    key: str
    hf: str
    vocab: bool = False


def layer_tensors(model: ModelConfig) -> list[LayerTensor]:
    bias_all = model.add_bias_linear
    attn = "self_attn."
    tensors = [
        LayerTensor("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
        LayerTensor("self_attention.linear_qkv.weight",
                    tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"),
    ]
    if bias_all or model.add_qkv_bias:
        tensors.append(LayerTensor("self_attention.linear_qkv.bias",
                                   tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv"))
    if model.qk_layernorm:
        tensors += [LayerTensor("self_attention.q_layernorm.weight", (f"{attn}q_norm.weight",)),
                    LayerTensor("self_attention.k_layernorm.weight", (f"{attn}k_norm.weight",))]
    tensors.append(LayerTensor("self_attention.linear_proj.weight", (f"{attn}o_proj.weight",)))
    if bias_all:
        tensors.append(LayerTensor("self_attention.linear_proj.bias", (f"{attn}o_proj.bias",)))
    tensors.append(LayerTensor("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)))
    for kind in ("weight", "bias") if bias_all else ("weight",):
        tensors += [
            LayerTensor(f"mlp.linear_fc1.{kind}", (f"mlp.gate_proj.{kind}", f"mlp.up_proj.{kind}"), "gate_up"),
            LayerTensor(f"mlp.linear_fc2.{kind}", (f"mlp.down_proj.{kind}",)),
        ]
    return tensors


def model_tensors(model: ModelConfig) -> list[ModelTensor]:
    tensors = [ModelTensor("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab=True),
               ModelTensor("decoder.final_layernorm.weight", "model.norm.weight")]
    if model.untie_embeddings:
        tensors.append(ModelTensor("output_layer.weight", "lm_head.weight", vocab=True))
    return tensors


def _dims(model: ModelConfig) -> tuple[int, int, int]:
    """(query heads, query groups, head size)"""
    heads = model.num_attention_heads
    return heads, model.num_query_groups or heads, model.kv_channels or model.hidden_size // heads


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model, in the order an export writes them: name -> shape."""
    h, f, v = model.hidden_size, model.ffn_size, model.vocab_size
    heads, groups, d = _dims(model)
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * d, h), "self_attn.k_proj.weight": (groups * d, h),
        "self_attn.v_proj.weight": (groups * d, h), "self_attn.o_proj.weight": (h, heads * d),
        "self_attn.q_proj.bias": (heads * d,), "self_attn.k_proj.bias": (groups * d,),
        "self_attn.v_proj.bias": (groups * d,), "self_attn.o_proj.bias": (h,),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
        "mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (h,),
    }
    shapes = {"model.embed_tokens.weight": (v, h)}
    names = [n for t in layer_tensors(model) for n in t.hf]
    for layer in range(model.num_layers):
        shapes.update({HF_LAYER.format(layer) + n: per_layer[n] for n in names})
    shapes["model.norm.weight"] = (h,)
    if model.untie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def mcore_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every megatron-core tensor of the model as stored: key -> global shape (layers stacked first)."""
    hf = hf_shapes(model)
    shapes = {}
    for t in model_tensors(model):
        shape = hf[t.hf]
        shapes[t.key] = (model.padded_vocab_size, *shape[1:]) if t.vocab else shape
    for t in layer_tensors(model):
        parts = [hf[HF_LAYER.format(0) + n] for n in t.hf]
        shapes[LAYERS + t.key] = (model.num_layers, sum(p[0] for p in parts), *parts[0][1:])
    return shapes


def to_mcore(t: LayerTensor, parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The megatron-core tensor of one layer from its HF tensors (in ``t.hf`` order)."""
    if t.fusion == "copy":
        return parts[0]
    if t.fusion == "gate_up":
        return torch.cat(parts)
    _, groups, _ = _dims(model)
    q, k, v = (p.reshape(groups, -1, *p.shape[1:]) for p in parts)
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def from_mcore(t: LayerTensor, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors (in ``t.hf`` order) of one layer's megatron-core tensor."""
    if t.fusion == "copy":
        return [tensor]
    if t.fusion == "gate_up":
        return list(tensor.chunk(2))
    heads, groups, d = _dims(model)
    grouped = tensor.reshape(groups, -1, *tensor.shape[1:])
    q, k, v = grouped.split([heads // groups * d, d, d], dim=1)
    return [x.reshape(-1, *tensor.shape[1:]) for x in (q, k, v)]


def extra_state_keys(model: ModelConfig) -> list[str]:
    """The per-layer ShardedObject keys megatron-core expects next to the tensors."""
    n = model.num_layers
    return [f"{LAYERS}{m}._extra_state/shard_{layer}_{n}" for layer in range(n) for m in EXTRA_STATE_MODULES]
