"""LayerNorm and RMSNorm over the last dimension: fused Triton forward and backward.

API: ``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm`` and the ``LayerNorm`` / ``RMSNorm``
modules (drop-in subclasses of torch's, same state dicts). For one row x of length N (the add variants
normalize s = x + residual, rounded to residual's dtype, and also return s as the new residual stream):

    LayerNorm: mean = sum(x)/N,  rstd = 1/sqrt(sum((x - mean)^2)/N + eps),  y = (x - mean)·rstd·w + b
    RMSNorm:   rstd = 1/sqrt(sum(x^2)/N + eps),  y = x·rstd·w
    backward, g = w·dy, xhat the normalized x, c1 = sum(xhat·g)/N, c2 = sum(g)/N:
    dx = rstd·(g - xhat·c1 - c2)  (RMSNorm: without c2);  dw = sum_rows dy·xhat,  db = sum_rows dy

Memory traffic is the whole cost: the forward reads x once and writes y once (4·M·N bytes at 2 bytes per
element), the backward reads x and dy and writes dx (6·M·N). Design:

* Rows up to ``MAX_BLOCK_N`` wide are held whole in registers as [BLOCK_M, BLOCK_N] tiles sized so each
  thread issues 128-bit loads (``_fwd_config``, ``_bwd_config``); wider rows (65536 and beyond) take looped
  kernels that combine chunk statistics with Chan's formula. Statistics are fp32, the mean subtracted
  before squaring.
* The backward runs a persistent grid (``_bwd_grid``), each program looping over a contiguous range of
  rows with its loads software-pipelined into shared memory, and accumulating dw/db partials in fp32
  registers; ``kernels._common.sum_partials_kernel`` adds the [G, N] partials in a fixed order. No atomics:
  gradients are bitwise reproducible.
* Rows may be strided (row stride 0 too); a non-unit last stride costs one explicit copy (``_as_rows``).
  x, residual, weight and bias may each be fp32/fp16/bf16 (y in x's dtype); the custom ops
  ``tritonforge::norm_fwd`` / ``norm_bwd`` have no autocast rule, so bf16 stays bf16 under autocast. Off
  CUDA, without ``TRITON_INTERPRET=1``, they run an fp32 torch reference.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import SUM_BLOCK_G, SUM_BLOCK_N, SUM_WARPS, launch, sm_count, sum_partials_kernel, use_triton
from .variant import Variant

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "LayerNorm", "RMSNorm"]

MAX_BLOCK_N = 8192  # widest row held whole in registers; wider rows take the looped kernels
_FWD_TILE = 8192  # elements per forward program (BLOCK_M * BLOCK_N) for narrow rows
_BWD_TILE = 4096  # elements per backward tile iteration
_FWD_BYTES_PER_THREAD = 64  # of x per thread in the forward: four 128-bit loads
_BWD_BYTES_PER_THREAD = 32  # of each of x and dy per thread in the backward: two 128-bit loads
_BWD_PREFETCH_BYTES = 96 * 1024  # shared memory the backward tile loop may use for prefetching
_BWD_WARPS_PER_SM = 16  # warps of ~128 registers/thread that fit one SM's 64K-register file
_NUM_STAGES = 3  # launch option (Triton's default, passed explicitly); loops set their own depth
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _norm_fwd_kernel(
    X,  # *[M, N] input rows, row stride stride_x, unit column stride
    RES,  # *[M, N] residual rows (add variants), row stride stride_res
    W,  # *[N] weight (read only when HAS_WEIGHT)
    B,  # *[N] bias (read only when HAS_BIAS)
    Y,  # *[M, N] output, contiguous, x's dtype
    RES_OUT,  # *[M, N] new residual x + residual, contiguous, residual's dtype (add variants)
    MEAN,  # *[M] fp32 row means (LayerNorm only)
    RSTD,  # *[M] fp32 row reciprocal standard deviations
    M,  # number of rows
    N,  # row length
    stride_x,  # row stride of X in elements
    stride_res,  # row stride of RES in elements
    eps,  # fp32 epsilon added to the variance
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next_pow2(N): the whole row
):
    """Normalize BLOCK_M whole rows held in registers.

    y = (x - mean) * rstd * w + b  (RMSNorm: mean = 0, no b), statistics in fp32.
    Memory: reads x (+ residual) once, writes y (+ new residual) once, 8 bytes per row of stats,
    w/b once per program.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]

    if HAS_WEIGHT:
        w = tl.load(W + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    x = tl.load(X + rows * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(RES + rows * stride_res + offs_n[None, :], mask=mask, other=0.0)
        s = (x + res.to(tl.float32)).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + rows * N + offs_n[None, :], s, mask=mask)
        x = s.to(tl.float32)  # normalize exactly the stored new residual

    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + offs_m, mean, mask=mask_m)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(RSTD + offs_m, rstd, mask=mask_m)

    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + b[None, :]
    tl.store(Y + rows * N + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_looped_kernel(
    X,  # *[M, N] input rows, row stride stride_x
    RES,  # *[M, N] residual rows (add variants), row stride stride_res
    W,  # *[N] weight
    B,  # *[N] bias
    Y,  # *[M, N] output, contiguous
    RES_OUT,  # *[M, N] new residual, contiguous (add variants)
    MEAN,  # *[M] fp32 (LayerNorm only)
    RSTD,  # *[M] fp32
    M,
    N,
    stride_x,
    stride_res,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # chunk length, < N
):
    """One row per program, in chunks of BLOCK_N, for rows too wide for registers.

    Pass 1: per chunk, exact chunk mean and sum of squared deviations, merged into the running row
    statistics with Chan's formula (RMSNorm: a running sum of squares). The add variants write the
    new residual here. Pass 2: re-read the row (x, or the stored new residual; usually still in L2)
    and write y. Memory: x (+ residual) read once from DRAM and once more mostly from L2.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    x_row = X + row * stride_x
    out_row = row * N  # offset of this row in the contiguous outputs

    count = 0.0
    mean = 0.0
    m2 = 0.0  # sum of squared deviations from the mean (RMSNorm: sum of squares)
    for start in tl.range(0, N, BLOCK_N, num_stages=2):
        cols = start + offs
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0)
            s = (x + res.to(tl.float32)).to(RES_OUT.dtype.element_ty)
            tl.store(RES_OUT + out_row + cols, s, mask=mask)
            x = s.to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(x * x, axis=0)
        else:
            n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(x, axis=0) / n_chunk
            dev = tl.where(mask, x - chunk_mean, 0.0)
            total = count + n_chunk
            delta = chunk_mean - mean
            mean += delta * (n_chunk / total)
            m2 += tl.sum(dev * dev, axis=0) + delta * delta * (count * n_chunk / total)
            count = total
    rstd = tl.rsqrt(m2 / N + eps)
    tl.store(RSTD + row, rstd)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # the new residual written above is read back below by other threads

    for start in tl.range(0, N, BLOCK_N, num_stages=2):
        cols = start + offs
        mask = cols < N
        if HAS_RESIDUAL:
            x = tl.load(RES_OUT + out_row + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            y = x * rstd
        else:
            y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + out_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X,  # *[M, N] normalized input (x, or the new residual), row stride stride_x
    W,  # *[N] weight (read only when HAS_WEIGHT)
    DY,  # *[M, N] gradient of y, row stride stride_dy
    DRES,  # *[M, N] gradient of the new residual (add variants), row stride stride_dres
    DX,  # *[M, N] gradient of the normalized input, contiguous, X's dtype
    MEAN,  # *[M] fp32 (LayerNorm only)
    RSTD,  # *[M] fp32
    DW_PART,  # *[G, N] fp32 per-program partial sums of dy * xhat (when HAS_WEIGHT)
    DB_PART,  # *[G, N] fp32 per-program partial sums of dy (when HAS_BIAS)
    M,
    N,
    stride_x,
    stride_dy,
    stride_dres,
    rows_per_program,  # rows owned by each program, a multiple of BLOCK_M
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile iteration
    BLOCK_N: tl.constexpr,  # next_pow2(N): the whole row
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the tile loop (2 or 3)
):
    """dx for a contiguous range of rows, and this program's dw/db partial sums.

    Per tile of BLOCK_M rows: xhat = (x - mean) * rstd, g = w * dy, c1 = mean(xhat * g),
    c2 = mean(g), dx = rstd * (g - xhat * c1 - c2) (+ dresidual_out). dw/db partials accumulate in
    fp32 registers over all of the program's rows and are written once, as row pid of DW_PART/DB_PART.
    Memory: x and dy (+ dresidual_out) read once, dx written once, N fp32 per partial per program.
    """
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    if HAS_WEIGHT:
        w = tl.load(W + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # The loads of the next NUM_STAGES - 1 tiles are in flight (cp.async into shared memory) while
    # this tile is reduced; without it each iteration would wait a full memory latency.
    for tile_start in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        offs_m = tile_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        mask = mask_m[:, None] & mask_n[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        x = tl.load(X + rows * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + offs_m, mask=mask_m, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + offs_m, mask=mask_m, other=0.0)
            xhat = (x - mean[:, None]) * rstd[:, None]
        # dw/db first: dy is then dead before the row reductions, which keeps the peak register
        # count (and spills) down.
        if HAS_WEIGHT:
            dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        # g is 0 on masked lanes, so the row sums need no extra masking.
        c1 = tl.sum(xhat * g, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + rows * stride_dres + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows * N + offs_n[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    if HAS_WEIGHT:
        tl.store(DW_PART + pid.to(tl.int64) * N + offs_n, tl.sum(dw_acc, axis=0), mask=mask_n)
    if HAS_BIAS:
        tl.store(DB_PART + pid.to(tl.int64) * N + offs_n, tl.sum(db_acc, axis=0), mask=mask_n)


@triton.jit
def _norm_bwd_looped_kernel(
    X,  # *[M, N] normalized input, row stride stride_x
    W,  # *[N] weight
    DY,  # *[M, N] gradient of y, row stride stride_dy
    DRES,  # *[M, N] gradient of the new residual (add variants), row stride stride_dres
    DX,  # *[M, N] gradient of the normalized input, contiguous
    MEAN,  # *[M] fp32 (LayerNorm only)
    RSTD,  # *[M] fp32
    C1,  # *[M] fp32 scratch: per-row mean(xhat * w * dy)
    C2,  # *[M] fp32 scratch: per-row mean(w * dy) (LayerNorm only)
    DW_PART,  # *[G, N] fp32 partial sums of dy * xhat
    DB_PART,  # *[G, N] fp32 partial sums of dy
    M,
    N,
    stride_x,
    stride_dy,
    stride_dres,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    BLOCK_N: tl.constexpr,  # column chunk length, < N
):
    """Backward for rows too wide for registers, over a contiguous range of rows.

    Phase 1: for each row, c1 and c2 accumulated chunk by chunk, stored to the C1/C2 scratch.
    Phase 2: column chunks outermost, rows inner: dx for the chunk, and the chunk's dw/db partials
    kept in fp32 registers across the program's rows, written once per chunk.
    Memory: x and dy read twice (phase 1 and 2), dx written once.
    """
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    offs = tl.arange(0, BLOCK_N)

    row_start64 = row_start.to(tl.int64)
    for i in range(0, row_end - row_start):
        row = row_start64 + i
        rstd = tl.load(RSTD + row)
        if not IS_RMS:
            mean = tl.load(MEAN + row)
        c1 = 0.0
        c2 = 0.0
        for start in tl.range(0, N, BLOCK_N, num_stages=2):
            cols = start + offs
            mask = cols < N
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                xhat = x * rstd
            else:
                xhat = (x - mean) * rstd
                c2 += tl.sum(g, axis=0)
            c1 += tl.sum(xhat * g, axis=0)
        tl.store(C1 + row, c1 / N)
        if not IS_RMS:
            tl.store(C2 + row, c2 / N)
    tl.debug_barrier()  # phase 2 reads every row's c1/c2, stored above by other threads

    for start in tl.range(0, N, BLOCK_N, num_stages=2):
        cols = start + offs
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_BIAS:
            db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in tl.range(0, row_end - row_start, num_stages=2):
            row = row_start64 + i
            rstd = tl.load(RSTD + row)
            c1 = tl.load(C1 + row)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = dy * w
            else:
                g = dy
            if IS_RMS:
                xhat = x * rstd
                dx = (g - xhat * c1) * rstd
            else:
                xhat = (x - tl.load(MEAN + row)) * rstd
                dx = (g - xhat * c1 - tl.load(C2 + row)) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        if HAS_WEIGHT:
            tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PART + pid.to(tl.int64) * N + cols, db_acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and aot_variants)
# ----------------------------------------------------------------------------------------------
def _fwd_config(m: int, n: int, max_block_n: int, elem_size: int) -> dict:
    """Forward launch config: looped or not, BLOCK_M, BLOCK_N, num_warps.

    Each thread holds ``_FWD_BYTES_PER_THREAD`` of x (four 128-bit loads); the looped kernel walks
    the row in chunks of max_block_n.
    """
    per_thread = _FWD_BYTES_PER_THREAD // elem_size
    block_n = triton.next_power_of_2(n)
    if block_n > max_block_n:
        return dict(looped=True, BLOCK_N=max_block_n, num_warps=_warps(max_block_n, per_thread))
    block_m = min(max(1, _FWD_TILE // block_n), triton.next_power_of_2(max(m, 1)))
    return dict(looped=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_warps(block_m * block_n, per_thread))


def _bwd_config(m: int, n: int, max_block_n: int, elem_size: int, bytes_per_col: int) -> dict:
    """Backward launch config: looped or not, BLOCK_M, BLOCK_N, num_warps, NUM_STAGES.

    Each thread holds ``_BWD_BYTES_PER_THREAD`` of each of x and dy (two 128-bit loads) beside its
    fp32 dw/db accumulators, which keeps the tile kernel near 128 registers per thread without
    spills. bytes_per_col: bytes loaded per element position (x, dy and dresidual_out together).
    The tile loop prefetches NUM_STAGES - 1 tiles into shared memory: two when they fit in
    ``_BWD_PREFETCH_BYTES``, else one (wide fp32 tiles), which keeps every config within sm_80's
    163 KB per block. The looped kernel walks the row in chunks of max_block_n / 2 (it holds five
    chunk-long arrays).
    """
    per_thread = _BWD_BYTES_PER_THREAD // elem_size
    block_n = triton.next_power_of_2(n)
    if block_n > max_block_n:
        chunk = max(1, max_block_n // 2)
        return dict(looped=True, BLOCK_M=1, BLOCK_N=chunk, num_warps=_warps(chunk, per_thread))
    block_m = min(max(1, _BWD_TILE // block_n), triton.next_power_of_2(max(m, 1)))
    stages = 3 if 2 * block_m * block_n * bytes_per_col <= _BWD_PREFETCH_BYTES else 2
    return dict(looped=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_warps(block_m * block_n, per_thread),
                NUM_STAGES=stages)


def _warps(tile: int, per_thread: int) -> int:
    """Warps so that each thread holds about `per_thread` elements of the tile, 1 to 32."""
    return min(32, max(1, tile // (32 * per_thread)))


def _bwd_grid(m: int, block_m: int, num_warps: int, sm_count: int) -> tuple[int, int]:
    """(G programs, rows per program): a persistent grid of as many programs as are co-resident.

    The backward kernels use up to ~128 registers per thread, so an SM holds 16 warps of them:
    2 programs of 8 warps or 1 of 16 (or 1 of 32 at 64 registers). More programs would only run in a second wave and grow the
    dw/db partial buffer.
    """
    programs_per_sm = max(1, _BWD_WARPS_PER_SM // num_warps)
    programs = min(triton.cdiv(m, block_m), programs_per_sm * sm_count)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    return triton.cdiv(m, rows_per_program), rows_per_program


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _as_rows(t: Tensor) -> Tensor:
    """A [M, N] view of t with unit column stride and one row stride.

    The single explicit copy of this module: when the last dimension is not unit-stride, or when the
    leading dimensions cannot share one row stride (e.g. a transposed batch), t is copied once here.
    """
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n)


def _param(p: Optional[Tensor]) -> Optional[Tensor]:
    """weight/bias with unit stride (a copy of N elements only for a strided parameter view)."""
    return p.contiguous() if p is not None else None


def _norm_fwd_triton(x, residual, weight, bias, eps, rms, max_block_n):
    weight, bias = _param(weight), _param(bias)
    n = x.shape[-1]
    x2 = _as_rows(x)
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    res2 = _as_rows(residual) if residual is not None else None
    res_out = torch.empty((m, n), device=x.device, dtype=residual.dtype) if residual is not None else None
    mean = torch.empty(0 if rms else m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        cfg = _fwd_config(m, n, max_block_n, x.element_size())
        dummy = x2  # stands in for absent tensors; never read (the constexpr switch is off)
        args = (
            x2, res2 if res2 is not None else dummy,
            weight if weight is not None else dummy, bias if bias is not None else dummy,
            y, res_out if res_out is not None else dummy, mean if not rms else rstd, rstd,
            m, n, x2.stride(0), res2.stride(0) if res2 is not None else 0, eps,
        )
        flags = dict(IS_RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
                     HAS_BIAS=bias is not None)
        if cfg["looped"]:
            launch(_norm_fwd_looped_kernel, (m,), *args, **flags, BLOCK_N=cfg["BLOCK_N"],
                   num_warps=cfg["num_warps"], num_stages=_NUM_STAGES)
        else:
            launch(_norm_fwd_kernel, (triton.cdiv(m, cfg["BLOCK_M"]),), *args, **flags, BLOCK_M=cfg["BLOCK_M"],
                   BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=_NUM_STAGES)
    lead = x.shape[:-1]
    res_out = res_out.view(x.shape) if res_out is not None else x.new_empty(0)
    return y.view(x.shape), res_out, mean.view(lead) if not rms else mean, rstd.view(lead)


def _norm_bwd_triton(dy, dres_out, xin, weight, bias, mean, rstd, rms, max_block_n):
    weight, bias = _param(weight), _param(bias)
    n = xin.shape[-1]
    x2 = _as_rows(xin)
    m = x2.shape[0]
    dx = torch.empty((m, n), device=xin.device, dtype=xin.dtype)
    params = [p for p in (weight, bias) if p is not None]
    grads = [torch.empty(n, device=p.device, dtype=p.dtype) for p in params]
    if m == 0:
        for g in grads:
            g.zero_()
    else:
        dy2 = _as_rows(dy)
        dres2 = _as_rows(dres_out) if dres_out is not None else None
        bytes_per_col = xin.element_size() + dy.element_size() + (dres_out.element_size() if dres_out is not None else 0)
        cfg = _bwd_config(m, n, max_block_n, xin.element_size(), bytes_per_col)
        programs, rows_per_program = _bwd_grid(m, cfg["BLOCK_M"], cfg["num_warps"], sm_count(xin.device))
        part = torch.empty((max(len(params), 1), programs, n), device=xin.device, dtype=torch.float32)
        dw_part = part[0]
        db_part = part[len(params) - 1] if bias is not None else part[0]
        rstd1 = rstd.reshape(m)
        mean1 = mean.reshape(m) if not rms else rstd1
        dummy = x2
        head = (x2, weight if weight is not None else dummy, dy2, dres2 if dres2 is not None else dummy, dx,
                mean1, rstd1)
        tail = (dw_part, db_part, m, n, x2.stride(0), dy2.stride(0), dres2.stride(0) if dres2 is not None else 0,
                rows_per_program)
        flags = dict(IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                     HAS_DRES=dres_out is not None, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                     num_stages=_NUM_STAGES)
        if cfg["looped"]:
            c = torch.empty((2, m), device=xin.device, dtype=torch.float32)
            launch(_norm_bwd_looped_kernel, (programs,), *head, c[0], c[1], *tail, **flags)
        else:
            launch(_norm_bwd_kernel, (programs,), *head, *tail, **flags, BLOCK_M=cfg["BLOCK_M"],
                   NUM_STAGES=cfg["NUM_STAGES"])
        if grads:
            launch(sum_partials_kernel, (triton.cdiv(n, SUM_BLOCK_N), len(grads)), part, grads[0], grads[-1],
                   programs, n, BLOCK_G=SUM_BLOCK_G, BLOCK_N=SUM_BLOCK_N, num_warps=SUM_WARPS,
                   num_stages=_NUM_STAGES)
    dw = grads[0] if weight is not None else xin.new_empty(0)
    db = grads[-1] if bias is not None else xin.new_empty(0)
    return dx.view(xin.shape), dw, db


# ----------------------------------------------------------------------------------------------
# fp32 torch reference (CPU tensors outside the interpreter); same outputs as the kernels
# ----------------------------------------------------------------------------------------------
def _norm_fwd_reference(x, residual, weight, bias, eps, rms):
    if residual is not None:
        res_out = (x.float() + residual.float()).to(residual.dtype)
        xf = res_out.float()
    else:
        res_out = x.new_empty(0)
        xf = x.float()
    if rms:
        mean = xf.new_empty(0)
        xc = xf
    else:
        mean = xf.mean(-1)
        xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), res_out, mean, rstd


def _norm_bwd_reference(dy, dres_out, xin, weight, bias, mean, rstd, rms):
    xf, dyf, rstd_ = xin.float(), dy.float(), rstd.unsqueeze(-1)
    xhat = xf * rstd_ if rms else (xf - mean.unsqueeze(-1)) * rstd_
    g = dyf * weight.float() if weight is not None else dyf
    dx = g - xhat * (xhat * g).mean(-1, keepdim=True)
    if not rms:
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd_
    if dres_out is not None:
        dx = dx + dres_out.float()
    n = xin.shape[-1]
    dw = (dyf * xhat).reshape(-1, n).sum(0).to(weight.dtype) if weight is not None else xin.new_empty(0)
    db = dyf.reshape(-1, n).sum(0).to(bias.dtype) if bias is not None else xin.new_empty(0)
    return dx.to(xin.dtype), dw, db


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tritonforge::norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, rms: bool, max_block_n: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, new residual or empty, mean (LayerNorm) or empty, rstd); mean/rstd fp32 of x.shape[:-1]."""
    if use_triton(x):
        return _norm_fwd_triton(x, residual, weight, bias, eps, rms, max_block_n)
    return _norm_fwd_reference(x, residual, weight, bias, eps, rms)


@_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, rms, max_block_n):
    lead = x.shape[:-1]
    y = x.new_empty(x.shape)
    res_out = x.new_empty(x.shape, dtype=residual.dtype) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if rms else lead, dtype=torch.float32)
    return y, res_out, mean, x.new_empty(lead, dtype=torch.float32)


@torch.library.custom_op("tritonforge::norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: Tensor, dres_out: Optional[Tensor], xin: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    mean: Tensor, rstd: Tensor, rms: bool, max_block_n: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d xin in xin's dtype, dweight or empty, dbias or empty); xin is the normalized input."""
    if use_triton(xin):
        return _norm_bwd_triton(dy, dres_out, xin, weight, bias, mean, rstd, rms, max_block_n)
    return _norm_bwd_reference(dy, dres_out, xin, weight, bias, mean, rstd, rms)


@_norm_bwd_op.register_fake
def _(dy, dres_out, xin, weight, bias, mean, rstd, rms, max_block_n):
    dw = weight.new_empty(weight.shape) if weight is not None else xin.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else xin.new_empty(0)
    return xin.new_empty(xin.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, max_block_n = inputs
    _, res_out, mean, rstd = output
    xin = res_out if residual is not None else x
    ctx.save_for_backward(xin, weight, bias, mean, rstd)
    ctx.x_dtype = x.dtype
    ctx.has_residual = residual is not None
    ctx.rms = rms
    ctx.max_block_n = max_block_n
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dres_out, _dmean, _drstd):
    xin, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(xin, dtype=ctx.x_dtype)
    if not ctx.has_residual:
        dres_out = None
    dxin, dw, db = _norm_bwd_op(dy, dres_out, xin, weight, bias, mean, rstd, ctx.rms, ctx.max_block_n)
    if ctx.has_residual:
        dx = dxin if dxin.dtype == ctx.x_dtype else dxin.to(ctx.x_dtype)
        dresidual = dxin
    else:
        dx, dresidual = dxin, None
    return (dx, dresidual, dw if weight is not None else None, db if bias is not None else None,
            None, None, None)


_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _check(name: str, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]):
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(f"{name}: x must be a tensor with at least one dimension")
    n = x.shape[-1]
    for label, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: {label} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device} but x is on {x.device}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{name}: residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name}: {label} must have shape ({n},) (the last dim of x), got {tuple(t.shape)}")


def _norm(x, residual, weight, bias, eps, rms, max_block_n=MAX_BLOCK_N):
    """Shared entry point; `max_block_n` (a power of two) caps the in-register row width, so tests can
    reach the looped kernels at small N."""
    return _norm_fwd_op(x, residual, weight, bias, float(eps), rms, max_block_n)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension of x (any leading shape); output in x's dtype."""
    _check("layer_norm", x, None, weight, bias)
    return _norm(x, None, weight, bias, eps, rms=False)[0]


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension of x (any leading shape); output in x's dtype."""
    _check("rms_norm", x, None, weight, None)
    return _norm(x, None, weight, None, eps, rms=True)[0]


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(layer_norm(x + residual) in x's dtype, x + residual in residual's dtype), in one pass."""
    _check("add_layer_norm", x, residual, weight, bias)
    y, new_residual, _, _ = _norm(x, residual, weight, bias, eps, rms=False)
    return y, new_residual


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual) in x's dtype, x + residual in residual's dtype), in one pass."""
    _check("add_rms_norm", x, residual, weight, None)
    y, new_residual, _, _ = _norm(x, residual, weight, None, eps, rms=True)
    return y, new_residual


# ----------------------------------------------------------------------------------------------
# Modules: torch.nn.LayerNorm / RMSNorm with the Triton forward; same arguments, parameters and
# state-dict keys, so checkpoints move both ways.
# ----------------------------------------------------------------------------------------------
def _single_dim(cls: str, normalized_shape) -> int:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or not isinstance(shape[0], int):
        raise ValueError(f"{cls}: normalized_shape must be a single last dimension (an int or a 1-tuple), "
                         f"got {normalized_shape!r}")
    return shape[0]


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the last dimension, computed by the Triton kernels."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        _single_dim("LayerNorm", normalized_shape)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim("LayerNorm", x, self.normalized_shape[0])
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last dimension, computed by the Triton kernels.

    ``eps=None`` is torch's default: the epsilon of the dtype the statistics are computed in, i.e.
    ``torch.finfo(torch.float32).eps`` for fp32, fp16 and bf16 inputs alike.
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None):
        _single_dim("RMSNorm", normalized_shape)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device,
                         dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim("RMSNorm", x, self.normalized_shape[0])
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        return rms_norm(x, self.weight, eps)


def _check_last_dim(cls: str, x: Tensor, n: int):
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"{cls}: expected input with last dimension {n}, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
_BENCH_SHAPES = ((32768, 768), (32768, 1024), (16384, 4096), (8192, 8192))  # M, N
_LOOPED_SHAPE = (4096, 65536)


def aot_variants() -> list[Variant]:
    """The configurations the launchers pick at the benchmark shapes and on the looped (N > 8192) path.

    Per kernel: x dtype fp32/fp16/bf16 with weight/bias/residual of the same dtype, times
    LayerNorm (weight and bias) / RMSNorm (weight), times plain / add variant (in the backward the
    add variant is the HAS_DRES switch); plus the autocast-training case, bf16 x with fp32 weight and
    bias, at the benchmark widths. Other widths pick other power-of-two BLOCK_N by the same rules.
    """
    variants = []
    shapes = _BENCH_SHAPES + (_LOOPED_SHAPE,)
    combos = [(dt, dt, add) for dt in ("fp32", "fp16", "bf16") for add in (False, True)] + [("bf16", "fp32", False)]
    for rms in (False, True):
        norm = "rms" if rms else "ln"
        for x_dt, p_dt, add in combos:
            size = 4 if x_dt == "fp32" else 2
            fwd = _unique(_fwd_config(m, n, MAX_BLOCK_N, size) for m, n in shapes)
            bwd = _unique(_bwd_config(m, n, MAX_BLOCK_N, size, size * (3 if add else 2)) for m, n in shapes)
            mixed = p_dt != x_dt  # the looped path is not listed for mixed parameter dtypes
            variants += [_fwd_variant(c, norm, rms, x_dt, p_dt, add) for c in fwd if not (mixed and c["looped"])]
            variants += [_bwd_variant(c, norm, rms, x_dt, p_dt, add) for c in bwd if not (mixed and c["looped"])]
    return variants


def _unique(configs) -> list[dict]:
    return list({tuple(sorted(c.items())): c for c in configs}.values())


def _fwd_variant(cfg, norm, rms, x_dt, p_dt, add) -> Variant:
    kernel = _norm_fwd_looped_kernel if cfg["looped"] else _norm_fwd_kernel
    signature = {"X": f"*{x_dt}", "RES": f"*{x_dt}", "W": f"*{p_dt}", "B": f"*{p_dt}" if not rms else f"*{x_dt}",
                 "Y": f"*{x_dt}", "RES_OUT": f"*{x_dt}", "MEAN": "*fp32", "RSTD": "*fp32", "M": "i32", "N": "i32",
                 "stride_x": "i32", "stride_res": "i32", "eps": "fp32"}
    constexprs = {"IS_RMS": rms, "HAS_RESIDUAL": add, "HAS_WEIGHT": True, "HAS_BIAS": not rms,
                  "BLOCK_N": cfg["BLOCK_N"]}
    if not cfg["looped"]:
        constexprs["BLOCK_M"] = cfg["BLOCK_M"]
    aligned = ("X", "RES", "W", "B", "Y", "RES_OUT", "MEAN", "RSTD", "M", "N", "stride_x", "stride_res")
    name = _variant_name("fwd", norm, x_dt, p_dt, add, cfg)
    return Variant(kernel, name, signature, constexprs, cfg["num_warps"], _NUM_STAGES, "memory", aligned)


def _bwd_variant(cfg, norm, rms, x_dt, p_dt, add) -> Variant:
    kernel = _norm_bwd_looped_kernel if cfg["looped"] else _norm_bwd_kernel
    signature = {"X": f"*{x_dt}", "W": f"*{p_dt}", "DY": f"*{x_dt}", "DRES": f"*{x_dt}", "DX": f"*{x_dt}",
                 "MEAN": "*fp32", "RSTD": "*fp32"}
    if cfg["looped"]:
        signature.update({"C1": "*fp32", "C2": "*fp32"})
    signature.update({"DW_PART": "*fp32", "DB_PART": "*fp32", "M": "i32", "N": "i32", "stride_x": "i32",
                      "stride_dy": "i32", "stride_dres": "i32", "rows_per_program": "i32"})
    constexprs = {"IS_RMS": rms, "HAS_WEIGHT": True, "HAS_BIAS": not rms, "HAS_DRES": add, "BLOCK_N": cfg["BLOCK_N"]}
    if not cfg["looped"]:
        constexprs.update(BLOCK_M=cfg["BLOCK_M"], NUM_STAGES=cfg["NUM_STAGES"])
    aligned = ("X", "W", "DY", "DRES", "DX", "MEAN", "RSTD", "C1", "C2", "DW_PART", "DB_PART", "M", "N",
               "stride_x", "stride_dy", "stride_dres")
    aligned = tuple(a for a in aligned if a in signature)
    name = _variant_name("bwd", norm, x_dt, p_dt, add, cfg)
    return Variant(kernel, name, signature, constexprs, cfg["num_warps"], _NUM_STAGES, "memory", aligned)


def _variant_name(direction, norm, x_dt, p_dt, add, cfg) -> str:
    params = "" if p_dt == x_dt else f" params={p_dt}"
    block = f"looped BLOCK_N={cfg['BLOCK_N']}" if cfg["looped"] else f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']}"
    stages = f" stages={cfg['NUM_STAGES']}" if "NUM_STAGES" in cfg else ""
    return f"{direction} {'add_' if add else ''}{norm} {x_dt}{params} {block} warps={cfg['num_warps']}{stages}"
