"""Per-GPU memory of a training layout and its pipeline bubble, predicted from the config alone.

What one rank holds (docs/layout.md gives the formulas with their sources):

- weights: the parameters of its pipeline stage, split over TP, in the params dtype;
- gradients: megatron-core DDP's fp32 gradient buffer (``grad_reduce_in_fp32``), padded as
  ``ParamAndGradBuffer`` pads it for the distributed optimizer;
- optimizer state: Adam's two fp32 moments, and fp32 master weights for bf16 parameters, for every
  parameter or, with the distributed optimizer, for the rank's 1/DP shard of the gradient buffer;
- activations: what one micro-batch saves for backward in each layer (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", for this layer: flash-style attention,
  no dropout masks, SwiGLU or GeLU, GQA), times the micro-batches in flight on the stage (Narayanan et al.
  2021: PP - rank for 1F1B, PP + (PP - 1) / VPP stages' worth on the first stage interleaved), plus the
  fp32 logits of the last stage.

Parameter, gradient-buffer and optimizer-state bytes are exact for megatron-core 0.16.1's local layer spec,
and one micro-batch's saved activations within 0.01% of what torch reports for it on CPU
(tests/test_memory_model.py builds the models and compares); Transformer Engine's spec (GPU) is sized by
the same counts with its fused norms, unmeasured here. Pure Python: the planner runs without torch or a GPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lrpath_megatron.config import ModelConfig

GIB = 1024 ** 3
ADAM_MOMENT_BYTES = 8  # exp_avg and exp_avg_sq in fp32 (the 4-byte step counter per tensor is ignored)
MASTER_BYTES = 4  # fp32 copy of a bf16 parameter
GRAD_BYTES = 4  # DDP reduces in fp32


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    data_parallel: int = 1
    context_parallel: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1  # per step and DP replica: global_batch / (micro_batch * DP)
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective | full (performance.recompute)
    sequence_parallel: bool = False
    dtype: str = "bf16"  # fp32 | bf16
    # Transformer Engine's layer spec (GPU): its norms are fused into the next GEMM and save less than the
    # local spec's torch norms (the only spec measurable on CPU)
    transformer_engine: bool = False

    @property
    def chunks(self) -> int:
        return self.virtual_pipeline or 1


# ------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Param:
    numel: int
    shared_embedding: bool = False  # tied embedding with PP > 1: its own DDP bucket (distributed optimizer)


def chunk_parameters(model: ModelConfig, layout: Layout, pp_rank: int, vp_stage: int = 0) -> list[Param]:
    """The parameters of one model chunk on one TP rank, in the order megatron-core's GPTModel registers
    them (the order DDP lays its buffer out in, reversed)."""
    tp, pp, v = layout.tensor_parallel, layout.pipeline_parallel, layout.chunks
    h, heads = model.hidden_size, model.num_attention_heads
    head_dim = model.kv_channels or h // heads
    q, kv = head_dim * heads, head_dim * (model.num_query_groups or heads)
    ffn = model.ffn_size
    norm = 2 if model.normalization == "LayerNorm" else 1  # weight (+ bias)
    linear_bias = model.add_bias_linear
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == pp - 1 and vp_stage == v - 1
    vocab = model.padded_vocab_size // tp
    tied_across_stages = not model.untie_embeddings and pp > 1
    params: list[Param] = []
    if first:
        params.append(Param(vocab * h, shared_embedding=tied_across_stages))
        if model.position_embedding == "learned_absolute":
            params.append(Param(model.seq_length * h))
    fc1 = ffn * (2 if model.activation == "swiglu" else 1) // tp
    for _ in range(model.num_layers // (pp * v)):
        params += [Param(norm * h)] if norm == 1 else [Param(h), Param(h)]
        params.append(Param(q // tp * h))  # linear_proj
        if linear_bias:
            params.append(Param(h))
        params.append(Param((q + 2 * kv) // tp * h))  # linear_qkv
        if linear_bias or model.add_qkv_bias:
            params.append(Param((q + 2 * kv) // tp))
        if model.qk_layernorm:
            params += [Param(head_dim)] * (2 * norm)
        params += [Param(h)] * norm  # pre_mlp_layernorm
        params.append(Param(fc1 * h))
        if linear_bias:
            params.append(Param(fc1))
        params.append(Param(ffn // tp * h))  # linear_fc2
        if linear_bias:
            params.append(Param(h))
    if last:
        params += [Param(h)] * norm  # final norm
        if model.untie_embeddings or pp > 1:
            params.append(Param(vocab * h, shared_embedding=tied_across_stages))
    return params


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Bucket:
    start: int
    end: int  # padded
    params: tuple  # (start, end) of each parameter in the buffer


def grad_buffer(params: list[Param], layout: Layout) -> list[Bucket]:
    """The buckets of megatron-core 0.16.1's ParamAndGradBuffer for one chunk: parameters in reverse
    order; with the distributed optimizer each parameter starts at a multiple of 64 elements, each bucket
    ends at a multiple of lcm(DP, 128), and a shared embedding gets a bucket of its own. One bucket
    otherwise (lrpath builds DDP without overlap: no bucket size)."""
    dist = layout.distributed_optimizer
    dp_cp = layout.data_parallel * layout.context_parallel
    buckets, spans, bucket_start, pos = [], [], 0, 0

    def close(end: int) -> int:
        nonlocal bucket_start, spans
        padded = _pad(end, math.lcm(dp_cp, 128)) if dist else end
        buckets.append(Bucket(bucket_start, padded, tuple(spans)))
        bucket_start, spans = padded, []
        return padded

    for p in reversed(params):
        if dist:
            pos = _pad(pos, 64)
        own_bucket = p.shared_embedding and dist
        if own_bucket and spans:
            pos = close(pos)
        spans.append((pos, pos + p.numel))
        pos += p.numel
        if own_bucket:
            pos = close(pos)
    if spans:
        close(pos)
    return buckets


def shard_numel(buckets: list[Bucket], dp_rank: int, dp_size: int) -> int:
    """Parameter elements in one DP rank's shard of the buffer (each bucket split in DP equal parts;
    padding holds no optimizer state)."""
    total = 0
    for b in buckets:
        size = (b.end - b.start) // dp_size
        lo, hi = b.start + dp_rank * size, b.start + (dp_rank + 1) * size
        total += sum(max(0, min(hi, e) - max(lo, s)) for s, e in b.params)
    return total


# ------------------------------------------------------------------------------------------ activations
def _norm_bytes_per_token(model: ModelConfig, layout: Layout, h: float, e: int) -> float:
    """What a norm and the GEMM reading it save. Local spec (torch norms): RMSNorm computes in fp32 and
    saves its fp32 input, the fp32 normalised tensor and the fp32 1/rms; LayerNorm's CPU kernel saves its
    input, mean and 1/std (input dtype). Transformer Engine's LayerNormLinear saves its input, the fp32
    1/rms (and mean) and the normalised output. The GEMM saves the norm's output (e bytes)."""
    if layout.transformer_engine:
        saved = e * h + (4 if model.normalization == "RMSNorm" else 8)
    elif model.normalization == "RMSNorm":
        saved = 4 * h + 4 * h + 4
    else:
        saved = e * h + 2 * e
    return saved + e * h


def layer_activation_bytes(model: ModelConfig, layout: Layout) -> float:
    """Bytes one transformer layer saves for backward per micro-batch, as megatron-core's local spec
    saves them (what torch reports on CPU) or, with ``layout.transformer_engine``, its TE spec (norms fused
    into the GEMMs; not measurable here).

    Per token, after Korthikanti et al. 2022 (their 34sbh + 5as^2b counts the same places): two norms
    (:func:`_norm_bytes_per_token`; split over TP only with sequence parallelism); attention: Q and K after
    RoPE, the fused QKV output (V is a view of it), the attention output that the projection also reads
    (3q + 3kv elements, split over TP) and the fp32 log-sum-exp per head. Flash-style attention keeps no
    s x s scores, and dropout 0 keeps no masks: the 5as/h and dropout terms of the paper are absent. MLP:
    the first GEMM's output, and for SwiGLU the SiLU output and the gated product (5f for SwiGLU, 2f for
    GeLU, split over TP). Plus RoPE's cos/sin tables (4 s d per layer). Full recompute keeps only the
    layer input; selective recompute (core attention) keeps the attention's inputs but not its statistics."""
    e = 2 if layout.dtype == "bf16" else 4
    tp, cp = layout.tensor_parallel, layout.context_parallel
    seq = model.seq_length / cp
    tokens = seq * layout.micro_batch_size
    h, heads = model.hidden_size, model.num_attention_heads
    head_dim = model.kv_channels or h // heads
    q, kv = head_dim * heads, head_dim * (model.num_query_groups or heads)
    f = model.ffn_size
    replicated = h / tp if layout.sequence_parallel else h
    if layout.recompute == "full":
        return tokens * replicated * e
    norms = 2 * _norm_bytes_per_token(model, layout, replicated, e)
    attention = (3 * q + 3 * kv) / tp * e
    lse = heads / tp * 4 if layout.recompute == "none" else 0
    mlp = (5 if model.activation == "swiglu" else 2) * f / tp * e
    rope = 4 * seq * head_dim * e if model.position_embedding == "rope" else 0
    return tokens * (norms + attention + lse + mlp) + rope


def logits_bytes(model: ModelConfig, layout: Layout) -> float:
    """The last stage per micro-batch: the final norm, megatron-core's fp32 cross-entropy over the logits
    (its softmax), the int64 labels and the loss mask."""
    e = 2 if layout.dtype == "bf16" else 4
    tokens = model.seq_length * layout.micro_batch_size / layout.context_parallel
    h = model.hidden_size / layout.tensor_parallel if layout.sequence_parallel else model.hidden_size
    return tokens * (_norm_bytes_per_token(model, layout, h, e) + model.padded_vocab_size / layout.tensor_parallel * 4 + 8 + 1)


def embedding_bytes(model: ModelConfig, layout: Layout) -> float:
    """The first stage per micro-batch: the int64 token ids the embedding's backward reads."""
    return model.seq_length * layout.micro_batch_size / layout.context_parallel * 8


def in_flight_microbatches(layout: Layout, pp_rank: int = 0) -> float:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at once, in units of a whole stage's
    layers: 1F1B runs PP - rank forwards before its first backward; the interleaved schedule's warm-up
    runs 2 (PP - rank - 1) + (v - 1) PP chunk forwards, plus the one in progress (megatron-core's
    get_pp_rank_microbatches), each a 1/v stage. For the first stage that is PP + (PP - 1) / v, Megatron-LM's
    ``(1 + (p - 1) / (p * v))`` factor. Never more than the micro-batches of a step."""
    pp, v, m = layout.pipeline_parallel, layout.chunks, layout.num_microbatches
    if v == 1:
        return min(pp - pp_rank, m)
    return min((2 * (pp - pp_rank - 1) + (v - 1) * pp + 1) / v, m)


def bubble_fraction(layout: Layout) -> float:
    """Pipeline bubble over ideal compute time, (p - 1) / (v * m) (Narayanan et al. 2021, eq. 1 and 2)."""
    return (layout.pipeline_parallel - 1) / (layout.chunks * layout.num_microbatches)


# ------------------------------------------------------------------------------------------ per GPU
@dataclass
class Memory:
    weights: int
    gradients: int
    optimizer: int  # with the layout's optimizer
    optimizer_plain: int  # every rank holds the whole state
    optimizer_distributed: int  # the rank's 1/DP shard
    activations_per_microbatch: float  # the stage's layers, one micro-batch
    activations_per_microbatch_recompute: float  # the same with full recompute
    in_flight: float
    activations: float  # per micro-batch x in flight (+ logits on the last stage)
    bubble: float
    stage: int  # the pipeline rank this is for

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def stage_memory(model: ModelConfig, layout: Layout, pp_rank: int, dp_rank: int = 0) -> Memory:
    e = 2 if layout.dtype == "bf16" else 4
    numel, grads, shard = _state_numels(model, layout, pp_rank, dp_rank)
    per_param = ADAM_MOMENT_BYTES + (MASTER_BYTES if layout.dtype == "bf16" else 0)
    plain, distributed = numel * per_param, shard * per_param
    layers = model.num_layers // layout.pipeline_parallel
    per_mb = layer_activation_bytes(model, layout) * layers
    full = layer_activation_bytes(model, dataclasses.replace(layout, recompute="full")) * layers
    flight = in_flight_microbatches(layout, pp_rank)
    activations = per_mb * flight
    if pp_rank == layout.pipeline_parallel - 1:
        activations += logits_bytes(model, layout)
    if pp_rank == 0:
        activations += embedding_bytes(model, layout) * flight
    return Memory(weights=numel * e, gradients=grads * GRAD_BYTES,
                  optimizer=distributed if layout.distributed_optimizer else plain,
                  optimizer_plain=plain, optimizer_distributed=distributed,
                  activations_per_microbatch=per_mb, activations_per_microbatch_recompute=full,
                  in_flight=flight, activations=activations, bubble=bubble_fraction(layout), stage=pp_rank)


_STATE_CACHE: dict = {}


def _state_numels(model: ModelConfig, layout: Layout, pp_rank: int, dp_rank: int) -> tuple[int, int, int]:
    """(parameters, gradient-buffer elements with the layout's optimizer, the DP rank's distributed
    optimizer shard) of one stage; cached, as the planner sizes many layouts of one model."""
    key = (dataclasses.astuple(model), layout.tensor_parallel, layout.pipeline_parallel, layout.chunks,
           layout.data_parallel * layout.context_parallel, layout.distributed_optimizer, pp_rank, dp_rank)
    if key not in _STATE_CACHE:
        chunks = [chunk_parameters(model, layout, pp_rank, v) for v in range(layout.chunks)]
        numel = sum(p.numel for c in chunks for p in c)
        grads = sum(grad_buffer(c, layout)[-1].end for c in chunks if c)
        dist = dataclasses.replace(layout, distributed_optimizer=True)
        dp = layout.data_parallel * layout.context_parallel
        shard = sum(shard_numel(grad_buffer(c, dist), dp_rank, dp) for c in chunks)
        _STATE_CACHE[key] = (numel, grads, shard)
    return _STATE_CACHE[key]


def peak_memory(model: ModelConfig, layout: Layout) -> Memory:
    """The most loaded pipeline stage's memory (the first holds the most micro-batches and the embedding,
    the last the output layer and logits)."""
    return max((stage_memory(model, layout, r) for r in range(layout.pipeline_parallel)), key=lambda m: m.total)
