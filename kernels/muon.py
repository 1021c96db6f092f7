"""Muon for hidden matrices and AdamW for the rest, fused: ``kernels.Muon``.

One ``torch.optim.Optimizer`` whose groups carry ``use_muon``; it follows ``kernels.AdamW``'s contract
(``max_grad_norm`` clipping over all gradients, ``grad_scale``, ``skip``, ``found_inf``/``grad_norm``
device tensors, the whole step skipped on the device on inf/NaN or ``skip``, no host sync,
``master_weights``) and
writes ``torch.optim.Muon``'s / ``AdamW``'s state keys. Per Muon matrix W (m x n), gradient G:

    B = lerp(B, G, 1 - mu);  U = lerp(G, B, mu) (Nesterov) or B                  (momentum kernel)
    X = U / max(||U||_F, eps);  k times: A = X X^T, X = a X + (b A + c A^2) X    (batched matmuls)
    W = W (1 - lr wd) - lr * s * X,  s = 0.2 sqrt(max(m, n)) ("match_rms_adamw")   (update kernel)

For tall W the iteration is written X = a X + X (b A + c A^2) with A = X^T X: the same polynomial,
with the small Gram matrix and no transposes. Matrices of one shape are stacked in one buffer (bf16
on CUDA, fp32 elsewhere) so each iteration is three batched matmuls per shape, whatever the depth;
the last one writes into the buffer the update kernel reads. The iterations stay cuBLAS matmuls: a
Triton kernel would only repeat them (tensor-core GEMMs of a few hundred columns, already bound
by the matmul units); the two passes around them are the part worth fusing.

Launches per step: the AdamW machinery of ``kernels.optim`` (norm pass over every gradient, the
finalize kernel, AdamW's update), one momentum and one update launch per Muon bucket, and 3k + 2
torch ops per distinct Muon shape. Memory per fp32 Muon element: momentum reads g, B and writes B
and U (bf16): 14 bytes; update reads W and X (bf16) and writes W: 10 bytes.

Under DDP or FSDP2 an ``orthogonalizer`` (``engine.optim.sharing.MuonSharing``) takes the place of the
iterations: it gathers each matrix whole on one rank, iterates there with :func:`newton_schulz_` and hands
every rank its part of the result in the buffer the update kernel reads. Without one, FSDP2 (sharded
DTensor) parameters are refused in Muon groups: the iterations need whole matrices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.distributed.tensor import DTensor

from ._common import TL_DTYPES
from ._fused import (CHUNK, UPDATE_BLOCK, UPDATE_WARPS, COL_GRAD as _COL_GRAD, COL_INDEX as _COL_INDEX,
                     COL_MASTER as _COL_MASTER, COL_NUMEL as _COL_NUMEL, COL_PARAM as _COL_PARAM,
                     COL_STATE1 as _COL_STATE1, COL_STATE2 as _COL_STATE2, DTYPES as _DTYPES,
                     HYPER_COLS as _HYPER_COLS, H_BETA1 as _H_BETA1, H_BETA2 as _H_BETA2, H_LR as _H_LR,
                     H_WD as _H_WD, OPT_ADAMW as _ADAMW, S_CLIP as _S_CLIP, S_INV_SCALE as _S_INV_SCALE,
                     S_SKIP as _S_SKIP, TABLE_COLS as _TABLE_COLS, FusedOptimizer, Plan, check_betas,
                     fp32_like, launch, local, make_buckets, shard_group, to_device)
from .optim import (adamw_update_kernel as _adamw_update_kernel, finalize_kernel, grad_sumsq_kernel,
                    round_to as _round_to)
from .variant import Variant

__all__ = ["Muon"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")
_INFO_COLS = tl.constexpr(2)  # per Muon tensor (fp64): group index, lr scale s


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _muon_momentum_kernel(
    tensor_table,  # *int64 [T, _TABLE_COLS]: this bucket's tensors (STATE1 buffer, STATE2 NS input)
    chunk_table,  # *int64 [C, 2]: (row in tensor_table, first element) per program
    info_ptr,  # *fp64 [T_muon, _INFO_COLS]: group index and lr scale per Muon tensor
    hyper_ptr,  # *fp64 [G, _HYPER_COLS]: per-group hyperparameters (momentum, Nesterov flag)
    scalars_ptr,  # *fp32 [5]: grad norm, found_inf, 1/grad_scale, clip factor, skip
    grad_like,  # *grad dtype: unused tensor whose pointer type is the gradients' element type
    ns_like,  # *NS dtype: unused tensor whose pointer type is the iterations' element type
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per loop iteration
    CHUNK: tl.constexpr,  # elements per program
):
    """B = lerp(B, g, 1-mu); U = lerp(g, B, mu) if Nesterov else B, with g unscaled and clipped.

    Memory, per element: reads g (4 or 2 bytes), B (4); writes B (4), U (2 in bf16, 4 in fp32).
    Nothing when skipped.
    """
    pid = tl.program_id(0)
    row = tl.load(chunk_table + pid * 2)
    start = tl.load(chunk_table + pid * 2 + 1)
    entry = tensor_table + row * _TABLE_COLS
    g_ptr = tl.load(entry + _COL_GRAD).to(grad_like.dtype)
    b_ptr = tl.load(entry + _COL_STATE1).to(tl.pointer_type(tl.float32))
    u_ptr = tl.load(entry + _COL_STATE2).to(ns_like.dtype)
    numel = tl.load(entry + _COL_NUMEL)
    group = tl.load(info_ptr + tl.load(entry + _COL_INDEX) * _INFO_COLS).to(tl.int64)
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        u_ptr = tl.multiple_of(u_ptr, 16)
        start = tl.multiple_of(start, CHUNK)
    mu64 = tl.load(hyper_ptr + group * _HYPER_COLS + _H_BETA1)
    mu = mu64.to(tl.float32)
    w = (1.0 - mu64).to(tl.float32)  # lerp weight 1 - mu
    nesterov = tl.load(hyper_ptr + group * _HYPER_COLS + _H_BETA2) != 0.0
    inv_scale = tl.load(scalars_ptr + _S_INV_SCALE)
    clip = tl.load(scalars_ptr + _S_CLIP)
    skip = tl.load(scalars_ptr + _S_SKIP) != 0.0
    end = tl.where(skip, start, tl.minimum(start + CHUNK, numel))
    full_end = start + (end - start) // BLOCK * BLOCK

    for tail in tl.static_range(2):  # 0: unmasked full blocks, 1: the masked last block
        if tail:
            lo = full_end
            hi = end
        else:
            lo = start
            hi = full_end
        for off in tl.range(lo, hi, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            if tail:
                mask = offs < hi
            else:
                mask = None
            g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
            g = g * inv_scale * clip
            b = tl.load(b_ptr + offs, mask=mask)
            b = tl.where(w < 0.5, b + w * (g - b), g - (g - b) * (1.0 - w))  # torch's lerp
            u = tl.where(mu < 0.5, g + mu * (b - g), b - (b - g) * (1.0 - mu))
            u = tl.where(nesterov, u, b)
            tl.store(b_ptr + offs, b, mask=mask)
            tl.store(u_ptr + offs, _round_to(u, u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _muon_update_kernel(
    tensor_table,  # *int64 [T, _TABLE_COLS]: this bucket's tensors (STATE2 the iterations' output)
    chunk_table,  # *int64 [C, 2]: (row in tensor_table, first element) per program
    info_ptr,  # *fp64 [T_muon, _INFO_COLS]: group index and lr scale per Muon tensor
    hyper_ptr,  # *fp64 [G, _HYPER_COLS]: per-group hyperparameters (lr, weight decay)
    scalars_ptr,  # *fp32 [5]: grad norm, found_inf, 1/grad_scale, clip factor, skip
    param_like,  # *param dtype: unused tensor whose pointer type is the parameters' element type
    ns_like,  # *NS dtype: unused tensor whose pointer type is the iterations' element type
    HAS_MASTER: tl.constexpr,  # parameters are bf16/fp16 with an fp32 master copy
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per loop iteration
    CHUNK: tl.constexpr,  # elements per program
):
    """W = W * (1 - lr*wd) - (lr*s) * X, X the orthogonalized update.

    Memory, per element (fp32 W, bf16 X): reads W, X, writes W: 10 bytes; with master weights reads
    the master and X, writes the master and W (2 bytes). Nothing when skipped.
    """
    pid = tl.program_id(0)
    row = tl.load(chunk_table + pid * 2)
    start = tl.load(chunk_table + pid * 2 + 1)
    entry = tensor_table + row * _TABLE_COLS
    p_ptr = tl.load(entry + _COL_PARAM).to(param_like.dtype)
    x_ptr = tl.load(entry + _COL_STATE2).to(ns_like.dtype)
    if HAS_MASTER:
        w_ptr = tl.load(entry + _COL_MASTER).to(tl.pointer_type(tl.float32))
    else:
        w_ptr = p_ptr
    numel = tl.load(entry + _COL_NUMEL)
    info = info_ptr + tl.load(entry + _COL_INDEX) * _INFO_COLS
    group = tl.load(info).to(tl.int64)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        start = tl.multiple_of(start, CHUNK)
    lr = tl.load(hyper_ptr + group * _HYPER_COLS + _H_LR)
    wd = tl.load(hyper_ptr + group * _HYPER_COLS + _H_WD)
    decay = (1.0 - lr * wd).to(tl.float32)
    neg_step = (-(lr * tl.load(info + 1))).to(tl.float32)
    skip = tl.load(scalars_ptr + _S_SKIP) != 0.0
    end = tl.where(skip, start, tl.minimum(start + CHUNK, numel))
    full_end = start + (end - start) // BLOCK * BLOCK

    for tail in tl.static_range(2):  # 0: unmasked full blocks, 1: the masked last block
        if tail:
            lo = full_end
            hi = end
        else:
            lo = start
            hi = full_end
        for off in tl.range(lo, hi, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            if tail:
                mask = offs < hi
            else:
                mask = None
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            p = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
            p = p * decay + neg_step * x
            if HAS_MASTER:
                tl.store(w_ptr + offs, p, mask=mask)
            tl.store(p_ptr + offs, _round_to(p, p_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Newton-Schulz on stacked matrices
# ----------------------------------------------------------------------------------------------
def newton_schulz_(stack: Tensor, coefficients: tuple[float, float, float], steps: int,
                   eps: float) -> None:
    """Orthogonalize each matrix of ``stack`` ([L, m, n]) in place: ``steps`` quintic iterations.

    The Gram matrix is taken on the short side (X X^T when m <= n, X^T X when m > n).
    """
    a, b, c = coefficients
    tall = stack.shape[1] > stack.shape[2]
    norms = torch.linalg.vector_norm(stack, dim=(1, 2), keepdim=True, dtype=torch.float32)
    x = stack / norms.clamp(min=eps).to(stack.dtype)
    for i in range(steps):
        gram = x.mT @ x if tall else x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        out = stack if i == steps - 1 else None
        x = torch.baddbmm(x, x, poly, beta=a, out=out) if tall else torch.baddbmm(x, poly, x, beta=a, out=out)


def _stored_shape(p: Tensor) -> tuple[int, int]:
    """The matrix that a dense 2-D ``p``'s elements form in memory, read row-major: ``p``'s shape, or for
    a transposed ``p`` (strides (1, m)) that of ``p.T``.

    The momentum and update kernels copy the parameter's elements in storage order into its slot of a
    stack and back, so the slot must have that shape: the iterations then orthogonalize ``p.T``, whose
    orthogonal factor is the transpose of ``p``'s (the iteration commutes with transposition), and the
    update lands on ``p``'s elements as the matrix's. A slot of ``p``'s own shape would hold a reshape of
    the matrix, not the matrix.
    """
    return tuple(p.shape) if p.is_contiguous() else (p.shape[1], p.shape[0])


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------
def muon_lr_scale(shape: torch.Size, adjust_lr_fn: Optional[str]) -> float:
    """The factor Muon's update takes on top of ``lr`` (``torch.optim.Muon``'s rules)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


@dataclass
class _NSStack:
    """Muon matrices sharing a shape and iteration settings: one buffer, batched iterations."""

    buffer: Tensor  # [L, m, n]: the momentum kernel's output, then the iterations' result
    coefficients: tuple[float, float, float]
    steps: int
    eps: float


@dataclass
class _MuonPlan(Plan):
    """``buckets``: the AdamW buckets, then the Muon ones (``momentum=True``); ``tensor_info`` and
    the finalize kernel's coefficients cover the AdamW tensors only."""

    muon_info: Optional[Tensor] = None  # fp64 [T_muon, _INFO_COLS]
    stacks: list = field(default_factory=list)
    muon_params: list = field(default_factory=list)  # in table order, for the orthogonalizer
    muon_settings: list = field(default_factory=list)  # (coefficients, steps, eps) of each
    ns_dtype: torch.dtype = torch.float32


class Muon(FusedOptimizer):
    """Muon (``use_muon=True`` groups, 2-D matrices) and AdamW (``use_muon=False``) in one step.

    Arguments and group keys are ``torch.optim.Muon``'s (``eps``: the Newton-Schulz normalization's),
    except the default ``adjust_lr_fn="match_rms_adamw"``, which scales Muon's update to AdamW's RMS
    so that one ``lr`` (and schedule) serves both kinds. AdamW groups take ``betas`` and ``eps``,
    defaulting to ``adamw_betas`` and ``adamw_eps``. A group without ``use_muon`` is a Muon group.
    Extras as ``kernels.AdamW``: ``max_grad_norm``, ``master_weights``; ``orthogonalizer``: a callable
    ``(params, updates, settings, newton_schulz_)`` that replaces each rank's part of every U with its part
    of the orthogonalized X (``engine.optim.sharing.MuonSharing``, for DDP and FSDP2). The reference is
    ``engine.optim.muon.TorchMuon``.
    """

    _OPT = _ADAMW
    _sumsq_kernel = grad_sumsq_kernel
    _finalize_kernel = finalize_kernel
    _update_kernel = _adamw_update_kernel

    def __init__(self, params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: Optional[str] = "match_rms_adamw", *,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False,
                 orthogonalizer=None):
        self._adamw_defaults = (tuple(adamw_betas), adamw_eps)
        self.orthogonalizer = orthogonalizer
        self._ns_slot: dict[Tensor, Tensor] = {}
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, use_muon=True)
        super().__init__(params, defaults, max_grad_norm, master_weights)

    # -- groups and state ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group["use_muon"] = bool(param_group.get("use_muon", self.defaults["use_muon"]))
        if not param_group["use_muon"]:
            betas, eps = self._adamw_defaults
            param_group.setdefault("betas", betas)
            param_group.setdefault("eps", eps)
            for key in ("momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn"):
                param_group.setdefault(key, None)
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if not isinstance(lr, Tensor) and not 0.0 <= lr:
            raise ValueError(f"Muon: invalid lr {lr}; expected lr >= 0")
        if not 0.0 <= wd:
            raise ValueError(f"Muon: invalid weight_decay {wd}; expected >= 0")
        if group["use_muon"]:
            self._validate_muon_group(group)
        else:
            check_betas(group["betas"])
            if not 0.0 <= group["eps"]:
                raise ValueError(f"Muon: invalid eps {group['eps']} of an AdamW group; expected >= 0")
        super()._validate_group(group)

    def _validate_muon_group(self, group: dict[str, Any]) -> None:
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"Muon: invalid momentum {group['momentum']}; expected 0 <= momentum < 1")
        steps = group["ns_steps"]
        if not (isinstance(steps, int) and 1 <= steps < 100):
            raise ValueError(f"Muon: invalid ns_steps {steps!r}; expected an int in [1, 100)")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"Muon: ns_coefficients must be 3 numbers (a, b, c), got "
                             f"{group['ns_coefficients']!r}")
        if group["adjust_lr_fn"] is not None and group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"Muon: invalid adjust_lr_fn {group['adjust_lr_fn']!r}; expected one of "
                             f"{', '.join(ADJUST_LR_FNS)} or None")
        for p in group["params"]:
            if isinstance(p, DTensor) and self.orthogonalizer is None:
                raise ValueError("Muon: use_muon=True groups take DTensor (FSDP2-sharded) parameters only "
                                 "with an orthogonalizer that assembles whole matrices "
                                 "(engine.optim.sharing.MuonSharing)")
            if p.ndim != 2:
                raise ValueError(f"Muon: a use_muon=True group holds a parameter of shape "
                                 f"{tuple(p.shape)}; Muon takes 2-D matrices, put the others (conv "
                                 "kernels included) in a use_muon=False (AdamW) group")

    def _has_momentum(self, group):  # the plan is rebuilt when a group changes kind
        return group["use_muon"]

    def _init_state(self, p, group, state):
        if group["use_muon"]:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = fp32_like(p)
        elif "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = fp32_like(p)
            state["exp_avg_sq"] = fp32_like(p)

    def _state_tensors(self, p, group, state):
        if group["use_muon"]:
            return state["momentum_buffer"], self._ns_slot[p]
        return state["exp_avg"], state["exp_avg_sq"]

    def _counter(self, p, state):
        return state.get("step")

    def _hyper_row(self, group):
        if group["use_muon"]:
            return [group["lr"], group["weight_decay"], group["momentum"],
                    1.0 if group["nesterov"] else 0.0, 0.0, 1.0]
        beta1, beta2 = group["betas"]
        return [group["lr"], group["weight_decay"], beta1, beta2, group["eps"], 1.0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also loads a ``torch.optim.Muon`` or ``AdamW`` state dict: group keys it lacks keep ours."""
        own = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, own):
            for key, value in before.items():
                group.setdefault(key, value)

    # -- the plan -----------------------------------------------------------------------------
    def _build_plan(self, entries: list[tuple[int, Tensor, Tensor]], key: tuple) -> _MuonPlan:
        device = entries[0][1].device
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        adamw = [e for e in entries if not self.param_groups[e[0]]["use_muon"]]
        muon = [e for e in entries if self.param_groups[e[0]]["use_muon"]]
        stacks = self._allocate_stacks(muon, ns_dtype, device)

        info, adamw_rows = [], {}
        for index, (gi, p, g) in enumerate(adamw):
            row, counter, aligned = self._table_row(index, gi, p, g)
            info.append((counter.data_ptr(), gi))
            adamw_rows.setdefault((p.dtype, aligned, False), []).append(row)
        muon_info, muon_rows = [], {}
        for index, (gi, p, g) in enumerate(muon):
            row, _, aligned = self._table_row(index, gi, p, g)
            muon_info.append((float(gi), muon_lr_scale(p.shape, self.param_groups[gi]["adjust_lr_fn"])))
            muon_rows.setdefault((p.dtype, aligned, True), []).append(row)

        buckets, n_adamw_chunks = make_buckets(adamw_rows, device)
        muon_buckets, n_chunks = make_buckets(muon_rows, device, first_chunk=n_adamw_chunks)
        return _MuonPlan(
            key=key, device=device, chunk=CHUNK, buckets=buckets + muon_buckets,
            shard_group=shard_group(p for _, p, _ in entries),
            tensor_info=to_device(torch.tensor(info, dtype=torch.int64).reshape(-1, 2), device),
            n_tensors=len(adamw), n_chunks=n_chunks,
            coefs=torch.empty(max(len(adamw), 1), 8, dtype=torch.float32, device=device),
            partials=torch.zeros(max(2 * n_chunks, 2), dtype=torch.float32, device=device),
            stacks=stacks, ns_dtype=ns_dtype, muon_params=[p for _, p, _ in muon],
            muon_settings=[self._ns_settings(self.param_groups[gi]) for gi, _, _ in muon],
            muon_info=to_device(torch.tensor(muon_info, dtype=torch.float64).reshape(-1, 2), device))

    @staticmethod
    def _ns_settings(group: dict[str, Any]) -> tuple[tuple, int, float]:
        return tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"]

    def _allocate_stacks(self, muon: list[tuple[int, Tensor, Tensor]], ns_dtype: torch.dtype,
                         device: torch.device) -> list[_NSStack]:
        """One zeroed [L, m, n] buffer per (stored shape, iteration settings); records each matrix's slot.

        The shape is this rank's part (an FSDP2 shard's rows): the momentum kernel fills it, the
        orthogonalizer, where there is one, replaces it with the same part of X.
        """
        members: dict[tuple, list[Tensor]] = {}
        for gi, p, _ in muon:
            settings = (_stored_shape(local(p)), *self._ns_settings(self.param_groups[gi]))
            members.setdefault(settings, []).append(p)
        self._ns_slot = {}
        stacks = []
        for (shape, coefficients, steps, eps), params in members.items():
            buffer = torch.zeros(len(params), *shape, dtype=ns_dtype, device=device)
            for i, p in enumerate(params):
                self._ns_slot[p] = buffer[i]
            stacks.append(_NSStack(buffer, coefficients, steps, eps))
        return stacks

    # -- the step -----------------------------------------------------------------------------
    def _launch_update(self, b, plan, scalars, device):
        if not b.momentum:  # Muon buckets (momentum=True) are updated after their iterations
            super()._launch_update(b, plan, scalars, device)

    def _after_updates(self, plan: _MuonPlan, scalars: Tensor, device: torch.device) -> None:
        ns_like = self._like(plan.ns_dtype, device)
        muon_buckets = [b for b in plan.buckets if b.momentum]
        for b in muon_buckets:
            launch(_muon_momentum_kernel, (b.n_chunks,), b.tensor_table, b.chunk_table,
                    plan.muon_info, self._hyper, scalars, self._like(b.dtype, device), ns_like,
                    ALIGNED=b.aligned, BLOCK=UPDATE_BLOCK, CHUNK=plan.chunk,
                    num_warps=UPDATE_WARPS, num_stages=1)
        if self.orthogonalizer is not None:
            self.orthogonalizer(plan.muon_params, [self._ns_slot[p] for p in plan.muon_params],
                                plan.muon_settings, newton_schulz_)
        else:
            for s in plan.stacks:
                newton_schulz_(s.buffer, s.coefficients, s.steps, s.eps)
        for b in muon_buckets:
            launch(_muon_update_kernel, (b.n_chunks,), b.tensor_table, b.chunk_table,
                    plan.muon_info, self._hyper, scalars, self._like(b.dtype, device), ns_like,
                    HAS_MASTER=b.dtype != torch.float32, ALIGNED=b.aligned, BLOCK=UPDATE_BLOCK,
                    CHUNK=plan.chunk, num_warps=UPDATE_WARPS, num_stages=1)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
def aot_variants() -> list[Variant]:
    """The momentum and update kernels per parameter dtype and alignment, bf16 iterations (CUDA)."""
    variants = []
    for dtype in _DTYPES:
        ty = TL_DTYPES[dtype]
        for aligned in (True, False):
            tag = f"{ty} {'aligned' if aligned else 'unaligned'}"
            common = {"tensor_table": "*i64", "chunk_table": "*i64", "info_ptr": "*fp64",
                      "hyper_ptr": "*fp64", "scalars_ptr": "*fp32"}
            ptrs = ("tensor_table", "chunk_table", "info_ptr", "hyper_ptr", "scalars_ptr")
            variants.append(Variant(
                kernel=_muon_momentum_kernel, name=f"{tag} BLOCK={UPDATE_BLOCK}",
                signature={**common, "grad_like": f"*{ty}", "ns_like": "*bf16"},
                constexprs={"ALIGNED": aligned, "BLOCK": UPDATE_BLOCK, "CHUNK": CHUNK},
                num_warps=UPDATE_WARPS, num_stages=1, kind="memory",
                aligned=(*ptrs, "grad_like", "ns_like") if aligned else ()))
            variants.append(Variant(
                kernel=_muon_update_kernel, name=f"{tag} BLOCK={UPDATE_BLOCK}",
                signature={**common, "param_like": f"*{ty}", "ns_like": "*bf16"},
                constexprs={"HAS_MASTER": dtype != torch.float32, "ALIGNED": aligned,
                            "BLOCK": UPDATE_BLOCK, "CHUNK": CHUNK},
                num_warps=UPDATE_WARPS, num_stages=1, kind="memory",
                aligned=(*ptrs, "param_like", "ns_like") if aligned else ()))
    return variants
