"""Fused multi-tensor optimizer steps: AdamW, SGD (momentum, Nesterov) and Lion.

``AdamW``, ``SGD``, ``Lion`` take their torch counterparts' arguments (Lion: the paper's) and write state
dicts with torch's keys, plus ``max_grad_norm`` (global L2 clipping inside the step, as
``clip_grad_norm_``) and ``master_weights`` (bf16/fp16 parameters with an fp32 copy in the same pass).
Nothing in ``step()`` waits for the device: the trainer may set ``opt.grad_scale`` (the loss scale the
gradients carry) and ``opt.skip`` (a device flag, nonzero to skip the step: a non-finite loss, whose
gradients need not show it); afterwards ``opt.grad_norm`` (before clipping) and ``opt.found_inf`` (the
gradients held inf/NaN) are device tensors, and when either flag was set nothing was written. Per
element, g unscaled and clipped:

    AdamW: p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g
           p += -(lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
    SGD:   d = g + wd*p;  buf = momentum*buf + (1-dampening)*d;  d = d + momentum*buf (Nesterov) or buf
    Lion:  c = b1*m + (1-b1)*g;  p = p*(1 - lr*wd) - lr*sign(c);  m = b2*m + (1-b2)*g

* A constant number of launches per step, whatever the number of tensors: the gradients' sum of squares
  and inf/NaN flags per chunk (only when clipping or unscaling), one finalize program (norm, clip factor,
  step counts, per-tensor coefficients with fp64 bias corrections), one update per bucket (tensors
  sharing a dtype and alignment). Int64 device tables hold each tensor's addresses; they are rebuilt
  only when a parameter's or gradient's address changes, and hyperparameters are copied to the device
  only when they change.
* The floor is the bytes: AdamW with clipping moves 32 B/param (4 for the norm pass, 28 for the update).
  Aligned buckets get ``tl.multiple_of`` hints so every stream is 128-bit; each chunk runs its full blocks
  unmasked and only its last block masked. Chunks of ``CHUNK`` elements amortize the table lookups.
* AdamW's denominator uses the fast square root and division (a few ulp from torch's IEEE ones, at far
  fewer registers).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TL_DTYPES
from ._fused import (CHUNK, FINALIZE_BLOCK_C, FINALIZE_BLOCK_T, FINALIZE_WARPS, NORM_BLOCK, NORM_WARPS,
                     UPDATE_BLOCK, UPDATE_WARPS, COEF_COLS as _COEF_COLS, COL_GRAD as _COL_GRAD,
                     COL_INDEX as _COL_INDEX, COL_MASTER as _COL_MASTER, COL_NUMEL as _COL_NUMEL,
                     COL_PARAM as _COL_PARAM, COL_STATE1 as _COL_STATE1, COL_STATE2 as _COL_STATE2,
                     DTYPES as _DTYPES, FusedOptimizer, HYPER_COLS as _HYPER_COLS,
                     H_BETA1 as _H_BETA1, H_BETA2 as _H_BETA2, H_EPS as _H_EPS, H_LR as _H_LR,
                     H_SIGN as _H_SIGN, H_WD as _H_WD, OPT_ADAMW as _ADAMW, OPT_LION as _LION,
                     OPT_SGD as _SGD, S_CLIP as _S_CLIP, S_FOUND_INF as _S_FOUND_INF,
                     S_INV_SCALE as _S_INV_SCALE, S_NORM as _S_NORM, S_SKIP as _S_SKIP,
                     TABLE_COLS as _TABLE_COLS, check_betas, fp32_like)
from .variant import Variant

__all__ = ["AdamW", "SGD", "Lion"]

# The tables' layout, block sizes and the optimizer step machinery are shared with Muon (``_fused``);
# the kernels below read the layout under the names they always used.


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``DTYPE`` (the parameter's dtype).

    bf16 is rounded with integer arithmetic on the fp32 bits (add 0x7FFF plus the lowest kept bit,
    drop 16 bits; NaN kept as NaN), which is exactly what ``cvt.rn.bf16.f32`` does on the GPU; the
    Triton interpreter's own fp32 -> bf16 cast truncates instead.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)
    else:
        return x.to(DTYPE)


@triton.jit
def _grad_sumsq_kernel(
    tensor_table,  # *int64 [T, _TABLE_COLS]: this bucket's tensors
    chunk_table,  # *int64 [C, 2]: (row in tensor_table, first element) of each program's chunk
    partial_ptr,  # *fp32 [2, n_total]: per chunk, sum of squares of unscaled grads; non-finite seen
    chunk_offset,  # index of this bucket's first chunk among all buckets' chunks
    n_total,  # number of chunks of all buckets
    grad_scale_ptr,  # *fp32 [1]: loss scale the gradients carry
    grad_like,  # *grad dtype: unused tensor whose pointer type is the gradients' element type
    ALIGNED: tl.constexpr,  # every gradient address is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per loop iteration
    CHUNK: tl.constexpr,  # elements per program
):
    """partial[c] = sum((g / grad_scale)^2) over chunk c, flag[c] = 1 if the chunk holds inf/NaN.

    Memory: reads each gradient once (4 bytes/param for fp32, 2 for bf16/fp16), writes 8 bytes per
    chunk. Squares are accumulated in fp32 per lane, then summed across the block.
    """
    pid = tl.program_id(0)
    row = tl.load(chunk_table + pid * 2)
    start = tl.load(chunk_table + pid * 2 + 1)
    entry = tensor_table + row * _TABLE_COLS
    g_ptr = tl.load(entry + _COL_GRAD).to(grad_like.dtype)
    numel = tl.load(entry + _COL_NUMEL)
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
        start = tl.multiple_of(start, CHUNK)
    inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    end = tl.minimum(start + CHUNK, numel)
    full_end = start + (end - start) // BLOCK * BLOCK

    sumsq = tl.zeros((BLOCK,), tl.float32)
    bad = tl.zeros((BLOCK,), tl.int32)
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
                g = tl.load(g_ptr + offs, mask=offs < hi, other=0.0).to(tl.float32)
            else:
                g = tl.load(g_ptr + offs).to(tl.float32)
            bad = tl.maximum(bad, ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32))
            g = g * inv_scale
            sumsq += g * g
    tl.store(partial_ptr + chunk_offset + pid, tl.sum(sumsq, axis=0))
    tl.store(partial_ptr + n_total + chunk_offset + pid, tl.max(bad, axis=0).to(tl.float32))


@triton.jit
def _finalize_kernel(
    partial_ptr,  # *fp32 [2, n_chunks]: the norm pass's partials (read when HAS_NORM)
    n_chunks,  # number of partials
    tensor_info,  # *int64 [T, 2]: (address of the fp32 step counter or 0, group index) per tensor
    n_tensors,  # T
    hyper_ptr,  # *fp64 [G, _HYPER_COLS]: per-group hyperparameters
    coef_ptr,  # *fp32 [T, _COEF_COLS]: out, per-tensor coefficients of the update
    scalars_ptr,  # *fp32 [5]: out, grad norm, found_inf, 1/grad_scale, clip factor, skip
    grad_scale_ptr,  # *fp32 [1]: loss scale
    skip_ptr,  # *fp32 [1]: nonzero skips the step whatever the gradients (the caller's flag)
    max_grad_norm,  # fp32: clipping threshold, 0 for no clipping
    OPT: tl.constexpr,  # 0 AdamW, 1 SGD, 2 Lion
    HAS_NORM: tl.constexpr,  # the norm pass ran (clipping or loss scaling)
    BLOCK_C: tl.constexpr,  # partials per iteration
    BLOCK_T: tl.constexpr,  # tensors per iteration
):
    """One program: global norm, found_inf, clip factor, step counts and per-tensor coefficients.

    norm = sqrt(sum of partials) (fp64 sum); clip = min(1, max_grad_norm / (norm + 1e-6)) in fp32;
    skip = found_inf or the caller's flag; step counts (and SGD's buffer-age counts) += 1 - skip. Bias
    corrections 1 - b^t are computed in fp64 as 1 - exp(t * log(b)) and rounded once to fp32.
    Memory: 8 bytes per chunk, ~40 bytes per tensor; latency-bound, a few microseconds.
    """
    if HAS_NORM:
        sumsq = tl.zeros((BLOCK_C,), tl.float64)
        bad = tl.zeros((BLOCK_C,), tl.float32)
        for c0 in tl.range(0, n_chunks, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_chunks
            sumsq += tl.load(partial_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float64)
            bad = tl.maximum(bad, tl.load(partial_ptr + n_chunks + offs_c, mask=mask_c, other=0.0))
        norm = tl.sqrt_rn(tl.sum(sumsq, axis=0).to(tl.float32))
        found_inf = tl.max(bad, axis=0)
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
        clip = tl.minimum(tl.div_rn(max_grad_norm, norm + 1e-6), 1.0)
        clip = tl.where(max_grad_norm > 0.0, clip, 1.0)
    else:
        norm = tl.full((), 0.0, tl.float32)
        found_inf = tl.full((), 0.0, tl.float32)
        inv_scale = tl.full((), 1.0, tl.float32)
        clip = tl.full((), 1.0, tl.float32)
    tl.store(scalars_ptr + _S_NORM, norm)
    tl.store(scalars_ptr + _S_FOUND_INF, found_inf)
    tl.store(scalars_ptr + _S_INV_SCALE, inv_scale)
    tl.store(scalars_ptr + _S_CLIP, clip)
    skip = tl.maximum(found_inf, (tl.load(skip_ptr) != 0.0).to(tl.float32))
    tl.store(scalars_ptr + _S_SKIP, skip)
    live = 1.0 - skip  # 1 when the step is taken

    for t0 in tl.range(0, n_tensors, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_tensors
        group = tl.load(tensor_info + offs_t * 2 + 1, mask=mask_t, other=0)
        hyper = hyper_ptr + group * _HYPER_COLS
        lr = tl.load(hyper + _H_LR, mask=mask_t, other=0.0)
        wd = tl.load(hyper + _H_WD, mask=mask_t, other=0.0)
        h1 = tl.load(hyper + _H_BETA1, mask=mask_t, other=0.5)
        h2 = tl.load(hyper + _H_BETA2, mask=mask_t, other=0.5)
        coef = coef_ptr + offs_t * _COEF_COLS
        if OPT == 2:  # Lion: no step count
            tl.store(coef + 0, (1.0 - lr * wd).to(tl.float32), mask=mask_t)
            tl.store(coef + 1, h1.to(tl.float32), mask=mask_t)
            tl.store(coef + 2, (1.0 - h1).to(tl.float32), mask=mask_t)
            tl.store(coef + 3, h2.to(tl.float32), mask=mask_t)
            tl.store(coef + 4, (1.0 - h2).to(tl.float32), mask=mask_t)
            tl.store(coef + 5, (-lr).to(tl.float32), mask=mask_t)
        else:
            counter = tl.load(tensor_info + offs_t * 2, mask=mask_t, other=0)
            counter = counter.to(tl.pointer_type(tl.float32))
            done = tl.load(counter, mask=mask_t, other=0.0)
            tl.store(counter, done + live, mask=mask_t)
            h3 = tl.load(hyper + _H_EPS, mask=mask_t, other=0.0)
            sign = tl.load(hyper + _H_SIGN, mask=mask_t, other=1.0)
            tl.store(coef + 0, sign.to(tl.float32), mask=mask_t)
            if OPT == 0:  # AdamW: h1, h2, h3 = beta1, beta2, eps
                step = (done + 1.0).to(tl.float64)  # the step being taken (unused when skipped)
                bias1 = 1.0 - tl.exp(step * tl.log(h1))
                bias2 = 1.0 - tl.exp(step * tl.log(h2))
                tl.store(coef + 1, (1.0 - lr * wd).to(tl.float32), mask=mask_t)
                tl.store(coef + 2, (1.0 - h1).to(tl.float32), mask=mask_t)
                tl.store(coef + 3, h2.to(tl.float32), mask=mask_t)
                tl.store(coef + 4, (1.0 - h2).to(tl.float32), mask=mask_t)
                tl.store(coef + 5, (-(lr / bias1)).to(tl.float32), mask=mask_t)
                tl.store(coef + 6, (1.0 / tl.sqrt(bias2)).to(tl.float32), mask=mask_t)
                tl.store(coef + 7, h3.to(tl.float32), mask=mask_t)
            else:  # SGD: h1, h2, h3 = momentum, dampening, nesterov; a new buffer takes d as is
                keep = tl.where(done == 0.0, 1.0, 1.0 - h2)
                tl.store(coef + 1, wd.to(tl.float32), mask=mask_t)
                tl.store(coef + 2, h1.to(tl.float32), mask=mask_t)
                tl.store(coef + 3, keep.to(tl.float32), mask=mask_t)
                tl.store(coef + 4, h3.to(tl.float32), mask=mask_t)
                tl.store(coef + 5, (-lr).to(tl.float32), mask=mask_t)


@triton.jit
def _adamw_update_kernel(
    tensor_table,  # *int64 [T, _TABLE_COLS]: this bucket's tensors
    chunk_table,  # *int64 [C, 2]: (row in tensor_table, first element) per program
    coef_ptr,  # *fp32 [T_all, _COEF_COLS]: per-tensor coefficients from the finalize kernel
    scalars_ptr,  # *fp32 [5]: grad norm, found_inf, 1/grad_scale, clip factor, skip
    param_like,  # *param dtype: unused tensor whose pointer type is the parameters' element type
    HAS_MASTER: tl.constexpr,  # parameters are bf16/fp16 with an fp32 master copy
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per loop iteration
    CHUNK: tl.constexpr,  # elements per program
):
    """AdamW on one chunk: p = p*(1-lr*wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).

    Memory, per element: fp32 reads g, p, m, v and writes p, m, v (28 bytes); with master weights
    reads g (2), master, m, v and writes master, m, v and p (2): 28 bytes. Nothing when skipped.
    """
    pid = tl.program_id(0)
    row = tl.load(chunk_table + pid * 2)
    start = tl.load(chunk_table + pid * 2 + 1)
    entry = tensor_table + row * _TABLE_COLS
    p_ptr = tl.load(entry + _COL_PARAM).to(param_like.dtype)
    g_ptr = tl.load(entry + _COL_GRAD).to(param_like.dtype)
    m_ptr = tl.load(entry + _COL_STATE1).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(entry + _COL_STATE2).to(tl.pointer_type(tl.float32))
    if HAS_MASTER:
        w_ptr = tl.load(entry + _COL_MASTER).to(tl.pointer_type(tl.float32))
    else:
        w_ptr = p_ptr
    numel = tl.load(entry + _COL_NUMEL)
    coef = coef_ptr + tl.load(entry + _COL_INDEX) * _COEF_COLS
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        start = tl.multiple_of(start, CHUNK)
    sign = tl.load(coef + 0)
    decay = tl.load(coef + 1)
    w1 = tl.load(coef + 2)  # lerp weight 1 - beta1
    beta2 = tl.load(coef + 3)
    w2 = tl.load(coef + 4)  # 1 - beta2
    neg_step_size = tl.load(coef + 5)
    inv_bias2_sqrt = tl.load(coef + 6)
    eps = tl.load(coef + 7)
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
            g = g * inv_scale * clip * sign  # unscale, clip, maximize: torch's order of rounding
            p = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=mask)
            v = tl.load(v_ptr + offs, mask=mask)
            p = p * decay
            m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))  # torch's lerp
            v = v * beta2 + w2 * g * g
            denom = tl.sqrt(v) * inv_bias2_sqrt + eps
            p = p + neg_step_size * m / denom
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            if HAS_MASTER:
                tl.store(w_ptr + offs, p, mask=mask)
            tl.store(p_ptr + offs, _round_to(p, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sgd_update_kernel(
    tensor_table,  # *int64 [T, _TABLE_COLS]: this bucket's tensors
    chunk_table,  # *int64 [C, 2]: (row in tensor_table, first element) per program
    coef_ptr,  # *fp32 [T_all, _COEF_COLS]: per-tensor coefficients from the finalize kernel
    scalars_ptr,  # *fp32 [5]: grad norm, found_inf, 1/grad_scale, clip factor, skip
    param_like,  # *param dtype: unused tensor whose pointer type is the parameters' element type
    HAS_MASTER: tl.constexpr,  # parameters are bf16/fp16 with an fp32 master copy
    HAS_MOMENTUM: tl.constexpr,  # the bucket's groups have momentum != 0 (a momentum buffer)
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per loop iteration
    CHUNK: tl.constexpr,  # elements per program
):
    """SGD on one chunk: d = g + wd*p; buf = mu*buf + (1-dampening)*d; d = d + mu*buf or buf;
    p = p - lr*d.

    Memory, per element (fp32): reads g, p (+ buf), writes p (+ buf): 12 bytes, 20 with momentum;
    master weights add the 2-byte parameter write and halve the gradient read.
    """
    pid = tl.program_id(0)
    row = tl.load(chunk_table + pid * 2)
    start = tl.load(chunk_table + pid * 2 + 1)
    entry = tensor_table + row * _TABLE_COLS
    p_ptr = tl.load(entry + _COL_PARAM).to(param_like.dtype)
    g_ptr = tl.load(entry + _COL_GRAD).to(param_like.dtype)
    b_ptr = tl.load(entry + _COL_STATE1).to(tl.pointer_type(tl.float32))
    if HAS_MASTER:
        w_ptr = tl.load(entry + _COL_MASTER).to(tl.pointer_type(tl.float32))
    else:
        w_ptr = p_ptr
    numel = tl.load(entry + _COL_NUMEL)
    coef = coef_ptr + tl.load(entry + _COL_INDEX) * _COEF_COLS
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        start = tl.multiple_of(start, CHUNK)
    sign = tl.load(coef + 0)
    wd = tl.load(coef + 1)
    momentum = tl.load(coef + 2)
    keep = tl.load(coef + 3)  # 1 - dampening, or 1 on the buffer's first step
    nesterov = tl.load(coef + 4) != 0.0
    neg_lr = tl.load(coef + 5)
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
            g = g * inv_scale * clip * sign
            p = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
            d = g + wd * p
            if HAS_MOMENTUM:
                buf = tl.load(b_ptr + offs, mask=mask)
                buf = buf * momentum + keep * d
                tl.store(b_ptr + offs, buf, mask=mask)
                d = tl.where(nesterov, d + momentum * buf, buf)
            p = p + neg_lr * d
            if HAS_MASTER:
                tl.store(w_ptr + offs, p, mask=mask)
            tl.store(p_ptr + offs, _round_to(p, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lion_update_kernel(
    tensor_table,  # *int64 [T, _TABLE_COLS]: this bucket's tensors
    chunk_table,  # *int64 [C, 2]: (row in tensor_table, first element) per program
    coef_ptr,  # *fp32 [T_all, _COEF_COLS]: per-tensor coefficients from the finalize kernel
    scalars_ptr,  # *fp32 [5]: grad norm, found_inf, 1/grad_scale, clip factor, skip
    param_like,  # *param dtype: unused tensor whose pointer type is the parameters' element type
    HAS_MASTER: tl.constexpr,  # parameters are bf16/fp16 with an fp32 master copy
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per loop iteration
    CHUNK: tl.constexpr,  # elements per program
):
    """Lion on one chunk: c = b1*m + (1-b1)*g; p = p*(1-lr*wd) - lr*sign(c); m = b2*m + (1-b2)*g.

    Memory, per element (fp32): reads g, p, m, writes p, m: 20 bytes.
    """
    pid = tl.program_id(0)
    row = tl.load(chunk_table + pid * 2)
    start = tl.load(chunk_table + pid * 2 + 1)
    entry = tensor_table + row * _TABLE_COLS
    p_ptr = tl.load(entry + _COL_PARAM).to(param_like.dtype)
    g_ptr = tl.load(entry + _COL_GRAD).to(param_like.dtype)
    m_ptr = tl.load(entry + _COL_STATE1).to(tl.pointer_type(tl.float32))
    if HAS_MASTER:
        w_ptr = tl.load(entry + _COL_MASTER).to(tl.pointer_type(tl.float32))
    else:
        w_ptr = p_ptr
    numel = tl.load(entry + _COL_NUMEL)
    coef = coef_ptr + tl.load(entry + _COL_INDEX) * _COEF_COLS
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        start = tl.multiple_of(start, CHUNK)
    decay = tl.load(coef + 0)
    beta1 = tl.load(coef + 1)
    w1 = tl.load(coef + 2)  # 1 - beta1
    beta2 = tl.load(coef + 3)
    w2 = tl.load(coef + 4)  # 1 - beta2
    neg_lr = tl.load(coef + 5)
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
            p = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=mask)
            c = m * beta1 + w1 * g
            direction = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))
            p = p * decay + neg_lr * direction
            m = m * beta2 + w2 * g
            tl.store(m_ptr + offs, m, mask=mask)
            if HAS_MASTER:
                tl.store(w_ptr + offs, p, mask=mask)
            tl.store(p_ptr + offs, _round_to(p, p_ptr.dtype.element_ty), mask=mask)


# The kernels Muon's step launches beside its own (its non-matrix parameters take the AdamW update).
round_to = _round_to
grad_sumsq_kernel = _grad_sumsq_kernel
finalize_kernel = _finalize_kernel
adamw_update_kernel = _adamw_update_kernel


def _check_nonnegative(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, Tensor) and not 0.0 <= value:
            raise ValueError(f"Invalid {name}: {value}")


def _reject(name: str, **flags: bool) -> None:
    for arg, value in flags.items():
        if value:
            raise ValueError(f"{name} does not support {arg}=True; use torch.optim.{name} for it")


class AdamW(FusedOptimizer):
    """AdamW (decoupled weight decay) in 2-3 fused launches per step; drop-in for
    ``torch.optim.AdamW``. ``foreach``, ``capturable`` and ``fused`` are accepted and have no effect
    (the step is always fused and keeps its step counts on the device); ``amsgrad=True`` and
    ``differentiable=True`` raise ``ValueError``. Extras: ``max_grad_norm``, ``master_weights``.
    """

    _OPT = _ADAMW
    _sumsq_kernel = _grad_sumsq_kernel
    _finalize_kernel = _finalize_kernel
    _update_kernel = _adamw_update_kernel

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False):
        _check_nonnegative(**{"learning rate": lr, "epsilon value": eps, "weight_decay value": weight_decay})
        check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults, max_grad_norm, master_weights)

    def _validate_group(self, group):
        _reject("AdamW", amsgrad=group["amsgrad"], differentiable=group["differentiable"])
        check_betas(group["betas"])
        super()._validate_group(group)

    def _init_state(self, p, group, state):
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = fp32_like(p)
            state["exp_avg_sq"] = fp32_like(p)

    def _state_tensors(self, p, group, state):
        return state["exp_avg"], state["exp_avg_sq"]

    def _counter(self, p, state):
        return state["step"]

    def _hyper_row(self, group):
        beta1, beta2 = group["betas"]
        return [group["lr"], group["weight_decay"], beta1, beta2, group["eps"],
                -1.0 if group["maximize"] else 1.0]


class SGD(FusedOptimizer):
    """SGD with momentum, dampening, Nesterov, weight decay and maximize, in 2-3 fused launches per
    step; drop-in for ``torch.optim.SGD`` (state: ``momentum_buffer`` when momentum != 0).
    ``foreach`` and ``fused`` have no effect; ``differentiable=True`` raises ``ValueError``.

    A buffer's first step takes the gradient as is (torch's rule). Whether a buffer has had its first
    step is a device count kept beside the state dict (set from the loaded state: a loaded buffer
    has). A buffer created by a step that was skipped is still zero, which is exact unless
    dampening != 0 and the state dict is handed to torch before the next step.
    """

    _OPT = _SGD
    _sumsq_kernel = _grad_sumsq_kernel
    _finalize_kernel = _finalize_kernel
    _update_kernel = _sgd_update_kernel

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, max_grad_norm: Optional[float] = None,
                 master_weights: bool = False):
        _check_nonnegative(**{"learning rate": lr, "momentum value": momentum,
                              "weight_decay value": weight_decay})
        self._buffer_age: dict[Tensor, Tensor] = {}
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, max_grad_norm, master_weights)

    def _validate_group(self, group):
        _reject("SGD", differentiable=group["differentiable"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super()._validate_group(group)

    def _has_momentum(self, group):
        return group["momentum"] != 0

    def _init_state(self, p, group, state):
        if p not in self._buffer_age:
            self._buffer_age[p] = torch.zeros((), dtype=torch.float32, device=p.device)
        if self._has_momentum(group) and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = fp32_like(p)
            self._buffer_age[p].zero_()

    def _state_tensors(self, p, group, state):
        return (state["momentum_buffer"] if self._has_momentum(group) else None), None

    def _counter(self, p, state):
        return self._buffer_age[p]

    def _after_load(self, p, state):
        started = state.get("momentum_buffer") is not None
        self._buffer_age[p] = torch.full((), float(started), dtype=torch.float32, device=p.device)

    def _hyper_row(self, group):
        return [group["lr"], group["weight_decay"], group["momentum"], group["dampening"],
                1.0 if group["nesterov"] else 0.0, -1.0 if group["maximize"] else 1.0]


class Lion(FusedOptimizer):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") in 2-3 fused
    launches per step. State: ``exp_avg``. Extras: ``max_grad_norm``, ``master_weights``."""

    _OPT = _LION
    _sumsq_kernel = _grad_sumsq_kernel
    _finalize_kernel = _finalize_kernel
    _update_kernel = _lion_update_kernel

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, max_grad_norm: Optional[float] = None,
                 master_weights: bool = False):
        _check_nonnegative(**{"learning rate": lr, "weight_decay value": weight_decay})
        for i, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        super().__init__(params, defaults, max_grad_norm, master_weights)

    def _init_state(self, p, group, state):
        if "exp_avg" not in state:
            state["exp_avg"] = fp32_like(p)

    def _state_tensors(self, p, group, state):
        return state["exp_avg"], None

    def _counter(self, p, state):
        return None

    def _hyper_row(self, group):
        beta1, beta2 = group["betas"]
        return [group["lr"], group["weight_decay"], beta1, beta2, 0.0, 1.0]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------


def aot_variants() -> list[Variant]:
    """Every configuration the launchers use: per kernel, parameter dtype, alignment and switch.

    Unaligned buckets list no aligned pointers: their data accesses are scalar by design.
    """
    variants = []
    table_ptrs = ("tensor_table", "chunk_table")
    for dtype in _DTYPES:
        ty = TL_DTYPES[dtype]
        for aligned in (True, False):
            tag = f"{ty} {'aligned' if aligned else 'unaligned'}"
            variants.append(Variant(
                kernel=_grad_sumsq_kernel, name=f"{tag} BLOCK={NORM_BLOCK}",
                signature={"tensor_table": "*i64", "chunk_table": "*i64", "partial_ptr": "*fp32",
                           "chunk_offset": "i32", "n_total": "i32", "grad_scale_ptr": "*fp32",
                           "grad_like": f"*{ty}"},
                constexprs={"ALIGNED": aligned, "BLOCK": NORM_BLOCK, "CHUNK": CHUNK},
                num_warps=NORM_WARPS, num_stages=1, kind="memory",
                aligned=(*table_ptrs, "partial_ptr", "grad_scale_ptr", "grad_like") if aligned else (),
                vector_stores=False))
            update_sig = {"tensor_table": "*i64", "chunk_table": "*i64", "coef_ptr": "*fp32",
                          "scalars_ptr": "*fp32", "param_like": f"*{ty}"}
            update_aligned = (*table_ptrs, "coef_ptr", "scalars_ptr", "param_like") if aligned else ()
            common = {"HAS_MASTER": dtype != torch.float32, "ALIGNED": aligned,
                      "BLOCK": UPDATE_BLOCK, "CHUNK": CHUNK}
            kernels = [(_adamw_update_kernel, {}), (_lion_update_kernel, {}),
                       (_sgd_update_kernel, {"HAS_MOMENTUM": True}),
                       (_sgd_update_kernel, {"HAS_MOMENTUM": False})]
            for kernel, extra in kernels:
                suffix = "" if not extra else (" momentum" if extra["HAS_MOMENTUM"] else " plain")
                variants.append(Variant(
                    kernel=kernel, name=f"{tag}{suffix} BLOCK={UPDATE_BLOCK}", signature=update_sig,
                    constexprs={**common, **extra}, num_warps=UPDATE_WARPS, num_stages=1,
                    kind="memory", aligned=update_aligned))
    for opt, label in ((_ADAMW, "adamw"), (_SGD, "sgd"), (_LION, "lion")):
        for has_norm in (True, False):
            # One program, latency-bound: its strided scalar loads are not judged as vector traffic.
            variants.append(Variant(
                kernel=_finalize_kernel, name=f"{label} {'norm' if has_norm else 'no norm'}",
                signature={"partial_ptr": "*fp32", "n_chunks": "i32", "tensor_info": "*i64",
                           "n_tensors": "i32", "hyper_ptr": "*fp64", "coef_ptr": "*fp32",
                           "scalars_ptr": "*fp32", "grad_scale_ptr": "*fp32", "skip_ptr": "*fp32",
                           "max_grad_norm": "fp32"},
                constexprs={"OPT": opt, "HAS_NORM": has_norm, "BLOCK_C": FINALIZE_BLOCK_C,
                            "BLOCK_T": FINALIZE_BLOCK_T},
                num_warps=FINALIZE_WARPS, num_stages=1, kind="memory", vector_stores=False))
    return variants
