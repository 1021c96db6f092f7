"""Ahead-of-time compilation of the project's Triton kernels for GPUs that are not present.

Every kernel module in this package exposes ``aot_variants() -> list[Variant]``: one entry per
configuration its launch wrappers may choose (block sizes, warps, stages, dtypes, constexpr switches).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One launch configuration of one ``@triton.jit`` kernel.

    kernel:      the ``@triton.jit`` function itself (unwrap ``triton.autotune`` to ``.fn``).
    name:        a short label for the report, e.g. ``"bf16 BLOCK_N=1024"``.
    signature:   every non-constexpr argument name -> Triton type string (``"*bf16"``, ``"*fp32"``,
                 ``"i32"``, ``"fp32"``), in the kernel's argument order.
    constexprs:  every ``tl.constexpr`` argument name -> the value the wrapper passes.
    num_warps, num_stages: the launch options the wrapper (or autotune config) uses.
    kind:        ``"memory"`` (bandwidth-bound, judged on 128-bit vector memory ops) or ``"dot"``
                 (matrix-bound, judged on ``wgmma``/``mma`` use).
    aligned:     argument names a real launch specializes as 16-byte aligned (pointers) or divisible
                 by 16 (integers such as row strides and N at the benchmark shapes).
    """

    kernel: Any
    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    kind: str
    aligned: tuple[str, ...] = field(default_factory=tuple)
