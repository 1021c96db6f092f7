"""Ahead-of-time compilation of the project's Triton kernels for GPUs that are not present.

Every kernel module of the kernel package exposes ``aot_variants() -> list[Variant]`` (the contract in
``kernels.variant``): one entry per configuration its launch wrappers may choose (block sizes, warps,
stages, dtypes, constexpr switches).

This tool package compiles each variant for Hopper (``sm_90``) and Ampere (``sm_80``) with Triton's own
compiler, which needs no GPU, applying the specializations a real launch gets (16-byte aligned
pointers, integers divisible by 16), and reads back what the hardware would run:

- registers per thread, stack/local bytes (spills) and static shared memory from
  ``cuobjdump --dump-resource-usage``; dynamic shared memory from Triton's metadata;
- matrix instructions (``wgmma.mma_async``, ``mma.sync``) and the width of every global load and
  store from the PTX: ``ld.global``/``st.global`` with ``.v4.b32``/``.v2.b64`` (128 bits) or
  narrower, ``cp.async`` with its byte count (16 = 128 bits), TMA/bulk copies counted as vector
  traffic. PTX rather than SASS because it comes with the compile for free, while disassembling
  the cubin (``cuobjdump -sass``) costs as much again as compiling a memory kernel; for what
  Triton emits, ptxas maps these one to one (``LDG.E.128``, ``LDGSTS...128``, ``STG.E.128``,
  ``HGMMA``, ``HMMA``: checked on every kernel of this package). What ptxas does change, it says
  in its log, which is kept: e.g. ``wgmma`` serialized for lack of registers;
- the theoretical occupancy: resident warps per SM under the register, shared-memory, warp and
  block limits, as CUDA's occupancy calculator counts them.

Compilation runs in worker processes started with ``TRITON_INTERPRET=0`` (tests import the kernels
under the interpreter, whose functions cannot be compiled), one per available core. Results reuse
Triton's on-disk cache: Triton writes each file to a temporary directory and ``os.replace``s it into
place, writes the group index last and treats an entry whose index or files are missing as a miss,
so a crashed compile never yields a half-written hit. The analysis is stored beside it the same way,
keyed by the compiled kernel's hash; it is only ever computed from a cubin compiled in this process.

Entry points: ``discover()``, ``compile_variant()``, ``report()``, ``format_table()``,
``config_variants()`` and ``over_budget()`` for autotune lists, and ``main()`` behind
``tritonforge kernels report`` / ``python -m kernels.aot``.

Modules: ``archs`` (per-SM limits, occupancy), ``discovery`` (kernel modules, variants, coverage),
``analysis`` (reading compiler output, the cached analysis, the verdict), ``compiling`` (one variant
in this process, many on worker processes) and ``cli`` (the report, its table and command line). The
kernel modules never import this package; it imports them.
"""

from .archs import ARCHS, DEFAULT_ARCHS, ArchLimits, occupancy  # noqa: F401
from .discovery import Discovery, covered_functions, discover, kernel_name, module_jit_functions  # noqa: F401
from .analysis import count_ptx, judge, parse_ptxas_log, parse_resource_usage  # noqa: F401
from .compiling import available_cores, compile_all, compile_variant  # noqa: F401
from .cli import config_variants, format_table, main, over_budget, report  # noqa: F401
