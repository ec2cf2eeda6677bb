"""Speed levers for megatron-core without Transformer Engine or apex (``performance`` config section).

Every lever is off by default; off leaves the plain megatron-core path untouched. A lever whose dependency
is missing either falls back (and says so once) or is refused with one :class:`ConfigError`, as listed in
docs/performance.md. Called by :mod:`lrpath_megatron.model` (TransformerConfig flags) and by the trainer
(compiled layers, optimizer).
"""
from __future__ import annotations

import os
import shutil

import torch
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.transformer_layer import TransformerLayer

from lrpath_megatron.config import ConfigError, PerformanceConfig, PrecisionConfig
from lrpath_megatron.mcore_patches import pass_own_tp_group


def inductor_missing(cuda: bool) -> str | None:
    """Why torch.compile's inductor backend cannot generate kernels here, or None when it can."""
    if cuda:
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not importable (inductor generates its GPU kernels with it)"
    compiler = os.environ.get("CXX") or "g++"
    return None if shutil.which(compiler) else f"no C++ compiler {compiler!r} on PATH (inductor's CPU backend needs one)"


def check(perf: PerformanceConfig, cuda: bool, have_te: bool) -> None:
    """Refuse, before anything is built, levers whose dependency is missing here."""
    compiled = [name for name in ("compile_layers", "bias_dropout_fusion", "bias_activation_fusion",
                                  "cross_entropy_fusion") if getattr(perf, name)]
    reason = inductor_missing(cuda) if compiled else None
    if reason:
        raise ConfigError(
            f"performance.{compiled[0]} needs torch.compile, but {reason}; install it or set "
            f"{', '.join('performance.' + n for n in compiled)} to false"
        )
    if perf.rope_fusion and not (have_te and cuda):
        raise ConfigError(
            "performance.rope_fusion needs Transformer Engine on a GPU (megatron-core has no other fused "
            "RoPE); set it to false - performance.compile_layers fuses RoPE without it"
        )


def transformer_flags(perf: PerformanceConfig | None) -> dict:
    """TransformerConfig fusion flags. Off = all False, as megatron-core's local spec runs without TE."""
    perf = perf or PerformanceConfig()
    return dict(
        bias_dropout_fusion=perf.bias_dropout_fusion,
        bias_activation_fusion=perf.bias_activation_fusion,
        cross_entropy_loss_fusion=perf.cross_entropy_fusion,
        cross_entropy_fusion_impl="native",  # megatron-core's own (compiled) kernels, no TE needed
        apply_rope_fusion=perf.rope_fusion,
        recompute_granularity=None if perf.recompute == "none" else perf.recompute,
        recompute_method="uniform" if perf.recompute == "full" else None,
        recompute_num_layers=perf.recompute_num_layers if perf.recompute == "full" else None,
        # Need apex or TE kernels that this project never requires: always off.
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def fp8_settings(precision: PrecisionConfig) -> dict:
    """megatron-core's FP8 settings (Transformer Engine recipes); {} when FP8 is off."""
    if precision.fp8 is None:
        return {}
    return dict(fp8=precision.fp8, fp8_recipe=precision.fp8_recipe, fp8_margin=precision.fp8_margin,
                fp8_amax_history_len=precision.fp8_amax_history_len,
                fp8_amax_compute_algo=precision.fp8_amax_compute_algo)


def compile_layers(model: torch.nn.Module, perf: PerformanceConfig) -> int:
    """torch.compile every TransformerLayer of ``model`` in place; returns how many.

    ``nn.Module.compile`` keeps the module tree and state-dict keys, so checkpoints are the same with and
    without it. The layers share one compiled graph (no recompiles across layers on CPU); the recompile
    limit is still raised past the layer count, so a per-layer guard on another setup could never leave
    the deeper layers of a model eager (the default limit is 8).
    """
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    if not layers:
        return 0
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(layers))
    for layer in layers:
        for linear in layer.modules():
            if isinstance(linear, RowParallelLinear):
                pass_own_tp_group(linear)
        layer.compile(mode=perf.compile_mode, dynamic=False)
    return len(layers)


def use_fused_adam(optimizer) -> int:
    """Switch the torch Adam/AdamW inside a megatron-core optimizer (or each one of a chained optimizer)
    to torch's fused kernel; returns how many were switched (0 = fell back: nothing to switch).

    Without TE or apex, megatron-core builds a plain ``torch.optim.AdamW`` over the fp32 master weights,
    which torch runs with its multi-kernel foreach path. TE's and apex's FusedAdam are left alone."""
    return sum(fuse_torch_adam(getattr(m, "optimizer", None))
               for m in getattr(optimizer, "chained_optimizers", [optimizer]))


def fuse_torch_adam(inner) -> bool:
    """Make a ``torch.optim.Adam``/``AdamW`` step with the fused kernel; False (unchanged) for any other
    optimizer or parameters on a device without one. Same update, same fp32 state; only the kernel
    changes. A load-state-dict pre-hook keeps the choice across checkpoint loads (a saved state carries
    the flags it was saved with) and gives every parameter its own ``step`` tensor on its device, as the
    fused kernel needs."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    supported = set(_get_fused_kernels_supported_devices())
    if not all(p.is_floating_point() and p.device.type in supported for g in inner.param_groups for p in g["params"]):
        return False
    for group in inner.param_groups:
        group.update(fused=True, foreach=False)
    inner.register_load_state_dict_pre_hook(_keep_fused)
    return True


def _keep_fused(optimizer, state_dict: dict) -> dict:
    state_dict = dict(state_dict)
    state_dict["param_groups"] = [dict(g, fused=True, foreach=False) for g in state_dict["param_groups"]]
    state_dict["state"] = {k: {n: (v.clone() if n == "step" else v) for n, v in s.items()}
                           for k, s in state_dict["state"].items()}
    return state_dict
