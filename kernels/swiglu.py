"""SwiGLU, ``silu(gate) * up``, on the fused gate/up projection output: one Triton pass each way.

``swiglu(h)`` with h (..., 2F) and gate = h[..., :F], up = h[..., F:] (what ``h.chunk(2, -1)`` gives)
returns (..., F). With s = sigmoid(gate):

    out   = gate * s * up
    dgate = dout * up * s * (1 + gate * (1 - s)),   dup = dout * gate * s

Memory, per output element (``e`` bytes per element): the forward reads gate and up and writes out,
3e bytes; the backward reads gate, up and dout and writes dgate and dup, 5e bytes. Both are the floor:
each tensor crosses DRAM once, nothing else is saved (the backward recomputes s from h). Eager PyTorch
moves 5e forward (silu reads and writes F, the product reads 2F, writes F) and keeps silu(gate) for the
backward, which then runs several more elementwise passes.

h is read in place: rows may have any stride (a slice of a wider projection), columns unit stride; the
leading dimensions are flattened into one row stride (a copy only when they cannot be). The math is
fp32, rounded once to h's dtype; out and dh are contiguous. The programs tile [BLOCK_M, BLOCK_F] of
the output (up to 1024 columns, 4096 elements, 8 warps: two 128-bit loads per thread of each 16-bit
input). On CUDA, and on CPU under ``TRITON_INTERPRET=1``, the kernels run inside the
``tritonforge::swiglu_fwd`` / ``swiglu_bwd`` custom ops; on a CPU without the interpreter they run the
same fp32 math in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, launch, use_triton
from .variant import Variant

__all__ = ["swiglu"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Output columns and elements per program: on a GPU 1024 and 4096; in the interpreter 32 and 128, so that
# small tests cross column and row blocks.
_BLOCK_F_GPU, _TILE_GPU = 1024, 4096
_BLOCK_F_INTERPRET, _TILE_INTERPRET = 32, 128
_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd_kernel(
    X,  # *[M, 2F] gate | up rows, row stride stride_x, unit column stride
    OUT,  # *[M, F] output, row stride stride_o
    M,  # rows
    F,  # output columns (half of X's)
    stride_x,
    stride_o,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out = silu(gate) * up for a [BLOCK_M, BLOCK_F] tile. Memory: gate, up read once, out written
    once (3 elements moved per output element)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_m < M)[:, None] & (offs_f < F)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    gate = tl.load(X + rows * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + rows * stride_x + F + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + rows * stride_o + offs_f[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    X,  # *[M, 2F] gate | up rows, row stride stride_x, unit column stride
    DOUT,  # *[M, F] gradient of the output, row stride stride_do
    DX,  # *[M, 2F] dgate | dup, row stride stride_dx
    M,
    F,
    stride_x,
    stride_do,
    stride_dx,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * silu(gate), s = sigmoid(gate), for a
    [BLOCK_M, BLOCK_F] tile. Memory: gate, up, dout read once, dgate, dup written once (5 elements
    moved per output element)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_m < M)[:, None] & (offs_f < F)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    gate = tl.load(X + rows * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + rows * stride_x + F + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + rows * stride_do + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    dgate = dout * up * s * (1.0 + gate * (1.0 - s))
    dup = dout * gate * s
    tl.store(DX + rows * stride_dx + offs_f[None, :], dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + rows * stride_dx + F + offs_f[None, :], dup.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers and the torch fallback
# ----------------------------------------------------------------------------------------------
def _as_rows(t: Tensor) -> Tensor:
    """A [M, N] view of t with unit column stride and one row stride (a copy only if there is none)."""
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n)


def _blocks(m: int, f: int) -> tuple[int, int]:
    block_f_max, tile = (_BLOCK_F_INTERPRET, _TILE_INTERPRET) if INTERPRET else (_BLOCK_F_GPU, _TILE_GPU)
    block_f = min(block_f_max, triton.next_power_of_2(f))
    return max(1, min(triton.next_power_of_2(m), tile // block_f)), block_f


def _launch(kernel, m: int, f: int, *args) -> None:
    block_m, block_f = _blocks(m, f)
    grid = (triton.cdiv(m, block_m), triton.cdiv(f, block_f))
    launch(kernel, grid, *args, m, f, *[a.stride(0) for a in args], BLOCK_M=block_m, BLOCK_F=block_f,
           num_warps=1 if INTERPRET else _WARPS)


def _split(h: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = h.float().chunk(2, dim=-1)
    return gate, up


@torch.library.custom_op("tritonforge::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(h: Tensor) -> Tensor:
    """silu(h[..., :F]) * h[..., F:] of h (..., 2F), contiguous, in h's dtype."""
    f = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], f), device=h.device, dtype=h.dtype)
    if not use_triton(h):
        gate, up = _split(h)
        return out.copy_(torch.sigmoid(gate) * gate * up)
    if out.numel() == 0:
        return out
    rows = _as_rows(h)
    _launch(_swiglu_fwd_kernel, rows.shape[0], f, rows, out.view(-1, f))
    return out


@_swiglu_fwd_op.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("tritonforge::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dout: Tensor, h: Tensor) -> Tensor:
    """(dgate | dup) of shape h.shape, contiguous, in h's dtype."""
    f = h.shape[-1] // 2
    dh = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    if not use_triton(h):
        gate, up = _split(h)
        s, g = torch.sigmoid(gate), dout.float()
        return dh.copy_(torch.cat((g * up * s * (1 + gate * (1 - s)), g * gate * s), dim=-1))
    if dh.numel() == 0:
        return dh
    rows = _as_rows(h)
    _launch(_swiglu_bwd_kernel, rows.shape[0], f, rows, _as_rows(dout), dh.view(-1, 2 * f))
    return dh


@_swiglu_bwd_op.register_fake
def _(dout, h):
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dout):
    (h,) = ctx.saved_tensors
    return _swiglu_bwd_op(dout, h)


_swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def swiglu(h: Tensor) -> Tensor:
    """``F.silu(gate) * up`` with ``gate, up = h.chunk(2, dim=-1)``, in one pass each way.

    Args:
        h: (..., 2F) fp32/fp16/bf16, the fused gate/up projection output; any row strides.
    Returns:
        (..., F), contiguous, in h's dtype (fp32 math, rounded once); differentiable in h.
    """
    if not isinstance(h, Tensor):
        raise TypeError(f"swiglu: h must be a tensor, got {type(h).__name__}")
    if h.dtype not in _DTYPES:
        raise TypeError(f"swiglu: h must be float32, float16 or bfloat16, got {h.dtype}")
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"swiglu: h must have an even last dimension (gate | up), got shape {tuple(h.shape)}")
    return _swiglu_fwd_op(h)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
def aot_variants() -> list[Variant]:
    """Both kernels at the GPU tile (4 x 1024, 8 warps) for bf16, fp16 and fp32. Aligned: pointers, F and
    the row strides (multiples of 16 at the usual widths, e.g. F = 11008 or 8 * 256)."""
    block_m, block_f = _TILE_GPU // _BLOCK_F_GPU, _BLOCK_F_GPU
    constexprs = {"BLOCK_M": block_m, "BLOCK_F": block_f}
    variants = []
    for dt in ("bf16", "fp16", "fp32"):
        name = f"{dt} BLOCK_M={block_m} BLOCK_F={block_f} warps={_WARPS}"
        variants.append(Variant(
            kernel=_swiglu_fwd_kernel, name=f"fwd {name}",
            signature={"X": f"*{dt}", "OUT": f"*{dt}", "M": "i32", "F": "i32", "stride_x": "i32", "stride_o": "i32"},
            constexprs=constexprs, num_warps=_WARPS, num_stages=3, kind="memory",
            aligned=("X", "OUT", "F", "stride_x", "stride_o")))
        variants.append(Variant(
            kernel=_swiglu_bwd_kernel, name=f"bwd {name}",
            signature={"X": f"*{dt}", "DOUT": f"*{dt}", "DX": f"*{dt}", "M": "i32", "F": "i32", "stride_x": "i32",
                       "stride_do": "i32", "stride_dx": "i32"},
            constexprs=constexprs, num_warps=_WARPS, num_stages=3, kind="memory",
            aligned=("X", "DOUT", "DX", "F", "stride_x", "stride_do", "stride_dx")))
    return variants
