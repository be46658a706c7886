"""Rank, world size and the few collectives the package uses (``torch.distributed`` only).

Every function works without an initialised process group (one process): it then returns the
single-process answer.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["initialized", "rank", "world_size", "all_reduce_sum", "broadcast_object", "barrier",
           "all_ok"]


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place; returns it."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_ok(ok: bool) -> bool:
    """True if ``ok`` on every rank (a barrier that carries a failure flag)."""
    if world_size() == 1:
        return ok
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0
