"""Typed configuration: the sections of a training config as dataclasses, each validated once; loaded from
YAML and overridable with ``--set a.b=c`` through :mod:`lrpath_megatron.config_loading`.

Every error raised here is a :class:`ConfigError` whose message names the field (``model.hidden_size``),
the file it came from, and what to do about it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lrpath_megatron.config_loading import (OMITTED_WHEN_UNSET, ConfigError, apply_overrides, config_source, from_dict,
                                            read_yaml, register_list_item_type, to_dict)



# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = multi-head attention
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    seq_length: int = 128
    vocab_size: int = 2048  # the tokenizer's vocabulary; padded internally for TP divisibility
    make_vocab_size_divisible_by: int = 128
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    activation: str = "gelu"  # gelu | swiglu
    position_embedding: str = "rope"  # rope | learned_absolute
    rotary_base: int = 10000
    # RoPE frequency scaling for long contexts: None | llama3 (megatron-core's fixed low/high frequency
    # factors 1 and 4 over an 8192-token original context) | linear (positions divided by the factor).
    rope_scaling: Optional[str] = None
    rope_scaling_factor: Optional[float] = None
    norm_epsilon: float = 1e-5
    kv_channels: Optional[int] = None  # per-head size; None = hidden_size / num_attention_heads
    untie_embeddings: bool = True
    add_bias_linear: bool = False  # biases on every linear layer
    add_qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2)
    qk_layernorm: bool = False  # a norm over each query and key head before RoPE (Qwen3)
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        """Independent of TP (unlike Megatron-LM's default) so checkpoints reshard across TP sizes."""
        multiple = self.make_vocab_size_divisible_by
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward, no recomputation) by Megatron-LM's count,
        ``num_floating_point_operations`` in its ``megatron/training/training.py`` for a dense GPT with
        MHA or GQA: 3 passes x 2 FLOPs per multiply-add over the GEMMs a token goes through (QKV and
        attention output, the MLP with 3 matrices for SwiGLU and 2 otherwise, the logits on the padded
        vocabulary), plus causal attention, ``QK^T`` and ``softmax x V`` over half the score matrix:
        ``6 * (gemm_params + L * q * S)``. MFU figures therefore compare with Megatron-LM's."""
        h, layers, s = self.hidden_size, self.num_layers, self.seq_length
        head = self.kv_channels or h / self.num_attention_heads
        q = head * self.num_attention_heads
        kv = head * (self.num_query_groups or self.num_attention_heads)
        mlp = h * self.ffn_size * (3 if self.activation == "swiglu" else 2)
        gemm_params = layers * (2 * h * q + 2 * h * kv + mlp) + h * self.padded_vocab_size
        return 6 * (gemm_params + layers * q * s)

    def validate(self) -> None:
        _positive(self, "model", ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                                  "norm_epsilon"])
        if self.kv_channels is not None:
            _positive(self, "model", ["kv_channels"])
        elif self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}; choose heads so that hidden_size % heads == 0"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(f"model.num_query_groups={groups} must divide num_attention_heads")
        _choice(self, "model", "normalization", ["RMSNorm", "LayerNorm"])
        _choice(self, "model", "activation", ["gelu", "swiglu"])
        _choice(self, "model", "position_embedding", ["rope", "learned_absolute"])
        if self.rope_scaling is not None:
            _choice(self, "model", "rope_scaling", ["llama3", "linear"])
            if self.rope_scaling_factor is None or self.rope_scaling_factor <= 0:
                raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.rope_scaling_factor > 0")
        elif self.rope_scaling_factor is not None:
            raise ConfigError("model.rope_scaling_factor is set but model.rope_scaling is null; set both or neither")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1)")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    micro_batch_size: int = 4
    global_batch_size: int = 8
    # None = on when running on GPU (sharded Adam states), off on CPU.
    use_distributed_optimizer: Optional[bool] = None
    # Model chunks per pipeline stage (megatron-core's interleaved schedule); None = one chunk. Each stage
    # holds v chunks of num_layers / (pipeline_parallel * v) layers: the bubble shrinks by v for v times
    # the pipeline's point-to-point traffic (docs/layout.md).
    virtual_pipeline: Optional[int] = None
    # Both need megatron-core's Transformer Engine layer spec (refused without it, model.check_parallel_features).
    sequence_parallel: bool = False  # norms, dropout and residuals split over the TP ranks along the sequence
    context_parallel: int = 1  # ranks that each hold 1/CP of every sequence (ring attention)
    # How long a collective waits for a rank that stopped answering before every other rank ends the job for
    # requeue (Megatron-LM's --distributed-timeout-minutes; hang_guard). Also the floor of the step watchdog.
    distributed_timeout_minutes: float = 10.0

    def validate(self) -> None:
        _positive(self, "parallel", ["tensor_parallel", "pipeline_parallel", "micro_batch_size", "global_batch_size",
                                     "context_parallel", "distributed_timeout_minutes"])
        if self.virtual_pipeline is not None:
            _positive(self, "parallel", ["virtual_pipeline"])
            if self.pipeline_parallel < 2:
                raise ConfigError(f"parallel.virtual_pipeline={self.virtual_pipeline} interleaves the stages of a "
                                  f"pipeline: it needs parallel.pipeline_parallel >= 2 (got "
                                  f"{self.pipeline_parallel}); set virtual_pipeline to null")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ConfigError("parallel.sequence_parallel splits activations over the tensor-parallel ranks: it needs "
                              f"parallel.tensor_parallel >= 2 (got {self.tensor_parallel}); set it to false")

    @property
    def model_chunks(self) -> int:
        """Model chunks each pipeline stage holds."""
        return self.virtual_pipeline or 1

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one replica of the model (DP replicates it)."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        """DP size derived from the world size; raises if the world does not factor."""
        mp = self.model_parallel
        if world_size % mp:
            cp = " * parallel.context_parallel" if self.context_parallel > 1 else ""
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_parallel * "
                f"parallel.pipeline_parallel{cp} = {mp}; launch a multiple of {mp} processes"
            )
        dp = world_size // mp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"parallel.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size * data_parallel = {self.micro_batch_size} * {dp}"
            )
        self.check_microbatches(self.global_batch_size // (self.micro_batch_size * dp))
        return dp

    def check_microbatches(self, num_microbatches: int) -> None:
        """megatron-core's interleaved schedule runs the micro-batches in groups of pipeline_parallel."""
        pp = self.pipeline_parallel
        if self.virtual_pipeline is not None and num_microbatches % pp:
            raise ConfigError(
                f"parallel.virtual_pipeline needs a number of micro-batches per step (global_batch_size / "
                f"(micro_batch_size * data_parallel) = {num_microbatches}) that is a multiple of "
                f"parallel.pipeline_parallel={pp}; change parallel.global_batch_size to a multiple of "
                f"{pp * self.global_batch_size // num_microbatches} or set virtual_pipeline to null"
            )

    def check_eval_batches(self, eval_batches: int, dp: int) -> None:
        """Each DP rank runs its 1/DP of the held-out micro-batches through the (interleaved) schedule."""
        pp = self.pipeline_parallel
        if eval_batches < dp:
            raise ConfigError(f"logging.eval_batches={eval_batches} held-out micro-batches per corpus, split over "
                              f"data_parallel={dp} ranks, leave a rank without any; set logging.eval_batches to at "
                              f"least {dp}")
        if self.virtual_pipeline is not None and eval_batches % (pp * dp):
            raise ConfigError(
                f"logging.eval_batches={eval_batches} held-out micro-batches per corpus, split over "
                f"data_parallel={dp} ranks, must give each a multiple of parallel.pipeline_parallel={pp} for the "
                f"interleaved schedule; set logging.eval_batches to a multiple of {pp * dp}"
            )

    def check_model(self, model: ModelConfig) -> None:
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_parallel={tp} does not divide model.num_attention_heads="
                f"{model.num_attention_heads}"
            )
        if (model.num_query_groups or model.num_attention_heads) % tp:
            raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.num_query_groups")
        if model.ffn_size % tp:
            raise ConfigError(f"parallel.tensor_parallel={tp} does not divide the FFN size {model.ffn_size}")
        if model.padded_vocab_size % tp:
            raise ConfigError(
                f"parallel.tensor_parallel={tp} does not divide the padded vocabulary {model.padded_vocab_size}; "
                f"raise model.make_vocab_size_divisible_by to a multiple of {tp}"
            )
        if model.num_layers % pp:
            raise ConfigError(
                f"parallel.pipeline_parallel={pp} does not divide model.num_layers={model.num_layers}"
            )
        chunks = pp * self.model_chunks
        if model.num_layers % chunks:
            raise ConfigError(
                f"parallel.pipeline_parallel * parallel.virtual_pipeline = {pp} * {self.virtual_pipeline} = "
                f"{chunks} model chunks do not divide model.num_layers={model.num_layers}; choose a "
                f"virtual_pipeline that divides num_layers / pipeline_parallel = {model.num_layers // pp}"
            )
        if self.context_parallel > 1 and model.seq_length % (2 * self.context_parallel):
            raise ConfigError(
                f"parallel.context_parallel={self.context_parallel} splits each sequence into 2 * CP load-balanced "
                f"parts: model.seq_length={model.seq_length} must be a multiple of {2 * self.context_parallel}"
            )


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16
    fp8: Optional[str] = None  # None | hybrid | e4m3 (needs Transformer Engine)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise (TE recipes)
    # Scaling of the delayed recipe (megatron-core's defaults): amax window, how the amax is taken from
    # it, and the margin (scale = fp8_max / amax / 2^margin).
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"  # most_recent | max
    fp8_margin: int = 0

    def validate(self) -> None:
        _choice(self, "precision", "dtype", ["fp32", "bf16"])
        if self.fp8 is not None:
            _choice(self, "precision", "fp8", ["hybrid", "e4m3"])
            if self.dtype != "bf16":
                raise ConfigError("precision.fp8 requires precision.dtype=bf16")
        _choice(self, "precision", "fp8_recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
        _choice(self, "precision", "fp8_amax_compute_algo", ["most_recent", "max"])
        _positive(self, "precision", ["fp8_amax_history_len"])
        if self.fp8_margin < 0:
            raise ConfigError(f"precision.fp8_margin must be >= 0, got {self.fp8_margin}")


@dataclass
class PerformanceConfig:
    """Speed levers; each off by default (off = the plain megatron-core path). What each does, what it
    needs and how it falls back: docs/performance.md."""

    # torch.compile each TransformerLayer (fuses RoPE, norms, residual adds, activation, casts).
    compile_layers: bool = False
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs
    # torch's single-kernel AdamW for the fp32 master weights instead of its multi-kernel foreach path.
    fused_adam: bool = False
    # Gradient norm and clipping with torch._foreach ops instead of megatron-core's per-tensor loop
    # with one host sync per tensor (its fallback when neither Transformer Engine nor apex is installed).
    foreach_grad_norm: bool = False
    # megatron-core fusions that have pure-torch implementations (compiled by megatron-core itself).
    bias_dropout_fusion: bool = False
    bias_activation_fusion: bool = False  # swiglu only (the gelu fusion changes numerics: tanh approximation)
    cross_entropy_fusion: bool = False  # bf16 only (its logits gradient is always bf16)
    # Needs Transformer Engine (refused without it).
    rope_fusion: bool = False
    # Activation recomputation, memory for compute: none | selective (the core attention of every layer,
    # as Megatron-LM's --recompute-activations) | full (whole layers: the input of each group of
    # recompute_num_layers layers is kept, the rest recomputed in backward).
    recompute: str = "none"
    recompute_num_layers: int = 1
    # megatron-core DDP: reduce each gradient bucket during backward as soon as its gradients are complete,
    # instead of all of them after backward; with the distributed optimizer, also gather the updated
    # parameter shards during the next forward instead of right after the optimizer step.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Parameters per gradient bucket, the unit of overlap; null = megatron-core's max(40M, 1M x DP).
    ddp_bucket_size: Optional[int] = None

    def validate(self) -> None:
        _choice(self, "performance", "compile_mode", ["default", "max-autotune-no-cudagraphs"])
        _choice(self, "performance", "recompute", ["none", "selective", "full"])
        _positive(self, "performance", ["recompute_num_layers"])
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError("performance.overlap_param_gather needs performance.overlap_grad_reduce=true "
                              "(megatron-core overlaps the gather only together with the reduction)")
        if self.ddp_bucket_size is not None:
            _positive(self, "performance", ["ddp_bucket_size"])
            if not self.overlap_grad_reduce:
                raise ConfigError("performance.ddp_bucket_size splits the gradients for overlap_grad_reduce; "
                                  "set performance.overlap_grad_reduce=true or leave the bucket size null")


@dataclass
class OptimizerConfig:
    lr: float = 1e-3  # peak LR (eta_max) for stand-alone runs; plans set it per path
    min_lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optimizer.lr must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optimizer.{name} must be in [0, 1)")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("optimizer.clip_grad and optimizer.weight_decay must be >= 0")


@dataclass
class ScheduleConfig:
    """LR schedule of a stand-alone run (plans derive theirs from the version plan)."""

    style: str = "cosine"  # constant | cosine | linear | wsd
    warmup_steps: int = 10
    train_steps: int = 100
    wsd_decay_steps: int = 0  # for style=wsd: length of the final decay
    wsd_decay_style: str = "linear"  # linear | cosine | 1-sqrt

    def validate(self) -> None:
        _choice(self, "schedule", "style", ["constant", "cosine", "linear", "wsd"])
        _positive(self, "schedule", ["train_steps"])
        if not 0 <= self.warmup_steps <= self.train_steps:
            raise ConfigError("schedule.warmup_steps must be in [0, schedule.train_steps]")
        if self.style == "wsd" and not 0 < self.wsd_decay_steps <= self.train_steps - self.warmup_steps:
            raise ConfigError("schedule.wsd_decay_steps must be in (0, train_steps - warmup_steps] for style=wsd")


@dataclass
class CorpusConfig:
    """One tokenized corpus: a Megatron .bin/.idx prefix, or its shards (a glob, or a list of prefixes and
    globs), read as one dataset in that order (:mod:`lrpath_megatron.corpus_shards`)."""

    name: str = ""
    prefix: Any = ""  # str | list[str]

    def validate(self, where: str) -> None:
        if not self.name:
            raise ConfigError(f"{where}.name is empty; give every corpus a unique name")
        entries = self.prefix if isinstance(self.prefix, list) else [self.prefix]
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ConfigError(f"{where}.prefix={self.prefix!r}: point it at a Megatron .bin/.idx prefix (PREFIX of "
                              f"PREFIX.bin), a glob of shard prefixes, or a non-empty list of prefixes and globs")




@dataclass
class MixStage:
    """One stage of an LR-triggered blend. ``lr_below`` None = the first stage (active from the start).

    ``lr_below`` is a number, or a string relative to the path's peak LR such as ``"eta_max/5"``; the stage
    becomes active at the first step whose LR has come down to it (``lr <= lr_below``). ``name`` labels the
    stage in logs and metrics; left out, the label says what triggers it (``lr<=0.0006``; the first stage
    ``lr>`` the next one's threshold; a stage alone ``all``).
    """

    lr_below: Any = None
    weights: dict = field(default_factory=dict)
    name: Optional[str] = field(default=None, metadata=OMITTED_WHEN_UNSET)


@dataclass
class MixConfig:
    stages: list = field(default_factory=list)  # list[MixStage]
    ramp_steps: int = 0  # linear ramp between consecutive stages


@dataclass
class DataConfig:
    corpora: list = field(default_factory=list)  # list[CorpusConfig]
    mix: MixConfig = field(default_factory=MixConfig)  # empty = equal weights, one stage
    valid_fraction: float = 0.02  # per corpus, held out deterministically
    seed: int = 1234

    def validate(self) -> None:
        names = set()
        for i, corpus in enumerate(self.corpora):
            corpus.validate(f"data.corpora[{i}]")
            if corpus.name in names:
                raise ConfigError(f"data.corpora[{i}].name={corpus.name!r} is used twice")
            names.add(corpus.name)
        if not 0 < self.valid_fraction < 1:
            raise ConfigError("data.valid_fraction must be in (0, 1)")


@dataclass
class CheckpointConfig:
    save_interval: int = 50  # steps; 0 = only at the end / on signal
    # Keep only the newest N checkpoints a run can resume from (0 = all); the plan's fork points, merge
    # inputs and the path's end are never deleted.
    keep_last: int = 0
    # false: the path's final checkpoint holds the weights only (a release nobody continues training;
    # the optimizer state is 6/7 of a bf16 checkpoint, 2/3 of an fp32 one). Interval and signal saves keep it.
    save_optimizer: bool = True
    # Start a stand-alone run from these weights (an lrpath checkpoint, e.g. from `lrpath hf import`): step
    # 0, a fresh optimizer and data. A plan's main path has plan.main.init_from.
    init_from: Optional[str] = None
    # Also save when this many minutes of wall time passed since the last save (whichever of this and
    # save_interval comes first; the same decision on every rank). 0 = by steps only.
    save_interval_minutes: float = 0.0
    # Write checkpoints in the background while training continues (megatron-core's asynchronous
    # dist-checkpointing); costs up to one more copy of the state in host memory (docs/checkpointing.md).
    async_save: bool = False

    def validate(self) -> None:
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")
        if not self.save_interval_minutes >= 0:
            raise ConfigError(f"checkpoint.save_interval_minutes must be >= 0 (0 = by steps only), got "
                              f"{self.save_interval_minutes}")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    eval_interval: int = 50  # 0 = never
    eval_batches: int = 4
    tensorboard: bool = True
    # Per-GPU peak TFLOP/s for MFU; null = known for A100/H100/H200 in bf16, no MFU elsewhere.
    peak_tflops: Optional[float] = None

    def validate(self) -> None:
        _positive(self, "logging", ["log_interval", "eval_batches"])
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"logging.peak_tflops must be > 0 (or null), got {self.peak_tflops}")
        if self.eval_interval < 0:
            raise ConfigError("logging.eval_interval must be >= 0")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    seed: int = 1234

    def validate(self) -> "TrainConfig":
        for section in (self.model, self.parallel, self.precision, self.optimizer, self.schedule,
                        self.data, self.checkpoint, self.logging, self.performance):
            section.validate()
        self.parallel.check_model(self.model)
        if self.performance.bias_activation_fusion and self.model.activation != "swiglu":
            raise ConfigError(
                f"performance.bias_activation_fusion needs model.activation=swiglu (got "
                f"{self.model.activation!r}: megatron-core's fused gelu is the tanh approximation, other "
                f"numerics than the unfused exact gelu); set it to false"
            )
        if self.performance.cross_entropy_fusion and self.precision.dtype != "bf16":
            raise ConfigError(
                "performance.cross_entropy_fusion needs precision.dtype=bf16 (megatron-core's fused cross "
                "entropy returns the logits gradient in bf16, a precision loss for an fp32 run); set it to false"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
register_list_item_type(DataConfig, "corpora", CorpusConfig)
register_list_item_type(MixConfig, "stages", MixStage)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    with config_source(path, overrides):
        cfg = from_dict(TrainConfig, data).validate()
        if not cfg.data.corpora:  # a plan names its corpora in its versions; a stand-alone run needs some
            raise ConfigError("data.corpora is empty: list at least one {name, prefix} corpus")
        return cfg


# Model settings added after checkpoints and plans were first written; their defaults are the models of before.
LATER_MODEL_FIELDS = ("rope_scaling", "rope_scaling_factor", "norm_epsilon", "kv_channels", "add_qkv_bias",
                      "qk_layernorm")


def with_model_defaults(model: dict) -> dict:
    """A model section (``config.model`` of a manifest) with each missing setting at its default: a
    checkpoint saved before a setting existed holds the model of its default."""
    return {**to_dict(ModelConfig()), **model}


def hashed_model(model: ModelConfig) -> dict:
    """The model section as plan hashes see it: the later settings only where they differ from their
    default, so a plan written before they existed keeps its hash."""
    defaults = ModelConfig()
    return {k: v for k, v in to_dict(model).items()
            if k not in LATER_MODEL_FIELDS or v != getattr(defaults, k)}


def _positive(obj: Any, section: str, names: list[str]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {getattr(obj, name)}")


def _choice(obj: Any, section: str, name: str, choices: list[str]) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{section}.{name}={getattr(obj, name)!r} is not one of {', '.join(choices)}")
