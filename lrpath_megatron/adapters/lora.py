"""LoRA for megatron-core GPT linear layers (QKV, attention output, MLP in/out), tensor-parallel aware.

``inject_lora`` freezes the base model and wraps each target ``ColumnParallelLinear`` /
``RowParallelLinear`` in a :class:`LoraLinear`: ``y = W x + (alpha / r) * B A x`` (peft's names:
``lora_A``, ``lora_B``, ``scaling``; B starts at zero so an injected adapter leaves the model unchanged).
A wrapper holds any number of named adapters and runs at most one (``set_active``): the per-update experts
of dynamic ConPET share one base.

Tensor parallelism follows the base layer's split so no adapter needs a new collective pattern:
column-parallel base (output split over TP ranks): A replicated, B split on its output like W; the
low-rank activation passes ``copy_to_tensor_model_parallel_region`` so A's gradient is summed over the
ranks' output shards. Row-parallel base (input split): A split on its input like W, its partial product
all-reduced (``reduce_from_tensor_model_parallel_region``), B replicated.

Checkpoint keys: the wrapped base keeps its original keys (``...linear_qkv.weight``), so base checkpoints
load into a wrapped model and vice versa; adapters are saved apart from the base by :func:`save_adapter`
under name-independent keys (``...linear_qkv.lora_A.weight``) in a megatron-core dist checkpoint, which
reshards to any TP size on load.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint
from torch import nn

from lrpath_megatron import ranks
from lrpath_megatron.config import ConfigError
from lrpath_megatron.errors import LrpathError

# target name -> (submodule of a TransformerLayer, parallel kind of the base linear)
TARGETS = {
    "linear_qkv": ("self_attention", "column"),
    "linear_proj": ("self_attention", "row"),
    "linear_fc1": ("mlp", "column"),
    "linear_fc2": ("mlp", "row"),
}
DEFAULT_ADAPTER = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "lrpath-lora/1"
HEAD_KEY = "output_layer.weight"


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(TARGETS))
    train_output_layer: bool = False  # also train (and save with the adapter) the output layer

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self, where: str = "adapt.lora") -> "LoraConfig":
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"{where}.rank={self.rank!r} must be an integer > 0 (the LoRA rank, e.g. 4)")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha={self.alpha} must be > 0 (scaling = alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules is empty; choose from {', '.join(TARGETS)}")
        unknown = [t for t in self.target_modules if t not in TARGETS]
        if unknown:
            raise ConfigError(
                f"{where}.target_modules: unknown target module(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(TARGETS)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(f"{where}.target_modules lists a module twice: {self.target_modules}")
        return self


def _seeded_kaiming_uniform(shape: tuple, fan_in: int, seed: int) -> torch.Tensor:
    """peft's A init (kaiming-uniform, a=sqrt(5)) from a generator seeded per module: the full matrix is
    the same on every rank and at every TP size, so each rank can take its own slice."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class LoraLinear(nn.Module):
    """A frozen megatron-core parallel linear plus named low-rank adapters (at most one active)."""

    def __init__(self, base: nn.Module, kind: str, gated: bool, where: str):
        super().__init__()
        if getattr(base, "sequence_parallel", False):
            raise LrpathError(f"{where}: LoRA does not support sequence parallelism; turn it off")
        if kind == "column" and getattr(base, "gather_output", False):
            raise LrpathError(f"{where}: LoRA expects a column-parallel layer with gather_output=False")
        self.base, self.kind, self.gated = base, kind, gated
        self.tp_size = base.tp_group.size() if base.tp_group is not None else 1
        self.tp_rank = base.tp_group.rank() if base.tp_group is not None else 0
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: Optional[str] = None

    def add_adapter(self, name: str, cfg: LoraConfig, seed: int) -> None:
        base, r = self.base, cfg.rank
        weight = base.weight
        if self.kind == "column":
            in_local, out_local = base.input_size, base.output_size_per_partition
            a_full = _seeded_kaiming_uniform((r, base.input_size), base.input_size, seed)
        else:
            in_local, out_local = base.input_size_per_partition, base.output_size
            a_full = _seeded_kaiming_uniform((r, base.input_size), base.input_size, seed)
            a_full = a_full[:, self.tp_rank * in_local:(self.tp_rank + 1) * in_local]
        lora_a = nn.Linear(in_local, r, bias=False, device=weight.device, dtype=weight.dtype)
        lora_b = nn.Linear(r, out_local, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            lora_a.weight.copy_(a_full)
            lora_b.weight.zero_()
        # Split params carry megatron's TP attributes: grad-norm and optimizer count them on every rank.
        if self.kind == "column":
            set_tensor_model_parallel_attributes(lora_b.weight, True, 0, 1)
        else:
            set_tensor_model_parallel_attributes(lora_a.weight, True, 1, 1)
        self.lora_A[name], self.lora_B[name] = lora_a, lora_b
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling

    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        name = self.active
        if name is None:
            return out, bias
        h = self.lora_A[name](self.lora_dropout[name](x))
        if self.kind == "column":
            h = copy_to_tensor_model_parallel_region(h, group=self.base.tp_group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=self.base.tp_group)
        return out + self.lora_B[name](h) * self.scaling[name], bias

    def adapter_tensors(self, name: str) -> dict[str, tuple[torch.Tensor, Optional[int]]]:
        """{suffix: (param, TP axis or None)} of one adapter, with name-independent suffixes."""
        a_axis, b_axis = (None, 0) if self.kind == "column" else (1, None)
        return {"lora_A.weight": (self.lora_A[name].weight, a_axis),
                "lora_B.weight": (self.lora_B[name].weight, b_axis)}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        # The base under its own (unwrapped) checkpoint keys; dict keys stay those of state_dict().
        sd = self.base.sharded_state_dict(f"{prefix}base.", sharded_offsets, metadata)
        replace_prefix_for_sharding(sd, f"{prefix}base.", prefix)
        tensors, axes = {}, {}
        for name in self.lora_A:
            for suffix, (param, axis) in self.adapter_tensors(name).items():
                key = suffix.replace("lora_A.", f"lora_A.{name}.").replace("lora_B.", f"lora_B.{name}.")
                tensors[key] = param
                if axis is not None:
                    axes[key] = axis
        sd.update(make_sharded_tensors_for_checkpoint(tensors, prefix, axes, sharded_offsets,
                                                      tp_group=self.base.tp_group,
                                                      dp_cp_group=metadata["dp_cp_group"]))
        if self.gated:  # GLU fc1 rows are [gate shard | up shard] per rank: reshard each half separately
            for key, value in sd.items():
                if key in (f"{prefix}base.weight", f"{prefix}base.bias") or ".lora_B." in key:
                    sd[key] = apply_swiglu_sharded_factory(value, sharded_offsets)
        return sd


# --------------------------------------------------------------------------------------------------
# Injection and selection
# --------------------------------------------------------------------------------------------------
def _layers(model):
    model = getattr(model, "module", model)
    return [(layer.layer_number - 1, layer) for layer in model.decoder.layers]  # global 0-based index


def lora_modules(model) -> dict[str, LoraLinear]:
    """Every LoRA wrapper of the model keyed by its global module path (``decoder.layers.0.mlp.linear_fc1``)."""
    found = {}
    for index, layer in _layers(model):
        for target, (parent, _) in TARGETS.items():
            module = getattr(getattr(layer, parent, None), target, None)
            if isinstance(module, LoraLinear):
                found[f"decoder.layers.{index}.{parent}.{target}"] = module
    return found


def inject_lora(model, cfg: LoraConfig, name: str = DEFAULT_ADAPTER, seed: int = 0) -> list[str]:
    """Freeze every base parameter and add adapter ``name`` to each target linear; makes it active.
    Returns the module paths that got an adapter."""
    cfg.validate()
    model = getattr(model, "module", model)
    for param in model.parameters():
        param.requires_grad_(False)
    gated = model.config.gated_linear_unit
    done = []
    for index, layer in _layers(model):
        for target in cfg.target_modules:
            parent_name, kind = TARGETS[target]
            path = f"decoder.layers.{index}.{parent_name}.{target}"
            parent = getattr(layer, parent_name, None)
            module = getattr(parent, target, None)
            if not isinstance(module, LoraLinear):
                cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
                if not isinstance(module, cls):
                    raise LrpathError(
                        f"LoRA target {target!r}: {path} is {type(module).__name__}, not megatron-core's "
                        f"{cls.__name__}; LoRA supports the local layer spec (fused Transformer Engine "
                        f"layer-norm linears are not supported): drop it from adapt.lora.target_modules"
                    )
                module = LoraLinear(module, kind, gated and target == "linear_fc1", path)
                setattr(parent, target, module)
            if name in module.lora_A:
                raise LrpathError(f"{path} already has an adapter named {name!r}")
            module.add_adapter(name, cfg, seed=zlib.crc32(f"{seed}/{name}/{path}".encode()))
            done.append(path)
    if cfg.train_output_layer:
        head_weight(model).requires_grad_(True)
    set_active(model, name)
    return done


def set_active(model, name: Optional[str]) -> None:
    """Route every wrapper through adapter ``name`` (None = the plain base model)."""
    for path, module in lora_modules(model).items():
        if name is not None and name not in module.lora_A:
            raise LrpathError(f"{path} has no adapter {name!r}; it has {', '.join(module.lora_A) or 'none'}")
        module.active = name


def head_weight(model) -> torch.Tensor:
    model = getattr(model, "module", model)
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight


@dataclass(frozen=True)
class ParamReport:
    """Parameters of this rank's model shard and the optimizer memory they cost."""

    trainable: int
    total: int
    optimizer_state_bytes: int  # Adam exp_avg + exp_avg_sq (fp32), + fp32 main params under bf16
    grad_buffer_bytes: int  # megatron DDP keeps fp32 grads of the trainable params only

    @property
    def ratio(self) -> float:
        return self.trainable / self.total

    def describe(self) -> str:
        return (f"trainable parameters {self.trainable:,} of {self.total:,} ({100 * self.ratio:.3f}%, "
                f"1/{self.total / max(self.trainable, 1):.0f}); optimizer state "
                f"{self.optimizer_state_bytes / 2**20:.2f} MiB, grad buffer {self.grad_buffer_bytes / 2**20:.2f} MiB")


def param_report(model) -> ParamReport:
    model = getattr(model, "module", model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    per_param = 8 + (4 if any(p.dtype != torch.float32 for p in trainable) else 0)
    return ParamReport(n_train, sum(p.numel() for p in params), n_train * per_param, n_train * 4)


# --------------------------------------------------------------------------------------------------
# Saving and loading adapters apart from the base
# --------------------------------------------------------------------------------------------------
def _adapter_sharded_state_dict(model, name: str, with_head: bool) -> dict:
    sd = {}
    for path, module in lora_modules(model).items():
        if name not in module.lora_A:
            raise LrpathError(f"{path} has no adapter {name!r}; it has {', '.join(module.lora_A) or 'none'}")
        for suffix, (param, axis) in module.adapter_tensors(name).items():
            key = f"{path}.{suffix}"
            tensor = param.detach()
            if axis is None:
                sd[key] = make_sharded_tensors_for_checkpoint({key: tensor}, "")[key]
            else:
                sd[key] = make_tp_sharded_tensor_for_checkpoint(tensor, key, axis)
            if module.gated and suffix.startswith("lora_B"):
                sd[key] = apply_swiglu_sharded_factory(sd[key], ())
    inner = getattr(model, "module", model)
    if with_head and inner.post_process:
        sd[HEAD_KEY] = make_tp_sharded_tensor_for_checkpoint(head_weight(inner).detach(), HEAD_KEY, 0)
    return sd


def _adapter_shapes(model, name: str, with_head: bool) -> dict[str, list[int]]:
    """Global (unsplit) shapes of an adapter's tensors: equal for a base at any TP size."""
    shapes = {}
    for path, module in lora_modules(model).items():
        r = module.lora_A[name].weight.shape[0]
        shapes[f"{path}.lora_A.weight"] = [r, module.base.input_size]
        shapes[f"{path}.lora_B.weight"] = [module.base.output_size, r]
    if with_head:
        inner = getattr(model, "module", model)
        shapes[HEAD_KEY] = [inner.vocab_size, inner.config.hidden_size]  # the padded vocabulary
    return shapes


def save_adapter(model, out_dir: Path, cfg: LoraConfig, name: str = DEFAULT_ADAPTER,
                 info: Optional[dict] = None) -> Path:
    """Collective. Writes adapter ``name`` (and the trained head when ``cfg.train_output_layer``) to
    ``out_dir``: ``adapter_config.json`` + ``weights/`` (dist checkpoint), renamed into place when complete."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    if ranks.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
    ranks.barrier()
    dist_checkpointing.save(_adapter_sharded_state_dict(model, name, cfg.train_output_layer), str(tmp / "weights"))
    ranks.barrier()
    if ranks.rank() == 0:
        inner = getattr(model, "module", model)
        config = {"format": ADAPTER_FORMAT, "lora": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                  "shapes": _adapter_shapes(model, name, cfg.train_output_layer),
                  "tensor_parallel": inner.config.tensor_model_parallel_size, **(info or {})}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    ranks.barrier()
    return out_dir


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise LrpathError(f"{adapter_dir} is not an adapter directory (no {ADAPTER_CONFIG}); save one with "
                          f"`lrpath adapt` or save_adapter()")
    config = json.loads(path.read_text())
    if config.get("format") != ADAPTER_FORMAT:
        raise LrpathError(f"{path}: format {config.get('format')!r} is not {ADAPTER_FORMAT!r}")
    return config


def load_adapter(model, adapter_dir: Path, name: str = DEFAULT_ADAPTER, seed: int = 0) -> LoraConfig:
    """Collective. Adds adapter ``name`` to ``model`` (a base model, possibly with other adapters) and
    loads its weights from ``adapter_dir``, at whatever TP size the model has. Refuses an adapter whose
    shapes do not fit this base before loading any weight."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    cfg = LoraConfig(**config["lora"]).validate(f"{adapter_dir / ADAPTER_CONFIG}: lora")
    inject_lora(model, cfg, name, seed)
    live = _adapter_shapes(model, name, cfg.train_output_layer)
    saved = config["shapes"]
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    wrong = [(k, saved[k], live[k]) for k in sorted(set(live) & set(saved)) if saved[k] != live[k]]
    if missing or extra or wrong:
        detail = "; ".join([f"{k}: adapter {s}, this model {l}" for k, s, l in wrong[:3]]
                           + [f"not in the adapter: {k}" for k in missing[:2]]
                           + [f"not in this model: {k}" for k in extra[:2]])
        raise LrpathError(
            f"adapter {adapter_dir} was trained for a different base model ({detail}); load it onto the "
            f"base it was trained on (its config: {adapter_dir / ADAPTER_CONFIG})"
        )
    sd = _adapter_sharded_state_dict(model, name, cfg.train_output_layer)
    loaded = dist_checkpointing.load(sd, str(adapter_dir / "weights"))
    with torch.no_grad():
        for path, module in lora_modules(model).items():
            for suffix, (param, _) in module.adapter_tensors(name).items():
                param.copy_(loaded[f"{path}.{suffix}"])
        if HEAD_KEY in loaded:
            head_weight(model).copy_(loaded[HEAD_KEY])
    return cfg
