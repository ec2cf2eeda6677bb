"""megatron-core ``GPTModel`` from a :class:`ModelConfig`.

Layer spec: Transformer Engine's when it imports (FP8 from the precision config), otherwise the local
spec with :class:`SDPAttention` as core attention - the local unfused attention materialises the
[b, n, s, s] score matrix and does not fit a 1.3B model at seq 2048 on an 80 GB GPU.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from lrpath_megatron import performance
from lrpath_megatron.config import ConfigError, ModelConfig, ParallelConfig, PerformanceConfig, PrecisionConfig
from lrpath_megatron.distributed import use_cuda


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # an installed-but-broken TE build raises more than ImportError
        return False
    return True


class SDPAttention(DotProductAttention):
    """Causal core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Same constructor and tensor layout as megatron-core's ``DotProductAttention`` ([s, b, n, d] in,
    [s, b, n*d] out) so it drops into the local spec; flash / memory-efficient kernels are picked by torch.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports plain causal attention only")
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v,
            is_causal=True,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def check_parallel_features(parallel: ParallelConfig) -> None:
    """Sequence and context parallelism exist in megatron-core 0.16.1 only in its Transformer Engine layer
    spec (the local spec's torch norms and attention assert on split sequences): refused without it, on
    every rank alike, before any process group starts."""
    wanted = [name for name, on in (("parallel.sequence_parallel", parallel.sequence_parallel),
                                    ("parallel.context_parallel", parallel.context_parallel > 1)) if on]
    if wanted and not (have_transformer_engine() and use_cuda()):
        where = "Transformer Engine is not importable" if not have_transformer_engine() else "no GPU is used"
        raise ConfigError(
            f"{' and '.join(wanted)} need{'' if len(wanted) > 1 else 's'} megatron-core's Transformer Engine layers on GPU, but {where}; "
            f"install the [te] extra (pip install 'lrpath-megatron[te]', a CUDA build) on a GPU machine, or set "
            f"parallel.sequence_parallel=false and parallel.context_parallel=1"
        )


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                       perf: PerformanceConfig | None = None) -> TransformerConfig:
    """``perf`` None = no performance levers (what export, evaluation and merging build)."""
    cuda = use_cuda()
    if precision.fp8 and not have_transformer_engine():
        raise ConfigError(
            "precision.fp8 is set but Transformer Engine is not importable; install the [te] extra "
            "or set precision.fp8=null (docs/performance.md says why there is no FP8 path without it)"
        )
    check_parallel_features(parallel)
    if perf is not None:
        performance.check(perf, cuda, have_transformer_engine())
    bf16 = precision.dtype == "bf16"
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_size,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=not cuda,
        # CPU: p2p calls torch.cuda.synchronize when batched (see cpu_compat notes).
        batch_p2p_sync=cuda,
        # Interleaved at PP=2 a stage's previous and next stage are the same rank: a batch of sends both
        # ways is matched in posting order and swaps activations with gradients (measured on gloo).
        # Unbatched, megatron-core sends each direction over its own group (Megatron-LM's default too).
        batch_p2p_comm=parallel.virtual_pipeline is None,
        **performance.transformer_flags(perf),
        **performance.fp8_settings(precision),
    )
    return TransformerConfig(**kwargs)


def layer_spec(model: ModelConfig) -> ModuleSpec:
    if have_transformer_engine() and use_cuda():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=model.normalization,
                                                  qk_layernorm=model.qk_layernorm))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                config: TransformerConfig | None = None, vp_stage: int | None = None) -> GPTModel:
    """The local pipeline stage of the GPT, or with ``parallel.virtual_pipeline`` its chunk ``vp_stage``
    (the layers of virtual stage vp_stage * PP + pp_rank). Only the first chunk of the first stage embeds,
    only the last chunk of the last stage has the output layer."""
    config = config or transformer_config(model, parallel, precision)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=not model.untie_embeddings,
        position_embedding_type=model.position_embedding,
        rotary_base=model.rotary_base,
        **_rope_scaling(model),
    )
    if use_cuda():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                       config: TransformerConfig | None = None) -> list[GPTModel]:
    """Every model chunk of the local pipeline stage, in schedule order: one, or one per virtual stage."""
    config = config or transformer_config(model, parallel, precision)
    if parallel.virtual_pipeline is None:
        return [build_model(model, parallel, precision, config)]
    return [build_model(model, parallel, precision, config, vp) for vp in range(parallel.virtual_pipeline)]


def _rope_scaling(model: ModelConfig) -> dict:
    if model.rope_scaling == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": model.rope_scaling_factor}
    if model.rope_scaling == "linear":
        return {"seq_len_interpolation_factor": model.rope_scaling_factor}
    return {}


def with_precision(module: torch.nn.Module, config: TransformerConfig) -> torch.nn.Module:
    """bf16 as Megatron-LM runs it: megatron-core's Float16Module holds every parameter in bf16 (the local
    spec's torch norms are built in fp32) and returns the loss in fp32; the optimizer keeps fp32 master
    weights. fp32 runs use the module as it is."""
    return Float16Module(config, module) if config.bf16 else module
