"""Process groups, model wrapping and cross-process reductions for runs launched by torchrun.

A plain ``python -m engine.train`` is a world of one and touches none of ``torch.distributed``. Under
``torchrun`` the process group is initialised from its environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import RecipeError

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
        timeout = datetime.timedelta(minutes=10)
        dist.init_process_group(backend, store=_attempt_store(info, timeout), rank=info.rank,
                                world_size=info.world, timeout=timeout)
    return info


def _attempt_store(info: DistInfo, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's rendezvous store, namespaced by restart attempt.

    After a worker dies, ``torchrun --max-restarts`` starts every worker again; without a fresh namespace
    the new process group would read the addresses the dead attempt published and fail to connect.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world,
                          is_master=not agent_hosts_store and info.rank == 0, timeout=timeout,
                          multi_tenant=not agent_hosts_store)
    return dist.PrefixStore(f"tritonforge/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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


def check_sync_bn(recipe, device: torch.device, world_: int) -> None:
    """Stop a run that asks for ``parallel.sync_bn`` where torch's SyncBatchNorm cannot run: several
    processes on CPUs (it synchronizes CUDA tensors only). A world of one has nothing to synchronize."""
    if recipe.parallel.sync_bn and world_ > 1 and device.type != "cuda":
        raise RecipeError(f"parallel.sync_bn: torch's SyncBatchNorm synchronizes CUDA tensors only, and this run "
                          f"has {world_} processes on {device.type}; set it to false (each process then keeps its "
                          f"own BatchNorm statistics)")


def sync_batchnorm(model: torch.nn.Module, log=print) -> torch.nn.Module:
    """Make every BatchNorm layer of ``model`` a SyncBatchNorm, in place: the same parameters and buffers
    under the same names (checkpoints load either way), and in training its statistics (and their
    gradients) are computed over every process's rows. Out of training, or in a world of one, it is
    BatchNorm."""
    if torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) is not model:  # a bare BatchNorm layer: not in place
        raise ValueError("sync_batchnorm converts the BatchNorm layers inside a model, not a layer itself")
    count = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    log(f"parallel.sync_bn: {count} BatchNorm layer(s) synchronized over {world()} processes" if count else
        "parallel.sync_bn: the model has no BatchNorm layer; nothing to synchronize")
    return model


def wrap(model: torch.nn.Module, recipe, device: torch.device, log=print) -> torch.nn.Module:
    """Wrap ``model`` for data parallelism as ``parallel.strategy`` says.

    ``ddp``: DistributedDataParallel (gradients all-reduced, bucketed, overlapping the backward).
    ``fsdp``: FSDP2 — ``fully_shard`` on each unit the model names (its ``blocks``: transformer blocks, CNN
    stages) and then on the whole model, so parameters, gradients and optimizer state are sharded and each
    unit's parameters are gathered just in time. Its mixed-precision policy follows ``train.precision``:
    parameters cast to bf16/fp16 for compute, gradients reduced in fp32. The model object itself becomes
    the sharded module (its parameters turn into DTensors), so the task keeps using it.

    With ``parallel.sync_bn`` the model's BatchNorm layers become SyncBatchNorm first (:func:`sync_batchnorm`).
    """
    if recipe.parallel.sync_bn:
        sync_batchnorm(model, log)
    if recipe.parallel.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for unit in getattr(model, "blocks", ()):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient reduction of the backward inside (an accumulation micro-step) when ``skip``."""
    if not skip:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors) -> bool:
    """True when every element of every tensor (every shard, on every process) is finite."""
    tensors = [local(t) for t in tensors]
    flags = [torch.isfinite(t).all() for t in tensors if t.numel()]
    ok = torch.stack(flags).all().float() if flags else torch.ones(())
    if world() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def cleanup(drain: bool = True) -> None:
    """Leave the process group; ``drain`` first waits (GIL released) until every rank is here and idle."""
    if dist.is_available() and dist.is_initialized():
        if drain:
            dist.barrier()
        gc.collect()  # free DDP's reducer now, while the group's threads are idle
        dist.destroy_process_group()
