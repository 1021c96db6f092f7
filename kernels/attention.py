"""Fused scaled-dot-product attention (FlashAttention-2 style): forward, backward, custom op.

``attention(q, k, v, causal=False, scale=None, window=None, deterministic=True, segment_ids=None)``, for
each batch b and query head h (served by key/value head hk = h // (H // Hkv), so GQA/MQA)::

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, hk, j] | j visible from i) * v[b, hk, j]

Every mask is one band, key j visible from query i iff i - left < j <= i + right: full (S, S), causal
(S, 0), causal with window w (w, 0), non-causal window w (w, w - 1). ``segment_ids`` (B, S) (packed
documents) also require equal ids; a query always sees its own key. ``attention_varlen`` takes
FlashAttention's (total tokens, H, D) layout with ``cu_seqlens``; (B, H, S, D) with ids is the fast layout.

* Forward: one program per (query block, batch·head) streams key/value tiles through an online softmax in
  fp32 (exp2, log2(e) folded into the scale) and writes O and the log-sum-exp; never an S x S matrix. Key
  blocks outside the band (and, with ``SEGMENTS``, outside the block's documents) are never visited, so
  causal halves the work, a window makes it O(S·w) and packed documents cost the sum of their squares.
  The loop (``_band_blocks``, ``_block_start``) visits the few boundary blocks masked, the interior ones
  unmasked; an id that recurs out of order stays exact, only its skipping shrinks.
* Backward, ``deterministic=True``: dK/dV (one program per key block, looping over the kv group's query
  heads and blocks) then dQ: 7 matmuls per block pair, no atomics, bitwise reproducible. ``False``: the
  dK/dV kernel also adds dQ with fp32 atomics (5 matmuls, as FlashAttention-2; dQ's rounding then varies
  run to run, dK and dV do not).
* Head dims 16-256 (80 and 96 in padded 128 tiles); fp16/bf16 dots with fp32 accumulation; fp32 inputs
  (for tests) take IEEE or TF32 products as torch's ``allow_tf32`` says for its own matmuls. Strided
  q/k/v from a fused QKV projection are read in place; where a row offset may pass 2^31 elements the
  launcher switches the kernels to 64-bit row offsets (``_row_ptrs``, ``_wide_rows``). Small config
  lists per kernel and head-dim class (``_GPU_CONFIGS``, per Triton version via ``kernels._compat``;
  ``_SEGMENT_CONFIGS``), each compiled spill-free with wgmma by ``tritonforge kernels report`` or kept
  with a reason (``_KEEP_REASONS``). ``deterministic=True`` runs the first config of each list (no
  timing: the same tiles in every process); ``False`` autotunes over the list, keyed on power-of-two
  buckets of S (``_tune_key``). The interpreter runs one small config so tests cross block edges.
* Grids are (blocks, B * H); past 65,535 (CUDA's limit on axes 1 and 2) B * H joins the blocks on
  axis 0.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from ._compat import DOT_IEEE, DOT_TF32, by_version
from ._common import INTERPRET, MAX_GRID, TL_DTYPES, dot_precision, keep_config, kept_config, launch, use_triton
from .variant import Variant, dot_kind

__all__ = ["attention", "attention_varlen", "attention_forward", "attention_backward", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, per tile width class, for sm_90.
# "fwd"/"dq": BLOCK_M = query rows of the program, BLOCK_N = key rows per loop step.
# "dkdv": BLOCK_N = key rows of the program, BLOCK_M = query rows per loop step; "dkdvdq" likewise, for
# the same kernel with the dQ atomics (``deterministic=False``).
_GPU_CONFIGS = {
    ("fwd", "d<=64"): [(128, 128, 8, 3), (128, 64, 8, 3)],
    ("fwd", "d128"): [(128, 128, 8, 3), (128, 64, 8, 3)],
    ("fwd", "d256"): [(128, 64, 8, 2), (64, 64, 8, 2)],
    ("fwd", "fp32"): [(64, 16, 4, 2)],
    ("fwd", "fp32 d256"): [(64, 16, 8, 2)],
    ("dkdv", "d<=64"): [(64, 128, 8, 2), (32, 128, 8, 3)],
    ("dkdv", "d128"): [(16, 128, 8, 2), (32, 64, 8, 2)],
    ("dkdv", "d256"): [(16, 64, 8, 2)],
    ("dkdv", "fp32"): [(16, 64, 8, 1)],
    ("dkdv", "fp32 d256"): [(16, 64, 8, 1)],
    ("dkdvdq", "d<=64"): [(32, 128, 8, 3)],
    ("dkdvdq", "d128"): [(16, 128, 8, 2)],
    ("dkdvdq", "d256"): [(16, 64, 8, 2)],
    ("dkdvdq", "fp32"): [(16, 64, 8, 1)],
    ("dkdvdq", "fp32 d256"): [(16, 32, 8, 1)],
    ("dq", "d<=64"): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("dq", "d128"): [(128, 64, 8, 2), (64, 64, 4, 3)],
    ("dq", "d256"): [(64, 32, 4, 2)],
    ("dq", "fp32"): [(64, 16, 4, 2)],
    ("dq", "fp32 d256"): [(64, 16, 4, 2)],
}
# Older Tritons allocate more registers to the backward kernels (sm_90, measured with kernels.aot), so
# some of the configs above spill there; these replace them, from each version on. D = 256 dQ: 64 x 32 on
# 4 warps spills 128 B on 3.6 and 3.7; on 8 warps (204 registers on 3.6) it does not. D <= 64 dK/dV:
# 32 x 128 with 3 stages reaches 255 registers and spills 16 B on 3.6, 64 x 128 spills 48 B; 32 x 128
# with 2 stages (234 registers) and 32 x 64 with 3 (253) do not. With dQ atomics on 3.6, 32 x 128 with 3
# stages spills 48 B at D <= 64 and 16 x 128 16 B at D = 128; 32 x 128 with 2 stages (252 registers) and
# 16 x 64 with 2 (237) do not.
_GPU_CONFIGS = by_version("attention", {
    (3, 6): {**_GPU_CONFIGS, ("dkdv", "d<=64"): [(32, 128, 8, 2), (32, 64, 8, 3)],
             ("dkdvdq", "d<=64"): [(32, 128, 8, 2)], ("dkdvdq", "d128"): [(16, 64, 8, 2)],
             ("dq", "d256"): [(64, 32, 8, 2)]},
    (3, 7): {**_GPU_CONFIGS, ("dq", "d256"): [(64, 32, 8, 2)]},
    (3, 9): _GPU_CONFIGS,
})
# Configs that spill or exceed shared memory somewhere (measured with kernels.aot), why they stay, and the
# architectures that excuses (empty: all); elsewhere the report fails them if they do not fit.
_SM80_SPILLS = ("tuned for sm_90, where it does not spill; on sm_80 (not tuned) it spills a little", ("sm_80",))
_FP32_D256 = ("fp32 (for testing) at D = 256: spills on sm_90 and exceeds sm_80's shared memory, so this "
              "case runs on sm_90 only", ())
_D256_ACCUMULATORS = ("D = 256: the dK and dV accumulators (2 x 64 x 256 fp32) exceed the registers at every "
                      "wgmma tiling; this one spills the least", ())
_FP32_SPILLS = ("fp32 (for testing): the tf32 wgmma tiling spills at D = 128", ())
_FP32_IEEE = ("fp32 with IEEE products (torch's fp32 default; tests and exact-fp32 use): no tensor-core "
              "instruction computes them, so the tf32 tiles run on the FMA units and spill at D >= 64; "
              "training on CUDA allows TF32", ())
_KEEP_REASONS = {
    ("fwd", "d128", (128, 128, 8, 3)): _SM80_SPILLS,
    ("fwd", "d128", (128, 64, 8, 3)): _SM80_SPILLS,
    ("fwd", "d256", (128, 64, 8, 2)): _SM80_SPILLS,
    ("dkdv", "d<=64", (64, 128, 8, 2)): _SM80_SPILLS,
    ("dkdv", "d128", (16, 128, 8, 2)): _SM80_SPILLS,
    ("dq", "d128", (128, 64, 8, 2)): _SM80_SPILLS,
    ("dkdv", "d256", (16, 64, 8, 2)): _D256_ACCUMULATORS,
    ("dkdv", "fp32", (16, 64, 8, 1)): _FP32_SPILLS,
    ("dkdv", "fp32 d256", (16, 64, 8, 1)): _FP32_D256,
    ("dq", "fp32 d256", (64, 16, 4, 2)): _FP32_D256,
    ("dkdvdq", "d<=64", (32, 128, 8, 3)): _SM80_SPILLS,
    ("dkdvdq", "d128", (16, 128, 8, 2)): _SM80_SPILLS,
    ("dkdvdq", "d256", (16, 64, 8, 2)): _D256_ACCUMULATORS,
    ("dkdvdq", "fp32", (16, 64, 8, 1)): _FP32_SPILLS,
    ("dq", "fp32", (64, 16, 4, 2)): ("fp32 (for testing): with segments in a padded D = 128 tile, Triton 3.6 "
                                    "spills 16 B; 3.9 does not", ()),
    ("dkdvdq", "fp32 d256", (16, 32, 8, 1)): ("fp32 (for testing) at D = 256: the smallest wgmma tiling, "
                                              "64 keys x 16 queries, exceeds sm_90's shared memory; this "
                                              "mma.sync one fits both archs but spills on sm_80 (not tuned)",
                                              ("sm_80",)),
}
# With SEGMENTS the id compares cost a few registers: where a config at the register limit without
# segments spills 8-40 B on sm_90 with them, the segment variants use these lists instead.
_SEGMENT_CONFIGS = {
    ("fwd", "d128"): [(128, 64, 8, 3)],
    ("fwd", "d256"): [(64, 64, 8, 2)],
    ("dkdv", "d<=64"): [(32, 128, 8, 3)],
    ("dkdvdq", "d128"): [(16, 64, 8, 2)],
    ("dq", "d256"): [(64, 16, 4, 2)],
}
# Triton 3.6 (and, unmeasured, 3.7-3.8, which get the same lists) takes more registers for the segment
# variants: on 3.6 the D <= 64 forward at 128 x 128, the D <= 64 dK/dV at 32 x 128, the D = 128 dK/dV at
# 16 x 128 and dQ at 64 x 64, and the D = 256 dQ at 64 x 16 spill 8-64 B on sm_90; these smaller tiles do not.
_SEGMENT_CONFIGS = by_version("attention segments", {
    (3, 6): {**_SEGMENT_CONFIGS, ("fwd", "d<=64"): [(128, 64, 8, 3)], ("dkdv", "d<=64"): [(32, 64, 8, 2)],
             ("dkdv", "d128"): [(16, 64, 8, 2)], ("dq", "d128"): [(64, 32, 4, 2)],
             ("dq", "d256"): [(64, 16, 8, 2)]},
    (3, 9): _SEGMENT_CONFIGS,
})
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1),
                        "dkdvdq": (16, 32, 4, 1)}
# Preprocess (memory-bound): rows per program so that a tile holds 8192 elements; 8 warps.
_PRE_TILE_ELEMS = 8192
_PRE_NUM_WARPS = 8


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def _config_class(block_d: int, dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "fp32 d256" if block_d == 256 else "fp32"
    if block_d <= 64:
        return "d<=64"
    return "d128" if block_d == 128 else "d256"


def _configs_for(kernel: str, block_d: int, dtype: torch.dtype,
                 segments: bool = False) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) a launch may use on a GPU."""
    key = (kernel, _config_class(block_d, dtype))
    return _SEGMENT_CONFIGS.get(key, _GPU_CONFIGS[key]) if segments else _GPU_CONFIGS[key]


def _autotune_configs(kernel: str) -> list[triton.Config]:
    if INTERPRET:
        tuples = [_INTERPRETER_CONFIGS[kernel]]
    else:
        tuples = sorted({c for table in (_GPU_CONFIGS, _SEGMENT_CONFIGS)
                         for (name, _), cs in table.items() if name == kernel for c in cs})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tuples]


def _pruner(kernel: str):
    """Keep only the configs listed for the launch's tile width and dtype (interpreter: the one config)."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        allowed = set(_configs_for(kernel, args["BLOCK_D"], args["Q"].dtype, args["SEGMENTS"]))
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

    return prune


def _rule_config(kernel: str, block_d: int, dtype: torch.dtype, segments: bool) -> tuple[int, int, int, int]:
    """The config a ``deterministic`` launch uses, chosen by rule rather than by timing: the first one
    listed for the kernel, tile width class, dtype and ``segments`` on the installed Triton (the lists
    put the measured-fastest first). Every process, run and rank thus runs the same tiles, hence the same
    summation order (interpreter: its one config)."""
    if INTERPRET:
        return _INTERPRETER_CONFIGS[kernel]
    return _configs_for(kernel, block_d, dtype, segments)[0]


def _tune_key(seqlen: int, causal: bool, window: int) -> tuple[int, int]:
    """(tune_seqlen, tune_band): what the autotuner keys on besides D, dtype and segments. The next power
    of two of S (of the total tokens for varlen), so that growing or varying lengths re-benchmark once
    per octave, not at every new length; the band as causal or not and the window's next power of two
    (0: none), as it changes the work per block, not S."""
    return triton.next_power_of_2(seqlen), 2 * (triton.next_power_of_2(window) if window else 0) + causal


_AUTOTUNE_KEY = ["tune_seqlen", "tune_band", "head_dim", "SEGMENTS", "DOT_PRECISION"]
# The kernels never read the key-only ints: specializing on their values would only add compiles.
_TUNE_ARGS = ["tune_seqlen", "tune_band"]
# Row strides up to this many elements keep the offsets inside a block in 32 bits (see ``_row_ptrs``; the
# tallest block is the preprocess's at D = 16); an operand with a wider row stride is copied first.
_MAX_ROW_STRIDE = 2**31 // (_PRE_TILE_ELEMS // 16)
# B * heads above this many programs go onto grid axis 0 with the blocks (CUDA caps axis 1 there).
_MAX_GRID_HEADS = MAX_GRID[1]

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _block_and_head(seqlen, BLOCK: tl.constexpr, REVERSE: tl.constexpr, FOLD_HEADS: tl.constexpr):
    """(block of the sequence, batch x head index) of this program. The grid is (blocks, B * heads), or
    with ``FOLD_HEADS`` (B * heads past CUDA's 65,535 on axis 1) (blocks * B * heads,), blocks varying
    fastest either way, so the programs run in the same order. The folded form costs a division: the
    launcher asks for it only when needed. ``REVERSE``: the last block first (longest causal rows)."""
    if FOLD_HEADS:
        num_blocks = tl.cdiv(seqlen, BLOCK)
        block = tl.program_id(0) % num_blocks
        head = tl.program_id(0) // num_blocks
    else:
        num_blocks = tl.num_programs(0)
        block = tl.program_id(0)
        head = tl.program_id(1)
    if REVERSE:
        block = num_blocks - 1 - block
    return block, head


@triton.jit
def _row_ptrs(base, start, stride, offs_rows, offs_d, WIDE_ROWS: tl.constexpr):
    """Pointers to rows ``start + offs_rows`` (``offs_rows`` = 0 .. BLOCK - 1), columns ``offs_d``, of a
    [rows, D] operand with row stride ``stride``. With ``WIDE_ROWS`` (row * stride may pass 2^31
    elements: long sequences of a wide fused projection) the block's first row is offset in 64 bits, a
    scalar once per block, and the offsets inside the block stay 32-bit (the launcher keeps BLOCK *
    stride below 2^31). Without it, all in 32 bits: measured on sm_90, the 64-bit form costs up to 12
    registers and spills 16-40 B in the 128 x 128 forward, so the launcher asks for it only when needed."""
    if WIDE_ROWS:
        return base + start.to(tl.int64) * stride + (offs_rows[:, None] * stride + offs_d[None, :])
    return base + (start + offs_rows)[:, None] * stride + offs_d[None, :]


@triton.jit
def _band_blocks(start, last, seqlen, left, right, BLOCK: tl.constexpr):
    """The blocks of BLOCK columns that rows [start, last] visit under the band
    ``i - left < j <= i + right`` (columns past the sequence excluded): ``[lo, hi)`` in all, of which
    ``[inner_lo, inner_hi)`` are interior (every pair visible, inside the sequence). lo, inner_lo and
    inner_hi are multiples of BLOCK (inner_lo may also be hi); lo <= inner_lo <= inner_hi <= hi."""
    lo = tl.maximum(start - left + 1, 0) // BLOCK * BLOCK
    hi = tl.minimum(last + right + 1, seqlen)
    inner_lo = tl.minimum(tl.cdiv(tl.maximum(last - left + 1, 0), BLOCK) * BLOCK, hi)
    inner_hi = tl.minimum((start + right + 1) // BLOCK, seqlen // BLOCK) * BLOCK
    inner_hi = tl.maximum(inner_hi, inner_lo)
    return lo, hi, inner_lo, inner_hi


@triton.jit
def _block_start(it, lo, inner_lo, inner_hi, num_lower, BLOCK: tl.constexpr, BOUNDARY: tl.constexpr):
    """First column of loop step ``it``. Boundary pass: the lower boundary blocks [lo, inner_lo), then,
    jumping over the interior, the upper ones [inner_hi, hi). Interior pass: [inner_lo, inner_hi)."""
    if BOUNDARY:
        start = lo + it * BLOCK + (it >= num_lower).to(tl.int32) * (inner_hi - inner_lo)
    else:
        start = inner_lo + it * BLOCK
    return start


@triton.jit
def _segment_blocks(seg_base, start, last, offs, seqlen, lo, hi, inner_lo, inner_hi, BLOCK: tl.constexpr):
    """Narrow ``_band_blocks``' ranges for rows ``offs`` (``[start, last]`` inside the sequence) to the
    columns of their segments. ``seg_base`` points at this batch row's segment table (see
    ``_segment_table``): the span ``[first, last + 1)`` of every row's id bounds ``[lo, hi)``; blocks stay
    interior only if all rows lie in one contiguous run of equal ids and the block inside that run.
    Same invariants as ``_band_blocks``; the rows' own columns always remain inside ``[lo, hi)``."""
    in_seq = offs < seqlen
    span_lo = tl.min(tl.load(seg_base + seqlen + offs, mask=in_seq, other=seqlen), 0)
    span_hi = tl.max(tl.load(seg_base + 2 * seqlen + offs, mask=in_seq, other=0), 0)
    run_lo = tl.load(seg_base + 3 * seqlen + start)
    run_hi = tl.load(seg_base + 4 * seqlen + start)
    lo = tl.maximum(lo, span_lo // BLOCK * BLOCK)
    hi = tl.minimum(hi, span_hi)
    inner_lo = tl.minimum(tl.maximum(inner_lo, tl.cdiv(run_lo, BLOCK) * BLOCK), hi)
    inner_hi = tl.where(run_hi > last, tl.minimum(inner_hi, run_hi // BLOCK * BLOCK), 0)
    inner_hi = tl.maximum(inner_hi, inner_lo)
    return lo, hi, inner_lo, inner_hi



@triton.autotune(configs=_autotune_configs("fwd"), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit(do_not_specialize=_TUNE_ARGS)
def _attn_fwd(
    Q, K, V,  # (B, H, S, D), (B, Hkv, S, D), (B, Hkv, S, D); last dim contiguous
    Out,  # (B, H, S, D) contiguous, dtype of Q
    LSE,  # (B, H, S) fp32 contiguous: row log-sum-exp, base 2, of the scaled scores
    Seg,  # (B, 5, S) int32 segment table (``_segment_table``); read only with SEGMENTS
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    num_heads, group_size,  # H and H // Hkv
    seqlen, head_dim,  # S and D
    window_left, window_right,  # band: key j visible from query i iff i - left < j <= i + right
    tune_seqlen, tune_band,  # read by the autotuner only: its key (``_tune_key``)
    qk_scale,  # scale * log2(e)
    BLOCK_D: tl.constexpr,  # the next power of two of D: the tile width
    PAD_D: tl.constexpr,  # D < BLOCK_D: mask the columns past D
    SEGMENTS: tl.constexpr,  # key j visible from query i only if their segment ids are equal
    DOT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32" (fp32 inputs only)
    WIDE_ROWS: tl.constexpr,  # row * stride of q, k or v may reach 2^31 elements (``_wide_rows``)
    FOLD_HEADS: tl.constexpr,  # B * H on grid axis 0 with the blocks (``_block_and_head``)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O = softmax(scale * Q K^T | band, segments) V for one block of BLOCK_M queries of one (batch, head).

    Online softmax over key blocks, in base 2 with t = qk_scale * (q . k):
        m' = max(m, max_j t_j);  l' = l * 2^(m - m') + sum_j 2^(t_j - m');
        acc' = acc * 2^(m - m') + 2^(t - m') V;  finally O = acc / l, lse = m + log2(l).
    Reads Q once, K and V once per visited key block; writes O and lse.
    """
    pid_m, pid_bh = _block_and_head(seqlen, BLOCK_M, True, FOLD_HEADS)  # longest causal rows first
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // group_size
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    row_base = pid_bh.to(tl.int64) * seqlen  # start of this (batch, head) in Out rows and LSE

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    if PAD_D:
        mask_d = offs_d < head_dim
    else:
        mask_d = tl.full([BLOCK_D], 1, tl.int1)

    q = tl.load(_row_ptrs(q_base, start_m, stride_qs, tl.arange(0, BLOCK_M), offs_d, WIDE_ROWS),
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Visible keys of rows [start_m, last_m]: [lo, hi). Interior blocks [inner_lo, inner_hi) are visible
    # from every row of the block and lie inside the sequence; the rest of [lo, hi) is boundary.
    last_m = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    lo, hi, inner_lo, inner_hi = _band_blocks(start_m, last_m, seqlen, window_left, window_right, BLOCK_N)
    if SEGMENTS:
        seg_base = Seg + batch.to(tl.int64) * 5 * seqlen
        lo, hi, inner_lo, inner_hi = _segment_blocks(seg_base, start_m, last_m, offs_m, seqlen,
                                                     lo, hi, inner_lo, inner_hi, BLOCK_N)
        seg_m = tl.load(seg_base + offs_m, mask=mask_m, other=-1)
    num_lower = tl.cdiv(inner_lo - lo, BLOCK_N)  # boundary blocks below the interior ...
    num_upper = tl.cdiv(hi - inner_hi, BLOCK_N)  # ... and above it
    # per row: the last visible key, and the last key before the visible ones
    key_last = tl.minimum(offs_m + window_right, seqlen - 1)
    key_before = offs_m - window_left

    for boundary in tl.static_range(2):  # pass 0: boundary blocks, masked; pass 1: interior, unmasked
        if boundary == 0:
            num_blocks = num_lower + num_upper
        else:
            num_blocks = (inner_hi - inner_lo) // BLOCK_N
        for it in range(num_blocks):
            start_n = _block_start(it, lo, inner_lo, inner_hi, num_lower, BLOCK_N, boundary == 0)
            offs_kn = start_n + offs_n
            if boundary == 0:
                mask_kv = (offs_kn < seqlen)[:, None] & mask_d[None, :]
            else:
                mask_kv = mask_d[None, :]
            k = tl.load(_row_ptrs(k_base, start_n, stride_ks, offs_n, offs_d, WIDE_ROWS), mask=mask_kv, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if boundary == 0:
                visible = (offs_kn[None, :] <= key_last[:, None]) & (offs_kn[None, :] > key_before[:, None])
                if SEGMENTS:
                    seg_n = tl.load(seg_base + offs_kn, mask=offs_kn < seqlen, other=-1)
                    visible = visible & (seg_m[:, None] == seg_n[None, :])
                qk = tl.where(visible, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                # a row may see no key of this block and none before it: keep its exponents finite
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_ref = m_new
            p = tl.exp2(qk * qk_scale - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(_row_ptrs(v_base, start_n, stride_vs, offs_n, offs_d, WIDE_ROWS), mask=mask_kv, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

    l_i = tl.where(mask_m, l_i, 1.0)  # rows past the sequence may see no key; they are not stored
    acc = acc / l_i[:, None]
    tl.store(LSE + row_base + offs_m, m_i + tl.log2(l_i), mask=mask_m)
    tl.store(Out + (row_base + offs_m[:, None]) * head_dim + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attn_bwd_preprocess(
    Out,  # (B, H, S, D) contiguous
    DO,  # (B, H, S, D), last dim contiguous
    Delta,  # (B, H, S) fp32 contiguous, output
    stride_dob, stride_doh, stride_dos,
    num_heads, seqlen, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE_ROWS: tl.constexpr,  # row * stride of dO may reach 2^31 elements (``_wide_rows``)
    FOLD_HEADS: tl.constexpr,  # B * H on grid axis 0 with the row blocks (``_block_and_head``)
):
    """delta_i = sum_d dO[i, d] * O[i, d] for BLOCK_M rows of one (batch, head).

    Reads O and dO once (2 * S * D elements per head), writes S fp32.
    """
    pid_m, pid_bh = _block_and_head(seqlen, BLOCK_M, False, FOLD_HEADS)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen)[:, None] & (offs_d < head_dim)[None, :]
    row_base = pid_bh.to(tl.int64) * seqlen
    o = tl.load(Out + (row_base + offs_m[:, None]) * head_dim + offs_d[None, :], mask=mask, other=0.0)
    do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    do = tl.load(_row_ptrs(do_base, pid_m * BLOCK_M, stride_dos, tl.arange(0, BLOCK_M), offs_d, WIDE_ROWS), mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + row_base + offs_m, delta, mask=offs_m < seqlen)


@triton.autotune(configs=_autotune_configs("dkdv"), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit(do_not_specialize=_TUNE_ARGS)
def _attn_bwd_dkdv(
    Q, K, V, DO,  # (B, H, S, D), (B, Hkv, S, D) x 2, (B, H, S, D); last dims contiguous
    LSE, Delta,  # (B, H, S) fp32 contiguous
    DK, DV,  # (B, Hkv, S, D) contiguous, outputs
    DQAcc,  # (B, H, S, D) fp32 contiguous, zeroed: dQ summed with atomics (only with ATOMIC_DQ)
    Seg,  # (B, 5, S) int32 segment table; read only with SEGMENTS
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    num_heads, group_size, seqlen, head_dim, window_left, window_right,
    tune_seqlen, tune_band,  # read by the autotuner only: its key (``_tune_key``)
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    SEGMENTS: tl.constexpr,  # key j visible from query i only if their segment ids are equal
    DOT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32" (fp32 inputs only)
    WIDE_ROWS: tl.constexpr,  # row * stride of q, k, v or dO may reach 2^31 elements (``_wide_rows``)
    FOLD_HEADS: tl.constexpr,  # B * heads on grid axis 0 with the blocks (``_block_and_head``)
    ATOMIC_DQ: tl.constexpr,  # also add each step's dQ share into DQAcc (the 5-matmul backward)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV (and with ATOMIC_DQ, dQ) for one block of BLOCK_N keys of one (batch, kv head).

    For each query head of the group and each query block that sees these keys:
        P^T = 2^(qk_scale * K Q^T - lse);  dV += P^T dO;  dS^T = P^T * (V dO^T - delta);  dK += dS^T Q
    and finally dK *= scale. Reads K, V once; Q, dO, lse, delta once per visited query block of each
    head in the group; writes dK, dV once, so the group sum is in-program and deterministic.

    With ATOMIC_DQ the same step also forms this key block's share of the query block's gradient,
    scale * dS K (BLOCK_M x D, fp32), and adds it into DQAcc with ``tl.atomic_add``. Every key block
    that the query block sees adds into the same rows, in whatever order the programs run, so dQ is
    not bitwise reproducible; dK and dV are computed exactly as without the flag.
    """
    pid_n, pid_bhk = _block_and_head(seqlen, BLOCK_N, False, FOLD_HEADS)
    num_kv_heads = num_heads // group_size
    batch = pid_bhk // num_kv_heads
    kv_head = pid_bhk % num_kv_heads

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if PAD_D:
        mask_d = offs_d < head_dim
    else:
        mask_d = tl.full([BLOCK_D], 1, tl.int1)
    mask_nd = (offs_n < seqlen)[:, None] & mask_d[None, :]
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    k = tl.load(_row_ptrs(k_base, start_n, stride_ks, tl.arange(0, BLOCK_N), offs_d, WIDE_ROWS),
                mask=mask_nd, other=0.0)
    v = tl.load(_row_ptrs(v_base, start_n, stride_vs, tl.arange(0, BLOCK_N), offs_d, WIDE_ROWS),
                mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Queries that see keys [start_n, last_n]: [lo, hi); interior query blocks [inner_lo, inner_hi) see
    # every key of the block and lie inside the sequence. Keys past the sequence are never stored.
    last_n = tl.minimum(start_n + BLOCK_N, seqlen) - 1
    # the transposed band: query i sees key j iff j - (right + 1) < i <= j + (left - 1)
    lo, hi, inner_lo, inner_hi = _band_blocks(start_n, last_n, seqlen, window_right + 1, window_left - 1,
                                              BLOCK_M)
    if SEGMENTS:  # visibility by segment is symmetric: the keys' segments bound the queries
        seg_base = Seg + batch.to(tl.int64) * 5 * seqlen
        lo, hi, inner_lo, inner_hi = _segment_blocks(seg_base, start_n, last_n, offs_n, seqlen,
                                                     lo, hi, inner_lo, inner_hi, BLOCK_M)
        seg_n = tl.load(seg_base + offs_n, mask=offs_n < seqlen, other=-1)
    num_lower = tl.cdiv(inner_lo - lo, BLOCK_M)
    num_upper = tl.cdiv(hi - inner_hi, BLOCK_M)

    for g in range(group_size):
        head = kv_head * group_size + g
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        row_base = (batch * num_heads + head).to(tl.int64) * seqlen
        for boundary in tl.static_range(2):  # pass 0: boundary blocks, masked; pass 1: interior
            if boundary == 0:
                num_blocks = num_lower + num_upper
            else:
                num_blocks = (inner_hi - inner_lo) // BLOCK_M
            for it in range(num_blocks):
                start_m = _block_start(it, lo, inner_lo, inner_hi, num_lower, BLOCK_M, boundary == 0)
                offs_qm = start_m + offs_m
                if boundary == 0:
                    mask_m = offs_qm < seqlen
                    mask_q = mask_m[:, None] & mask_d[None, :]
                    # rows past the sequence get lse = +inf, hence P = 0
                    lse = tl.load(LSE + row_base + offs_qm, mask=mask_m, other=float("inf"))
                else:
                    mask_q = mask_d[None, :]
                    lse = tl.load(LSE + row_base + offs_qm)
                q = tl.load(_row_ptrs(q_base, start_m, stride_qs, offs_m, offs_d, WIDE_ROWS), mask=mask_q, other=0.0)
                p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
                if boundary == 0:
                    rel = offs_n[:, None] - offs_qm[None, :]  # j - i
                    visible = (rel <= window_right) & (rel > -window_left)
                    if SEGMENTS:
                        seg_m = tl.load(seg_base + offs_qm, mask=mask_m, other=-1)
                        visible = visible & (seg_n[:, None] == seg_m[None, :])
                    p_t = tl.where(visible, p_t, 0.0)
                do = tl.load(_row_ptrs(do_base, start_m, stride_dos, offs_m, offs_d, WIDE_ROWS), mask=mask_q, other=0.0)
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
                if boundary == 0:
                    delta = tl.load(Delta + row_base + offs_qm, mask=mask_m, other=0.0)
                else:
                    delta = tl.load(Delta + row_base + offs_qm)
                ds_t = (p_t * (tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) - delta[None, :])).to(q.dtype)
                dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
                if ATOMIC_DQ:
                    # dQ^T = K^T dS^T (D x BLOCK_M): the head dim, not the few query rows of a step, is
                    # the dot's M dimension, which wgmma needs to be a multiple of 64. Relaxed atomics:
                    # only the sums at kernel exit matter, not the order of the additions.
                    dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION) * sm_scale
                    tl.atomic_add(DQAcc + (row_base + offs_qm[None, :]) * head_dim + offs_d[:, None], dq_t,
                                  mask=tl.trans(mask_q), sem="relaxed")

    out_offs = (pid_bhk.to(tl.int64) * seqlen + offs_n[:, None]) * head_dim + offs_d[None, :]
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=mask_nd)


# The 5-matmul backward: the same kernel compiled with ATOMIC_DQ=True, tuned over its own config list.
# Autotuning runs the kernel once per candidate config, so the dQ accumulator is zeroed before each run
# and after the last one.
_attn_bwd_dkdvdq = triton.autotune(configs=_autotune_configs("dkdvdq"), key=_AUTOTUNE_KEY,
                                   prune_configs_by={"early_config_prune": _pruner("dkdvdq")},
                                   reset_to_zero=["DQAcc"])(_attn_bwd_dkdv.fn)


@triton.autotune(configs=_autotune_configs("dq"), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit(do_not_specialize=_TUNE_ARGS)
def _attn_bwd_dq(
    Q, K, V, DO,  # (B, H, S, D), (B, Hkv, S, D) x 2, (B, H, S, D); last dims contiguous
    LSE, Delta,  # (B, H, S) fp32 contiguous
    DQ,  # (B, H, S, D) contiguous, output
    Seg,  # (B, 5, S) int32 segment table; read only with SEGMENTS
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    num_heads, group_size, seqlen, head_dim, window_left, window_right,
    tune_seqlen, tune_band,  # read by the autotuner only: its key (``_tune_key``)
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    SEGMENTS: tl.constexpr,  # key j visible from query i only if their segment ids are equal
    DOT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32" (fp32 inputs only)
    WIDE_ROWS: tl.constexpr,  # row * stride of q, k, v or dO may reach 2^31 elements (``_wide_rows``)
    FOLD_HEADS: tl.constexpr,  # B * heads on grid axis 0 with the blocks (``_block_and_head``)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries of one (batch, head).

    For each visible key block: P = 2^(qk_scale * Q K^T - lse); dS = P * (dO V^T - delta); dQ += dS K;
    finally dQ *= scale. Reads Q, dO, lse, delta once and K, V once per visited key block; writes dQ.
    """
    pid_m, pid_bh = _block_and_head(seqlen, BLOCK_M, True, FOLD_HEADS)  # longest causal rows first
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // group_size
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    row_base = pid_bh.to(tl.int64) * seqlen

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    if PAD_D:
        mask_d = offs_d < head_dim
    else:
        mask_d = tl.full([BLOCK_D], 1, tl.int1)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(_row_ptrs(q_base, start_m, stride_qs, tl.arange(0, BLOCK_M), offs_d, WIDE_ROWS),
                mask=mask_md, other=0.0)
    do = tl.load(_row_ptrs(do_base, start_m, stride_dos, tl.arange(0, BLOCK_M), offs_d, WIDE_ROWS),
                 mask=mask_md, other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf"))  # padding rows: P = 0
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Same key ranges as the forward.
    last_m = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    lo, hi, inner_lo, inner_hi = _band_blocks(start_m, last_m, seqlen, window_left, window_right, BLOCK_N)
    if SEGMENTS:
        seg_base = Seg + batch.to(tl.int64) * 5 * seqlen
        lo, hi, inner_lo, inner_hi = _segment_blocks(seg_base, start_m, last_m, offs_m, seqlen,
                                                     lo, hi, inner_lo, inner_hi, BLOCK_N)
        seg_m = tl.load(seg_base + offs_m, mask=mask_m, other=-1)
    num_lower = tl.cdiv(inner_lo - lo, BLOCK_N)
    num_upper = tl.cdiv(hi - inner_hi, BLOCK_N)
    key_last = tl.minimum(offs_m + window_right, seqlen - 1)
    key_before = offs_m - window_left

    for boundary in tl.static_range(2):  # pass 0: boundary blocks, masked; pass 1: interior
        if boundary == 0:
            num_blocks = num_lower + num_upper
        else:
            num_blocks = (inner_hi - inner_lo) // BLOCK_N
        for it in range(num_blocks):
            start_n = _block_start(it, lo, inner_lo, inner_hi, num_lower, BLOCK_N, boundary == 0)
            offs_kn = start_n + offs_n
            if boundary == 0:
                mask_kv = (offs_kn < seqlen)[:, None] & mask_d[None, :]
            else:
                mask_kv = mask_d[None, :]
            k = tl.load(_row_ptrs(k_base, start_n, stride_ks, offs_n, offs_d, WIDE_ROWS), mask=mask_kv, other=0.0)
            v = tl.load(_row_ptrs(v_base, start_n, stride_vs, offs_n, offs_d, WIDE_ROWS), mask=mask_kv, other=0.0)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
            if boundary == 0:
                visible = (offs_kn[None, :] <= key_last[:, None]) & (offs_kn[None, :] > key_before[:, None])
                if SEGMENTS:
                    seg_n = tl.load(seg_base + offs_kn, mask=offs_kn < seqlen, other=-1)
                    visible = visible & (seg_m[:, None] == seg_n[None, :])
                p = tl.where(visible, p, 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + (row_base + offs_m[:, None]) * head_dim + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _band(seqlen: int, causal: bool, window: int) -> tuple[int, int]:
    """(left, right) of the band i - left < j <= i + right; ``window == 0`` means no window."""
    left = min(window, seqlen) if window else seqlen
    if causal:
        right = 0
    else:
        right = min(window - 1, seqlen) if window else seqlen
    return left, right


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along D and a row stride that ``_row_ptrs`` may form in 32 bits in a block."""
    return t if t.stride(-1) == 1 and abs(t.stride(-2)) <= _MAX_ROW_STRIDE else t.contiguous()


def _wide_rows(seqlen: int, *tensors: torch.Tensor) -> bool:
    """Whether a row offset (row * row stride, rows up to S plus a block of padding) of any of these
    (B, H, S, D) operands may reach 2^31 elements, so the kernels must form it in 64 bits."""
    rows = seqlen + _PRE_TILE_ELEMS // 16
    return any(rows * abs(t.stride(2)) >= 2**31 for t in tensors)


def _grid(blocks: int, heads: int) -> tuple[int, ...]:
    """The launch grid for ``_block_and_head``: (blocks, heads), or folded into axis 0 past axis 1's limit."""
    return (blocks * heads,) if _fold_heads(heads) else (blocks, heads)


def _fold_heads(heads: int) -> bool:
    return heads > _MAX_GRID_HEADS


def _launch_tuned(tuned, kernel: str, grid, args, deterministic: bool, tune_key: tuple[int, int], **meta) -> None:
    """Launch an autotuned attention kernel: with ``deterministic``, the rule's config (``_rule_config``)
    straight to the compiled kernel, so that no timing ever picks the tiles; else the config the
    configuration store kept for this launch's autotuning key (``kernels.set_config_store``), and without
    one the autotuner's choice, then given to the store. ``grid`` maps a config's meta-parameters to the
    launch grid; ``tune_key`` is ``_tune_key``'s (tune_seqlen, tune_band)."""
    dtype = args[0].dtype
    if deterministic:
        config = _rule_config(kernel, meta["BLOCK_D"], dtype, meta["SEGMENTS"])
    else:
        store_key = _store_key(tune_key, dtype, meta)
        config = _valid_config(kernel, kept_config(f"attention.{kernel}", store_key), meta["BLOCK_D"], dtype,
                               meta["SEGMENTS"])
        if config is None:
            launch(tuned, grid, *args, **meta)
            chosen = tuned.best_config
            keep_config(f"attention.{kernel}", store_key, {**chosen.kwargs, "num_warps": chosen.num_warps,
                                                           "num_stages": chosen.num_stages})
            return
    block_m, block_n, warps, stages = config
    tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    launch(tuned.fn, grid(tiles), *args, **meta, **tiles, num_warps=warps, num_stages=stages)


def _store_key(tune_key: tuple[int, int], dtype: torch.dtype, meta: dict) -> dict:
    """What the autotuner's choice depends on (its key, as ``_AUTOTUNE_KEY``, and the operands' dtype), for
    the configuration store."""
    return {"tune_seqlen": tune_key[0], "tune_band": tune_key[1], "block_d": meta["BLOCK_D"],
            "segments": bool(meta["SEGMENTS"]), "dot_precision": meta["DOT_PRECISION"], "dtype": TL_DTYPES[dtype]}


def _valid_config(kernel: str, kept: dict | None, block_d: int, dtype: torch.dtype,
                  segments: bool) -> tuple[int, int, int, int] | None:
    """A kept config as (BLOCK_M, BLOCK_N, num_warps, num_stages), if it is one this launch may use (one
    listed for its kernel, tile width, dtype and segments on the installed Triton); else None."""
    if kept is None:
        return None
    try:
        config = tuple(int(kept[name]) for name in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    except (KeyError, TypeError, ValueError):
        return None
    allowed = [_INTERPRETER_CONFIGS[kernel]] if INTERPRET else _configs_for(kernel, block_d, dtype, segments)
    return config if config in allowed else None


def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _segment_table(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 5, S) int32 from (B, S) integer ids, for the kernels' ``Seg`` argument. Per position ``i``:
    0: the id, renumbered 0, 1, ... per batch row (any int64 value is fine); 1, 2: ``[first, last + 1)``
    of the positions that carry the same id; 3, 4: the same for the contiguous run of equal ids
    around ``i``. For packed documents (each id one contiguous run) 1, 2 equal 3, 4. Sorting by id
    (stable, so each id's positions stay in order) finds first and last occurrences on the device."""
    batch, seqlen = segment_ids.shape
    ids = segment_ids.to(torch.int64)
    table = torch.empty((batch, 5, seqlen), dtype=torch.int32, device=ids.device)
    pos = torch.arange(seqlen, device=ids.device).expand(batch, seqlen)
    last_pos = torch.full_like(pos, seqlen - 1)

    def first_of(starts):  # per position: the latest position <= it where ``starts`` holds
        return torch.where(starts, pos, 0).cummax(dim=1).values

    def last_of(ends):  # per position: the earliest position >= it where ``ends`` holds
        return torch.where(ends, pos, last_pos).flip(1).cummin(dim=1).values.flip(1)

    def edges(sorted_ids):  # (first of a group of equal ids, last of a group)
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
        ends = torch.ones_like(starts)
        ends[:, :-1] = starts[:, 1:]
        return starts, ends

    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    starts, ends = edges(sorted_ids)
    table[:, 0].scatter_(1, order, (starts.cumsum(dim=1) - 1).to(torch.int32))
    table[:, 1].scatter_(1, order, order.gather(1, first_of(starts)).to(torch.int32))
    table[:, 2].scatter_(1, order, (order.gather(1, last_of(ends)) + 1).to(torch.int32))
    starts, ends = edges(ids)
    table[:, 3] = first_of(starts)
    table[:, 4] = last_of(ends) + 1
    return table


def attention_forward(q, k, v, causal: bool, scale: float, window: int, deterministic: bool = True,
                      segment_ids: torch.Tensor | None = None):
    """Launch the forward kernel. Returns ``(out, lse)``: out (B, H, S, D) contiguous in q's dtype,
    lse (B, H, S) fp32, the base-2 log-sum-exp of ``scale * log2(e) * q . k`` over the visible keys.
    ``deterministic``: tiles by rule (``_rule_config``), else autotuned."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, num_heads, seqlen, head_dim = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, num_heads, seqlen), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    left, right = _band(seqlen, causal, window)

    def grid(meta):
        return _grid(triton.cdiv(seqlen, meta["BLOCK_M"]), batch * num_heads)

    # Seg is not read without SEGMENTS: any tensor fills the slot.
    seg = lse if segment_ids is None else _segment_table(segment_ids)
    args = (q, k, v, out, lse, seg, *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v),
            num_heads, num_heads // k.shape[1], seqlen, head_dim, left, right,
            *_tune_key(seqlen, causal, window), scale * _LOG2E)
    _launch_tuned(_attn_fwd, "fwd", grid, args, deterministic, _tune_key(seqlen, causal, window),
                  BLOCK_D=_block_d(head_dim),
                  PAD_D=_block_d(head_dim) != head_dim, SEGMENTS=segment_ids is not None,
                  DOT_PRECISION=dot_precision(q.dtype), WIDE_ROWS=_wide_rows(seqlen, q, k, v),
                  FOLD_HEADS=_fold_heads(batch * num_heads))
    return out, lse


def attention_backward(do, q, k, v, out, lse, causal: bool, scale: float, window: int,
                       deterministic: bool = True, segment_ids: torch.Tensor | None = None):
    """Launch the backward kernels. Returns ``(dq, dk, dv)``, contiguous, in the inputs' dtype.

    ``deterministic=True``: the delta preprocess, the dK/dV kernel and the dQ kernel (7 matmuls per
    block pair, no atomics), with tiles chosen by rule (``_rule_config``): bitwise reproducible across
    runs and processes. ``deterministic=False``: the preprocess and one fused kernel (5 matmuls,
    autotuned) that adds dQ into a zeroed fp32 buffer with atomics; dQ's summation order then varies
    from run to run.
    """
    do, q, k, v = (_unit_last_stride(t) for t in (do, q, k, v))
    batch, num_heads, seqlen, head_dim = q.shape
    num_kv_heads = k.shape[1]
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if q.numel() == 0:
        return q.new_empty(q.shape), dk, dv
    left, right = _band(seqlen, causal, window)
    block_d = _block_d(head_dim)
    group_size = num_heads // num_kv_heads

    delta = torch.empty_like(lse)
    pre_block_m = _PRE_TILE_ELEMS // block_d
    launch(_attn_bwd_preprocess, _grid(triton.cdiv(seqlen, pre_block_m), batch * num_heads),
           out, do, delta, *_bhs_strides(do), num_heads, seqlen, head_dim, BLOCK_M=pre_block_m, BLOCK_D=block_d,
           WIDE_ROWS=_wide_rows(seqlen, do), FOLD_HEADS=_fold_heads(batch * num_heads), num_warps=_PRE_NUM_WARPS)
    tune_key = _tune_key(seqlen, causal, window)
    common = (*_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(do),
              num_heads, group_size, seqlen, head_dim, left, right, *tune_key,
              scale * _LOG2E, scale)
    segments = segment_ids is not None
    seg = _segment_table(segment_ids) if segments else delta  # not read without SEGMENTS
    meta = dict(BLOCK_D=block_d, PAD_D=block_d != head_dim, SEGMENTS=segments,
                DOT_PRECISION=dot_precision(q.dtype), WIDE_ROWS=_wide_rows(seqlen, q, k, v, do))

    def grid_dkdv(tiles):
        return _grid(triton.cdiv(seqlen, tiles["BLOCK_N"]), batch * num_kv_heads)

    if not deterministic:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _launch_tuned(_attn_bwd_dkdvdq, "dkdvdq", grid_dkdv,
                      (q, k, v, do, lse, delta, dk, dv, dq_acc, seg, *common), False, tune_key, **meta,
                      FOLD_HEADS=_fold_heads(batch * num_kv_heads), ATOMIC_DQ=True)
        return dq_acc.to(q.dtype), dk, dv

    # DQAcc is neither read nor written without ATOMIC_DQ: any fp32 tensor fills the slot.
    _launch_tuned(_attn_bwd_dkdv, "dkdv", grid_dkdv, (q, k, v, do, lse, delta, dk, dv, delta, seg, *common),
                  True, tune_key, **meta, FOLD_HEADS=_fold_heads(batch * num_kv_heads), ATOMIC_DQ=False)

    def grid_dq(tiles):
        return _grid(triton.cdiv(seqlen, tiles["BLOCK_M"]), batch * num_heads)

    dq = q.new_empty(q.shape)
    _launch_tuned(_attn_bwd_dq, "dq", grid_dq, (q, k, v, do, lse, delta, dq, seg, *common), True, tune_key,
                  **meta, FOLD_HEADS=_fold_heads(batch * num_heads))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Reference path (CPU tensors outside the interpreter) and the custom op
# ---------------------------------------------------------------------------------------------------


def _reference_mask(seqlen: int, causal: bool, window: int, segment_ids, device) -> torch.Tensor:
    """Boolean visibility, (S, S) or with segments (B, 1, S, S): True where query i sees key j."""
    left, right = _band(seqlen, causal, window)
    idx = torch.arange(seqlen, device=device)
    rel = idx[None, :] - idx[:, None]
    visible = (rel <= right) & (rel > -left)
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return visible


def _reference_scores(q, k, causal: bool, scale: float, window: int, segment_ids=None) -> torch.Tensor:
    """fp32 masked scores (B, H, S, S); k already expanded to H heads."""
    visible = _reference_mask(q.shape[2], causal, window, segment_ids, q.device)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    return scores.masked_fill(~visible, float("-inf"))


def _expand_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.repeat_interleave(num_heads // t.shape[1], dim=1)


def _reference_forward(q, k, v, causal, scale, window, segment_ids=None):
    scores = _reference_scores(q, _expand_kv(k, q.shape[1]), causal, scale, window, segment_ids)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ _expand_kv(v, q.shape[1]).float()
    return out.to(q.dtype).contiguous(), (lse * _LOG2E).contiguous()


def _reference_backward(do, q, k, v, causal, scale, window, segment_ids=None):
    """The FlashAttention backward formulas on materialized fp32 probabilities."""
    batch, num_heads, seqlen, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_heads, v_heads = _expand_kv(k, num_heads).float(), _expand_kv(v, num_heads).float()
    p = torch.softmax(_reference_scores(q, k_heads, causal, scale, window, segment_ids), dim=-1)
    do = do.float()
    dp = do @ v_heads.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = ds @ k_heads * scale
    group_shape = (batch, num_kv_heads, num_heads // num_kv_heads, seqlen, head_dim)
    dk = (ds.transpose(-1, -2) @ q.float() * scale).view(group_shape).sum(dim=2)
    dv = (p.transpose(-1, -2) @ do).view(group_shape).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("tritonforge::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                          window: int, deterministic: bool = True, segment_ids: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    # ``deterministic`` picks the forward's tiles by rule rather than by timing (``_rule_config``); autograd's
    # context (``_setup_context``) also receives it and picks the backward.
    if use_triton(q):
        return attention_forward(q, k, v, causal, scale, window, deterministic, segment_ids)
    return _reference_forward(q, k, v, causal, scale, window, segment_ids)


@_attention_forward_op.register_fake
def _(q, k, v, causal, scale, window, deterministic=True, segment_ids=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tritonforge::attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                           window: int, deterministic: bool = True,
                           segment_ids: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return attention_backward(do, q, k, v, out, lse, causal, scale, window, deterministic, segment_ids)
    return _reference_backward(do, q, k, v, causal, scale, window, segment_ids)  # exact either way


@_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, causal, scale, window, deterministic=True, segment_ids=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window, deterministic, segment_ids = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, segment_ids)
    ctx.causal, ctx.scale, ctx.window, ctx.deterministic = causal, scale, window, deterministic


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, segment_ids = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.window,
                                        ctx.deterministic, segment_ids)
    return dq, dk, dv, None, None, None, None, None


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _validate(q, k, v, causal, scale, window, deterministic, segment_ids) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, S, D), got shape {tuple(t.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, num_heads, seqlen, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seqlen or k.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} must be (B, Hkv, S, D) = ({batch}, Hkv, {seqlen}, "
                         f"{head_dim}) to match q {tuple(q.shape)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={head_dim} (last dim of q) is not supported; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q heads H={num_heads} must be a multiple of k/v heads Hkv={num_kv_heads}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor):
            raise TypeError(f"segment_ids must be a torch.Tensor or None, got {type(segment_ids).__name__}")
        if not _is_integer(segment_ids):
            raise TypeError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")
        if tuple(segment_ids.shape) != (batch, seqlen):
            raise ValueError(f"segment_ids must have shape (B, S) = ({batch}, {seqlen}), "
                             f"got {tuple(segment_ids.shape)}")
        if segment_ids.device != q.device:
            raise ValueError(f"segment_ids is on {segment_ids.device} but q is on {q.device}; "
                             "they must match")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None, window: int | None = None,
              deterministic: bool = True, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, fused, differentiable in q, k and v.

    Args:
        q: (B, H, S, D) queries; fp16, bf16 or fp32; any strides (the last dim contiguous avoids a copy).
        k, v: (B, Hkv, S, D) keys and values, same dtype and device; ``H % Hkv == 0`` (GQA / MQA: query
            head ``h`` uses kv head ``h // (H // Hkv)``).
        causal: query ``i`` sees keys ``j <= i``.
        scale: multiplies ``q . k`` before the softmax; default ``1 / sqrt(D)``; must be > 0.
        window: int >= 1 or None. With ``causal=True``: the ``window`` most recent keys,
            ``i - window < j <= i``. With ``causal=False``: the symmetric window ``|i - j| < window``.
        deterministic: True (default): output and gradients are bitwise reproducible run to run, across
            processes, resumed runs and data-parallel ranks on the same GPU model and Triton version:
            the backward uses no atomics, and every kernel's tiles (which fix the summation order) are
            chosen by rule, per kernel, head-dim class, dtype and segments (the first config its list
            holds for the installed Triton, ``_rule_config``), never by timing. False: the tiles are
            autotuned (timed once per shape bucket: the next power of two of S and the band's kind),
            and a faster backward (5 matmuls instead of 7 per block pair) sums dq with fp32 atomics,
            so results may differ in the last bits between runs.
        segment_ids: None, or a (B, S) integer tensor: key ``j`` is visible from query ``i`` only if
            ``segment_ids[b, i] == segment_ids[b, j]`` (and causal/window allow it). Packed documents,
            each a contiguous run of one id, cost in proportion to the documents' lengths; an id that
            recurs after another is still masked exactly, but the key blocks between its runs are
            visited (masked) rather than skipped.
    Returns:
        (B, H, S, D) in q's dtype. D must be one of ``SUPPORTED_HEAD_DIMS``.
    """
    _validate(q, k, v, causal, scale, window, deterministic, segment_ids)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = _attention_forward_op(q, k, v, causal, float(scale), window or 0, deterministic, segment_ids)
    return out


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, causal: bool = False, scale: float | None = None,
                     window: int | None = None, deterministic: bool = True) -> torch.Tensor:
    """Attention over variable-length sequences laid end to end, in FlashAttention's varlen convention.

    Args:
        q: (T, H, D) the tokens of all sequences; k, v: (T, Hkv, D).
        cu_seqlens: (N + 1,) integer offsets, ``0 = cu[0] <= cu[1] <= ... <= cu[N] = T``: sequence ``n``
            is tokens ``[cu[n], cu[n + 1])``. Not checked on the host (that would synchronize); tokens
            at or past ``cu[N]`` form one more sequence.
        max_seqlen: the longest sequence, accepted for FlashAttention's signature; the kernels find each
            sequence's bounds themselves, so it is only checked to be a positive int.
        causal, scale, window, deterministic: as for ``attention``, within each sequence.
    Returns:
        (T, H, D) in q's dtype: a view of an (H, T, D) buffer.

    This is ``attention`` on the (1, H, T, D) strided view of the tokens with ``segment_ids`` from
    ``cu_seqlens``: q, k, v are read in place, the output is written head-major. The fast layout is the
    same either way; a caller that needs the output contiguous as (T, H * D) pays one copy, which the
    (B, H, S, D) layout with ``segment_ids`` does not, when the next projection reads (B, H, S, D).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions (T, H, D), got shape {tuple(t.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 1, got {tuple(cu_seqlens.shape)}")
    if not _is_integer(cu_seqlens):
        raise TypeError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; they must match")
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < 1:
            raise ValueError(f"max_seqlen must be >= 1, got {max_seqlen}")
    tokens = torch.arange(q.shape[0], device=q.device, dtype=cu_seqlens.dtype)
    segment_ids = torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)[None, :]
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = attention(q4, k4, v4, causal=causal, scale=scale, window=window, deterministic=deterministic,
                    segment_ids=segment_ids)
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time variants
# ---------------------------------------------------------------------------------------------------

_STRIDES = ("stride_{}b", "stride_{}h", "stride_{}s")


def _stride_args(*prefixes: str) -> list[str]:
    return [s.format(p) for p in prefixes for s in _STRIDES]


def aot_variants() -> list[Variant]:
    """Every configuration the launchers and autotune lists may use on a GPU: per kernel, tile width
    (D rounded up to a power of two), dtype and config. Aligned: all pointers, the batch/head/sequence
    strides, H, S, D and the band ints (S or 0 at the benchmark shapes: hidden 2048, full or causal).
    Every dot kernel config is listed without and with ``SEGMENTS``, fp32 ones with IEEE and TF32 dots.
    The dK/dV kernel is listed twice: with its own configs, and with ``ATOMIC_DQ`` and the "dkdvdq"
    configs (the fused kernel of the ``deterministic=False`` backward)."""
    variants = []
    ints = ["num_heads", "group_size", "seqlen", "head_dim", "window_left", "window_right", "tune_seqlen",
            "tune_band"]
    aligned_ints = ("num_heads", "seqlen", "head_dim", "window_left", "window_right")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ty = TL_DTYPES[dtype]
        # fp32 dots: IEEE by default, TF32 where torch allows it for its matmuls (``dot_precision``)
        precisions = (DOT_IEEE, DOT_TF32) if dtype == torch.float32 else (DOT_TF32,)
        for block_d in sorted({_block_d(d) for d in SUPPORTED_HEAD_DIMS}):
            pre_sig = {"Out": f"*{ty}", "DO": f"*{ty}", "Delta": "*fp32",
                       **dict.fromkeys(_stride_args("do"), "i32"),
                       "num_heads": "i32", "seqlen": "i32", "head_dim": "i32"}
            # Its stores are one fp32 per row (a reduction over D): not 128-bit vectors.
            variants.append(Variant(
                kernel=_attn_bwd_preprocess, name=f"{ty} BLOCK_D={block_d}", signature=pre_sig,
                constexprs={"BLOCK_M": _PRE_TILE_ELEMS // block_d, "BLOCK_D": block_d, "WIDE_ROWS": False,
                            "FOLD_HEADS": False},
                num_warps=_PRE_NUM_WARPS, num_stages=1, kind="memory", vector_stores=False,
                aligned=("Out", "DO", "Delta", *_stride_args("do"), "num_heads", "seqlen", "head_dim")))
            fwd_sig = {"Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "Out": f"*{ty}", "LSE": "*fp32",
                       "Seg": "*i32", **dict.fromkeys(_stride_args("q", "k", "v"), "i32"),
                       **dict.fromkeys(ints, "i32"), "qk_scale": "fp32"}
            bwd_ptrs = {"Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "DO": f"*{ty}", "LSE": "*fp32",
                        "Delta": "*fp32"}
            bwd_rest = {**dict.fromkeys(_stride_args("q", "k", "v", "do"), "i32"),
                        **dict.fromkeys(ints, "i32"), "qk_scale": "fp32", "sm_scale": "fp32"}
            dkdv_sig = {**bwd_ptrs, "DK": f"*{ty}", "DV": f"*{ty}", "DQAcc": "*fp32", "Seg": "*i32",
                        **bwd_rest}
            dq_sig = {**bwd_ptrs, "DQ": f"*{ty}", "Seg": "*i32", **bwd_rest}
            pads = sorted({_block_d(d) != d for d in SUPPORTED_HEAD_DIMS if _block_d(d) == block_d})
            # (config list, kernel, signature, constexprs the launcher passes besides the tiles)
            launches = (("fwd", _attn_fwd, fwd_sig, {}),
                        ("dkdv", _attn_bwd_dkdv, dkdv_sig, {"ATOMIC_DQ": False}),
                        ("dkdvdq", _attn_bwd_dkdv, dkdv_sig, {"ATOMIC_DQ": True}),
                        ("dq", _attn_bwd_dq, dq_sig, {}))
            for (name, kernel, sig, switches), pad_d, segments, precision in itertools.product(
                    launches, pads, (False, True), precisions):
                pointers = tuple(n for n, t in sig.items() if t.startswith("*"))
                strides = tuple(n for n in sig if n.startswith("stride_"))
                config_class = _config_class(block_d, dtype)
                for config in _configs_for(name, block_d, dtype, segments):
                    block_m, block_n, warps, stages = config
                    keep_reason, keep_archs = (_FP32_IEEE if precision == DOT_IEEE else
                                               _KEEP_REASONS.get((name, config_class, config), ("", ())))
                    label = f"{ty} BLOCK_D={block_d}{' padded' if pad_d else ''}"
                    label += " segments" if segments else ""
                    label += " atomic dQ" if switches.get("ATOMIC_DQ") else ""
                    label += f" {precision}" if dtype == torch.float32 else ""
                    variants.append(Variant(
                        kernel=kernel.fn, name=f"{label} {block_m}x{block_n} w{warps} s{stages}",
                        signature=sig, constexprs={"BLOCK_D": block_d, "PAD_D": pad_d, "SEGMENTS": segments,
                                                   "DOT_PRECISION": precision, "WIDE_ROWS": False,
                                                   "FOLD_HEADS": False, **switches,
                                                   "BLOCK_M": block_m, "BLOCK_N": block_n},
                        num_warps=warps, num_stages=stages, kind=dot_kind(precision), aligned=pointers + strides + aligned_ints,
                        keep_reason=keep_reason, keep_archs=keep_archs))
    return variants
