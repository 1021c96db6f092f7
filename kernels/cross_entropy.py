"""Cross-entropy over a vocabulary as Triton kernels, and the language-model head fused with it.

``cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0, reduction="mean", softcap=0.0)``
is ``F.cross_entropy(logits.float(), targets)`` without the fp32 copy of bf16/fp16 logits: one program per
row (online log-sum-exp in fp32), its gradient written in the logits' dtype. ``softcap`` c > 0 scores the
soft-capped logits c·tanh(z / c), applied as the raw logits load (gradient times 1 - tanh²).

``linear_cross_entropy(x, weight, targets, bias=None, ...)`` is ``cross_entropy(F.linear(x, weight, bias),
targets)`` for a language model's head, whose logits are the largest activation (1.6 GB of bf16 at GPT-2's
vocabulary and 16k tokens). It holds at most ``chunk_size`` rows of logits; per chunk it

1. computes the logits with one matmul (cuBLAS),
2. runs the row kernel: the loss, then the row's gradient softmax - (1 - eps)·onehot - eps / V written
   over the logits in place,
3. turns that into the input gradient and adds the weight gradient (fp32 accumulator) and bias gradient.

The gradients are computed during the forward, where the logits are at hand; the backward only scales
them by the upstream gradient and the mean's 1 / N, in fp32: the rows' gradients are stored without
either (in [-1, 1]), so that in fp16 they do not underflow before an fp16 run's loss scale reaches them.
At GPT-2 small's head the matmuls are 6·N·d·V FLOPs and the row kernel reads each chunk's logits twice
and writes them once. Targets outside [0, V) that are not ignored raise on CPU tensors; on CUDA (a check
would cost a sync every step) their loss and their row of the gradient are NaN, which the trainer
reports (and skips the step). The custom ops keep ``torch.compile`` whole; off CUDA without
``TRITON_INTERPRET=1`` both functions run the PyTorch composition.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, launch
from .variant import Variant

__all__ = ["cross_entropy", "linear_cross_entropy"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCTIONS = ("mean", "sum", "none")
# Columns a program handles per step on a GPU, and in the interpreter (small, so that small tests cross
# several blocks and end in a ragged one).
_BLOCK_V_GPU = 4096
_BLOCK_V_INTERPRET = 128
# Logit elements per chunk of linear_cross_entropy (2**26: 128 MB in bf16), and the fewest rows a chunk
# gets however large the vocabulary (so that its matmuls stay large).
_CHUNK_ELEMENTS = 2 ** 26
_MIN_CHUNK_ROWS = 256
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # the lowest finite fp32
# The soft cap's tanh: below |u| = 0.9 (tanh 0.72) a polynomial, whose coefficients are below (see _tanh).
_TANH_SMALL = tl.constexpr(0.9)
_TANH_P0 = tl.constexpr(-0.33333221077919006)
_TANH_P1 = tl.constexpr(0.133305162191391)
_TANH_P2 = tl.constexpr(-0.05373034626245499)
_TANH_P3 = tl.constexpr(0.020926008000969887)
_TANH_P4 = tl.constexpr(-0.006884613540023565)
_TANH_P5 = tl.constexpr(0.0013142190873622894)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    """tanh(u) in fp32 to about 2 ulps at every magnitude.

    For |u| >= 0.9, 1 - 2 / (exp(2u) + 1), with the exact limits +-1 where exp overflows or vanishes.
    Below, that formula cancels (its error is an ulp of 1: up to all of a tiny tanh, 3e-4 of it at
    |u| = 1e-3); there tanh(u) = u + u * s * P(s), s = u^2, with P the quintic fitted to
    (tanh(u) / u - 1) / s on |u| <= 0.9 for relative error (largest 1e-7 in fp32; the Taylor series
    needs over a dozen terms there). Only multiply-adds: as accurate on a GPU, whose exp is
    approximate, as in the interpreter.
    """
    s = u * u
    p = ((((_TANH_P5 * s + _TANH_P4) * s + _TANH_P3) * s + _TANH_P2) * s + _TANH_P1) * s + _TANH_P0
    small = u + u * (s * p)
    large = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    return tl.where(tl.abs(u) < _TANH_SMALL, small, large)


@triton.jit
def _row_grad(ROW, GROW, target, lse, scale, V, smoothing, softcap, HAS_SMOOTHING: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Write ``scale * (softmax - (1 - eps) * onehot(target) - eps / V)`` of one row of logits
    (``ROW``) to ``GROW`` (which may be ``ROW`` itself: every block is read before it is written).
    With ``HAS_SOFTCAP`` the softmax is of the capped logits ``c * tanh(z / c)`` (``lse`` is theirs) and
    the gradient, with respect to the raw z, is multiplied by ``1 - tanh(z / c)^2``."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(ROW + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            x = softcap * t
        g = tl.exp(x - lse)
        if HAS_SMOOTHING:
            g = g - tl.where(offs == target, 1.0 - smoothing, 0.0) - smoothing / V
        else:
            g = g - tl.where(offs == target, 1.0, 0.0)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        tl.store(GROW + offs, (g * scale).to(GROW.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(LOGITS, GRAD, TARGETS, LOSS, LSE, V, stride_l, stride_g, ignore_index, smoothing,
                    softcap, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    """One program per row: the loss (0 at ignored rows, NaN at out-of-range targets) and the
    log-sum-exp of the row (of its capped logits with ``HAS_SOFTCAP``); with ``WRITE_GRAD`` also the
    row's gradient of its own loss (0 at ignored rows, NaN at out-of-range targets), entries in
    [-1, 1]: a reduction's 1 / N and the upstream gradient are applied by the caller, in fp32, after
    the matmuls that consume it."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    target = tl.load(TARGETS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    # Online log-sum-exp: a running max m and the sum s of exp(x - m), rescaled when m grows. m starts at
    # the lowest finite float, not -inf: while every logit so far is -inf (masked classes), x - m is then
    # -inf (exp 0) instead of -inf - (-inf) = NaN, at no cost in the loop.
    m = tl.full((), _LOWEST, tl.float32)
    s = tl.zeros((), tl.float32)
    sum_x = tl.zeros((), tl.float32)  # for label smoothing: the mean logit
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:  # the padding columns stay at -inf (tanh would bring them to -c)
            x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), 0)
    lse = m + tl.log(s)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    x_t = tl.load(base + tl.where(valid & in_range, target, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        x_t = softcap * _tanh(x_t / softcap)
    if HAS_SMOOTHING:
        # (1 - eps) * (lse - x_t) + eps * (lse - mean(x)): the smoothed target puts eps / V on every class
        loss = lse - (1.0 - smoothing) * x_t - smoothing * (sum_x / V)
    else:
        loss = lse - x_t
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        # GRAD may be LOGITS itself. Every thread read the target logit above (one stored the loss), after
        # the log-sum-exp's last barrier, and nothing else orders those reads before another warp's
        # stores of the gradient over the same column: a warp ahead could overwrite x_t first. The
        # barrier completes every thread's read before any store.
        tl.debug_barrier()
        # NaN at an out-of-range target, as its loss: a check of the gradients for inf/NaN (a loss scaler's,
        # a fused optimizer's) then sees the bad row too
        scale = tl.where(valid, tl.where(in_range, 1.0, float("nan")), 0.0)
        _row_grad(base, GRAD + row * stride_g, target, lse, scale, V, smoothing, softcap, HAS_SMOOTHING,
                  HAS_SOFTCAP, BLOCK_V)


@triton.jit
def _backward_kernel(LOGITS, GRAD, TARGETS, LSE, DLOSS, V, stride_l, stride_g, stride_d, ignore_index, smoothing,
                     softcap, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row: the row's gradient times its upstream gradient ``DLOSS[row]`` from the
    log-sum-exp the forward saved (one read of the logits, one write of the gradient)."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    in_range = (target >= 0) & (target < V)
    scale = tl.load(DLOSS + row * stride_d).to(tl.float32)
    scale = tl.where(target != ignore_index, tl.where(in_range, scale, float("nan")), 0.0)  # as the forward's
    _row_grad(LOGITS + row * stride_l, GRAD + row * stride_g, target, lse, scale, V, smoothing, softcap,
              HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_V)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _block_v(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): up to 4096 columns a step, 16 per thread at 8 warps (two 128-bit bf16
    loads each); small vocabularies get one block of their own size."""
    if INTERPRET:
        return min(_BLOCK_V_INTERPRET, triton.next_power_of_2(vocab)), 1
    block = min(_BLOCK_V_GPU, triton.next_power_of_2(vocab))
    return block, max(1, min(8, block // 512))


def _check_targets(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """On CPU tensors (free to inspect), reject targets outside [0, V) that are not ignore_index."""
    if targets.is_cuda or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"cross_entropy: targets holds {value}, outside the {vocab} classes [0, {vocab}) "
                         f"and not ignore_index ({ignore_index})")


def _forward_rows(logits: Tensor, targets: Tensor, ignore_index: int, smoothing: float, softcap: float, loss: Tensor,
                  lse: Tensor, grad: Optional[Tensor] = None) -> None:
    """Write the per-row losses and log-sum-exps (fp32, one per row) of 2-D ``logits`` (unit column
    stride) to ``loss`` and ``lse``; with ``grad`` (may be ``logits``) also the gradient of each row's
    own loss (0 at ignored rows)."""
    n, vocab = logits.shape
    if n == 0:
        return
    block, warps = _block_v(vocab)
    write = grad is not None
    launch(
        _forward_kernel, (n,),
        logits, grad if write else logits, targets, loss, lse, vocab, logits.stride(0),
        grad.stride(0) if write else 0, ignore_index, smoothing, softcap,
        HAS_SMOOTHING=smoothing != 0.0, HAS_SOFTCAP=softcap != 0.0, WRITE_GRAD=write, BLOCK_V=block,
        num_warps=warps)


# ----------------------------------------------------------------------------------------------
# Custom ops: cross_entropy on logits
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tritonforge::cross_entropy_forward", mutates_args=())
def _ce_forward_op(logits: Tensor, targets: Tensor, ignore_index: int, smoothing: float,
                   softcap: float) -> tuple[Tensor, Tensor]:
    """(per-row loss, per-row log-sum-exp), fp32, for 2-D logits."""
    _check_targets(targets, logits.shape[1], ignore_index)
    n = logits.shape[0]
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    _forward_rows(logits, targets, ignore_index, smoothing, softcap, loss, lse)
    return loss, lse


@_ce_forward_op.register_fake
def _(logits, targets, ignore_index, smoothing, softcap):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("tritonforge::cross_entropy_backward", mutates_args=())
def _ce_backward_op(dloss: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, ignore_index: int,
                    smoothing: float, softcap: float) -> Tensor:
    n, vocab = logits.shape
    grad = torch.empty((n, vocab), device=logits.device, dtype=logits.dtype)
    if n == 0:
        return grad
    block, warps = _block_v(vocab)
    launch(
        _backward_kernel, (n,),
        logits, grad, targets, lse, dloss, vocab, logits.stride(0), grad.stride(0), dloss.stride(0), ignore_index,
        smoothing, softcap, HAS_SMOOTHING=smoothing != 0.0, HAS_SOFTCAP=softcap != 0.0, BLOCK_V=block,
        num_warps=warps)
    return grad


@_ce_backward_op.register_fake
def _(dloss, logits, targets, lse, ignore_index, smoothing, softcap):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, targets, ignore_index, smoothing, softcap = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index, ctx.smoothing, ctx.softcap = ignore_index, smoothing, softcap
    ctx.mark_non_differentiable(output[1])


def _ce_backward(ctx, dloss, _dlse):
    logits, targets, lse = ctx.saved_tensors
    dlogits = _ce_backward_op(dloss.float(), logits, targets, lse, ctx.ignore_index, ctx.smoothing, ctx.softcap)
    return dlogits, None, None, None, None


_ce_forward_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ----------------------------------------------------------------------------------------------
# Custom op: the head's matmul and the loss, chunk by chunk
# ----------------------------------------------------------------------------------------------
def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly 16-bit: one GEMM with an fp32
    output on CUDA where PyTorch offers it, else the GEMM in fp32 (a 16-bit product of a chunk's
    unscaled gradient sums could overflow fp16)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if acc.is_cuda:
        try:
            return torch.ops.aten.addmm.dtype(acc, a, b, acc.dtype)
        except (RuntimeError, NotImplementedError):
            pass
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@torch.library.custom_op("tritonforge::linear_cross_entropy", mutates_args=())
def _lce_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
            smoothing: float, softcap: float, mean: bool, chunk: int, compute_dtype: torch.dtype, need_x: bool, need_weight: bool,
            need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, d_x, d_weight, d_bias, grad_scale) of the mean (or sum) loss of ``F.linear(x, weight,
    bias)`` for 2-D ``x``; the matmuls run in ``compute_dtype``; each gradient is empty unless asked for.

    The gradients are those of the sum of the rows' losses, d_x in x's dtype, d_weight and d_bias in
    fp32; ``grad_scale`` (fp32, 0-dim) is what they still need: 1 / (positions counted) for the mean, 1
    for the sum. The backward applies it with the upstream gradient (an fp16 run's loss scale), in fp32,
    before rounding to the parameters' dtypes: the logits' gradient stored in fp16 with the mean's 1 / N
    and without the loss scale would underflow (a softmax of 1/V over N at V = 32k, N = 8k is ~4e-9,
    under fp16's smallest subnormal), and so would d_x.
    """
    n, d = x.shape
    vocab = weight.shape[0]
    _check_targets(targets, vocab, ignore_index)
    counted = (targets != ignore_index).sum(dtype=torch.float32) if mean else None
    # a device scalar, no host sync (with no position counted every gradient is 0, whatever multiplies it)
    grad_scale = 1.0 / counted.clamp(min=1.0) if mean else torch.ones((), device=x.device)
    xc_all = x.to(compute_dtype)
    w = weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    grads = need_x or need_weight or need_bias
    loss_rows = torch.empty(n, device=x.device, dtype=torch.float32)
    lse = torch.empty(n, device=x.device, dtype=torch.float32)  # written by the row kernel, not needed after
    # contiguous like the fake implementation's; the row gradients' sums, scaled in the backward
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_x else x.new_empty((0,))
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32) if need_weight else x.new_empty((0,))
    db = torch.zeros(vocab, device=x.device, dtype=torch.float32) if need_bias else x.new_empty((0,))
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        xc = xc_all[start:end]
        logits = F.linear(xc, w, b)
        _forward_rows(logits, targets[start:end], ignore_index, smoothing, softcap, loss_rows[start:end],
                      lse[start:end], grad=logits if grads else None)
        if need_x:
            if dx.dtype == compute_dtype:
                torch.mm(logits, w, out=dx[start:end])
            else:  # x was cast for the matmuls (autocast): its gradient goes back to x's dtype
                dx[start:end] = logits @ w
        if need_weight:
            dw = _accumulate(dw, logits.t(), xc)
        if need_bias:
            db += logits.sum(dim=0, dtype=torch.float32)
    loss = loss_rows.sum()
    loss = loss / counted if mean else loss
    return loss, dx, dw, db, grad_scale


@_lce_op.register_fake
def _(x, weight, bias, targets, ignore_index, smoothing, softcap, mean, chunk, compute_dtype, need_x, need_weight,
      need_bias):
    empty = x.new_empty((0,))
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape) if need_x else empty,
            weight.new_empty(weight.shape, dtype=torch.float32) if need_weight else empty,
            bias.new_empty(bias.shape, dtype=torch.float32) if need_bias else empty,
            x.new_empty((), dtype=torch.float32))


def _lce_setup_context(ctx, inputs, output):
    _, dx, dw, db, grad_scale = output
    weight, bias = inputs[1], inputs[2]
    ctx.save_for_backward(dx, dw, db, grad_scale)
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(dx, dw, db, grad_scale)


def _lce_backward(ctx, dloss, _dx, _dw, _db, _grad_scale):
    dx, dw, db, grad_scale = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # fp32: the upstream gradient (an fp16 run's loss scale, 2^16, is inf in fp16) meets the mean's 1 / N
    # before the one rounding to each gradient's dtype
    g = dloss.float() * grad_scale
    return ((dx.float() * g).to(dx.dtype) if need_x else None,
            (dw * g).to(ctx.weight_dtype) if need_w else None,
            (db * g).to(ctx.bias_dtype) if need_b else None,
            None, None, None, None, None, None, None, None, None, None)


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _capped(logits: Tensor, softcap: float) -> Tensor:
    """``softcap * tanh(logits / softcap)`` in fp32 (the logits themselves, in fp32, at 0)."""
    logits = logits.float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _validate(logits_name: str, features: Tensor, targets: Tensor, label_smoothing: float, reduction: str,
              allowed: tuple[str, ...], softcap: float) -> None:
    fn = "cross_entropy" if logits_name == "logits" else "linear_cross_entropy"
    if not isinstance(features, Tensor) or not features.is_floating_point():
        kind = features.dtype if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{fn}: {logits_name} must be a floating-point tensor, got {kind}")
    if features.dtype not in _DTYPES:
        raise ValueError(f"{fn}: {logits_name} has dtype {features.dtype}; supported: float16, bfloat16, float32")
    if features.dim() == 0:
        raise ValueError(f"{fn}: {logits_name} must have a last dimension, got a 0-dim tensor")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        kind = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"{fn}: targets must be an integer tensor of class ids, got {kind}")
    if tuple(targets.shape) != tuple(features.shape[:-1]):
        raise ValueError(f"{fn}: targets has shape {tuple(targets.shape)} but {logits_name} "
                         f"{tuple(features.shape)} needs {tuple(features.shape[:-1])} (one target per position)")
    if targets.device != features.device:
        raise ValueError(f"{fn}: targets is on {targets.device} but {logits_name} is on {features.device}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if reduction not in allowed:
        raise ValueError(f"{fn}: reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 <= softcap < float("inf"):
        raise ValueError(f"{fn}: softcap must be a finite number >= 0 (0: off), got {softcap!r}")


def cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean", softcap: float = 0.0) -> Tensor:
    """``F.cross_entropy(logits.float(), targets, ...)`` over the last dim, as Triton kernels.

    Args:
        logits: (..., V) float16, bfloat16 or float32, any strides (read in their dtype, computed in fp32).
        targets: (...) integer class ids in [0, V), or ``ignore_index`` for positions that do not count.
        label_smoothing: eps in [0, 1]: the target puts 1 - eps on its class and eps / V on every class.
        reduction: ``"mean"`` over the positions that count (NaN when none does, as PyTorch),
            ``"sum"``, or ``"none"`` (the per-position losses, 0 at ignored positions).
        softcap: c > 0 scores the soft-capped logits ``c * tanh(logits / c)`` instead; 0 turns it off.
    Returns:
        fp32: a 0-dim tensor, or ``targets``' shape for ``"none"``. Differentiable in ``logits``; the
        gradient comes back in their dtype.
    """
    _validate("logits", logits, targets, label_smoothing, reduction, _REDUCTIONS, softcap)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"cross_entropy: logits has an empty last dimension (shape {tuple(logits.shape)}): "
                         "there are no classes")
    smoothing, softcap = float(label_smoothing), float(softcap)
    if not (logits.is_cuda or INTERPRET):
        _check_targets(targets, vocab, ignore_index)
        out = F.cross_entropy(_capped(logits, softcap).reshape(-1, vocab), targets.reshape(-1).long(),
                              ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
        return out.reshape(targets.shape) if reduction == "none" else out
    rows = logits.reshape(-1, vocab)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    flat_targets = targets.reshape(-1).contiguous()  # the kernels read one target per row, unit stride
    loss, _ = _ce_forward_op(rows, flat_targets, ignore_index, smoothing, softcap)
    if reduction == "none":
        return loss.reshape(targets.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (flat_targets != ignore_index).sum(dtype=torch.float32)


def default_chunk_size(vocab: int) -> int:
    """Rows of logits per chunk: about 2**26 logits (128 MB in bf16), at least 256 rows."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return max(_MIN_CHUNK_ROWS, 1 << (rows.bit_length() - 1))


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         chunk_size: Optional[int] = None, softcap: float = 0.0) -> Tensor:
    """``cross_entropy(F.linear(x, weight, bias), targets, ...)`` without materializing all the logits.

    Args:
        x: (..., d) float16, bfloat16 or float32: the hidden states before the head.
        weight: (V, d), ``nn.Linear(d, V)``'s (or a tied embedding's); bias: (V,) or None.
        targets, ignore_index, label_smoothing, softcap: as :func:`cross_entropy`.
        reduction: ``"mean"`` or ``"sum"`` (per-position losses would need a per-row upstream gradient
            that the gradients computed in the forward cannot take).
        chunk_size: rows of logits held at a time (default :func:`default_chunk_size`).
    Returns:
        The fp32 loss, 0-dim. Differentiable in x, weight and bias, each gradient in its own dtype.
        Under autocast the matmuls run in the autocast dtype, as ``F.linear``'s do; otherwise ``weight``
        and ``bias`` are used in ``x``'s dtype.
    """
    _validate("x", x, targets, label_smoothing, reduction, ("mean", "sum"), softcap)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"linear_cross_entropy: weight must be (V, d) with d = {x.shape[-1]} (x's last dim), "
                         f"got {shape}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("linear_cross_entropy: weight has no rows: there are no classes")
    if weight.dtype not in _DTYPES or weight.device != x.device:
        raise ValueError(f"linear_cross_entropy: weight must be a float16/bfloat16/float32 tensor on {x.device}, "
                         f"got {weight.dtype} on {weight.device}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (vocab,)
                             or bias.dtype not in _DTYPES or bias.device != x.device):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"linear_cross_entropy: bias must be a ({vocab},) float tensor on {x.device}, got {shape}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    smoothing, softcap = float(label_smoothing), float(softcap)
    if torch.is_autocast_enabled(x.device.type):
        compute = torch.get_autocast_dtype(x.device.type)
    else:
        compute = x.dtype
    if not (x.is_cuda or INTERPRET):
        _check_targets(targets, vocab, ignore_index)
        logits = F.linear(x.to(compute), weight.to(compute), bias.to(compute) if bias is not None else None)
        return F.cross_entropy(_capped(logits, softcap).reshape(-1, vocab), targets.reshape(-1).long(),
                               ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    x2 = x.reshape(-1, x.shape[-1])
    chunk = chunk_size or default_chunk_size(vocab)
    need = torch.is_grad_enabled()
    flat_targets = targets.reshape(-1).contiguous()  # the kernel reads one target per row, unit stride
    loss, *_ = _lce_op(x2, weight, bias, flat_targets, ignore_index, smoothing, softcap, reduction == "mean", chunk,
                       compute, need and x.requires_grad, need and weight.requires_grad,
                       need and bias is not None and bias.requires_grad)
    return loss


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
def aot_variants() -> list[Variant]:
    """The row kernels at GPT-2's vocabulary (4096-column blocks, 8 warps), with label smoothing on (the
    more general code): for bf16 logits (autocast training) the fused forward with its in-place gradient
    (linear_cross_entropy's), the loss-only forward and the backward from the saved log-sum-exp
    (cross_entropy's); for fp32 logits the fused forward; and the bf16 fused forward and backward with the
    soft cap on (its tanh in the loop). Row strides are 16-aligned at V = 50,304."""
    block, warps = _BLOCK_V_GPU, 8
    forward_signature = {"LOGITS": "*{dt}", "GRAD": "*{dt}", "TARGETS": "*i64", "LOSS": "*fp32", "LSE": "*fp32",
                         "V": "i32", "stride_l": "i32", "stride_g": "i32", "ignore_index": "i32",
                         "smoothing": "fp32", "softcap": "fp32"}
    variants = [
        Variant(kernel=_forward_kernel, name=f"{dt} V-block={block}{' +grad in place' if write else ' loss only'}"
                                             f"{' softcap' if cap else ''}",
                signature={k: t.format(dt=dt) for k, t in forward_signature.items()},
                constexprs={"HAS_SMOOTHING": True, "HAS_SOFTCAP": cap, "WRITE_GRAD": write, "BLOCK_V": block},
                num_warps=warps, num_stages=1, kind="memory", vector_stores=write,
                aligned=("LOGITS", "GRAD", "TARGETS", "LOSS", "LSE", "V", "stride_l", "stride_g"))
        for dt, write, cap in (("bf16", True, False), ("bf16", False, False), ("fp32", True, False),
                               ("bf16", True, True))]
    variants += [Variant(
        kernel=_backward_kernel, name=f"bf16 V-block={block} backward{' softcap' if cap else ''}",
        signature={"LOGITS": "*bf16", "GRAD": "*bf16", "TARGETS": "*i64", "LSE": "*fp32", "DLOSS": "*fp32",
                   "V": "i32", "stride_l": "i32", "stride_g": "i32", "stride_d": "i32", "ignore_index": "i32",
                   "smoothing": "fp32", "softcap": "fp32"},
        constexprs={"HAS_SMOOTHING": True, "HAS_SOFTCAP": cap, "BLOCK_V": block},
        num_warps=warps, num_stages=1, kind="memory",
        aligned=("LOGITS", "GRAD", "TARGETS", "LSE", "DLOSS", "V", "stride_l", "stride_g"))
        for cap in (False, True)]
    return variants
