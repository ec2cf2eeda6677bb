"""A GPTModel made ready to train: megatron-core's DDP around it, the Megatron optimizer over it, the
performance levers that act on them, and the hooks megatron-core's schedules call after backward."""
from __future__ import annotations

from typing import Callable

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

from lrpath_megatron import distributed, mcore_patches, performance
from lrpath_megatron.config import ConfigError, TrainConfig
from lrpath_megatron.model import with_precision


def use_distributed_optimizer(cfg: TrainConfig) -> bool:
    dist_opt = cfg.parallel.use_distributed_optimizer
    return distributed.use_cuda() if dist_opt is None else dist_opt


def check_levers(cfg: TrainConfig) -> None:
    """Refuse, before any model is built, levers that need the distributed optimizer (its default depends
    on the device, so this is known only at run time)."""
    if cfg.performance.overlap_param_gather and not use_distributed_optimizer(cfg):
        raise ConfigError("performance.overlap_param_gather gathers the distributed optimizer's parameter "
                          "shards; set parallel.use_distributed_optimizer=true or the lever to false")


def wrap_for_training(cfg: TrainConfig, tcfg: TransformerConfig, modules: list, say: Callable[[str], None]):
    """(DDP model chunks, Megatron optimizer over all of them) of the stage's ``modules`` (weights loaded
    and transformed already); ``say`` reports levers that were compiled or left as built."""
    perf, dist_opt = cfg.performance, use_distributed_optimizer(cfg)
    if perf.compile_layers:  # after any model transform: the compiled layers include its modules
        say(f"torch.compile: {sum(performance.compile_layers(m, perf) for m in modules)} layers")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt,
        overlap_grad_reduce=perf.overlap_grad_reduce, overlap_param_gather=perf.overlap_param_gather,
        bucket_size=perf.ddp_bucket_size)
    # One DDP per chunk, as Megatron-LM builds them: later chunks keep one bucket, reduced when the
    # interleaved schedule finishes their backward.
    model = [DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=with_precision(module, tcfg),
                                     disable_bucketing=i > 0)
             for i, module in enumerate(modules)]
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            bf16=cfg.precision.dtype == "bf16", params_dtype=tcfg.params_dtype, use_distributed_optimizer=dist_opt,
        ),
        model,
    )
    mcore_patches.check_checkpoint_patches(optimizer)
    if perf.fused_adam and not performance.use_fused_adam(optimizer):
        say("performance.fused_adam: megatron-core's optimizer is already fused (Transformer Engine or apex) or "
            "has no torch Adam here; left as built")
    if perf.foreach_grad_norm and not mcore_patches.use_foreach_grad_norm():
        say("performance.foreach_grad_norm: megatron-core uses the multi-tensor kernels of Transformer Engine or "
            "apex; left as is")
    # The schedules call these (loss scaling, grad all-reduce + clipping inputs) after backward.
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.finalize_model_grads_func = finalize_model_grads
    if perf.overlap_grad_reduce:  # reduce each bucket once, in the last micro-batch's backward
        tcfg.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    return model, optimizer
