"""NT-Xent, SimCLR's contrastive loss, as Triton kernels that never hold the whole similarity matrix.

``nt_xent(z, temperature, row_start=0, num_rows=None)`` takes N = 2B projections ``z`` (N, D) laid out in
pairs: rows 2k and 2k+1 are the two views of image k (row i's positive is row i ^ 1), and returns the mean
over the query rows [row_start, row_start + num_rows) of

    loss_i = -s[i, i^1] + log sum_{j != i} exp(s[i, j]),    s[i, j] = <z_i, z_j> / (|z_i| |z_j| temperature)

Every row of ``z`` is a key; a subset of query rows is what a data-parallel run asks for (each process
scores its own rows against the gathered views of every process). The whole batch is the default.

Forward: one program per block of query rows walks the keys in column blocks: it loads a block of raw
rows, normalizes them in registers (one reciprocal norm per row), takes the block of similarities with one
``tl.dot`` scaled by both rows' reciprocal norms and 1 / temperature, masks the diagonal, picks the
positive's similarity and folds the block into an online log-sum-exp (as ``kernels.cross_entropy``'s row
kernel does over vocabulary blocks). It writes one loss and one log-sum-exp per query row: memory is
O(N·D), never O(N²).

Backward: with G[i, j] = g_i (softmax_i(j) - [j = i^1]) for query rows i (zero elsewhere) and g the
upstream gradient per row, the gradient of the normalized rows u is dU = (G + Gᵀ) U / temperature (the
similarity is symmetric, so the column term reuses the same block of similarities), and dZ = r (dU - u
<u, dU>) with r = 1 / |z|. One program per block of rows recomputes its similarities against every column
block, once: no atomics, bitwise reproducible.

fp32 dots follow torch's TF32 setting (``torch.backends.cuda.matmul.allow_tf32`` /
``torch.set_float32_matmul_precision``); fp16 and bf16 dots accumulate in fp32. Off CUDA without
``TRITON_INTERPRET=1`` the function is the PyTorch composition.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._compat import DOT_IEEE, DOT_TF32
from ._common import INTERPRET, dot_precision, launch
from .variant import Variant, dot_kind

__all__ = ["nt_xent", "nt_xent_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: F.normalize's floor on a row's norm.
NORM_EPS = 1e-12
#: Widest projection the kernels hold in registers (one block of D per row).
MAX_DIM = 512
# Rows and columns per block on a GPU (the columns narrower for wide projections, whose fp32 gradient
# accumulator is BLOCK_M x D), and in the interpreter (small, so that tests cross several blocks).
_BLOCK_M_GPU = 64
_BLOCK_INTERPRET = 16
_NUM_STAGES = 2


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(Z, offs, mask, stride, offs_d, mask_d):
    """Rows ``offs`` of Z (BLOCK, BLOCK_D) in their dtype, and their reciprocal norms (fp32), 64-bit offsets."""
    z = tl.load(Z + offs.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=mask[:, None] & mask_d[None, :],
                other=0.0)
    zf = z.to(tl.float32)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(zf * zf, 1)), 1e-12)  # NORM_EPS, as F.normalize
    return z, inv_norm


@triton.jit
def _ntxent_fwd_kernel(
    Z,  # *[N, D] projections, unit column stride; rows 2k and 2k+1 are a positive pair
    LOSS,  # *[num_rows] fp32: loss of each query row
    LSE,  # *[num_rows] fp32: log-sum-exp over the row's keys (the diagonal excluded), for the backward
    N, D, stride_z,
    row_start, num_rows,  # the query rows are row_start .. row_start + num_rows - 1
    inv_temp,  # 1 / temperature
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """loss_i = lse_i - s[i, i^1] for a block of BLOCK_M query rows, online over column blocks.

    Memory: reads the block's rows once and all N rows once per program (N·D per program), writes 2 floats
    per row; FLOPs 2·BLOCK_M·N·D.
    """
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = local < num_rows
    offs_m = row_start + local
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q, inv_q = _load_rows(Z, offs_m, mask_m, stride_z, offs_d, mask_d)
    scale_q = inv_q * inv_temp
    partner = offs_m ^ 1
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    pos = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k, inv_k = _load_rows(Z, offs_n, mask_n, stride_z, offs_d, mask_d)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_q[:, None] * inv_k[None, :]
        pos += tl.sum(tl.where(offs_n[None, :] == partner[:, None], s, 0.0), 1)
        s = tl.where(mask_n[None, :] & (offs_n[None, :] != offs_m[:, None]), s, float("-inf"))
        # m is finite from the first block on: it holds at least three keys of every row (N >= 4 and
        # BLOCK_N >= 16), so exp(m_i - m_new) never sees -inf - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(LOSS + local, lse - pos, mask=mask_m)
    tl.store(LSE + local, lse, mask=mask_m)


@triton.jit
def _ntxent_bwd_kernel(
    Z,  # *[N, D] the forward's projections
    LSE,  # *[num_rows] fp32: the forward's log-sum-exps of the query rows
    DLOSS,  # *[num_rows] fp32: upstream gradient of each query row's loss
    DZ,  # *[N, D] gradient of Z, in Z's dtype
    N, D, stride_z, stride_dz,
    row_start, num_rows, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dZ for a block of BLOCK_M rows (every row is a key; the query rows are also queries).

    dU[m] = (sum_n (G[m, n] + G[n, m]) u_n) / temperature, accumulated over column blocks in fp32 from the
    raw rows (u_n = r_n z_n: the factor r_n goes onto G), then dZ[m] = r_m (dU[m] - u_m <u_m, dU[m]>).
    Memory: N·D read per program, BLOCK_M·D written; FLOPs 4·BLOCK_M·N·D.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    zm, inv_m = _load_rows(Z, offs_m, mask_m, stride_z, offs_d, mask_d)
    query_m = mask_m & (offs_m >= row_start) & (offs_m < row_start + num_rows)
    lse_m = tl.load(LSE + (offs_m - row_start), mask=query_m, other=0.0)
    g_m = tl.load(DLOSS + (offs_m - row_start), mask=query_m, other=0.0)
    partner = offs_m ^ 1
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        zn, inv_n = _load_rows(Z, offs_n, mask_n, stride_z, offs_d, mask_d)
        query_n = mask_n & (offs_n >= row_start) & (offs_n < row_start + num_rows)
        lse_n = tl.load(LSE + (offs_n - row_start), mask=query_n, other=0.0)
        g_n = tl.load(DLOSS + (offs_n - row_start), mask=query_n, other=0.0)
        s = tl.dot(zm, tl.trans(zn), input_precision=PRECISION) * (inv_m * inv_temp)[:, None] * inv_n[None, :]
        key = mask_n[None, :] & (offs_n[None, :] != offs_m[:, None])
        is_pos = tl.where(offs_n[None, :] == partner[:, None], 1.0, 0.0)
        # Softmax of row m over its keys (m a query) and of row n over its keys (n a query): exp of -inf
        # where the pair does not count, so that a large s never meets an unused log-sum-exp.
        p_row = tl.exp(tl.where(key & query_m[:, None], s - lse_m[:, None], float("-inf")))
        p_col = tl.exp(tl.where(key & query_n[None, :], s - lse_n[None, :], float("-inf")))
        w = g_m[:, None] * (p_row - is_pos) + g_n[None, :] * (p_col - is_pos)
        w = w * inv_n[None, :]
        acc += tl.dot(w.to(zn.dtype), zn, input_precision=PRECISION)
    du = acc * inv_temp
    um = zm.to(tl.float32) * inv_m[:, None]
    dz = inv_m[:, None] * (du - um * tl.sum(um * du, 1)[:, None])
    tl.store(DZ + offs_m.to(tl.int64)[:, None] * stride_dz + offs_d[None, :], dz.to(DZ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _config(dim: int, element_size: int, backward: bool, interpret: bool = INTERPRET) -> dict:
    """Block sizes and launch options for projections of width ``dim`` stored in ``element_size`` bytes.
    Forward: 64 query rows, 64 key columns up to D = 128 (32 beyond), 4 warps (8 past 128). Backward: 64
    rows, 8 warps, and 32 columns in two stages for rows up to 256 bytes (bf16 at D = 128), 16 columns in one
    stage for wider ones: it holds the 64 x D fp32 gradient accumulator beside the rows and the
    similarities, and wider blocks or fewer warps spill registers on sm_90 with triton 3.6 or 3.9
    (``kernels.aot``; 32 rows would leave wgmma, which needs 64 per warp group)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if interpret:
        return dict(BLOCK_M=_BLOCK_INTERPRET, BLOCK_N=_BLOCK_INTERPRET, BLOCK_D=block_d, num_warps=1, num_stages=1)
    if backward:
        narrow = block_d * element_size <= 256
        return dict(BLOCK_M=_BLOCK_M_GPU, BLOCK_N=32 if narrow else 16, BLOCK_D=block_d, num_warps=8,
                    num_stages=_NUM_STAGES if narrow else 1)
    return dict(BLOCK_M=_BLOCK_M_GPU, BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d,
                num_warps=4 if block_d <= 128 else 8, num_stages=_NUM_STAGES)


@torch.library.custom_op("tritonforge::nt_xent_forward", mutates_args=())
def _forward_op(z: Tensor, inv_temp: float, row_start: int, num_rows: int, precision: str) -> tuple[Tensor, Tensor]:
    """(loss, lse) of the query rows, fp32, for 2-D ``z`` with unit column stride."""
    loss = torch.empty(num_rows, device=z.device, dtype=torch.float32)
    lse = torch.empty(num_rows, device=z.device, dtype=torch.float32)
    cfg = _config(z.shape[1], z.element_size(), backward=False)
    launch(_ntxent_fwd_kernel, (triton.cdiv(num_rows, cfg["BLOCK_M"]),),
           z, loss, lse, z.shape[0], z.shape[1], z.stride(0), row_start, num_rows, inv_temp, PRECISION=precision,
           **cfg)
    return loss, lse


@_forward_op.register_fake
def _(z, inv_temp, row_start, num_rows, precision):
    return z.new_empty(num_rows, dtype=torch.float32), z.new_empty(num_rows, dtype=torch.float32)


@torch.library.custom_op("tritonforge::nt_xent_backward", mutates_args=())
def _backward_op(dloss: Tensor, z: Tensor, lse: Tensor, inv_temp: float, row_start: int, num_rows: int,
                 precision: str) -> Tensor:
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    cfg = _config(z.shape[1], z.element_size(), backward=True)
    launch(_ntxent_bwd_kernel, (triton.cdiv(z.shape[0], cfg["BLOCK_M"]),),
           z, lse, dloss, dz, z.shape[0], z.shape[1], z.stride(0), dz.stride(0), row_start, num_rows, inv_temp,
           PRECISION=precision, **cfg)
    return dz


@_backward_op.register_fake
def _(dloss, z, lse, inv_temp, row_start, num_rows, precision):
    return z.new_empty(z.shape)


def _setup_context(ctx, inputs, output):
    z, inv_temp, row_start, num_rows, precision = inputs
    ctx.save_for_backward(z, output[1])
    ctx.args = (inv_temp, row_start, num_rows, precision)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dloss, _dlse):
    z, lse = ctx.saved_tensors
    return _backward_op(dloss.float().contiguous(), z, lse, *ctx.args), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def nt_xent_reference(z: Tensor, temperature: float, row_start: int = 0, num_rows: int | None = None) -> Tensor:
    """The PyTorch composition (materializes the num_rows x N similarities), in fp32 for 16-bit ``z``."""
    num_rows = z.shape[0] - row_start if num_rows is None else num_rows
    u = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1, eps=NORM_EPS)
    rows = torch.arange(row_start, row_start + num_rows, device=z.device)
    sim = u[rows] @ u.T / temperature
    sim = sim.masked_fill(rows[:, None] == torch.arange(z.shape[0], device=z.device)[None, :], float("-inf"))
    return F.cross_entropy(sim, rows ^ 1)


def _validate(z: Tensor, temperature: float, row_start: int, num_rows: int) -> None:
    if not isinstance(z, Tensor) or z.dim() != 2 or z.dtype not in _DTYPES:
        what = f"{z.dtype} tensor of shape {tuple(z.shape)}" if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"nt_xent: z must be a 2-D float16/bfloat16/float32 tensor (2B views, D), got {what}")
    n, dim = z.shape
    if n % 2 or n < 4:
        raise ValueError(f"nt_xent: z needs an even number of rows, at least 4 (two views of at least two images: "
                         f"one image has no negatives), got {n}")
    if not 0 < dim <= MAX_DIM:
        raise ValueError(f"nt_xent: the projection width must be in [1, {MAX_DIM}], got {dim}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"nt_xent: temperature must be a finite number > 0, got {temperature!r}")
    if row_start < 0 or num_rows <= 0 or row_start + num_rows > n:
        raise ValueError(f"nt_xent: query rows [{row_start}, {row_start + num_rows}) must be a non-empty range "
                         f"inside the {n} rows of z")


def nt_xent(z: Tensor, temperature: float, row_start: int = 0, num_rows: int | None = None) -> Tensor:
    """SimCLR's NT-Xent: the mean over query rows of the positive pair's negative log-softmax.

    Args:
        z: (N, D) float16, bfloat16 or float32 projections of N = 2B views, rows 2k and 2k+1 the two views
            of image k; any row stride (a copy is made only if columns are strided).
        temperature: > 0; the cosine similarities are divided by it.
        row_start, num_rows: the query rows (default: all); every row is a key.
    Returns:
        The fp32 mean loss, 0-dim, differentiable in ``z`` (the gradient in z's dtype).
    """
    num_rows = z.shape[0] - row_start if num_rows is None and isinstance(z, Tensor) else num_rows
    _validate(z, temperature, row_start, num_rows)
    if not (z.is_cuda or INTERPRET):
        return nt_xent_reference(z, temperature, row_start, num_rows)
    if z.stride(1) != 1:
        z = z.contiguous()
    loss, _ = _forward_op(z, 1.0 / float(temperature), int(row_start), int(num_rows), dot_precision(z.dtype))
    return loss.mean()


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ----------------------------------------------------------------------------------------------
_FP32_IEEE = ("fp32 with IEEE products (torch's fp32 default, when TF32 is not allowed): no tensor-core "
              "instruction computes them, so the TF32 tiles run on the FMA units and spill; training on CUDA "
              "allows TF32")


def aot_variants() -> list[Variant]:
    """Forward and backward at SimCLR's projection width (128) and a wide one (256), bf16 (training under
    autocast) and fp32 (TF32 dots), row strides 16-aligned."""
    common = {"N": "i32", "D": "i32", "stride_z": "i32"}
    signatures = {
        _ntxent_fwd_kernel: {"Z": "*{dt}", "LOSS": "*fp32", "LSE": "*fp32", **common, "row_start": "i32",
                             "num_rows": "i32", "inv_temp": "fp32"},
        _ntxent_bwd_kernel: {"Z": "*{dt}", "LSE": "*fp32", "DLOSS": "*fp32", "DZ": "*{dt}", **common,
                             "stride_dz": "i32", "row_start": "i32", "num_rows": "i32", "inv_temp": "fp32"}}
    variants = []
    for (dt, dim), kernel in itertools.product((("bf16", 128), ("bf16", 256), ("fp32", 128)), signatures):
        signature = signatures[kernel]
        backward = kernel is _ntxent_bwd_kernel
        cfg = _config(dim, 4 if dt == "fp32" else 2, backward, interpret=False)
        # the launcher's dot_precision: fp32 IEEE or TF32 as torch allows, 16-bit operands Triton's default
        for precision in (DOT_IEEE, DOT_TF32) if dt == "fp32" else (DOT_TF32,):
            variants.append(Variant(
                kernel=kernel, name=f"{dt} D={dim} {'backward' if backward else 'forward'}"
                                    + (f" {precision}" if dt == "fp32" else ""),
                signature={k: t.format(dt=dt) for k, t in signature.items()},
                constexprs={"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"],
                            "PRECISION": precision},
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], kind=dot_kind(precision),
                keep_reason=_FP32_IEEE if precision == DOT_IEEE else "",
                aligned=tuple(k for k in signature if k not in ("row_start", "num_rows", "inv_temp"))))
    return variants
