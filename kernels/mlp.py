"""The second half of a ConvNeXt block as fused Triton GEMMs: GELU -> Linear -> LayerScale -> residual.

``gelu_linear_residual(h, weight, bias, layer_scale, residual, row_scale=None, h_bias=None)``::

    out = residual + row_scale[:, None] * layer_scale[None, :] * (gelu(h + h_bias) @ weight.T + bias)

``h`` is the first Linear's output without its bias (K = 4C features), ``h_bias`` that bias, ``weight``
the second Linear's (N, K) matrix (N = C), ``layer_scale`` LayerScale's gamma, ``row_scale`` drop-path's
per-row factor; exact erf GELU. At ConvNeXt's first stages (C = 96, 192) this is memory-bound (0.57·C
flop/byte against the ~270 an H100 needs), so:

* GELU is computed in registers where a GEMM loads its operand tile: ``gelu(h)`` never exists in memory
  while N spans at most two column tiles (C <= 256); wider, it is materialized once and read by both
  GEMMs (``_gelu_on_load``). The scales, bias and residual ride in the epilogues.
* Backward: the input-gradient GEMM applies gelu'(h) in its epilogue and emits h_bias's gradient as
  column-sum partials (one fewer pass over the 4C-wide gradient); the weight gradient splits the M
  reduction into fp32 partials; bias/LayerScale gradients are column sums. Every partial is added by
  ``kernels._common.sum_partials_kernel`` in a fixed order: no atomics, bitwise reproducible.
* GELU math and accumulation in fp32, operands rounded to h's dtype, one rounding of the output
  (``promote_types(residual, h)``); fp32 master parameters are converted in-kernel; fp32 operands
  take IEEE or TF32 products as torch's ``allow_tf32`` says for its own matmuls. Tiles are sized for
  two 64-row wgmma warpgroups without spills (``_GPU_CONFIGS``; ``tritonforge kernels report`` shows
  registers and shared memory); the interpreter runs one small config so tests cross tile edges.

The custom ops ``tritonforge::gelu_linear_residual_forward`` / ``_backward`` keep ``torch.compile`` whole;
off CUDA without ``TRITON_INTERPRET=1`` the same math runs as a torch composition in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._compat import DOT_IEEE, DOT_TF32
from ._common import (SUM_BLOCK_G, SUM_BLOCK_N, INTERPRET, dot_precision, launch, sm_count, sum_partials_kernel,
                      sum_partials_variant)
from .variant import Variant, dot_kind
# The deterministic fixed-order reduction of fp32 partial sums, and the SM count, shared with the norms.

__all__ = ["gelu_linear_residual"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WGRAD_WAVES = 2  # wgrad programs per SM the split count aims for
_WORKSPACE_BYTES = 64 * 1024 * 1024  # bound on the wgrad's fp32 partials
_MAX_GELU_EVALUATIONS = 2  # column tiles that may each recompute GELU on load (see _gelu_on_load)
# Column reductions: a [_COL_BLOCK_M, _COL_BLOCK_N] tile per step. Their partials (many rows of N) are
# summed by the norms' reduction at its own tile; the wgrad's (a few splits of N * K) with
# _WSUM_BLOCK_G rows of _WSUM_BLOCK_N columns per step.
_COL_BLOCK_M, _COL_BLOCK_N, _COL_WARPS = 128, 32, 4
_COL_PROGRAMS_PER_SM = 4
_WSUM_BLOCK_G, _WSUM_BLOCK_N, _SUM_WARPS = 8, 1024, 4

# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------
# (BLOCK_a, BLOCK_b, BLOCK_inner, num_warps, num_stages) per GEMM and dtype class, for sm_90:
# fwd: (BLOCK_M, BLOCK_N, BLOCK_K); dgrad: (BLOCK_M, BLOCK_K, BLOCK_N); wgrad: (BLOCK_N, BLOCK_K, BLOCK_M).
_GPU_CONFIGS = {
    ("fwd", "16-bit"): (128, 128, 32, 8, 4),
    ("dgrad", "16-bit"): (128, 64, 64, 8, 3),
    ("wgrad", "16-bit"): (128, 128, 32, 8, 4),
    ("fwd", "fp32"): (64, 64, 32, 4, 2),
    ("dgrad", "fp32"): (64, 64, 32, 4, 2),
    ("wgrad", "fp32"): (64, 64, 32, 4, 2),
}
_INTERPRETER_CONFIG = (32, 32, 32, 4, 1)
_BLOCK_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "dgrad": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                "wgrad": ("BLOCK_N", "BLOCK_K", "BLOCK_M")}


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16-bit"


def _config(kernel: str, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    return _INTERPRETER_CONFIG if INTERPRET else _GPU_CONFIGS[(kernel, _dtype_class(dtype))]


def _triton_config(kernel: str, cfg: tuple[int, int, int, int, int]) -> triton.Config:
    *blocks, warps, stages = cfg
    return triton.Config(dict(zip(_BLOCK_NAMES[kernel], blocks)), num_warps=warps, num_stages=stages)


def _autotune_configs(kernel: str) -> list[triton.Config]:
    if INTERPRET:
        return [_triton_config(kernel, _INTERPRETER_CONFIG)]
    return [_triton_config(kernel, c) for (name, _), c in _GPU_CONFIGS.items() if name == kernel]


def _pruner(kernel: str, dtype_arg: str):
    """Keep the configs listed for the launch's dtype class (interpreter: the one config)."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        wanted = _triton_config(kernel, _config(kernel, {**named_args, **kwargs}[dtype_arg].dtype))
        return [c for c in configs if c.all_kwargs() == wanted.all_kwargs()]

    return prune


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _gelu(x):
    """Exact GELU of an fp32 tensor: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))


@triton.jit
def _gelu_grad(x):
    """d gelu / dx of an fp32 tensor: Phi(x) + x phi(x)."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
    return cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI


@triton.jit
def _gelu_operand(h, HB, offs_k, mask_k, HAS_HB: tl.constexpr, dtype: tl.constexpr):
    """gelu(h + hb) of a loaded [rows, BLOCK_K] h tile, in fp32 and rounded to the GEMM's dtype. Masked-off
    columns (h = 0, hb = 0) give gelu(0) = 0; padding rows get gelu(hb), which callers never store or
    multiply by a nonzero operand row."""
    hf = h.to(tl.float32)
    if HAS_HB:
        hf += tl.load(HB + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    return _gelu(hf).to(dtype)


@triton.autotune(configs=_autotune_configs("fwd"), key=["N", "K"],
                 prune_configs_by={"early_config_prune": _pruner("fwd", "H")})
@triton.jit
def _fwd_kernel(
    H,  # *[M, K] pre-activation, row stride stride_h, unit column stride; the compute dtype
    HB,  # *[K] the first linear's bias, added to h before GELU (read only when HAS_HB)
    W,  # *[N, K] weight, row stride stride_w, unit column stride; any float dtype
    BIAS,  # *[N] (read only when HAS_BIAS)
    GAMMA,  # *[N] layer scale (read only when HAS_GAMMA)
    RS,  # *[M] row scale (read only when HAS_ROW_SCALE)
    RES,  # *[M, N] residual, row stride stride_res
    Y,  # *[M, N] branch output gelu(h) @ W^T + bias, contiguous, compute dtype (when STORE_Y)
    OUT,  # *[M, N] output, contiguous, promote_types(residual, h)
    M, N, K,
    stride_h, stride_w, stride_res,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    STORE_Y: tl.constexpr,
    GELU_ON_LOAD: tl.constexpr,  # H holds h and the A operand is gelu(h + hb); else H holds that itself
    HAS_HB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32" (fp32 operands only)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of y = gelu(h + hb) @ W^T + bias and out = residual + rs * gamma * y.

    The A operand is gelu(h tile + hb), computed in fp32 registers after the load and rounded to the
    compute dtype (or, without GELU_ON_LOAD, loaded ready-made); B is the weight tile read
    transposed (K-major, wgmma's native B layout).
    Memory: h and the residual read once per N tile (programs of one row block are adjacent, so
    the repeats hit L2), y and out written once; the weight (N * K, small) stays in L2.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    dtype = H.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        h = tl.load(H + rows[:, None] * stride_h + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if GELU_ON_LOAD:
            a = _gelu_operand(h, HB, offs_k, mask_k, HAS_HB, dtype)
        else:
            a = h
        w = tl.load(W + offs_n[None, :] * stride_w + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(a, w.to(dtype), acc, input_precision=DOT_PRECISION)

    y = acc
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    out_offs = rows[:, None] * N + offs_n[None, :]
    if STORE_Y:
        tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_GAMMA:
        y *= tl.load(GAMMA + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_ROW_SCALE:
        y *= tl.load(RS + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    res = tl.load(RES + rows[:, None] * stride_res + offs_n[None, :], mask=mask, other=0.0)
    tl.store(OUT + out_offs, (res.to(tl.float32) + y).to(OUT.dtype.element_ty), mask=mask)


@triton.autotune(configs=_autotune_configs("dgrad"), key=["N", "K"],
                 prune_configs_by={"early_config_prune": _pruner("dgrad", "H")})
@triton.jit
def _dgrad_kernel(
    G,  # *[M, N] gradient of out, row stride stride_g
    GAMMA,  # *[N] layer scale (read only when HAS_GAMMA)
    RS,  # *[M] row scale (read only when HAS_ROW_SCALE)
    W,  # *[N, K] weight, row stride stride_w
    H,  # *[M, K] pre-activation, row stride stride_h; the compute dtype
    HB,  # *[K] the first linear's bias (read only when HAS_HB)
    DH,  # *[M, K] gradient of h, contiguous, h's dtype
    DHB_PART,  # *[cdiv(M, BLOCK_M), K] fp32 column sums of each row block's d_h (when SUM_DH)
    M, N, K,
    stride_g, stride_w, stride_h,
    HAS_GAMMA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    HAS_HB: tl.constexpr, SUM_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32" (fp32 operands only)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One BLOCK_M x BLOCK_K tile of d_h = ((g * gamma) @ W) * rs[:, None] * gelu'(h + hb).

    The A operand is the g tile scaled by gamma in fp32 registers; the row scale multiplies the
    accumulator rows, and the epilogue loads the h tile for gelu'(x) = Phi(x) + x phi(x) and, with
    SUM_DH, writes the tile's column sums (the row block's share of hb's gradient).
    Memory: g read once per K tile (adjacent programs, L2 for the repeats), h read once, d_h
    written once; the weight stays in L2.
    """
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k
    pid_k = pid % num_k
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows = offs_m.to(tl.int64)
    dtype = H.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(G + rows[:, None] * stride_g + offs_n[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if HAS_GAMMA:
            gamma = tl.load(GAMMA + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            a = (g.to(tl.float32) * gamma[None, :]).to(dtype)
        else:
            a = g.to(dtype)
        w = tl.load(W + offs_n[:, None] * stride_w + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(a, w.to(dtype), acc, input_precision=DOT_PRECISION)

    if HAS_ROW_SCALE:
        acc *= tl.load(RS + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    mask = mask_m[:, None] & mask_k[None, :]
    h = tl.load(H + rows[:, None] * stride_h + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_HB:
        h += tl.load(HB + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    dh = acc * _gelu_grad(h)  # padding rows: acc is 0 there
    tl.store(DH + rows[:, None] * K + offs_k[None, :], dh.to(DH.dtype.element_ty), mask=mask)
    if SUM_DH:  # the first linear's bias gradient, one partial per row block: no extra pass over d_h
        tl.store(DHB_PART + pid_m.to(tl.int64) * K + offs_k, tl.sum(dh, axis=0), mask=mask_k)


@triton.jit
def _wgrad_kernel(
    G,  # *[M, N] gradient of out, row stride stride_g
    GAMMA,  # *[N] layer scale (read only when HAS_GAMMA)
    RS,  # *[M] row scale (read only when HAS_ROW_SCALE)
    H,  # *[M, K] pre-activation, row stride stride_h; the compute dtype
    HB,  # *[K] the first linear's bias (read only when HAS_HB)
    PART,  # *[splits, N, K] fp32 partial sums of dW, contiguous
    M, N, K,
    stride_g, stride_h,
    rows_per_split,  # rows of M reduced by each split, a multiple of BLOCK_M
    HAS_GAMMA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    GELU_ON_LOAD: tl.constexpr,  # H holds h and B is gelu(h + hb); else H holds that itself
    HAS_HB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32" (fp32 operands only)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Split program_id(1)'s partial of one BLOCK_N x BLOCK_K tile of dW = t^T @ gelu(h + hb).

    Over the split's rows: A = (g * rs)^T, scaled in fp32 registers and transposed; B = gelu(h tile)
    computed on load (or, without GELU_ON_LOAD, loaded ready-made). gamma multiplies the accumulator
    rows (the N index) before the fp32 store.
    Memory: the split's g and h rows read once per (N, K) tile (concurrent tiles of one split read
    the same rows, so the repeats hit L2), N * K fp32 written per split.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    dtype = H.dtype.element_ty
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        rows = offs_m.to(tl.int64)
        g = tl.load(G + rows[:, None] * stride_g + offs_n[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if HAS_ROW_SCALE:
            rs = tl.load(RS + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            g = g.to(tl.float32) * rs[:, None]
        h = tl.load(H + rows[:, None] * stride_h + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if GELU_ON_LOAD:
            b = _gelu_operand(h, HB, offs_k, mask_k, HAS_HB, dtype)
        else:
            b = h
        acc = tl.dot(tl.trans(g.to(dtype)), b, acc, input_precision=DOT_PRECISION)

    if HAS_GAMMA:
        acc *= tl.load(GAMMA + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    part = PART + split.to(tl.int64) * N * K
    tl.store(part + offs_n[:, None] * K + offs_k[None, :], acc,
             mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _colsum_kernel(
    G,  # *[M, N] gradient of out, row stride stride_g
    RS,  # *[M] row scale (read only when HAS_ROW_SCALE)
    GAMMA,  # *[N] layer scale (read only when HAS_GAMMA)
    Y,  # *[M, N] branch output saved by the forward, contiguous (read only when HAS_DGAMMA)
    DB_PART,  # *[P, N] fp32 partial column sums of t (when HAS_DB)
    DG_PART,  # *[P, N] fp32 partial column sums of g * rs * y (when HAS_DGAMMA)
    M, N,
    stride_g,
    rows_per_program,  # a multiple of BLOCK_M
    HAS_ROW_SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_DB: tl.constexpr, HAS_DGAMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column sums over one contiguous range of rows, for one BLOCK_N column block.

    Accumulates g * rs (and g * rs * y) in an fp32 [BLOCK_M, BLOCK_N] register tile, reduces it over
    the rows once at the end and writes row program_id(0) of the partials; d_bias's partial is
    multiplied by gamma. Memory: g (and y) read once; 4 * N bytes per partial per program.
    """
    pid = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)

    acc_db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_dg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        rows = offs_m.to(tl.int64)
        mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(G + rows[:, None] * stride_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ROW_SCALE:
            g *= tl.load(RS + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        if HAS_DB:
            acc_db += g
        if HAS_DGAMMA:
            y = tl.load(Y + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
            acc_dg += g * y.to(tl.float32)

    if HAS_DB:
        db = tl.sum(acc_db, axis=0)
        if HAS_GAMMA:
            db *= tl.load(GAMMA + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(DB_PART + pid * N + offs_n, db, mask=mask_n)
    if HAS_DGAMMA:
        tl.store(DG_PART + pid * N + offs_n, tl.sum(acc_dg, axis=0), mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Launchers (inputs already validated; 2-D tensors with unit column stride)
# ----------------------------------------------------------------------------------------------
def _dummy(t: Optional[Tensor], like: Tensor) -> Tensor:
    """The tensor, or a stand-in pointer for an argument the kernel does not read."""
    return t if t is not None else like


def _gelu_on_load(n: int, dtype: torch.dtype) -> bool:
    """Whether the GEMMs compute GELU as they load h (True) or read a materialized gelu(h) (False).

    On load, each of the forward's and the wgrad's ``cdiv(N, BLOCK_N)`` column tiles evaluates erf
    for every element of h again. One evaluation costs about the issue time of ~15 fp32 instructions
    (~0.45 ps per element on an H100's 33 T instructions/s); materializing gelu(h) costs writing and
    reading it (4 bytes per element at 2 bytes each, ~1.2 ps at 3.35 TB/s) and keeping it for the
    backward. So GELU rides in the load while it is evaluated at most twice (C <= 256 at ConvNeXt's
    widths, the memory-bound stages) and is materialized once above that.
    """
    return triton.cdiv(n, _config("fwd", dtype)[1]) <= _MAX_GELU_EVALUATIONS


def _forward(h, weight, bias, layer_scale, residual, row_scale, store_y: bool, gelu_on_load: bool = True,
             h_bias=None):
    """``(out, y)``: out in promote_types(residual, h), y in h's dtype (None unless store_y).
    With ``gelu_on_load=False``, ``h`` holds gelu(h + h_bias) already (and h_bias is not read)."""
    m, k = h.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=h.device, dtype=torch.promote_types(residual.dtype, h.dtype))
    y = torch.empty((m, n), device=h.device, dtype=h.dtype) if store_y else None
    if m == 0:
        return out, y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    has_hb = h_bias is not None and gelu_on_load
    launch(
        _fwd_kernel, grid,
        h, _dummy(h_bias if has_hb else None, weight), weight, _dummy(bias, weight), _dummy(layer_scale, weight),
        _dummy(row_scale, h), residual,
        _dummy(y, out), out, m, n, k, h.stride(0), weight.stride(0), residual.stride(0),
        HAS_BIAS=bias is not None, HAS_GAMMA=layer_scale is not None, HAS_ROW_SCALE=row_scale is not None,
        STORE_Y=store_y, GELU_ON_LOAD=gelu_on_load, HAS_HB=has_hb, DOT_PRECISION=dot_precision(h.dtype))
    return out, y


def _dgrad(g, layer_scale, row_scale, weight, h, h_bias=None, hb_dtype=None):
    """``(d_h, d_h_bias)``: d_h in h's dtype, contiguous, the gradient of gelu's input h + h_bias; its
    column sums d_h_bias (in ``hb_dtype``, None without one) from per-row-block partials that the GEMM's
    epilogue writes, added in a fixed order."""
    m, k = h.shape
    n = weight.shape[0]
    dh = torch.empty((m, k), device=h.device, dtype=h.dtype)
    if m == 0:
        return dh, (torch.zeros(k, device=h.device, dtype=hb_dtype) if hb_dtype is not None else None)
    block_m = _config("dgrad", h.dtype)[0]
    part = (torch.empty((triton.cdiv(m, block_m), k), device=h.device, dtype=torch.float32)
            if hb_dtype is not None else None)

    def grid(meta):
        assert meta["BLOCK_M"] == block_m  # the partials' row count assumes it
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    launch(
        _dgrad_kernel, grid,
        g, _dummy(layer_scale, weight), _dummy(row_scale, h), weight, h, _dummy(h_bias, weight), dh,
        _dummy(part, dh), m, n, k, g.stride(0), weight.stride(0), h.stride(0),
        HAS_GAMMA=layer_scale is not None, HAS_ROW_SCALE=row_scale is not None, HAS_HB=h_bias is not None,
        SUM_DH=part is not None, DOT_PRECISION=dot_precision(h.dtype))
    if part is None:
        return dh, None
    dhb = torch.empty(k, device=h.device, dtype=hb_dtype)
    launch(
        sum_partials_kernel, (triton.cdiv(k, SUM_BLOCK_N), 1),
        part, dhb, dhb, part.shape[0], k, BLOCK_G=SUM_BLOCK_G, BLOCK_N=SUM_BLOCK_N,
        num_warps=_SUM_WARPS)
    return dh, dhb


def _wgrad_splits(m: int, n: int, k: int, cfg, device: torch.device) -> int:
    """Splits of the M reduction: enough programs for ~_WGRAD_WAVES waves of the SMs, at least one
    row block per split, and a workspace of at most _WORKSPACE_BYTES."""
    block_n, block_k, block_m = cfg[:3]
    tiles = triton.cdiv(n, block_n) * triton.cdiv(k, block_k)
    wanted = triton.cdiv(_WGRAD_WAVES * sm_count(device), tiles)
    return max(1, min(wanted, triton.cdiv(m, block_m), _WORKSPACE_BYTES // (n * k * 4)))


def _wgrad(g, layer_scale, row_scale, h, weight, splits: Optional[int] = None, gelu_on_load: bool = True,
           h_bias=None):
    """dW = t^T @ gelu(h + h_bias) in weight's dtype, reduced deterministically over `splits` row ranges.
    With ``gelu_on_load=False``, ``h`` holds gelu(h + h_bias) already (and h_bias is not read)."""
    m, k = h.shape
    n = weight.shape[0]
    cfg = _config("wgrad", h.dtype)
    block_n, block_k, block_m, warps, stages = cfg
    if m == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if splits is None:
        splits = _wgrad_splits(m, n, k, cfg, h.device)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)  # no empty split
    part = torch.empty((splits, n, k), device=h.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n) * triton.cdiv(k, block_k), splits)
    has_hb = h_bias is not None and gelu_on_load
    launch(
        _wgrad_kernel, grid,
        g, _dummy(layer_scale, weight), _dummy(row_scale, h), h, _dummy(h_bias if has_hb else None, weight), part,
        m, n, k, g.stride(0), h.stride(0), rows_per_split,
        HAS_GAMMA=layer_scale is not None, HAS_ROW_SCALE=row_scale is not None, GELU_ON_LOAD=gelu_on_load,
        HAS_HB=has_hb, DOT_PRECISION=dot_precision(h.dtype),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=warps, num_stages=stages)
    dw = torch.empty((n, k), device=h.device, dtype=weight.dtype)
    launch(
        sum_partials_kernel, (triton.cdiv(n * k, _WSUM_BLOCK_N), 1),
        part, dw, dw, splits, n * k, BLOCK_G=_WSUM_BLOCK_G, BLOCK_N=_WSUM_BLOCK_N, num_warps=_SUM_WARPS)
    return dw


def _colsums(g, row_scale, layer_scale, y, n, bias_dtype, gamma_dtype):
    """(d_bias or None, d_layer_scale or None); a None dtype skips that sum."""
    m = g.shape[0]
    dev = g.device
    if m == 0:
        return tuple(torch.zeros(n, device=dev, dtype=dt) if dt is not None else None
                     for dt in (bias_dtype, gamma_dtype))
    col_blocks = triton.cdiv(n, _COL_BLOCK_N)
    row_blocks = triton.cdiv(m, _COL_BLOCK_M)
    programs = min(row_blocks, max(1, _COL_PROGRAMS_PER_SM * sm_count(dev) // col_blocks))
    rows_per_program = triton.cdiv(row_blocks, programs) * _COL_BLOCK_M
    programs = triton.cdiv(m, rows_per_program)
    has_db, has_dg = bias_dtype is not None, gamma_dtype is not None
    part = torch.empty((has_db + has_dg, programs, n), device=dev, dtype=torch.float32)
    launch(
        _colsum_kernel, (programs, col_blocks),
        g, _dummy(row_scale, g), _dummy(layer_scale, g), _dummy(y, g), part[0], part[-1], m, n,
        g.stride(0), rows_per_program,
        HAS_ROW_SCALE=row_scale is not None, HAS_GAMMA=layer_scale is not None, HAS_DB=has_db,
        HAS_DGAMMA=has_dg, BLOCK_M=_COL_BLOCK_M, BLOCK_N=_COL_BLOCK_N, num_warps=_COL_WARPS)
    db = torch.empty(n, device=dev, dtype=bias_dtype) if has_db else None
    dg = torch.empty(n, device=dev, dtype=gamma_dtype) if has_dg else None
    sums = [t for t in (db, dg) if t is not None]
    launch(
        sum_partials_kernel, (triton.cdiv(n, SUM_BLOCK_N), len(sums)),
        part, sums[0], sums[-1], programs, n, BLOCK_G=SUM_BLOCK_G, BLOCK_N=SUM_BLOCK_N,
        num_warps=_SUM_WARPS)
    return db, dg


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
def _as_rows(t: Tensor, width: int) -> Tensor:
    """t as (rows, width) with unit column stride: a view when the strides allow, else one copy."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 or width <= 1 else rows.contiguous()


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(0) == 1 else t.contiguous()


# The launchers as torch.library custom ops, so that torch.compile treats them as opaque (no graph break,
# no tracing into the Triton launches). Optional outputs are empty (0,) tensors: a custom op returns
# tensors only.
_NONE = (0,)


@torch.library.custom_op("tritonforge::gelu_linear_residual_forward", mutates_args=())
def _forward_op(h: Tensor, h_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                layer_scale: Optional[Tensor], residual: Tensor, row_scale: Optional[Tensor], store_y: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, y, act)``: out shaped like residual; y (M, N) in h's dtype when ``store_y``, else
    empty; act = gelu(h + h_bias) (M, K) when it is materialized (wide N, see ``_gelu_on_load``),
    else empty."""
    k, n = h.shape[-1], weight.shape[0]
    h2, w2 = _as_rows(h, k), _as_rows(weight, k)
    rs = _vector(row_scale.reshape(-1)) if row_scale is not None else None
    h_bias = _vector(h_bias)
    on_load = _gelu_on_load(n, h.dtype)
    if on_load:
        act = h2
    else:  # GELU in fp32 internally, rounded once to h's dtype, as on load (the bias add rounds too)
        act = F.gelu(h2 if h_bias is None else h2 + h_bias.to(h2.dtype))
    out, y = _forward(act, w2, _vector(bias), _vector(layer_scale), _as_rows(residual, n), rs,
                      store_y and layer_scale is not None, on_load, h_bias)
    return (out.view(*h.shape[:-1], n), y if y is not None else h.new_empty(_NONE),
            h.new_empty(_NONE) if on_load else act)


@_forward_op.register_fake
def _(h, h_bias, weight, bias, layer_scale, residual, row_scale, store_y):
    n, k = weight.shape
    out = h.new_empty((*h.shape[:-1], n), dtype=torch.promote_types(residual.dtype, h.dtype))
    rows = h.numel() // k
    return (out, h.new_empty((rows, n) if store_y and layer_scale is not None else _NONE),
            h.new_empty(_NONE if _gelu_on_load(n, h.dtype) else (rows, k)))


@torch.library.custom_op("tritonforge::gelu_linear_residual_backward", mutates_args=())
def _backward_op(grad_out: Tensor, h: Tensor, h_bias: Optional[Tensor], weight: Tensor,
                 layer_scale: Optional[Tensor], row_scale: Optional[Tensor], y: Tensor, act: Tensor,
                 need_h: bool, need_weight: bool, h_bias_dtype: Optional[torch.dtype],
                 bias_dtype: Optional[torch.dtype], gamma_dtype: Optional[torch.dtype]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(d_h, d_weight, d_bias, d_layer_scale, d_h_bias)``; each is empty unless asked for
    (``need_*``, or a dtype for the column sums: ``d_layer_scale`` is computed from the saved ``y``,
    ``d_h_bias`` in the input-gradient GEMM, which then runs even without ``need_h``). ``act`` is the
    forward's materialized gelu(h + h_bias), or empty when the GEMMs compute it on load."""
    k, n = h.shape[-1], weight.shape[0]
    h2, w2 = _as_rows(h, k), _as_rows(weight, k)
    layer_scale = _vector(layer_scale)
    h_bias = _vector(h_bias)
    rs = _vector(row_scale.reshape(-1)) if row_scale is not None else None
    g = _as_rows(grad_out, n)
    dh = dhb = None
    if need_h or h_bias_dtype is not None:
        dh, dhb = _dgrad(g, layer_scale, rs, w2, h2, h_bias, h_bias_dtype)
        dh = dh.view(h.shape) if need_h else None
    if need_weight:
        dw = _wgrad(g, layer_scale, rs, act if act.numel() else h2, w2, gelu_on_load=act.numel() == 0,
                    h_bias=h_bias)
    else:
        dw = None
    db = dgamma = None
    if bias_dtype is not None or gamma_dtype is not None:
        db, dgamma = _colsums(g, rs, layer_scale, y if y.numel() else None, n, bias_dtype, gamma_dtype)
    # an output never asked for is a fresh empty tensor (returns may not alias one another)
    return tuple(t if t is not None else h.new_empty(_NONE) for t in (dh, dw, db, dgamma, dhb))


@_backward_op.register_fake
def _(grad_out, h, h_bias, weight, layer_scale, row_scale, y, act, need_h, need_weight, h_bias_dtype,
      bias_dtype, gamma_dtype):
    n, k = weight.shape
    return (h.new_empty(h.shape if need_h else _NONE),
            weight.new_empty(weight.shape) if need_weight else h.new_empty(_NONE),
            h.new_empty((n,), dtype=bias_dtype) if bias_dtype is not None else h.new_empty(_NONE),
            h.new_empty((n,), dtype=gamma_dtype) if gamma_dtype is not None else h.new_empty(_NONE),
            h.new_empty((k,), dtype=h_bias_dtype) if h_bias_dtype is not None else h.new_empty(_NONE))


def _setup_context(ctx, inputs, output):
    h, h_bias, weight, bias, layer_scale, residual, row_scale, _ = inputs
    ctx.save_for_backward(h, h_bias, weight, layer_scale, row_scale, output[1], output[2])
    ctx.dtypes = (bias.dtype if bias is not None else None, residual.dtype)


def _backward(ctx, grad_out, _grad_y, _grad_act):
    h, h_bias, weight, layer_scale, row_scale, y, act = ctx.saved_tensors
    bias_dtype, residual_dtype = ctx.dtypes
    need_h, need_hb, need_w, need_b, need_gamma, need_res = ctx.needs_input_grad[:6]
    dh, dw, db, dgamma, dhb = _backward_op(grad_out, h, h_bias, weight, layer_scale, row_scale, y, act, need_h,
                                           need_w, h_bias.dtype if need_hb else None,
                                           bias_dtype if need_b else None,
                                           layer_scale.dtype if need_gamma else None)
    dres = grad_out.to(residual_dtype) if need_res else None
    return (dh if need_h else None, dhb if need_hb else None, dw if need_w else None, db if need_b else None,
            dgamma if need_gamma else None, dres, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _reference(h, weight, bias, layer_scale, residual, row_scale, h_bias=None):
    """The same math as a differentiable torch composition in fp32 (the CPU path)."""
    a = h.float() if h_bias is None else h.float() + h_bias.float()
    y = F.linear(F.gelu(a), weight.float(), bias.float() if bias is not None else None)
    if layer_scale is not None:
        y = y * layer_scale.float()
    if row_scale is not None:
        y = y * row_scale.reshape(-1, 1).float().view(*h.shape[:-1], 1)
    return (residual.float() + y).to(torch.promote_types(residual.dtype, h.dtype))


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _validate(h, weight, bias, layer_scale, residual, row_scale, h_bias) -> None:
    named = (("h", h), ("weight", weight), ("bias", bias), ("layer_scale", layer_scale),
             ("residual", residual), ("row_scale", row_scale), ("h_bias", h_bias))
    for name, t in named:
        if t is None and name in ("h", "weight", "residual"):
            raise TypeError(f"gelu_linear_residual: {name} must be a tensor, got None")
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"gelu_linear_residual: {name} must be a tensor, got {type(t).__name__}")
    for name, t in named:
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"gelu_linear_residual: {name} has dtype {t.dtype}; "
                            "supported: float16, bfloat16, float32")
        if t.device != h.device:
            raise ValueError(f"gelu_linear_residual: {name} is on {t.device} but h is on {h.device}")
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"gelu_linear_residual: h must have a non-empty last dim (K), got shape {_shape(h)}")
    k = h.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] == 0:
        raise ValueError(f"gelu_linear_residual: weight has shape {_shape(weight)} but must be (N, K) "
                         f"with N > 0 and K = {k}, h's last dim")
    n = weight.shape[0]
    for name, t in (("bias", bias), ("layer_scale", layer_scale)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"gelu_linear_residual: {name} has shape {_shape(t)} but must be ({n},), "
                             "weight's N")
    if h_bias is not None and tuple(h_bias.shape) != (k,):
        raise ValueError(f"gelu_linear_residual: h_bias has shape {_shape(h_bias)} but must be ({k},), h's "
                         "last dim")
    expected = (*h.shape[:-1], n)
    if tuple(residual.shape) != expected:
        raise ValueError(f"gelu_linear_residual: residual has shape {_shape(residual)} but must be "
                         f"{expected}: h's leading dims and weight's N")
    if row_scale is not None:
        m = h.numel() // k
        if tuple(row_scale.shape) not in ((m,), tuple(h.shape[:-1])):
            raise ValueError(f"gelu_linear_residual: row_scale has shape {_shape(row_scale)} but must be "
                             f"({m},), one factor per row of h")
        if row_scale.requires_grad:
            raise ValueError("gelu_linear_residual: row_scale receives no gradient; pass it detached")


def gelu_linear_residual(h: Tensor, weight: Tensor, bias: Optional[Tensor], layer_scale: Optional[Tensor],
                         residual: Tensor, row_scale: Optional[Tensor] = None,
                         h_bias: Optional[Tensor] = None) -> Tensor:
    """``residual + row_scale[:, None] * layer_scale * (gelu(h + h_bias) @ weight.T + bias)``, fused.

    Args:
        h: (..., K) pre-activation (the first Linear's output); float16, bfloat16 or float32. Its
            dtype is the compute dtype of the GEMMs (fp32: IEEE products on a GPU unless torch's
            ``allow_tf32`` lets its own matmuls use TF32, then TF32 here too).
        weight: (N, K), ``nn.Linear`` layout; any of the three dtypes (converted in-kernel).
        bias: (N,) or None.
        layer_scale: (N,) LayerScale gamma, or None for 1.
        residual: (..., N) with h's leading dims; any of the three dtypes.
        row_scale: None, or (M,) factors for the M = h.numel() // K rows (h's leading shape is also
            accepted), e.g. drop-path's per-sample ``keep / (1 - p)``; receives no gradient.
        h_bias: (K,) or None: the first Linear's bias, when that Linear runs without it
            (``F.linear(x, W1)``). It is added as h loads, and its gradient (the column sums of
            d(h + h_bias)) comes out of the input-gradient GEMM's epilogue instead of a separate
            reduction over the 4C-wide gradient.
    Returns:
        (..., N) in ``torch.promote_types(residual.dtype, h.dtype)``. Differentiable in h, h_bias,
        weight, bias, layer_scale and residual; each gradient comes back in its input's dtype.

    Rows may be strided (e.g. NHWC views of channels_last activations) as long as the last dim has
    unit stride and the leading dims merge into one row stride; otherwise one copy is made.
    """
    _validate(h, weight, bias, layer_scale, residual, row_scale, h_bias)
    if not (h.is_cuda or INTERPRET):
        return _reference(h, weight, bias, layer_scale, residual, row_scale, h_bias)
    # y, the branch before its scales, is kept for the LayerScale's gradient only when there is one
    store_y = layer_scale is not None and layer_scale.requires_grad and torch.is_grad_enabled()
    return _forward_op(h, h_bias, weight, bias, layer_scale, residual, row_scale, store_y)[0]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
# (compute dtype, parameter dtype): fp16 throughout, bf16 activations with fp32 parameters (autocast
# training, the conversion path), fp32 throughout (testing).
_AOT_DTYPES = (("fp16", "fp16"), ("bf16", "fp32"), ("fp32", "fp32"))
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _dot_precisions(dt: str) -> tuple[str, ...]:
    """The ``DOT_PRECISION`` values a launch with ``dt`` operands may pass (``dot_precision``)."""
    return (DOT_IEEE, DOT_TF32) if dt == "fp32" else (DOT_TF32,)


def _gemm_variant(kernel, name: str, signature: dict[str, str], switches: dict, dt: str, pdt: str,
                  precision: str) -> Variant:
    *blocks, warps, stages = _GPU_CONFIGS[(name, _dtype_class(_TORCH_DTYPE[dt]))]
    constexprs = {**switches, "DOT_PRECISION": precision, **dict(zip(_BLOCK_NAMES[name], blocks))}
    label = f"{dt}{'' if pdt == dt else f' params={pdt}'} " + "x".join(map(str, blocks))
    label += f" {precision}" if dt == "fp32" else ""
    if "GELU_ON_LOAD" in switches:
        label += " gelu-on-load" if switches["GELU_ON_LOAD"] else " gelu-read"
    aligned = tuple(a for a, ty in signature.items() if ty.startswith("*") or a in ("N", "K", "rows_per_split")
                    or a.startswith("stride_"))
    return Variant(kernel=kernel, name=f"{label} w{warps} s{stages}",
                   signature=signature, constexprs=constexprs, num_warps=warps, num_stages=stages,
                   kind=dot_kind(precision), aligned=aligned)


def aot_variants() -> list[Variant]:
    """One variant per kernel and dtype pair of ``_AOT_DTYPES``, with every optional input present
    (bias, layer scale, row scale, the first Linear's bias where GELU is computed on load, and in
    the dgrad with its column sums): the configurations the launchers use on a GPU. Aligned: all
    pointers, N, K and the row strides (multiples of 16 at ConvNeXt widths, C = 96 * 2^i)."""
    variants = []
    for (dt, pdt), precision in ((d, p) for d in _AOT_DTYPES for p in _dot_precisions(d[0])):
        for on_load in (True, False):  # GELU on the operand load (narrow N), or gelu(h) materialized
            variants.append(_gemm_variant(_fwd_kernel.fn, "fwd", {
                "H": f"*{dt}", "HB": f"*{pdt}", "W": f"*{pdt}", "BIAS": f"*{pdt}", "GAMMA": f"*{pdt}",
                "RS": f"*{dt}", "RES": f"*{dt}", "Y": f"*{dt}", "OUT": f"*{dt}", "M": "i32", "N": "i32", "K": "i32",
                "stride_h": "i32", "stride_w": "i32", "stride_res": "i32"},
                {"HAS_BIAS": True, "HAS_GAMMA": True, "HAS_ROW_SCALE": True, "STORE_Y": True,
                 "GELU_ON_LOAD": on_load, "HAS_HB": on_load}, dt, pdt, precision))
            variants.append(_gemm_variant(_wgrad_kernel, "wgrad", {
                "G": f"*{dt}", "GAMMA": f"*{pdt}", "RS": f"*{dt}", "H": f"*{dt}", "HB": f"*{pdt}",
                "PART": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_g": "i32", "stride_h": "i32",
                "rows_per_split": "i32"},
                {"HAS_GAMMA": True, "HAS_ROW_SCALE": True, "GELU_ON_LOAD": on_load, "HAS_HB": on_load}, dt, pdt,
                precision))
        variants.append(_gemm_variant(_dgrad_kernel.fn, "dgrad", {
            "G": f"*{dt}", "GAMMA": f"*{pdt}", "RS": f"*{dt}", "W": f"*{pdt}", "H": f"*{dt}", "HB": f"*{pdt}",
            "DH": f"*{dt}", "DHB_PART": "*fp32",
            "M": "i32", "N": "i32", "K": "i32", "stride_g": "i32", "stride_w": "i32", "stride_h": "i32"},
            {"HAS_GAMMA": True, "HAS_ROW_SCALE": True, "HAS_HB": True, "SUM_DH": True}, dt, pdt, precision))
        if precision != _dot_precisions(dt)[0]:
            continue  # no dot below: the column sums once per dtype pair
        # Partial sums are one row per program: their stores are not 128-bit vectors (judged on loads).
        variants.append(Variant(
            kernel=_colsum_kernel, name=f"{dt} params={pdt} {_COL_BLOCK_M}x{_COL_BLOCK_N}",
            signature={"G": f"*{dt}", "RS": f"*{dt}", "GAMMA": f"*{pdt}", "Y": f"*{dt}", "DB_PART": "*fp32",
                       "DG_PART": "*fp32", "M": "i32", "N": "i32", "stride_g": "i32",
                       "rows_per_program": "i32"},
            constexprs={"HAS_ROW_SCALE": True, "HAS_GAMMA": True, "HAS_DB": True, "HAS_DGAMMA": True,
                        "BLOCK_M": _COL_BLOCK_M, "BLOCK_N": _COL_BLOCK_N},
            num_warps=_COL_WARPS, num_stages=3, kind="memory", vector_stores=False,
            aligned=("G", "RS", "GAMMA", "Y", "DB_PART", "DG_PART", "N", "stride_g", "rows_per_program")))
    # The partial-sum reduction (kernels._common lists its default tile) at the wgrad's tile.
    for pdt in ("fp16", "bf16", "fp32"):
        variants.append(sum_partials_variant(pdt, _WSUM_BLOCK_G, _WSUM_BLOCK_N, _SUM_WARPS, " (wgrad)",
                                             vector_stores=True))
    return variants
