"""The compile-variant contract every kernel module lists its configurations with.

Each kernel module exposes ``aot_variants() -> list[Variant]``: one entry per configuration its launch
wrappers may choose (block sizes, warps, stages, dtypes, constexpr switches). The compile report
(``python -m kernels.aot``) imports the kernel modules and compiles these; the kernel modules import
only this module, never the report.
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
    constexprs:  every ``tl.constexpr`` argument name -> the value the wrapper passes. An integer
                 argument a real launch passes as 1 (a unit stride) is specialized by Triton into a
                 constant: list it here with the value 1 instead of in ``signature``.
    num_warps, num_stages: the launch options the wrapper (or autotune config) uses.
    kind:        ``"memory"`` (bandwidth-bound, judged on 128-bit vector memory ops), ``"dot"``
                 (matrix-bound, judged on ``wgmma``/``mma`` use) or ``"ieee-dot"`` (matrix-shaped work
                 in IEEE fp32, which no tensor-core instruction computes: judged on spills and shared
                 memory only; see :func:`dot_kind`).
    aligned:     argument names a real launch specializes as 16-byte aligned (pointers) or divisible
                 by 16 (integers such as row strides and N at the benchmark shapes).
    keep_reason: why a config that spills or exceeds an architecture's shared memory stays in the
                 list anyway (e.g. "the autotuner skips it on sm_80, where it does not fit"); the
                 report prints it and does not count the row as a failure.
    keep_archs:  the architectures the reason excuses (empty: every one); on the others the same
                 config must fit, or the row fails.
    vector_stores: False for a memory kernel whose only stores are one value per program (partial
                 sums): its stores cannot be vectors and are not judged.
    """

    kernel: Any
    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    kind: str
    aligned: tuple[str, ...] = field(default_factory=tuple)
    keep_reason: str = ""
    keep_archs: tuple[str, ...] = ()
    vector_stores: bool = True


KINDS = ("memory", "dot", "ieee-dot")


def dot_kind(precision: str) -> str:
    """A dot kernel's ``kind`` for ``tl.dot``'s ``input_precision``: IEEE fp32 products run on the FMA
    units (there is no tensor-core instruction for them), so their variants are not judged on ``wgmma``."""
    return "ieee-dot" if precision == "ieee" else "dot"

