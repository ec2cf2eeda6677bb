"""Process groups from torchrun or SLURM environment variables, and megatron-core's parallel state."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from lrpath_megatron import cpu_compat
from lrpath_megatron.config import ConfigError, ParallelConfig
from lrpath_megatron.process_lifetime import forks_die_with_this_process


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_env(environ: dict | None = None) -> DistEnv:
    """Rank/world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID); torchrun's variables win when both are set (torchrun inside an allocation)."""
    env = os.environ if environ is None else environ

    def pick(torchrun: str, slurm: str, default: str) -> int:
        return int(env.get(torchrun, env.get(slurm, default)))

    world = pick("WORLD_SIZE", "SLURM_NTASKS", "1")
    rank = pick("RANK", "SLURM_PROCID", "0")
    local = pick("LOCAL_RANK", "SLURM_LOCALID", "0")
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside world size {world}: check RANK/WORLD_SIZE or SLURM_* variables")
    return DistEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")))


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("LRPATH_DEVICE", "auto") != "cpu"


def initialize(parallel: ParallelConfig, seed: int) -> DistEnv:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's model-parallel groups, every
    collective bounded by ``parallel.distributed_timeout_minutes``.

    The world shape is checked against the config BEFORE any collective, so a bad config fails on
    every rank with the same message instead of hanging.
    """
    from megatron.core import parallel_state

    env = read_env()
    parallel.data_parallel(env.world_size)  # raises ConfigError on a world that does not factor
    forks_die_with_this_process()
    cuda = use_cuda()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    else:
        cpu_compat.enable()
    if not torch.distributed.is_initialized():
        backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
        if env.world_size == 1:
            # One process needs no rendezvous: an in-process store, so single-process runs never compete
            # for MASTER_PORT on a shared machine.
            torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                                 rank=env.rank, world_size=env.world_size, timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    seed_everything(seed)
    return env


def seed_everything(seed: int) -> None:
    """Same seed on every rank of a TP group (identical init of replicated params); PP stages offset."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if use_cuda():
        torch.manual_seed(stage_seed)
        model_parallel_cuda_manual_seed(stage_seed)
    else:
        cpu_compat.init_rng(stage_seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
