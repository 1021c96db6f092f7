"""Depthwise 2D convolution (``groups = channels``, stride 1) as Triton kernels, forward and backward.

``depthwise_conv2d(x, weight, bias=None, padding=0)`` is ``F.conv2d(x, weight, bias, padding=padding,
groups=C)`` for an (N, C, H, W) input and a (C, 1, KH, KW) weight, filters up to 15 x 15::

    y[n, c, oh, ow] = bias[c] + sum_{i, j} x[n, c, oh + i - ph, ow + j - pw] * weight[c, 0, i, j]

ConvNeXt's 7x7 token mixer: 49 FMAs per 4 bytes moved, so the floor is reading and writing the activation
once, and ``torch.compile`` leaves it to cuDNN (whose grouped-conv weight gradient has been reported far
from that floor; ``bench ops --op dwconv`` measures both). Any input strides; channels_last is the fast
layout (a 128-bit vector of channels per load); outputs take the input's memory format. Design:

* ``_conv_kernel``: a program computes ``ROWS`` output rows of a (BLOCK_W x BLOCK_C) tile, walking the
  ``ROWS + KH - 1`` input rows it needs and loading each once per filter column, so an input row is read
  (ROWS + KH - 1)·KW / ROWS times per output row (17.5 at 7x7) instead of 49. Only one filter column's
  taps are live at a time (unrolling all taps spilled). The filter is a (KH·KW, C) fp32 table so a tap is
  one vector. The input gradient is the same kernel on dy with the filter rotated by 180 degrees.
* ``_wgrad_kernel``: program (channel block, filter row, split of the output rows), KW accumulators per
  tile; per-split fp32 partials of the taps and the bias gradient are added by
  ``kernels._common.sum_partials_kernel`` in a fixed order: no atomics, bitwise reproducible.
* fp32 products and sums, one rounding to the input's dtype; weights read in their own dtype (fp32 master
  weights need no cast copy). Tile widths follow the output width (``_tile``) so late, narrow stages are
  not mostly padding; the interpreter runs a small tile so tests cross every tile edge.

The custom ops ``tritonforge::depthwise_conv2d_forward`` / ``_backward`` keep ``torch.compile`` whole;
off CUDA without ``TRITON_INTERPRET=1`` the function is ``F.conv2d`` itself.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import SUM_BLOCK_G, SUM_BLOCK_N, INTERPRET, launch, sm_count, sum_partials_kernel
from .variant import Variant

__all__ = ["depthwise_conv2d"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_KERNEL = 15
# Output rows per forward program (at most 4: one accumulator each), BLOCK_W * BLOCK_C and the widest
# BLOCK_W: on a GPU, and in the Triton interpreter (small, so that small tests cross every tile edge).
_GPU_ROWS, _GPU_TILE, _GPU_MAX_W = 4, 1024, 32
_ROWS = 2 if INTERPRET else _GPU_ROWS
_CONV_WARPS = 4
_WGRAD_WARPS = 4
_WGRAD_PROGRAMS_PER_SM = 4
_SUM_WARPS = 4
_PART_BYTES = 64 * 1024 * 1024  # bound on the weight gradient's fp32 partials


def _tile(width: int, channels: int, interpret: bool = INTERPRET) -> tuple[int, int]:
    """(BLOCK_W, BLOCK_C) for an output ``width`` wide: BLOCK_W covers the width with the least padding
    from 8 up to 32 columns (8 in the interpreter); BLOCK_C fills the tile of 1024 elements (128 in the
    interpreter), capped at the channels' power of two."""
    tile, max_w = (128, 8) if interpret else (_GPU_TILE, _GPU_MAX_W)
    block_w = max(8, min(triton.next_power_of_2(max(width, 1)), max_w))
    block_c = max(1, min(tile // block_w, triton.next_power_of_2(channels)))
    return block_w, block_c


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv_kernel(
    X,  # *[N, C, H, W] input (the forward) or output gradient (the input gradient), any strides
    WT,  # *[KH * KW, C] fp32 filter table, contiguous: row i * KW + j holds tap (i, j) of every channel
    BIAS,  # *[C] (read only when HAS_BIAS)
    Y,  # *[N, C, HO, WO] output, strides sy*
    C, H, W, HO, WO,
    PH, PW,  # padding (may be negative for the input gradient: K - 1 - p)
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # output rows per program, 1 to 4
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Y[n, c, oh, ow] = bias[c] + sum_{i,j} X[n, c, oh + i - PH, ow + j - PW] * WT[i * KW + j, c].

    Program (image n, ROWS-row block, BLOCK_W-column block) x (BLOCK_C-channel block). For each filter
    column j (a loop, so that only one column's KH taps are live in registers), input row r of the tile
    (r = 0 .. ROWS + KH - 2, unrolled) is loaded once and feeds output row o with filter row i = r - o:
    all static, so each of the ROWS accumulators gets exactly its KH taps per column.
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    w_blocks = tl.cdiv(WO, BLOCK_W)
    h_blocks = tl.cdiv(HO, ROWS)
    wb = pid % w_blocks
    hb = (pid // w_blocks) % h_blocks
    n = pid // (w_blocks * h_blocks)
    h0 = hb * ROWS
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = X + n.to(tl.int64) * sxn + (offs_c * sxc)[None, :]
    h0w = h0 + 0 * offs_w  # the first row's index as a tensor (the interpreter mishandles scalar & tensor masks)

    acc0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for j in range(KW):
        iw = offs_w + (j - PW)
        col_ok = (iw >= 0) & (iw < W)
        x_col = x_base + (iw * sxw)[:, None]
        w_col = WT + j * C
        for r in tl.static_range(ROWS + KH - 1):
            ih = h0w + (r - PH)  # as a tensor: the interpreter mishandles scalar & tensor conditions
            mask = (col_ok & (ih >= 0) & (ih < H))[:, None] & mask_c[None, :]
            x = tl.load(x_col + (h0 + r - PH).to(tl.int64) * sxh, mask=mask, other=0.0).to(tl.float32)
            # output row o uses filter row r - o; the conditions are on constexprs, resolved at compile time
            if r < KH:
                acc0 += x * tl.load(w_col + ((r) * KW) * C + offs_c, mask=mask_c, other=0.0)[None, :]
            if ROWS > 1:
                if r >= 1 and r - 1 < KH:
                    acc1 += x * tl.load(w_col + ((r - 1) * KW) * C + offs_c, mask=mask_c, other=0.0)[None, :]
            if ROWS > 2:
                if r >= 2 and r - 2 < KH:
                    acc2 += x * tl.load(w_col + ((r - 2) * KW) * C + offs_c, mask=mask_c, other=0.0)[None, :]
            if ROWS > 3:
                if r >= 3 and r - 3 < KH:
                    acc3 += x * tl.load(w_col + ((r - 3) * KW) * C + offs_c, mask=mask_c, other=0.0)[None, :]

    if HAS_BIAS:
        b = tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        acc0 += b
        acc1 += b
        acc2 += b
        acc3 += b
    y_base = Y + n.to(tl.int64) * syn + (offs_c * syc)[None, :] + (offs_w * syw)[:, None]
    mask_c = mask_c[None, :]
    col_ok = offs_w < WO
    tl.store(y_base + h0.to(tl.int64) * syh, acc0.to(Y.dtype.element_ty),
             mask=(col_ok & (h0w < HO))[:, None] & mask_c)
    if ROWS > 1:
        tl.store(y_base + (h0 + 1).to(tl.int64) * syh, acc1.to(Y.dtype.element_ty),
                 mask=(col_ok & (h0w + 1 < HO))[:, None] & mask_c)
    if ROWS > 2:
        tl.store(y_base + (h0 + 2).to(tl.int64) * syh, acc2.to(Y.dtype.element_ty),
                 mask=(col_ok & (h0w + 2 < HO))[:, None] & mask_c)
    if ROWS > 3:
        tl.store(y_base + (h0 + 3).to(tl.int64) * syh, acc3.to(Y.dtype.element_ty),
                 mask=(col_ok & (h0w + 3 < HO))[:, None] & mask_c)


@triton.jit
def _wgrad_kernel(
    X,  # *[N, C, H, W] input, any strides
    DY,  # *[N, C, HO, WO] output gradient, any strides
    PART,  # *[splits, C * KH * KW] fp32 partial sums of the weight gradient
    DB_PART,  # *[splits, C] fp32 partial sums of the bias gradient (written when HAS_BIAS)
    C, H, W, HO, WO, PH, PW,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    rows,  # N * HO
    rows_per_split,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """PART[s, c * KH * KW + i * KW + j] = sum over the split's output rows (n, oh) and columns ow of
    X[n, c, oh + i - PH, ow + j - PW] * DY[n, c, oh, ow]. Program (filter row i (fastest), channel
    block, split s); the column shifts j = 0 .. KW - 1 of filter row i are handled in groups of up to 8
    (the grid's first dimension is KH * cdiv(KW, 8)), one accumulator each."""
    pid0 = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    j_groups: tl.constexpr = (KW + 7) // 8
    i = pid0 // j_groups
    j0 = (pid0 % j_groups) * 8
    offs_w = tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_c_x = (offs_c * sxc)[None, :]
    offs_c_y = (offs_c * syc)[None, :]

    a0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    a4 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    a5 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    a6 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    a7 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # bias gradient, stored by the pid0 == 0 programs
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows)
    for row in range(row_start, row_end):
        n = row // HO
        oh = row - n * HO
        ih = oh + i - PH
        dy_row = DY + n.to(tl.int64) * syn + oh.to(tl.int64) * syh + offs_c_y
        x_row = X + n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + offs_c_x
        ihw = ih + 0 * offs_w  # as a tensor: the interpreter mishandles scalar & tensor conditions
        row_ok = ((ihw >= 0) & (ihw < H))[:, None]
        for w0 in range(0, WO, BLOCK_W):
            ow = w0 + offs_w
            mask_dy = (ow < WO)[:, None] & mask_c[None, :]
            dy = tl.load(dy_row + (ow * syw)[:, None], mask=mask_dy, other=0.0).to(tl.float32)
            if HAS_BIAS:
                db += dy
            mask_rc = mask_dy & row_ok
            iw_base = ow + j0
            iw = iw_base + (0 - PW)
            x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
            a0 += x.to(tl.float32) * dy
            if KW > 1:
                iw = iw_base + (1 - PW)
                x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
                a1 += x.to(tl.float32) * dy
            if KW > 2:
                iw = iw_base + (2 - PW)
                x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
                a2 += x.to(tl.float32) * dy
            if KW > 3:
                iw = iw_base + (3 - PW)
                x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
                a3 += x.to(tl.float32) * dy
            if KW > 4:
                iw = iw_base + (4 - PW)
                x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
                a4 += x.to(tl.float32) * dy
            if KW > 5:
                iw = iw_base + (5 - PW)
                x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
                a5 += x.to(tl.float32) * dy
            if KW > 6:
                iw = iw_base + (6 - PW)
                x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
                a6 += x.to(tl.float32) * dy
            if KW > 7:
                iw = iw_base + (7 - PW)
                x = tl.load(x_row + (iw * sxw)[:, None], mask=mask_rc & ((iw >= 0) & (iw < W))[:, None], other=0.0)
                a7 += x.to(tl.float32) * dy

    # the taps j0 + 0 .. j0 + 7 of filter row i; the ones past KW are not stored
    taps = KH * KW
    j0c = j0 + 0 * offs_c  # as a tensor (the interpreter mishandles scalar & tensor masks)
    out = PART + split.to(tl.int64) * C * taps + offs_c * taps + i * KW + j0
    tl.store(out, tl.sum(a0, axis=0), mask=mask_c)
    if KW > 1:
        tl.store(out + 1, tl.sum(a1, axis=0), mask=mask_c & (j0c + 1 < KW))
    if KW > 2:
        tl.store(out + 2, tl.sum(a2, axis=0), mask=mask_c & (j0c + 2 < KW))
    if KW > 3:
        tl.store(out + 3, tl.sum(a3, axis=0), mask=mask_c & (j0c + 3 < KW))
    if KW > 4:
        tl.store(out + 4, tl.sum(a4, axis=0), mask=mask_c & (j0c + 4 < KW))
    if KW > 5:
        tl.store(out + 5, tl.sum(a5, axis=0), mask=mask_c & (j0c + 5 < KW))
    if KW > 6:
        tl.store(out + 6, tl.sum(a6, axis=0), mask=mask_c & (j0c + 6 < KW))
    if KW > 7:
        tl.store(out + 7, tl.sum(a7, axis=0), mask=mask_c & (j0c + 7 < KW))
    if HAS_BIAS:
        tl.store(DB_PART + split.to(tl.int64) * C + offs_c, tl.sum(db, axis=0), mask=mask_c & (j0c + i == 0))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when x's channels are its innermost dim (as torch's convolutions decide), else NCHW."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _empty(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype, memory_format=_memory_format(like))


def _check_image_offsets(**tensors: Tensor) -> None:
    """The kernels offset images and rows in 64 bits but channels and columns within an image in 32:
    refuse (rather than wrap) a tensor whose channel and column offsets reach 2^31 elements, e.g. one
    NCHW image of 2^31 elements or more; in channels_last they stay below C * W."""
    for name, t in tensors.items():
        span = (t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[3] - 1) * abs(t.stride(3))
        if span >= 2**31:
            raise ValueError(f"depthwise_conv2d: {name} {tuple(t.shape)} with strides {t.stride()} spans {span} "
                             "elements over its channels and columns, past the kernels' 32-bit offsets within "
                             "an image; pass it as channels_last (x.contiguous(memory_format=torch.channels_last))")


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], ph: int, pw: int, ho: int, wo: int,
          flip: bool, like: Tensor) -> Tensor:
    """The convolution of x (N, C, H, W) to (N, C, ho, wo) in like's memory format and dtype."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    y = _empty((n, c, ho, wo), like, like.dtype)
    if y.numel() == 0:
        return y
    _check_image_offsets(x=x, output=y)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # C values
    # The (KH * KW, C) fp32 tap table, so that each tap of a channel block is one contiguous vector load:
    # C * KH * KW values, cast and transposed in one copy. Rotating the filter by 180 degrees (the input
    # gradient) reverses its flattened taps.
    taps = weight.reshape(c, kh * kw)
    table = torch.empty((kh * kw, c), device=x.device, dtype=torch.float32)
    table.copy_((taps.flip(1) if flip else taps).t())
    block_w, block_c = _tile(wo, c)
    grid = (n * triton.cdiv(ho, _ROWS) * triton.cdiv(wo, block_w), triton.cdiv(c, block_c))
    launch(
        _conv_kernel, grid,
        x, table, bias if bias is not None else table, y, c, h, w, ho, wo, ph, pw, *x.stride(), *y.stride(),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, ROWS=_ROWS, BLOCK_W=block_w, BLOCK_C=block_c,
        num_warps=_CONV_WARPS)
    return y


def _wgrad_splits(rows: int, programs_per_split: int, partial_row_bytes: int, device: torch.device) -> int:
    """Splits of the N * HO output rows: about _WGRAD_PROGRAMS_PER_SM programs per SM, at least one row
    each, and at most _PART_BYTES of partials."""
    wanted = triton.cdiv(_WGRAD_PROGRAMS_PER_SM * sm_count(device), programs_per_split)
    return max(1, min(wanted, rows, _PART_BYTES // partial_row_bytes, 65535))


def _wgrad(x: Tensor, dy: Tensor, kh: int, kw: int, ph: int, pw: int, weight_dtype: torch.dtype,
           bias_dtype: Optional[torch.dtype], splits: Optional[int] = None):
    """(d_weight (C, 1, kh, kw) in weight_dtype, d_bias (C,) in bias_dtype or None), fixed-order sums."""
    n, c, h, w = x.shape
    ho, wo = dy.shape[-2:]
    rows = n * ho
    has_db = bias_dtype is not None
    if rows == 0 or wo == 0:
        dw = torch.zeros((c, 1, kh, kw), device=x.device, dtype=weight_dtype)
        return dw, (torch.zeros(c, device=x.device, dtype=bias_dtype) if has_db else None)
    _check_image_offsets(x=x, output_gradient=dy)
    block_w, block_c = _tile(wo, c)
    j_groups = triton.cdiv(kw, 8)
    taps = kh * kw
    if splits is None:
        splits = _wgrad_splits(rows, kh * j_groups * triton.cdiv(c, block_c), c * (taps + 1) * 4, x.device)
    rows_per_split = triton.cdiv(rows, splits)
    splits = triton.cdiv(rows, rows_per_split)  # no empty split
    part = torch.empty((splits, c * taps), device=x.device, dtype=torch.float32)
    db_part = torch.empty((splits, c), device=x.device, dtype=torch.float32) if has_db else part
    launch(
        _wgrad_kernel, (kh * j_groups, triton.cdiv(c, block_c), splits),
        x, dy, part, db_part, c, h, w, ho, wo, ph, pw, *x.stride(), *dy.stride(), rows, rows_per_split,
        KH=kh, KW=kw, HAS_BIAS=has_db, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=_WGRAD_WARPS)
    dw = torch.empty((c, 1, kh, kw), device=x.device, dtype=weight_dtype)
    launch(
        sum_partials_kernel, (triton.cdiv(c * taps, SUM_BLOCK_N), 1),
        part, dw, dw, splits, c * taps, BLOCK_G=SUM_BLOCK_G, BLOCK_N=SUM_BLOCK_N, num_warps=_SUM_WARPS)
    db = None
    if has_db:
        db = torch.empty(c, device=x.device, dtype=bias_dtype)
        launch(
            sum_partials_kernel, (triton.cdiv(c, SUM_BLOCK_N), 1),
            db_part, db, db, splits, c, BLOCK_G=SUM_BLOCK_G, BLOCK_N=SUM_BLOCK_N, num_warps=_SUM_WARPS)
    return dw, db


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
def _out_size(x: Tensor, weight: Tensor, ph: int, pw: int) -> tuple[int, int]:
    kh, kw = weight.shape[-2:]
    return x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1


@torch.library.custom_op("tritonforge::depthwise_conv2d_forward", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], ph: int, pw: int) -> Tensor:
    ho, wo = _out_size(x, weight, ph, pw)
    return _conv(x, weight, bias, ph, pw, ho, wo, flip=False, like=x)


@_forward_op.register_fake
def _(x, weight, bias, ph, pw):
    return _empty((x.shape[0], x.shape[1], *_out_size(x, weight, ph, pw)), x, x.dtype)


_NONE = (0,)


@torch.library.custom_op("tritonforge::depthwise_conv2d_backward", mutates_args=())
def _backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, ph: int, pw: int, need_x: bool,
                 need_weight: bool, bias_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_x, d_weight, d_bias)``, each empty unless asked for (``need_*``, a dtype for d_bias)."""
    kh, kw = weight.shape[-2:]
    dx = dw = db = None
    if need_x:  # the forward kernel on grad_out with the flipped filter and the complementary padding
        dx = _conv(grad_out, weight, None, kh - 1 - ph, kw - 1 - pw, x.shape[2], x.shape[3], flip=True, like=x)
    if need_weight or bias_dtype is not None:
        dw, db = _wgrad(x, grad_out, kh, kw, ph, pw, weight.dtype, bias_dtype)
    return (dx if dx is not None else x.new_empty(_NONE), dw if need_weight else x.new_empty(_NONE),
            db if db is not None else x.new_empty(_NONE))


@_backward_op.register_fake
def _(grad_out, x, weight, ph, pw, need_x, need_weight, bias_dtype):
    return (_empty(x.shape, x, x.dtype) if need_x else x.new_empty(_NONE),
            weight.new_empty(weight.shape) if need_weight else x.new_empty(_NONE),
            x.new_empty((x.shape[1],), dtype=bias_dtype) if bias_dtype is not None else x.new_empty(_NONE))


def _setup_context(ctx, inputs, output):
    x, weight, bias, ph, pw = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = (ph, pw)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = _backward_op(grad_out, x, weight, *ctx.padding, need_x, need_w,
                              ctx.bias_dtype if need_b else None)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _pair(padding, name: str, kernel: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    if padding == "same":  # F.conv2d's: symmetric for odd filters (asymmetric, for even ones, is not supported)
        if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
            raise ValueError(f"depthwise_conv2d: {name}='same' with the even filter {kernel[0]}x{kernel[1]} pads "
                             "unequally on the two sides, which the Triton kernel does not; pass the padding "
                             "as numbers or use torch.nn.functional.conv2d")
        return (kernel[0] - 1) // 2, (kernel[1] - 1) // 2
    if isinstance(padding, bool) or not isinstance(padding, (int, tuple, list)):
        raise TypeError(f"depthwise_conv2d: {name} must be an int, a pair of ints, 'same' or 'valid', "
                        f"got {padding!r}")
    pair = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pair):
        raise TypeError(f"depthwise_conv2d: {name} must be an int, a pair of ints, 'same' or 'valid', "
                        f"got {padding!r}")
    if min(pair) < 0:
        raise ValueError(f"depthwise_conv2d: {name} must be >= 0, got {padding!r}")
    return pair


def _validate(x, weight, bias, padding) -> tuple[int, int]:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name != "bias":
            raise TypeError(f"depthwise_conv2d: {name} must be a tensor, got None")
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"depthwise_conv2d: {name} must be a tensor, got {type(t).__name__}")
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"depthwise_conv2d: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t is not None and t.device != x.device:
            raise ValueError(f"depthwise_conv2d: {name} is on {t.device} but x is on {x.device}")
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv2d: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c == 0:
        raise ValueError(f"depthwise_conv2d: x has no channels (shape {tuple(x.shape)})")
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d: weight has shape {tuple(weight.shape)} but must be (C, 1, KH, KW) "
                         f"with C = {c}, x's channels (one filter per channel, groups = C)")
    kh, kw = weight.shape[-2:]
    if not (1 <= kh <= _MAX_KERNEL and 1 <= kw <= _MAX_KERNEL):
        raise ValueError(f"depthwise_conv2d: filters of {kh}x{kw}; the Triton kernel takes 1 to {_MAX_KERNEL} "
                         "per side (use torch.nn.functional.conv2d for larger ones)")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"depthwise_conv2d: bias has shape {tuple(bias.shape)} but must be ({c},)")
    ph, pw = _pair(padding, "padding", (kh, kw))
    ho, wo = _out_size(x, weight, ph, pw)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"depthwise_conv2d: a {kh}x{kw} filter with padding {(ph, pw)} does not fit the "
                         f"{x.shape[2]}x{x.shape[3]} input (output would be {ho}x{wo})")
    return ph, pw


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     padding: Union[int, tuple[int, int], str] = 0) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=C)``, stride 1, as Triton kernels.

    Args:
        x: (N, C, H, W); float16, bfloat16 or float32; any strides (channels_last is the fast layout).
            Under autocast an fp32 ``x`` is cast to the autocast dtype, as ``F.conv2d`` does.
        weight: (C, 1, KH, KW), ``nn.Conv2d(C, C, (KH, KW), groups=C)``'s layout, up to 15 x 15; any
            of the three dtypes (read in it: fp32 master weights need no cast copy).
        bias: (C,) or None.
        padding: zeros added on each side, an int or (ph, pw); or ``"valid"`` (none) or ``"same"``
            (odd filters: the output keeps the input's size), as ``F.conv2d`` takes them.
    Returns:
        (N, C, H + 2 ph - KH + 1, W + 2 pw - KW + 1) in x's dtype and memory format. Differentiable in
        x, weight and bias; each gradient comes back in its input's dtype.
    """
    ph, pw = _validate(x, weight, bias, padding)
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if not (x.is_cuda or INTERPRET):
        y = F.conv2d(x.float(), weight.float(), bias.float() if bias is not None else None,
                     padding=(ph, pw), groups=x.shape[1])
        return y.to(x.dtype)
    return _forward_op(x, weight, bias, ph, pw)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
# (activation dtype, parameter dtype) of the variants compiled: bf16 activations with fp32 master weights
# (autocast training) and fp32 throughout (testing). fp16 compiles to the bf16 code but for its conversions.
_AOT_DTYPES = (("bf16", "fp32"), ("fp32", "fp32"))
# (output width, channels) of ConvNeXt-T's stages, one per tile shape (see _tile): 56 x 96, 14 x 384, 7 x 768
_AOT_SHAPES = ((56, 96), (14, 384), (7, 768))


def aot_variants() -> list[Variant]:
    """ConvNeXt's 7 x 7 filter with bias: the forward and the input gradient (the rotated filter, no bias)
    at each tile shape for the autocast dtypes, the weight gradient likewise, and the forward and weight
    gradient in fp32 at one tile. Channels_last layout: the channel stride is 1 (specialized); pointers, C and the other
    strides are 16-aligned at ConvNeXt's widths (C = 96 * 2^i), the padding and W are not."""
    variants = []
    conv_strides = ("sxn", "sxh", "sxw", "syn", "syh", "syw")
    for dt, pdt in _AOT_DTYPES:
        shapes = _AOT_SHAPES if dt == "bf16" else _AOT_SHAPES[:1]
        for width, channels in shapes:
            block_w, block_c = _tile(width, channels, interpret=False)
            for flip in ((False, True) if dt == "bf16" else (False,)):
                variants.append(Variant(
                    kernel=_conv_kernel, name=f"{dt} params={pdt} 7x7 {block_w}x{block_c}"
                                              f"{' input-grad' if flip else ''}",
                    signature={"X": f"*{dt}", "WT": "*fp32", "BIAS": f"*{pdt}", "Y": f"*{dt}", "C": "i32",
                               "H": "i32", "W": "i32", "HO": "i32", "WO": "i32", "PH": "i32", "PW": "i32",
                               "sxn": "i32", "sxh": "i32", "sxw": "i32", "syn": "i32", "syh": "i32",
                               "syw": "i32"},
                    constexprs={"sxc": 1, "syc": 1, "KH": 7, "KW": 7,
                                "HAS_BIAS": not flip, "ROWS": _GPU_ROWS, "BLOCK_W": block_w, "BLOCK_C": block_c},
                    num_warps=_CONV_WARPS, num_stages=1, kind="memory",
                    aligned=("X", "WT", "BIAS", "Y", "C", *conv_strides)))
            variants.append(Variant(
                kernel=_wgrad_kernel, name=f"{dt} 7x7 {block_w}x{block_c}",
                signature={"X": f"*{dt}", "DY": f"*{dt}", "PART": "*fp32", "DB_PART": "*fp32", "C": "i32",
                           "H": "i32", "W": "i32", "HO": "i32", "WO": "i32", "PH": "i32", "PW": "i32",
                           "sxn": "i32", "sxh": "i32", "sxw": "i32", "syn": "i32", "syh": "i32", "syw": "i32",
                           "rows": "i32", "rows_per_split": "i32"},
                constexprs={"sxc": 1, "syc": 1, "KH": 7, "KW": 7, "HAS_BIAS": True, "BLOCK_W": block_w,
                            "BLOCK_C": block_c},
                num_warps=_WGRAD_WARPS, num_stages=1, kind="memory", vector_stores=False,
                aligned=("X", "DY", "PART", "DB_PART", "C", *conv_strides)))
    return variants
