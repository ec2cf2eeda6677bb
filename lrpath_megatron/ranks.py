"""Rank, world size, barrier and gather that also work without an initialised process group (one
process: rank 0 of 1), for code that runs both under torchrun and alone."""
from __future__ import annotations

from typing import Any

import torch


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather(obj: Any) -> list:
    """``obj`` of every rank, in rank order (collective)."""
    if world() == 1:
        return [obj]
    gathered: list[Any] = [None] * world()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def on_any_rank(*flags: bool) -> list[bool]:
    """Collective: each flag, true when it is true on any rank."""
    agreed = torch.tensor([int(f) for f in flags])
    if torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            agreed = agreed.cuda()
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    return [bool(f) for f in agreed.tolist()]
