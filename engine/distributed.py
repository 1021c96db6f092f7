"""Process groups, model wrapping and cross-process reductions for runs launched by torchrun.

A plain ``python -m engine.train`` is a world of one and touches none of ``torch.distributed``. Under
``torchrun`` the process group is initialised from its environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str) -> DistInfo:
    """Join the process group torchrun set up; a world of one when not launched by torchrun."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        # A bounded timeout: a peer that died makes the others fail instead of hanging forever.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return info


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def main_first(fn: Callable[[], T], rank_: int, world_: int) -> T:
    """Run ``fn`` on rank 0 first (e.g. to build a cache), then on the others."""
    if world_ > 1 and rank_ != 0:
        dist.barrier()
    out = fn()
    if world_ > 1 and rank_ == 0:
        dist.barrier()
    return out


def mean(t: torch.Tensor) -> torch.Tensor:
    """Average of ``t`` over all processes (``t`` itself in a world of one)."""
    if world() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world()


def wrap(model: torch.nn.Module, recipe, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` for data parallelism as ``parallel.strategy`` says."""
    if recipe.parallel.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raise NotImplementedError(f"parallel.strategy = {recipe.parallel.strategy!r} is not supported yet")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
