"""Rotary position embedding of q and k in one Triton pass, read in place from the QKV projection.

``rope(q, k, cos, sin, position_ids=None)`` rotates each pair (x[i], x[i + D/2]) of every head of q
(B, H, T, D) and k (B, Hkv, T, D) by the angle of its position p (``t``, or ``position_ids[b, t]``):

    y[i] = x[i] cos[p, i] - x[i + D/2] sin[p, i],   y[i + D/2] = x[i + D/2] cos[p, i] + x[i] sin[p, i]

with cos/sin (positions, D/2) tables (the GPT's ``rotary_tables``). The backward is the rotation by
-angle (sin negated), the same kernel with ``INVERSE``: one pass over dq and dk.

Memory per element of q and k (``e`` bytes): read once, written once, 2e bytes, the floor (eager torch
moves 9e: four products, two sums and a cat). q and k are strided views of the (B, T, H + 2 Hkv, D)
projection output; the kernel takes their strides, nothing is copied. cos/sin are read from the table,
not computed: a program loads the fp32 rows of its BLOCK_T positions once for all its heads, 8 bytes
per pair per position against 4e per pair per head, 2 / (e * heads) extra (2.5% for bf16 at
H + Hkv = 40), from L2 where head groups share positions. In-kernel sin/cos would save that but cost
two transcendentals per pair, and an fp32 angle p * inv_freq is off by ~p * 2^-24 rad (5e-4 at
p = 8k) from the float64-made table, so results would differ from the torch path's; a table also
serves any frequency scheme the caller builds.

Math in fp32, rounded once to q's dtype; outputs contiguous. On CUDA, and on CPU under
``TRITON_INTERPRET=1``, the kernel runs inside the ``tritonforge::rope`` custom op (opaque to
``torch.compile``); on a CPU without the interpreter the op runs the same fp32 math in torch. Positions
outside the table raise on CPU and give NaN rows on CUDA (checking there would synchronize).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, launch, sm_count, use_triton
from .variant import Variant

__all__ = ["rope"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of one half-head tile [BLOCK_T, D/2] per program step: 2048 on a GPU (4 warps, two 128-bit
# loads of each half per thread in 16-bit dtypes), 64 in the interpreter so small tests cross blocks.
_TILE_GPU, _TILE_INTERPRET = 2048, 64
_WARPS = 4
_PROGRAMS_PER_SM = 4  # programs wanted per SM before the heads are split over programs


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rotate_head(X, Y, rows_x, rows_y, offs_d, cos, sin, mask, HALF: tl.constexpr):
    """Rotate one head's [BLOCK_T, D] tile: X/Y point at the head, rows_* are the position offsets."""
    x1 = tl.load(X + rows_x + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + rows_x + HALF + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows_y + offs_d[None, :], (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + rows_y + HALF + offs_d[None, :], (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,  # *[B, H, T, D] input q, strides (stride_qb, stride_qh, stride_qt, 1)
    K,  # *[B, Hkv, T, D] input k, strides (stride_kb, stride_kh, stride_kt, 1)
    QO,  # *[B, H, T, D] rotated q, strides (stride_qob, stride_qoh, stride_qot, 1)
    KO,  # *[B, Hkv, T, D] rotated k, strides (stride_kob, stride_koh, stride_kot, 1)
    COS,  # *[P, HALF] cos table, contiguous
    SIN,  # *[P, HALF] sin table, contiguous
    POS,  # *[B, T] integer positions, contiguous (read only when HAS_POS)
    T,  # positions per sequence
    H,  # q heads
    HKV,  # k heads
    P,  # rows of the tables
    heads_per_program,  # consecutive heads of [q heads, k heads] each program along axis 2 rotates
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot,
    stride_kob, stride_koh, stride_kot,
    HALF: tl.constexpr,  # D / 2
    BLOCK_T: tl.constexpr,  # positions per program
    BLOCK_HALF: tl.constexpr,  # next_pow2(HALF)
    HAS_POS: tl.constexpr,  # positions from POS, else t
    INVERSE: tl.constexpr,  # rotate by -angle (the backward)
):
    """Rotate BLOCK_T positions of batch row b for a range of heads of q and then of k.

    Grid (cdiv(T, BLOCK_T) * B, head groups): position blocks and batch rows share axis 0 (axis 1's
    limit, 65,535, is below real batch sizes), the position block varying fastest. cos/sin rows are
    loaded once per program (NaN for a position outside [0, P)) and applied to each head of its range.
    Memory: every element of q and k read once and written once; 8 * HALF bytes of table per position
    per program.
    """
    t_blocks = tl.cdiv(T, BLOCK_T)
    pid_t = tl.program_id(0) % t_blocks
    b = (tl.program_id(0) // t_blocks).to(tl.int64)
    group = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_d < HALF)[None, :]
    if HAS_POS:
        pos = tl.load(POS + b * T + offs_t, mask=mask_t, other=0).to(tl.int64)
    else:
        pos = offs_t.to(tl.int64)
    in_table = mask & ((pos >= 0) & (pos < P))[:, None]
    table = pos[:, None] * HALF + offs_d[None, :]
    cos = tl.load(COS + table, mask=in_table, other=float("nan")).to(tl.float32)
    sin = tl.load(SIN + table, mask=in_table, other=float("nan")).to(tl.float32)
    if INVERSE:
        sin = -sin

    t64 = offs_t.to(tl.int64)[:, None]
    first = group * heads_per_program
    last = tl.minimum(first + heads_per_program, H + HKV)
    # Head offsets in 64 bits (64-bit head strides, scalars): (H - 1) * T * D passes 2^31 elements for
    # long sequences of many heads.
    q_head, qo_head = tl.cast(stride_qh, tl.int64), tl.cast(stride_qoh, tl.int64)
    k_head, ko_head = tl.cast(stride_kh, tl.int64), tl.cast(stride_koh, tl.int64)
    for h in range(first, tl.minimum(last, H)):
        _rotate_head(Q + b * stride_qb + h * q_head, QO + b * stride_qob + h * qo_head,
                     t64 * stride_qt, t64 * stride_qot, offs_d, cos, sin, mask, HALF)
    for h in range(tl.maximum(first, H) - H, last - H):
        _rotate_head(K + b * stride_kb + h * k_head, KO + b * stride_kob + h * ko_head,
                     t64 * stride_kt, t64 * stride_kot, offs_d, cos, sin, mask, HALF)


# ----------------------------------------------------------------------------------------------
# Launcher and the torch fallback
# ----------------------------------------------------------------------------------------------
def _config(batch: int, seq: int, heads: int, half: int, device: torch.device) -> dict:
    """Block sizes and the grid: BLOCK_T positions x next_pow2(D/2) per tile; the heads are split over
    a second grid axis only when the positions alone give fewer than 4 programs per SM."""
    block_half = triton.next_power_of_2(half)
    tile = _TILE_INTERPRET if INTERPRET else _TILE_GPU
    block_t = max(1, min(triton.next_power_of_2(seq), tile // block_half))
    t_blocks = triton.cdiv(seq, block_t)
    groups = min(heads, max(1, triton.cdiv(_PROGRAMS_PER_SM * sm_count(device), batch * t_blocks)))
    per_program = triton.cdiv(heads, groups)
    return {"BLOCK_T": block_t, "BLOCK_HALF": block_half, "heads_per_program": per_program,
            "grid": (t_blocks * batch, triton.cdiv(heads, per_program))}


def _rope_triton(q, k, qo, ko, cos, sin, position_ids, inverse):
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if B * T == 0 or H + Hkv == 0:
        return
    cfg = _config(B, T, H + Hkv, D // 2, q.device)
    pos = position_ids.contiguous() if position_ids is not None else cos
    launch(
        _rope_kernel, cfg["grid"],
        q, k, qo, ko, cos, sin, pos, T, H, Hkv, cos.shape[0], cfg["heads_per_program"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        HALF=D // 2, BLOCK_T=cfg["BLOCK_T"], BLOCK_HALF=cfg["BLOCK_HALF"], HAS_POS=position_ids is not None,
        INVERSE=inverse, num_warps=1 if INTERPRET else _WARPS)


def _rope_reference(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor], inverse: bool) -> Tensor:
    """The kernel's math in torch: fp32 rotation of x (B, H, T, D), rounded once to x's dtype."""
    T = x.shape[2]
    if position_ids is not None:
        c, s = cos.float()[position_ids.long()][:, None], sin.float()[position_ids.long()][:, None]
    else:
        c, s = cos.float()[:T], sin.float()[:T]
    if inverse:
        s = -s
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Custom op and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("tritonforge::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
             inverse: bool) -> tuple[Tensor, Tensor]:
    """(q, k) rotated by +angle (-angle when ``inverse``), contiguous, in their dtype."""
    qo = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    ko = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    if use_triton(q):
        _rope_triton(q, k, qo, ko, cos, sin, position_ids, inverse)
    else:
        qo.copy_(_rope_reference(q, cos, sin, position_ids, inverse))
        ko.copy_(_rope_reference(k, cos, sin, position_ids, inverse))
    return qo, ko


@_rope_op.register_fake
def _(q, k, cos, sin, position_ids, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, inverse = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.inverse = inverse


def _rope_backward(ctx, dq, dk):
    # The rotation is orthogonal: its gradient is the rotation by the opposite angle.
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = _rope_op(_unit_last(dq), _unit_last(dk), cos, sin, position_ids, not ctx.inverse)
    return dq, dk, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _unit_last(x: Tensor) -> Tensor:
    """x with unit stride along D (a copy only when it has not)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _check(q, k, cos, sin, position_ids) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"rope: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"rope: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"rope: {name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be (B, heads, T, D), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"rope: k has dtype {k.dtype} but q has {q.dtype}")
    B, _, T, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"rope: k {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D")
    if D % 2:
        raise ValueError(f"rope: the head dim D = {D} must be even (pairs (x[i], x[i + D/2]) are rotated)")
    if cos.dim() != 2 or cos.shape[1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(f"rope: cos and sin must both be (positions, {D // 2}) for D = {D}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope: cos and sin are constant tables; no gradient flows to them (detach them)")
    if position_ids is None:
        if T > cos.shape[0]:
            raise ValueError(f"rope: T = {T} positions but the tables hold {cos.shape[0]}")
        return
    if not isinstance(position_ids, Tensor) or position_ids.is_floating_point() or position_ids.is_complex() \
            or position_ids.dtype == torch.bool:
        kind = position_ids.dtype if isinstance(position_ids, Tensor) else type(position_ids).__name__
        raise TypeError(f"rope: position_ids must be an integer tensor, got {kind}")
    if tuple(position_ids.shape) != (B, T):
        raise ValueError(f"rope: position_ids must be (B, T) = {(B, T)}, got {tuple(position_ids.shape)}")
    if position_ids.device != q.device:
        raise ValueError(f"rope: position_ids is on {position_ids.device} but q is on {q.device}")
    if not position_ids.is_cuda and position_ids.numel():
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= cos.shape[0]:
            raise ValueError(f"rope: position_ids span [{lo}, {hi}], outside the tables' [0, {cos.shape[0]})")


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
         position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q (B, H, T, D) and k (B, Hkv, T, D), in one pass.

    Args:
        q, k: fp32/fp16/bf16 of one dtype; any strides (e.g. views of a fused QKV projection output),
            a unit stride along D avoids a copy. H and Hkv are independent (GQA/MQA).
        cos, sin: (positions, D/2) tables, e.g. ``rotary_tables``'s; read in fp32, not differentiated.
        position_ids: optional (B, T) integer positions (e.g. restarting at every packed document);
            by default position t.
    Returns:
        (q_rot, k_rot), contiguous, in q's dtype; differentiable in q and k.
    """
    _check(q, k, cos, sin, position_ids)
    return _rope_op(_unit_last(q), _unit_last(k), cos.contiguous(), sin.contiguous(), position_ids, False)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
def aot_variants() -> list[Variant]:
    """The kernel at the GPU tile for D = 128 and D = 64 (bf16, forward and backward, with and without
    position ids), D = 128 in fp16 and fp32. Aligned: every pointer and stride (multiples of 16
    elements for D = 64 and 128 heads in a fused QKV output), as real launches specialize them."""
    signature = {"Q": "*{dt}", "K": "*{dt}", "QO": "*{dt}", "KO": "*{dt}", "COS": "*fp32", "SIN": "*fp32",
                 "POS": "*i64", "T": "i32", "H": "i32", "HKV": "i32", "P": "i32", "heads_per_program": "i32"}
    strides = [f"stride_{t}{d}" for t in ("q", "k", "qo", "ko") for d in ("b", "h", "t")]
    signature.update({s: "i32" for s in strides})
    aligned = ("Q", "K", "QO", "KO", "COS", "SIN", "POS", "T", *strides)
    cases = [("bf16", 128, False, False), ("bf16", 128, True, True), ("bf16", 64, False, True),
             ("bf16", 64, True, False), ("fp16", 128, False, False), ("fp32", 128, True, False)]
    variants = []
    for dt, d, has_pos, inverse in cases:
        half = d // 2
        block_t = _TILE_GPU // half
        name = (f"{dt} D={d} BLOCK_T={block_t}{' pos' if has_pos else ''}{' backward' if inverse else ''}"
                f" warps={_WARPS}")
        variants.append(Variant(
            kernel=_rope_kernel, name=name, signature={k: v.format(dt=dt) for k, v in signature.items()},
            constexprs={"HALF": half, "BLOCK_T": block_t, "BLOCK_HALF": half, "HAS_POS": has_pos,
                        "INVERSE": inverse},
            num_warps=_WARPS, num_stages=3, kind="memory", aligned=aligned))
    return variants
