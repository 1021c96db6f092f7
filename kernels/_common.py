"""What several kernel modules share: the interpreter switch, the SM count, dtype names, and the
fixed-order partial-sum reduction that turns per-program partial gradients into one (no atomics)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .aot import Variant

#: The Triton interpreter runs the kernels on CPU tensors (tests). Read once, at import, as Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Stands in for the SM count when kernels run in the interpreter: grids stay small but above one program.
INTERPRETER_SMS = 4
#: torch dtype -> Triton's type name in kernel signatures.
TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: The partial-sum reduction's tile (BLOCK_G partial rows x BLOCK_N columns per step) and warps.
SUM_BLOCK_G, SUM_BLOCK_N, SUM_WARPS = 128, 32, 4


def use_triton(t: torch.Tensor) -> bool:
    """The Triton kernels can run on ``t``: it is on a GPU, or the interpreter is on."""
    return t.is_cuda or INTERPRET


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def sum_partials_kernel(
    PART,  # *[P, G, N] fp32 partial sums, contiguous; P = 1 or 2 (e.g. dw and db)
    OUT0,  # *[N] sum over G of PART[0], in its parameter's dtype
    OUT1,  # *[N] sum over G of PART[1] (when P = 2)
    G,  # number of partial rows
    N,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """OUT_p[n] = sum_g PART[p, g, n], program (column block, p), in a fixed order (deterministic).

    Memory: reads P*G*N fp32 once, writes P*N values.
    """
    pid_n = tl.program_id(0)
    part = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base = PART + part.to(tl.int64) * G * N
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g_start in range(0, G, BLOCK_G):
        offs_g = g_start + tl.arange(0, BLOCK_G)
        mask = (offs_g < G)[:, None] & mask_n[None, :]
        acc += tl.load(base + offs_g.to(tl.int64)[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if part == 0:
        tl.store(OUT0 + offs_n, total.to(OUT0.dtype.element_ty), mask=mask_n)
    else:
        tl.store(OUT1 + offs_n, total.to(OUT1.dtype.element_ty), mask=mask_n)


def sum_partials_variant(dtype: str, block_g: int = SUM_BLOCK_G, block_n: int = SUM_BLOCK_N,
                         num_warps: int = SUM_WARPS, label: str = "", vector_stores: bool = False) -> Variant:
    """The AOT variant of :func:`sum_partials_kernel` writing ``dtype`` outputs with the given tile.

    Its output is N values in all (its loads are 128-bit); 128-bit stores would need >= 8 output columns
    per thread, i.e. few wide programs that read G rows serially, so the default narrow tile trades store
    width (irrelevant at N values) for parallelism (``vector_stores=False``).
    """
    return Variant(
        kernel=sum_partials_kernel, name=f"{dtype} BLOCK_G={block_g} BLOCK_N={block_n}{label}",
        signature={"PART": "*fp32", "OUT0": f"*{dtype}", "OUT1": f"*{dtype}", "G": "i32", "N": "i32"},
        constexprs={"BLOCK_G": block_g, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=3,
        kind="memory", aligned=("PART", "OUT0", "OUT1", "N"), vector_stores=vector_stores)


def aot_variants() -> list[Variant]:
    """The default tile, for every parameter dtype (the norms', the depthwise conv's and mlp's sums)."""
    return [sum_partials_variant(dt) for dt in TL_DTYPES.values()]
