"""Muon's Newton-Schulz iterations shared out over the ranks of a data-parallel run.

Both Muon optimizers (``engine.optim.muon.TorchMuon`` and the Triton ``kernels.Muon``) take a
:class:`MuonSharing` as ``orthogonalizer``: after their momentum step each rank holds, per Muon matrix,
its part of the momentum-updated gradient U (DDP: the whole matrix, identical on every rank; FSDP2: the
rows of its shard), and :meth:`MuonSharing.__call__` replaces that part with the same part of the
orthogonalized X. Per step:

1. Every matrix has one owner rank, fixed from the parameter order: the matrices, largest Newton-Schulz
   cost first (ties in parameter order), each go to the rank with the least cost so far.
2. FSDP2 only: per bucket, one all-to-all sends every rank's shard of U to the matrix's owner, which
   concatenates the shards into the whole U. Under DDP every rank already holds it.
3. The owner orthogonalizes its matrices, stacked by shape, with the optimizer's own batched iterations.
4. Per bucket, one all-to-all hands each rank its part of X: its shard's rows (FSDP2), or the whole matrix
   (DDP: an all-gather, so every rank applies the owner's bytes and the parameters stay bit-identical).

Buckets (:data:`BUCKET_BYTES` of matrices each) are sent asynchronously: all of step 2 is issued first,
and each bucket's step 4 is in flight while the next bucket iterates.

Bytes per step, N the Muon elements, W ranks, e bytes per element of U and X (4 on CPU, 2 for the Triton
backend's bf16 on CUDA), counted as what a rank receives, on average over ranks (owners receive more when
the matrices do not divide evenly):

- FSDP2: 2 (W-1)/W^2 N e (steps 2 and 4), against FSDP2's own (W-1)/W N per parameter all-gather (bf16 or
  fp32; one in the forward, one again in the backward) and (W-1)/W N 4 for the fp32 reduce-scatter.
- DDP: (W-1)/W N e (step 4), against the gradient all-reduce's 2 (W-1)/W N 4.

Supported layouts: plain tensors replicated over the given process group (DDP) and DTensors sharded
along one dimension over a 1-D device mesh (FSDP2's ``Shard(0)``, or ``Shard(1)``). A matrix sharded along
both dimensions, over a 2-D mesh (tensor parallel with FSDP), or held as partial sums is refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

#: Matrices (by the bytes of U) sent per collective: small enough that iterating on one bucket overlaps
#: the transfer of the next, large enough that a GPT-2-sized model takes a handful of collectives.
BUCKET_BYTES = 64 << 20

#: ``newton_schulz_(stack [L, m, n], coefficients, steps, eps)``: orthogonalize each matrix in place.
NewtonSchulz = Callable[[Tensor, tuple, int, float], None]
#: Per matrix: (Newton-Schulz coefficients, steps, eps).
Settings = tuple[tuple, int, float]


class MuonShardingError(ValueError):
    """A Muon matrix is laid out in a way the shared Newton-Schulz step does not take."""


def shard_sizes(size: int, world: int) -> list[int]:
    """Lengths of the ``world`` shards of a dimension of ``size`` (``torch.chunk``'s split, as DTensor's)."""
    chunk = -(-size // world)
    return [max(0, min(chunk, size - r * chunk)) for r in range(world)]


def newton_schulz_flops(shape: Sequence[int], steps: int) -> float:
    """Matmul FLOPs of ``steps`` quintic iterations on an m x n matrix (Gram on the short side s, long l)."""
    short, long = sorted(shape)
    return steps * (4 * short * short * long + 2 * short ** 3)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The owner rank of each matrix: largest cost first (ties in parameter order), each to the rank with the
    least cost so far (the lowest on a tie). Every process derives the same owners from the same order."""
    load, owners = [0.0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):  # a stable sort keeps parameter order
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += costs[i]
    return owners


@dataclass
class _Matrix:
    index: int  # position in the call's parameter list
    shape: tuple[int, int]  # the whole matrix
    dim: Optional[int]  # the dimension sharded over the ranks, None when every rank holds it all
    owner: int = 0


@dataclass
class _Bucket:
    matrices: list[_Matrix]
    dtype: torch.dtype
    gather_splits: tuple[list[int], list[int]] = ((), ())  # all-to-all (input, output) sizes of step 2
    scatter_splits: tuple[list[int], list[int]] = ((), ())  # and of step 4


@dataclass
class _Plan:
    key: tuple
    buckets: list[_Bucket] = field(default_factory=list)


class MuonSharing:
    """Shares Muon's Newton-Schulz iterations out over ``group`` (see the module's docstring).

    ``group``: the process group plain (replicated, DDP) matrices are shared over; DTensor matrices use
    their mesh's group, and a group given as well must be that one. ``names`` maps ``id(parameter)`` to the
    name errors use.
    """

    def __init__(self, group: Any = None, names: Optional[Mapping[int, str]] = None):
        self.group = group
        self.names = dict(names or {})
        self._plan: Optional[_Plan] = None

    # -- layouts and owners -------------------------------------------------------------------
    def _name(self, p: Tensor, index: int) -> str:
        return self.names.get(id(p), f"Muon matrix {index} of shape {tuple(p.shape)}")

    def check(self, params: Sequence[Tensor]) -> None:
        """Raise :class:`MuonShardingError`, naming the parameter, for a layout the step does not take."""
        for i, p in enumerate(params):
            self._layout(p, i)

    def _layout(self, p: Tensor, index: int) -> tuple[Any, Optional[int]]:
        """(process group, sharded dimension or None) of one Muon matrix."""
        name = self._name(p, index)
        if p.ndim != 2:
            raise MuonShardingError(f"{name}: Muon takes 2-D matrices, got shape {tuple(p.shape)}")
        if not isinstance(p, DTensor):
            if self.group is None and dist.is_initialized() and dist.get_world_size() > 1:
                raise MuonShardingError(f"{name}: a plain tensor in a {dist.get_world_size()}-process run: "
                                        "name the process group it is replicated over (DDP)")
            return self.group, None
        mesh, placements = p.device_mesh, p.placements
        shards = [pl for pl in placements if isinstance(pl, Shard)]
        if len(shards) > 1:
            raise MuonShardingError(f"{name}: sharded along both dimensions ({placements}); Muon's shared step "
                                    "takes a matrix sharded along one dimension (FSDP2)")
        if mesh.ndim != 1:
            raise MuonShardingError(f"{name}: on a {mesh.ndim}-D device mesh ({placements}); tensor "
                                    "parallelism is not supported with Muon: shard with FSDP2 over a 1-D mesh")
        if not (shards or isinstance(placements[0], Replicate)):
            raise MuonShardingError(f"{name}: placement {placements[0]} is not supported with Muon (only "
                                    "Shard(0), Shard(1) or Replicate)")
        group = mesh.get_group()
        if self.group is not None and self.group is not group:
            raise MuonShardingError(f"{name}: sharded over another process group than the run's")
        return group, (shards[0].dim if shards else None)

    def _build_plan(self, params: Sequence[Tensor], updates: Sequence[Tensor], settings: Sequence[Settings],
                    key: tuple) -> _Plan:
        layouts = [self._layout(p, i) for i, p in enumerate(params)]
        groups = {id(g) for g, _ in layouts}
        if len(groups) > 1:
            raise MuonShardingError("Muon matrices are spread over several process groups; one is supported")
        self.group = layouts[0][0] if layouts else self.group
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        matrices = [_Matrix(i, tuple(p.shape), dim) for i, (p, (_, dim)) in enumerate(zip(params, layouts))]
        for m, u in zip(matrices, updates):
            expected = self._piece_shape(m, rank, world)
            assert tuple(u.shape) == expected, (tuple(u.shape), expected)  # DTensor's split is torch.chunk's
        costs = [newton_schulz_flops(m.shape, settings[m.index][1]) for m in matrices]
        for m, owner in zip(matrices, assign_owners(costs, world)):
            m.owner = owner
        plan = _Plan(key)
        by_dtype: dict[torch.dtype, list[_Matrix]] = {}
        for m in matrices:
            by_dtype.setdefault(updates[m.index].dtype, []).append(m)
        for dtype, members in by_dtype.items():
            size = torch.empty((), dtype=dtype).element_size()
            bucket: list[_Matrix] = []
            nbytes = 0
            for m in members:
                bucket.append(m)
                nbytes += math.prod(m.shape) * size
                if nbytes >= BUCKET_BYTES:
                    plan.buckets.append(self._bucket(bucket, dtype, rank, world))
                    bucket, nbytes = [], 0
            if bucket:
                plan.buckets.append(self._bucket(bucket, dtype, rank, world))
        return plan

    @staticmethod
    def _piece_shape(m: _Matrix, rank: int, world: int) -> tuple[int, int]:
        """The part of matrix ``m`` that ``rank`` holds (and gets back as X)."""
        if m.dim is None:
            return m.shape
        shape = list(m.shape)
        shape[m.dim] = shard_sizes(m.shape[m.dim], world)[rank]
        return tuple(shape)

    def _bucket(self, matrices: list[_Matrix], dtype: torch.dtype, rank: int, world: int) -> _Bucket:
        def numel(m: _Matrix, r: int) -> int:
            return math.prod(self._piece_shape(m, r, world))

        sharded = any(m.dim is not None for m in matrices)
        mine = [m for m in matrices if m.owner == rank]
        # Step 2 sends my piece of each matrix to its owner; step 4 sends each rank its piece of mine.
        gather_in = [sum(numel(m, rank) for m in matrices if m.owner == r and m.dim is not None)
                     for r in range(world)]
        gather_out = [sum(numel(m, r) for m in mine if m.dim is not None) for r in range(world)]
        scatter_in = [sum(numel(m, r) for m in mine) for r in range(world)]
        scatter_out = [sum(numel(m, rank) for m in matrices if m.owner == r) for r in range(world)]
        return _Bucket(matrices, dtype, (gather_in, gather_out) if sharded else ((), ()),
                       (scatter_in, scatter_out))

    # -- the step -----------------------------------------------------------------------------
    def __call__(self, params: Sequence[Tensor], updates: Sequence[Tensor], settings: Sequence[Settings],
                 newton_schulz_: NewtonSchulz) -> None:
        """Replace each ``updates[i]`` (this rank's part of U for ``params[i]``) with its part of X.

        Collective: every rank calls it with the same parameters in the same order.
        """
        key = tuple((id(p), tuple(u.shape), u.dtype, s) for p, u, s in zip(params, updates, settings))
        if self._plan is None or self._plan.key != key:
            self._plan = self._build_plan(params, updates, settings, key)
        rank = dist.get_rank(self.group)
        gathers = [self._start_gather(b, updates, rank) for b in self._plan.buckets]
        scatters = []
        for b, (work, received) in zip(self._plan.buckets, gathers):
            if work is not None:
                work.wait()
            whole = self._assemble(b, updates, received, rank)
            self._orthogonalize(b, whole, settings, newton_schulz_)
            scatters.append(self._start_scatter(b, whole, rank, updates[0].device))
        for b, (work, received) in zip(self._plan.buckets, scatters):
            work.wait()
            self._unpack(b, updates, received)

    def _all_to_all(self, pieces: list[Tensor], splits: tuple[list[int], list[int]], dtype: torch.dtype,
                    device: torch.device):
        send = torch.cat([t.reshape(-1) for t in pieces]) if pieces else torch.empty(0, dtype=dtype, device=device)
        received = torch.empty(sum(splits[1]), dtype=dtype, device=device)
        work = dist.all_to_all_single(received, send, splits[1], splits[0], group=self.group, async_op=True)
        return work, received

    def _start_gather(self, b: _Bucket, updates: Sequence[Tensor], rank: int):
        if not b.gather_splits[0]:  # nothing sharded: the owner holds the whole U already
            return None, None
        world = len(b.gather_splits[0])
        pieces = [updates[m.index] for r in range(world) for m in b.matrices if m.owner == r and m.dim is not None]
        return self._all_to_all(pieces, b.gather_splits, b.dtype, updates[0].device)

    def _assemble(self, b: _Bucket, updates: Sequence[Tensor], received: Optional[Tensor],
                  rank: int) -> dict[int, Tensor]:
        """The whole U of each matrix this rank owns, by index: its shards concatenated in rank order."""
        mine = [m for m in b.matrices if m.owner == rank]
        whole = {m.index: updates[m.index] for m in mine if m.dim is None}
        if received is None:
            return whole
        world = len(b.gather_splits[1])
        starts = [sum(b.gather_splits[1][:r]) for r in range(world)]  # where each source's pieces begin
        for m in mine:
            if m.dim is None:
                continue
            parts = []
            for r in range(world):
                shape = self._piece_shape(m, r, world)
                n = math.prod(shape)
                parts.append(received[starts[r]:starts[r] + n].view(shape))
                starts[r] += n
            whole[m.index] = torch.cat(parts, dim=m.dim)
        return whole

    @staticmethod
    def _orthogonalize(b: _Bucket, whole: dict[int, Tensor], settings: Sequence[Settings],
                       newton_schulz_: NewtonSchulz) -> None:
        """Iterate on the owned matrices, stacked by (shape, settings); results back into ``whole``."""
        stacks: dict[tuple, list[int]] = {}
        for index, u in whole.items():
            stacks.setdefault((tuple(u.shape), settings[index]), []).append(index)
        for (_, (coefficients, steps, eps)), indices in stacks.items():
            stack = torch.stack([whole[i] for i in indices])
            newton_schulz_(stack, coefficients, steps, eps)
            for i, x in zip(indices, stack):
                whole[i] = x

    def _start_scatter(self, b: _Bucket, whole: dict[int, Tensor], rank: int, device: torch.device):
        world = len(b.scatter_splits[0])
        mine = [m for m in b.matrices if m.owner == rank]
        pieces = []
        for r in range(world):
            for m in mine:
                x = whole[m.index]
                if m.dim is not None:
                    sizes = shard_sizes(m.shape[m.dim], world)
                    x = x.narrow(m.dim, sum(sizes[:r]), sizes[r])
                pieces.append(x)
        return self._all_to_all(pieces, b.scatter_splits, b.dtype, device)

    @staticmethod
    def _unpack(b: _Bucket, updates: Sequence[Tensor], received: Tensor) -> None:
        """Copy this rank's part of each X into its update, in the order the owners sent them."""
        offset = 0
        for r in range(len(b.scatter_splits[1])):
            for m in b.matrices:
                if m.owner == r:
                    u = updates[m.index]
                    u.copy_(received[offset:offset + u.numel()].view(u.shape))
                    offset += u.numel()

    # -- reporting ----------------------------------------------------------------------------
    def describe(self, params: Sequence[Tensor]) -> str:
        """One line for the run's log: what is shared, how evenly, and the elements moved per step."""
        world = dist.get_world_size(self._layout(params[0], 0)[0]) if params else 1
        sharded = any(isinstance(p, DTensor) for p in params)
        costs = [newton_schulz_flops(p.shape, 1) for p in params]
        owners = assign_owners(costs, world)
        load = [sum(c for c, owner in zip(costs, owners) if owner == r) for r in range(world)]
        n = sum(p.numel() for p in params)
        received = 2 * (world - 1) / world ** 2 * n if sharded else (world - 1) / world * n
        baseline = ("FSDP2's all-gather of them, per pass" if sharded else "DDP's all-reduce of their gradients")
        baseline_n = (world - 1) / world * n * (1 if sharded else 2)
        return (f"muon: {len(params)} matrices ({n / 1e6:.3g}M elements), Newton-Schulz shared over {world} "
                f"ranks ({'FSDP2 shards' if sharded else 'DDP replicas'}; busiest rank "
                f"{max(load) / (sum(load) / world):.2f}x the mean); about {received / 1e6:.3g}M elements "
                f"received per rank per step ({baseline}: {baseline_n / 1e6:.3g}M)")


def sharing_for_run(model: torch.nn.Module, muon_params: Sequence[Tensor], strategy: str) -> MuonSharing:
    """The sharing of a multi-process run: DDP's replicas over the world, FSDP2's shards over their mesh.

    The layouts are checked here, before training, and errors name the parameter.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    sharing = MuonSharing(dist.group.WORLD if strategy == "ddp" else None, names)
    sharing.check(muon_params)
    return sharing
