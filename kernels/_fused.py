"""The fused optimizer core that ``optim`` (AdamW, SGD, Lion) and ``muon`` (Muon) share.

The layout of the device tables the kernels read (tensor table, hyperparameter table, per-tensor
coefficients, per-step scalars), the block sizes of the sweeps, and ``FusedOptimizer``: parameter
groups and state, the tables and buckets of a step plan, and the launches of one step. The kernels
themselves live with their optimizers; a subclass names the ones its step launches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
import triton.language as tl
from torch import Tensor
from torch.distributed.tensor import DTensor

from ._common import launch as _common_launch

CHUNK = 16384  # elements per program of the sweep kernels (a multiple of both blocks below)
UPDATE_BLOCK, UPDATE_WARPS = 1024, 4  # 8 elements per thread per iteration
NORM_BLOCK, NORM_WARPS = 2048, 4  # 16 elements per thread per iteration
FINALIZE_BLOCK_C, FINALIZE_BLOCK_T, FINALIZE_WARPS = 4096, 256, 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Columns of a bucket's tensor table (int64 [T_bucket, TABLE_COLS]).
COL_PARAM = tl.constexpr(0)  # address of the parameter
COL_GRAD = tl.constexpr(1)  # address of its gradient
COL_STATE1 = tl.constexpr(2)  # exp_avg / momentum_buffer (fp32), or 0
COL_STATE2 = tl.constexpr(3)  # exp_avg_sq (fp32), or 0
COL_MASTER = tl.constexpr(4)  # fp32 master copy (bf16/fp16 parameters), or 0
COL_NUMEL = tl.constexpr(5)  # number of elements
COL_INDEX = tl.constexpr(6)  # row of the tensor in the coefficient table
TABLE_COLS = tl.constexpr(7)

# Columns of the per-group hyperparameter table (fp64 [G, HYPER_COLS]).
H_LR = tl.constexpr(0)
H_WD = tl.constexpr(1)
H_BETA1 = tl.constexpr(2)  # AdamW, Lion; SGD: momentum
H_BETA2 = tl.constexpr(3)  # AdamW, Lion; SGD: dampening
H_EPS = tl.constexpr(4)  # AdamW; SGD: 1.0 for Nesterov
H_SIGN = tl.constexpr(5)  # -1.0 for maximize, else 1.0
HYPER_COLS = tl.constexpr(6)

# Per-tensor coefficients written by the finalize kernel (fp32 [T, COEF_COLS]); meaning per opt:
#   AdamW: sign, 1-lr*wd, 1-b1, b2, 1-b2, -lr/(1-b1^t), 1/sqrt(1-b2^t), eps
#   SGD:   sign, wd, momentum, 1-dampening (1 on a buffer's first step), nesterov, -lr
#   Lion:  1-lr*wd, b1, 1-b1, b2, 1-b2, -lr
COEF_COLS = tl.constexpr(8)

# Per-step scalars (fp32 [5]): grad norm, found_inf, 1/grad_scale, clip factor, skip (found_inf or the
# caller's skip flag: the update kernels write nothing when it is set).
S_NORM = tl.constexpr(0)
S_FOUND_INF = tl.constexpr(1)
S_INV_SCALE = tl.constexpr(2)
S_CLIP = tl.constexpr(3)
S_SKIP = tl.constexpr(4)
N_SCALARS = 5

OPT_ADAMW, OPT_SGD, OPT_LION = 0, 1, 2


def launch(kernel, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Every kernel launch of the fused optimizers goes through here (tests count launches by patching it)."""
    _common_launch(kernel, grid, *args, **meta)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without waiting: pinned memory, non-blocking copy.

    The pinned block is recycled by torch's caching host allocator only after the copy has run.
    """
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor the kernels read: a DTensor's local shard (FSDP2), or the tensor itself."""
    if t is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def shard_group(params: Iterable[Tensor]):
    """The process group over which parameters are sharded (FSDP2), or None when none is.

    The global gradient norm then needs the sums of squares of every shard: the step all-reduces the
    norm pass's result over this group. Replicated DTensors need no reduction.
    """
    groups = set()
    for p in params:
        if isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements):
            if p.device_mesh.ndim != 1:
                raise ValueError("fused optimizers support parameters sharded over a 1-D device mesh "
                                 f"(FSDP2), got a {p.device_mesh.ndim}-D mesh")
            groups.add(p.device_mesh.get_group())
    if len(groups) > 1:
        raise ValueError("fused optimizers need all sharded parameters on one device mesh")
    return groups.pop() if groups else None


def is_dense(t: Tensor) -> bool:
    """True when ``t``'s elements fill its storage span without gaps or overlap (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and all(
        size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


def fp32_like(p: Tensor, value: Optional[Tensor] = None) -> Tensor:
    """An fp32 tensor with ``p``'s shape and strides, zero or a copy of ``value``."""
    out = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    return out.zero_() if value is None else out.copy_(value)


@dataclass
class Bucket:
    """Tensors updated by one launch: same parameter dtype, alignment and (SGD) momentum switch."""

    dtype: torch.dtype
    aligned: bool
    momentum: bool
    tensor_table: Tensor  # int64 [T_bucket, TABLE_COLS]
    chunk_table: Tensor  # int64 [n_chunks, 2]
    n_chunks: int
    chunk_offset: int  # first chunk of this bucket among all buckets' chunks (partials row)


@dataclass
class Plan:
    """Device tables of one set of parameters with gradients; rebuilt when that set changes."""

    key: tuple
    device: torch.device
    chunk: int
    buckets: list[Bucket]
    tensor_info: Tensor  # int64 [T, 2]: (step counter address or 0, group index)
    n_tensors: int
    n_chunks: int
    coefs: Tensor  # fp32 [T, COEF_COLS], written by the finalize kernel each step
    partials: Tensor  # fp32 [2, n_chunks], written by the norm pass
    shard_group: Any = None  # process group of FSDP2-sharded parameters, None when unsharded


class FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery: tables, hyperparameter upload, the launches of one step.

    Subclasses set ``_OPT``, the kernels (``_sumsq_kernel``: the gradients' sum of squares per chunk,
    ``_finalize_kernel``, ``_update_kernel``) and define how their state is created
    (``_init_state``), which state tensors the kernel uses (``_state_tensors``), the step counter
    (``_counter``) and the per-group hyperparameter row (``_hyper_row``).
    """

    _OPT: int
    _sumsq_kernel: Any
    _finalize_kernel: Any
    _update_kernel: Any

    def __init__(self, params, defaults: dict[str, Any], max_grad_norm: Optional[float],
                 master_weights: bool):
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r}; expected a positive number or None")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.master_weights = bool(master_weights)
        self.grad_scale: Optional[Tensor] = None
        self.skip: Optional[Tensor] = None
        self.grad_norm: Optional[Tensor] = None
        self.found_inf: Optional[Tensor] = None
        self._device: Optional[torch.device] = None
        self._plan: Optional[Plan] = None
        self._layout_version = 0  # bumped whenever state tensors are replaced
        self._hyper: Optional[Tensor] = None
        self._hyper_key: Optional[tuple] = None
        self._constants: dict[Any, Tensor] = {}
        super().__init__(params, defaults)

    # -- parameter groups and state -----------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        self._plan = None

    def _validate_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        for p in group["params"]:
            if p.dtype not in DTYPES:
                raise ValueError(f"{name}: parameters must be float32, bfloat16 or float16, got {p.dtype}")
            if p.dtype != torch.float32 and not self.master_weights:
                raise ValueError(f"{name}: {p.dtype} parameters need master_weights=True (an fp32 "
                                 "master copy in the optimizer state)")
            if self._device is None:
                self._device = p.device
            elif p.device != self._device:
                raise ValueError(f"{name}: all parameters must be on one device, got {self._device} "
                                 f"and {p.device}")

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _state_tensors(self, p: Tensor, group: dict[str, Any],
                       state: dict[str, Any]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        raise NotImplementedError

    def _counter(self, p: Tensor, state: dict[str, Any]) -> Optional[Tensor]:
        raise NotImplementedError

    def _hyper_row(self, group: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    def _has_momentum(self, group: dict[str, Any]) -> bool:
        return False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by this class or by its torch counterpart.

        torch casts floating state to the parameter's dtype; here every state tensor is restored in
        fp32 with the parameter's strides (moments and master copies of bf16 parameters stay fp32),
        and ``step`` becomes an fp32 scalar on the parameter's device.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key == "step":
                    value = torch.as_tensor(value)
                    state[key] = value.detach().to(device=p.device, dtype=torch.float32).reshape(()).clone()
                elif isinstance(value, Tensor) and value.shape == p.shape:
                    state[key] = fp32_like(p, value.detach())
            self._after_load(p, state)
        self._layout_version += 1
        self._plan = None

    def _after_load(self, p: Tensor, state: dict[str, Any]) -> None:
        pass

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(gi, p, p.grad) for gi, group in enumerate(self.param_groups)
                   for p in group["params"] if p.grad is not None]
        has_norm = self.max_grad_norm is not None or self.grad_scale is not None
        if not entries:  # nothing to update, nothing seen
            self.found_inf = torch.zeros((), dtype=torch.float32, device=self._device)
            self.grad_norm = torch.zeros_like(self.found_inf) if has_norm else None
            return loss
        plan = self._current_plan(entries)
        device = plan.device
        hyper = self._upload_hyper(device)
        scale = self._grad_scale_tensor(device)
        skip = self._skip_tensor(device)
        scalars = torch.empty(N_SCALARS, dtype=torch.float32, device=device)
        if has_norm:
            for b in plan.buckets:
                launch(self._sumsq_kernel, (b.n_chunks,), b.tensor_table, b.chunk_table,
                        plan.partials, b.chunk_offset, plan.n_chunks, scale, self._like(b.dtype, device),
                        ALIGNED=b.aligned, BLOCK=NORM_BLOCK, CHUNK=plan.chunk,
                        num_warps=NORM_WARPS, num_stages=1)
        partials, n_partials = plan.partials, plan.n_chunks
        if has_norm and plan.shard_group is not None:
            partials, n_partials = self._reduce_over_shards(plan), 1
        launch(self._finalize_kernel, (1,), partials, n_partials, plan.tensor_info,
                plan.n_tensors, hyper, plan.coefs, scalars, scale, skip, self.max_grad_norm or 0.0,
                OPT=self._OPT, HAS_NORM=has_norm, BLOCK_C=FINALIZE_BLOCK_C,
                BLOCK_T=FINALIZE_BLOCK_T, num_warps=FINALIZE_WARPS, num_stages=1)
        for b in plan.buckets:
            self._launch_update(b, plan, scalars, device)
        self._after_updates(plan, scalars, device)
        self.grad_norm = scalars[0] if has_norm else None
        self.found_inf = scalars[1]
        return loss

    @staticmethod
    def _reduce_over_shards(plan: Plan) -> Tensor:
        """[sum of squares, found_inf] over every shard, as a one-chunk partials array.

        Three small device ops and one all-reduce, whatever the number of tensors; no host sync.
        """
        n = plan.n_chunks
        both = torch.stack([plan.partials[:n].sum(dtype=torch.float64),
                            plan.partials[n:2 * n].amax().to(torch.float64)])
        dist.all_reduce(both, group=plan.shard_group)
        both[1].clamp_(max=1.0)  # found on any shard
        return both.to(torch.float32)

    def _launch_update(self, b: Bucket, plan: Plan, scalars: Tensor, device: torch.device) -> None:
        switches = dict(HAS_MASTER=b.dtype != torch.float32, ALIGNED=b.aligned)
        if self._OPT == OPT_SGD:
            switches["HAS_MOMENTUM"] = b.momentum
        launch(self._update_kernel, (b.n_chunks,), b.tensor_table, b.chunk_table, plan.coefs,
                scalars, self._like(b.dtype, device), **switches, BLOCK=UPDATE_BLOCK,
                CHUNK=plan.chunk, num_warps=UPDATE_WARPS, num_stages=1)

    def _after_updates(self, plan: Plan, scalars: Tensor, device: torch.device) -> None:
        """Work a subclass launches after the per-bucket updates (Muon: its iterations and update)."""

    def _like(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A small aligned tensor of ``dtype``: the kernels take its pointer type, never its data."""
        key = ("like", dtype, device)
        if key not in self._constants:
            self._constants[key] = torch.zeros(8, dtype=dtype, device=device)
        return self._constants[key]

    def _grad_scale_tensor(self, device: torch.device) -> Tensor:
        scale = self.grad_scale
        if scale is None:
            key = ("one", device)
            if key not in self._constants:
                self._constants[key] = torch.ones(1, dtype=torch.float32, device=device)
            return self._constants[key]
        if not isinstance(scale, Tensor) or scale.numel() != 1:
            raise ValueError("grad_scale must be a one-element tensor (the loss scale) or None")
        if scale.device != device:
            raise ValueError(f"grad_scale must be on the parameters' device {device}, got {scale.device}")
        return scale.to(torch.float32).reshape(1)

    def _skip_tensor(self, device: torch.device) -> Tensor:
        """``skip`` as the finalize kernel reads it: fp32 [1] on the device, 0 when unset (no host sync)."""
        skip = self.skip
        if skip is None:
            key = ("zero", device)
            if key not in self._constants:
                self._constants[key] = torch.zeros(1, dtype=torch.float32, device=device)
            return self._constants[key]
        if not isinstance(skip, Tensor) or skip.numel() != 1:
            raise ValueError("skip must be a one-element tensor (nonzero: skip the step) or None")
        if skip.device != device:
            raise ValueError(f"skip must be on the parameters' device {device}, got {skip.device}")
        return skip.to(torch.float32).reshape(1)

    def _upload_hyper(self, device: torch.device) -> Tensor:
        """The per-group hyperparameter table on the device; copied only when a value changed."""
        rows, device_lrs = [], []
        for gi, group in enumerate(self.param_groups):
            row = self._hyper_row(group)
            lr = row[0]
            if isinstance(lr, Tensor) and lr.device.type != "cpu":
                device_lrs.append((gi, lr))
                row[0] = 0.0
            else:
                row[0] = float(lr)
            rows.append(tuple(float(x) for x in row))
        key = tuple(rows)
        if self._hyper is None or key != self._hyper_key or self._hyper.device != device:
            self._hyper = to_device(torch.tensor(rows, dtype=torch.float64), device)
            self._hyper_key = key
        for gi, lr in device_lrs:  # device-to-device: no host sync, live inside a CUDA graph
            self._hyper[gi, 0].copy_(lr.reshape(()))
        return self._hyper

    def _current_plan(self, entries: list[tuple[int, Tensor, Tensor]]) -> Plan:
        switches = tuple(self._has_momentum(group) for group in self.param_groups)
        key = (self._layout_version, switches,
               tuple((gi, id(p), local(p).data_ptr(), local(g).data_ptr()) for gi, p, g in entries))
        if self._plan is None or self._plan.key != key:
            self._plan = self._build_plan(entries, key)
        return self._plan

    def _table_row(self, index: int, gi: int, p: Tensor, g: Tensor) -> tuple[tuple, Optional[Tensor], bool]:
        """Check one (parameter, gradient), create its state; returns its tensor-table row (``index``
        in the last column), its step counter and whether all its addresses are 16-byte aligned."""
        name = type(self).__name__
        if g.is_sparse:
            raise ValueError(f"{name} does not support sparse gradients")
        if g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"{name}: a gradient must have its parameter's dtype and device, got "
                             f"{g.dtype} on {g.device} for {p.dtype} on {p.device}")
        p_full = p
        p, g = local(p), local(g)
        if not is_dense(p) or not same_layout(p, g):
            raise ValueError(f"{name}: parameters must be dense (contiguous in some dimension "
                             "order) and their gradients must have the same strides")
        group = self.param_groups[gi]
        state = self.state[p_full]
        self._init_state(p_full, group, state)
        if p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = fp32_like(p_full, p_full)
        master = local(state.get("master_param")) if p.dtype != torch.float32 else None
        s1, s2 = (local(t) for t in self._state_tensors(p_full, group, state))
        addresses = [t.data_ptr() if t is not None else 0 for t in (p, g, s1, s2, master)]
        aligned = all(a % 16 == 0 for a in addresses)
        return (*addresses, p.numel(), index), self._counter(p_full, state), aligned

    def _build_plan(self, entries: list[tuple[int, Tensor, Tensor]], key: tuple) -> Plan:
        device = entries[0][1].device
        info, bucket_rows = [], {}
        for index, (gi, p, g) in enumerate(entries):
            row, counter, aligned = self._table_row(index, gi, p, g)
            info.append((0 if counter is None else counter.data_ptr(), gi))
            momentum = self._has_momentum(self.param_groups[gi])
            bucket_rows.setdefault((p.dtype, aligned, momentum), []).append(row)

        buckets, n_chunks = make_buckets(bucket_rows, device)
        return Plan(key=key, device=device, chunk=CHUNK, buckets=buckets,
                     shard_group=shard_group(p for _, p, _ in entries),
                     tensor_info=to_device(torch.tensor(info, dtype=torch.int64), device),
                     n_tensors=len(entries), n_chunks=n_chunks,
                     coefs=torch.empty(len(entries), COEF_COLS.value, dtype=torch.float32, device=device),
                     partials=torch.zeros(max(2 * n_chunks, 2), dtype=torch.float32, device=device))


def make_buckets(bucket_rows: dict[tuple, list[tuple]], device: torch.device,
                  first_chunk: int = 0) -> tuple[list[Bucket], int]:
    """Device tables of each bucket (key ``(dtype, aligned, switch)``, rows of ``TABLE_COLS``
    values) and the chunk count so far: chunks are numbered from ``first_chunk`` across buckets."""
    assert CHUNK % UPDATE_BLOCK == 0 and CHUNK % NORM_BLOCK == 0, "CHUNK must hold whole blocks"
    buckets, n_chunks = [], first_chunk
    for (dtype, aligned, switch), rows in bucket_rows.items():
        table = torch.tensor(rows, dtype=torch.int64)
        per_tensor = (table[:, COL_NUMEL.value] + CHUNK - 1) // CHUNK
        owner = torch.repeat_interleave(torch.arange(len(rows)), per_tensor)
        first = torch.cumsum(per_tensor, 0) - per_tensor
        starts = (torch.arange(owner.numel()) - first[owner]) * CHUNK
        chunks = torch.stack([owner, starts], dim=1).to(torch.int64)
        buckets.append(Bucket(dtype=dtype, aligned=aligned, momentum=switch,
                               tensor_table=to_device(table, device),
                               chunk_table=to_device(chunks.contiguous(), device),
                               n_chunks=chunks.shape[0], chunk_offset=n_chunks))
        n_chunks += chunks.shape[0]
    return [b for b in buckets if b.n_chunks > 0], n_chunks


def check_betas(betas: Iterable[float]) -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")

