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
