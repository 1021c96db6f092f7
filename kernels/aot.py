"""Ahead-of-time compilation of the project's Triton kernels for GPUs that are not present.

Every kernel module in this package exposes ``aot_variants() -> list[Variant]``: one entry per
configuration its launch wrappers may choose (block sizes, warps, stages, dtypes, constexpr switches).

This module compiles each variant for Hopper (``sm_90``) and Ampere (``sm_80``) with Triton's own
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
"""
from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import fnmatch
import importlib
import importlib.util
import inspect
import io
import json
import os
import pickle
import pkgutil
import queue
import re
import select
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import _compat


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


def _keep_reason_on(reason: str, archs: tuple[str, ...], arch: str) -> str:
    """A variant's keep reason where it excuses ``arch`` (``archs`` empty: everywhere), else ""."""
    return reason if not archs or arch in archs else ""


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of one architecture (CUDA C Programming Guide, compute capabilities)."""

    capability: int
    shared_per_block: int          # largest opt-in shared memory of one block, static + dynamic
    shared_per_sm: int             # shared memory of one SM at the largest carveout
    matrix: str                    # the matrix instruction dot kernels must use here
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    register_unit: int = 256       # registers are allocated per warp in units of 256
    register_banks: int = 4        # one register file per SM sub-partition
    shared_unit: int = 128         # shared memory is allocated per block in units of 128 bytes
    shared_reserved: int = 1024    # the system reserves 1 KB of shared memory per block
    max_warps: int = 64
    max_blocks: int = 32


ARCHS: dict[str, ArchLimits] = {
    "sm_90": ArchLimits(capability=90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024,
                        matrix="wgmma"),
    "sm_80": ArchLimits(capability=80, shared_per_block=163 * 1024, shared_per_sm=164 * 1024,
                        matrix="mma"),
}
DEFAULT_ARCHS = ("sm_90", "sm_80")
KINDS = ("memory", "dot", "ieee-dot")


def dot_kind(precision: str) -> str:
    """A dot kernel's ``kind`` for ``tl.dot``'s ``input_precision``: IEEE fp32 products run on the FMA
    units (there is no tensor-core instruction for them), so their variants are not judged on ``wgmma``."""
    return "ieee-dot" if precision == "ieee" else "dot"


def _check_archs(archs: Iterable[str]) -> tuple[str, ...]:
    archs = tuple(archs)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise ValueError(f"arch must be among {sorted(ARCHS)}, got {list(archs)}")
    return archs


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: str) -> dict[str, Any]:
    """Resident blocks and warps per SM of a kernel, and which resource limits them.

    Registers: each warp takes ``registers * 32`` rounded up to 256, out of one of the four
    16K-register sub-partition files. Shared memory: each block takes ``static + dynamic + 1 KB``
    rounded up to 128 bytes. Warps: 64 per SM; blocks: 32 per SM.
    """
    lim = ARCHS[arch]
    warp_registers = -(-max(registers, 1) * 32 // lim.register_unit) * lim.register_unit
    warps_by_registers = (lim.registers_per_sm // lim.register_banks // warp_registers
                          * lim.register_banks)
    block_shared = -(-(shared_bytes + lim.shared_reserved) // lim.shared_unit) * lim.shared_unit
    fits_shared = shared_bytes <= lim.shared_per_block
    fits_registers = registers <= lim.max_registers_per_thread
    # On a tie the hardware ceilings (warps, blocks) are named: nothing else would raise it.
    limits = {
        "warps": lim.max_warps // num_warps,
        "blocks": lim.max_blocks,
        "registers": warps_by_registers // num_warps if fits_registers else 0,
        "shared memory": lim.shared_per_sm // block_shared if fits_shared else 0,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps / lim.max_warps,
        "occupancy_limiter": limiter,
    }


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

def _jit_types() -> tuple[type, ...]:
    return _compat.jit_types()


def _unwrap(obj: Any) -> Any:
    """The jit function under any ``triton.autotune``/``triton.heuristics`` wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    while isinstance(obj, (Autotuner, Heuristics)):
        obj = obj.fn
    return obj


def _is_jit(obj: Any) -> bool:
    return isinstance(_unwrap(obj), _jit_types())


def kernel_name(kernel: Any) -> str:
    """``"<module>.<function>"`` with the module's last component, e.g. ``"norm._norm_fwd_kernel"``."""
    fn = _unwrap(kernel).fn
    return f"{fn.__module__.rpartition('.')[2]}.{fn.__name__}"


@dataclass
class Discovery:
    """What ``discover()`` found: every variant, and every jit function of the kernel modules."""

    variants: list[Variant]
    jit_functions: dict[str, Any]
    modules: list[str]

    def uncovered(self) -> list[str]:
        """Names of jit functions that no variant launches, directly or through calls."""
        reached = covered_functions(self.variants)
        return sorted(name for name, fn in self.jit_functions.items() if id(fn.fn) not in reached)


def _module_jit_functions(module: Any) -> dict[str, Any]:
    found = {}
    for value in vars(module).values():
        fn = _unwrap(value)
        if isinstance(fn, _jit_types()) and fn.fn.__module__ == module.__name__:
            found[kernel_name(fn)] = fn
    return found


def discover(package: str = __package__) -> Discovery:
    """Import every module of ``package`` and collect its variants and jit functions.

    A module that fails to import raises: a broken kernel module must fail the check, not vanish
    from it. A module with jit functions but no ``aot_variants()`` leaves them uncovered.
    """
    pkg = importlib.import_module(package)
    this_module = _this_module_name()
    variants, jit_functions, modules = [], {}, []
    for info in sorted(pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."), key=lambda i: i.name):
        if info.name == this_module:
            continue
        module = importlib.import_module(info.name)
        modules.append(info.name)
        jit_functions.update(_module_jit_functions(module))
        if hasattr(module, "aot_variants"):
            for variant in module.aot_variants():
                if not isinstance(variant, Variant):
                    raise TypeError(f"{info.name}.aot_variants() returned {type(variant).__name__}, "
                                    "expected kernels.aot.Variant")
                variants.append(variant)
    return Discovery(variants=variants, jit_functions=jit_functions, modules=modules)


def _referenced_jit_functions(fn: Any) -> list[Any]:
    """Jit functions that the source of jit function ``fn`` names (calls or passes as combiners)."""
    raw = fn.fn
    tree = ast.parse(textwrap.dedent(inspect.getsource(raw)))
    found = []
    for node in ast.walk(tree):
        path = []
        while isinstance(node, ast.Attribute):
            path.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in raw.__globals__:
            continue
        obj = raw.__globals__[node.id]
        for attr in reversed(path):
            obj = getattr(obj, attr, None)
        obj = _unwrap(obj)
        # Triton's own library (tl.sum, tl.cdiv, ...) is not the project's to cover.
        if isinstance(obj, _jit_types()) and not obj.fn.__module__.startswith("triton."):
            found.append(obj)
    return found


def covered_functions(variants: Iterable[Variant]) -> set[int]:
    """``id`` of the Python function under every jit function the variants launch or reach."""
    pending = [_unwrap(v.kernel) for v in variants]
    seen: set[int] = set()
    while pending:
        fn = pending.pop()
        if id(fn.fn) in seen:
            continue
        seen.add(id(fn.fn))
        pending.extend(_referenced_jit_functions(fn))
    return seen


# --------------------------------------------------------------------------------------------
# Reading compiler output
# --------------------------------------------------------------------------------------------

_RESOURCE_RE = re.compile(
    r"Function (?P<name>\S+?):\s*REG:(?P<registers>\d+) STACK:(?P<stack>\d+) "
    r"SHARED:(?P<shared>\d+) LOCAL:(?P<local>\d+)")
_PTX_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?(?P<op>[a-z][\w.:]*)(?P<args>[^;]*)", re.MULTILINE)
_CP_ASYNC_BYTES_RE = re.compile(r"\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_resource_usage(text: str, function: str | None = None) -> dict[str, int]:
    """Registers, stack, local and static shared bytes of one function from
    ``cuobjdump --dump-resource-usage``."""
    for m in _RESOURCE_RE.finditer(text):
        if function is None or m["name"] == function:
            return {"registers": int(m["registers"]), "stack_bytes": int(m["stack"]),
                    "local_bytes": int(m["local"]), "shared_static": int(m["shared"])}
    raise ValueError(f"no resource usage for function {function!r} in cuobjdump output:\n{text}")


def _access_bits(op: str) -> int:
    """Bits moved by one ``ld``/``st``: lanes (``.v4``) times the element type (``.b32``)."""
    parts = op.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 0)
    return lanes * bits


def _classify(op: str, args: str) -> tuple[str, bool] | None:
    """``("load" | "store", is_128_bit_or_bulk)`` for a global memory instruction, else None."""
    if op.startswith(("ld.global", "st.global")):
        return ("load" if op[0] == "l" else "store"), _access_bits(op) >= 128
    if op.startswith(("cp.async.bulk", "cp.reduce.async.bulk")):
        # TMA and bulk copies name the destination state space first.
        into_shared = op.find(".shared") < op.find(".global")
        return ("load" if into_shared else "store"), True
    if op.startswith(("cp.async.ca.shared.global", "cp.async.cg.shared.global")):
        size = _CP_ASYNC_BYTES_RE.search(args)
        return "load", bool(size) and int(size[1], 0) >= 16
    return None


def count_ptx(text: str) -> dict[str, int]:
    """Matrix instructions and global loads/stores (all, and 128-bit or bulk) in PTX."""
    counts = dict.fromkeys(("wgmma", "mma", "global_loads", "vector_loads",
                            "global_stores", "vector_stores"), 0)
    for m in _PTX_RE.finditer(text):
        op = m["op"]
        if op.startswith("wgmma.mma_async"):
            counts["wgmma"] += 1
        elif op.startswith("mma.sync"):
            counts["mma"] += 1
        elif (access := _classify(op, m["args"])) is not None:
            direction, wide = access
            counts[f"global_{direction}s"] += 1
            counts[f"vector_{direction}s"] += wide
    return counts


def parse_ptxas_log(text: str) -> dict[str, Any]:
    """Spill traffic and performance warnings from ``ptxas -v``."""
    spill = _SPILL_RE.search(text)
    notes = []
    for line in text.splitlines():
        if "Performance Loss:" in line:
            message = line.split("Performance Loss:", 1)[1]
        elif "warning" in line.lower():
            message = line.split(":", 1)[-1]
        else:
            continue
        notes.append(re.sub(r" in the function '.*$", "", message).strip())
    return {"spill_stores": int(spill[1]) if spill else None,
            "spill_loads": int(spill[2]) if spill else None,
            "ptxas_notes": notes}


# --------------------------------------------------------------------------------------------
# Compiling one variant
# --------------------------------------------------------------------------------------------

_ANALYSIS_VERSION = 2
_ALIGN_ATTR = [["tt.divisibility", 16]]


def _ast_source(kernel: Any, variant: Variant):
    """Triton's ``ASTSource`` for a variant: full signature, constants and alignment attributes.

    Triton 3.9 keys attributes by argument path, ``{(index,): [["tt.divisibility", 16]]}``, as its
    launcher does for a pointer whose address (or an integer whose value) is a multiple of 16.
    """
    from triton.compiler import ASTSource
    where = f"{kernel_name(kernel)} [{variant.name}]"
    names = list(kernel.arg_names)
    unknown = sorted((set(variant.signature) | set(variant.constexprs) | set(variant.aligned))
                     - set(names))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not arguments of the kernel ({names})")
    doubled = sorted(set(variant.signature) & set(variant.constexprs))
    if doubled:
        raise ValueError(f"{where}: {doubled} are in both signature and constexprs")
    signature, constexprs = {}, {}
    for param in kernel.params:
        if param.name in variant.constexprs:
            signature[param.name] = "constexpr"
            constexprs[param.name] = variant.constexprs[param.name]
        elif param.is_constexpr and param.has_default:
            signature[param.name] = "constexpr"
            constexprs[param.name] = param.default
        elif param.is_constexpr:
            raise ValueError(f"{where}: constexpr {param.name!r} missing from constexprs")
        elif param.name in variant.signature:
            signature[param.name] = variant.signature[param.name]
        else:
            raise ValueError(f"{where}: argument {param.name!r} missing from signature")
    attrs = {}
    for name in variant.aligned:
        if name in constexprs:
            continue
        if not (signature[name].startswith("*") or signature[name][:1] in "iu"):
            raise ValueError(f"{where}: aligned names {name!r} of type {signature[name]}; "
                             "only pointers and integers can be")
        attrs[(names.index(name),)] = _ALIGN_ATTR
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _compile(src, arch: str, variant: Variant, force: bool):
    """``triton.compile`` with ptxas's log captured; ``force`` bypasses Triton's cache."""
    import triton
    from triton.backends.compiler import GPUTarget
    log = io.StringIO()
    with _compat.compiler_knobs(force), contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch].capability, 32),
                                  options={"num_warps": variant.num_warps,
                                           "num_stages": variant.num_stages})
    return compiled, log.getvalue()


def _run_tool(tool: str, *args: str) -> str:
    return subprocess.run([_compat.tool_path(tool), *args], check=True, capture_output=True, text=True).stdout


def _analyze(compiled, ptxas_log: str) -> dict[str, Any]:
    """Resources and instruction mix of a kernel compiled in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        resources = parse_resource_usage(_run_tool("cuobjdump", "--dump-resource-usage", cubin),
                                         compiled.metadata.name)
    analysis = {**resources, **count_ptx(compiled.asm["ptx"]), **parse_ptxas_log(ptxas_log)}
    analysis["spill_bytes"] = resources["stack_bytes"] + resources["local_bytes"]
    analysis["shared_dynamic"] = compiled.metadata.shared
    analysis["shared_bytes"] = resources["shared_static"] + compiled.metadata.shared
    return analysis


def _sidecar_path(kernel_hash: str) -> Path:
    return Path(_compat.cache_dir()) / "tritonforge_aot" / f"{kernel_hash}.json"


def _load_analysis(kernel_hash: str) -> dict[str, Any] | None:
    try:
        stored = json.loads(_sidecar_path(kernel_hash).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("version") != _ANALYSIS_VERSION:
        return None
    # The hash already covers Triton's own sources and ptxas; the version is checked as well, so
    # that one Triton never reports another's analysis from a shared cache directory.
    if stored.get("triton") != _compat.version_tag():
        return None
    return stored.get("analysis")


def _store_analysis(kernel_hash: str, analysis: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``."""
    path = _sidecar_path(kernel_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _ANALYSIS_VERSION, "triton": _compat.version_tag(),
                       "analysis": analysis}, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _variant_fields(variant: Variant) -> dict[str, Any]:
    return {k: getattr(variant, k) for k in Variant.__dataclass_fields__ if k != "kernel"}


def _identity(kernel: str, fields: dict[str, Any], arch: str) -> dict[str, Any]:
    """The columns that name a row, known before (or without) compiling."""
    return {"kernel": kernel, "variant": fields["name"], "arch": arch, "kind": fields["kind"],
            "num_warps": fields["num_warps"], "num_stages": fields["num_stages"],
            "aligned": list(fields["aligned"]),
            "keep_reason": _keep_reason_on(fields["keep_reason"], tuple(fields["keep_archs"]), arch)}


def judge(row: dict[str, Any], variant: Variant) -> dict[str, Any]:
    """The verdict on a compiled row: over-budget reasons, other problems, notes, ``ok``."""
    lim = ARCHS[row["arch"]]
    over = []
    if row["spill_bytes"]:
        over.append(f"spills {row['spill_bytes']} B")
    if row["shared_bytes"] > lim.shared_per_block:
        over.append(f"shared {row['shared_bytes'] / 1024:.0f} KB > {lim.shared_per_block // 1024} KB")
    problems = []
    if variant.kind == "dot" and not row[lim.matrix]:
        problems.append(f"no {lim.matrix}")
    aligned_pointer = any(variant.signature.get(a, "").startswith("*") for a in variant.aligned)
    if variant.kind == "memory" and aligned_pointer:
        if row["global_loads"] and not row["vector_loads"]:
            problems.append("no 128-bit loads")
        if variant.vector_stores and row["global_stores"] and not row["vector_stores"]:
            problems.append("no 128-bit stores")
    notes = list(row.get("ptxas_notes", []))
    if lim.matrix == "wgmma" and row["wgmma"] and row["mma"]:
        notes.append(f"{row['mma']} mma.sync beside wgmma")
    excused = bool(over) and bool(_keep_reason_on(variant.keep_reason, variant.keep_archs, row["arch"]))
    return {"over_budget": over, "problems": problems, "notes": notes,
            "ok": not problems and (not over or excused)}


def compile_variant(variant: Variant, arch: str) -> dict[str, Any]:
    """Compile one variant for ``arch`` (``"sm_90"`` or ``"sm_80"``) and return its report row.

    Raises the compiler's exception if it does not compile. Under the interpreter the kernel is
    not compilable in this process, so the work goes to a worker process.
    """
    _check_archs([arch])
    if variant.kind not in KINDS:
        raise ValueError(f"{kernel_name(variant.kernel)} [{variant.name}]: kind must be one of "
                         f"{KINDS}, got {variant.kind!r}")
    kernel = _unwrap(variant.kernel)
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        row = compile_all([variant], [arch], jobs=1)[0]
        if row["error"]:
            raise RuntimeError(row["error"])
        return row
    start = time.perf_counter()
    src = _ast_source(kernel, variant)
    compiled, log = _compile(src, arch, variant, force=False)
    cached = not log
    analysis = _load_analysis(compiled.hash)
    if analysis is None:
        if cached:
            # Triton's cache holds the kernel but not our analysis: compile again so that ptxas runs
            # and its log, and a cubin made in this process, are what we read.
            compiled, log = _compile(src, arch, variant, force=True)
            cached = False
        analysis = _analyze(compiled, log)
        analysis["cold_compile_s"] = round(time.perf_counter() - start, 3)
        _store_analysis(compiled.hash, analysis)
    row = {**_identity(kernel_name(kernel), _variant_fields(variant), arch), **analysis}
    row.update(occupancy(row["registers"], row["shared_bytes"], variant.num_warps, arch))
    row.update(judge(row, variant))
    row.update(compile_s=round(time.perf_counter() - start, 3), cached=cached, error=None)
    return row


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------

_JOB_TIMEOUT_S = 600


def _this_module_name() -> str:
    spec = globals().get("__spec__")
    return spec.name if spec is not None else __name__


def _import_root() -> str:
    """The directory from which this module is importable under its dotted name."""
    return str(Path(__file__).resolve().parents[_this_module_name().count(".")])


def _worker_boot() -> str:
    """The code a fresh compiler process starts with: import this module by its dotted name and serve.

    A top-level package that this process bound by hand rather than found on ``sys.path`` (the test suite
    binds ``tritonforge`` to the checkout it lives in) is bound the same way there first, so the worker
    imports the kernels, and any module a job names, exactly as this process does."""
    name = _this_module_name()
    top = name.split(".")[0]
    package = sys.modules.get(top)
    lines = ["import sys", f"sys.path.insert(0, {_import_root()!r})"]
    paths = list(getattr(package, "__path__", None) or [])
    if package is not None and getattr(package, "__spec__", None) is None and paths:
        lines += ["import types", f"_p = types.ModuleType({top!r})", f"_p.__path__ = {paths!r}",
                  f"sys.modules[{top!r}] = _p"]
    lines.append(f"from {name} import _serve")
    lines.append("_serve()")
    return "; ".join(lines)


def _job(variant: Variant, arch: str) -> bytes:
    raw = _unwrap(variant.kernel).fn
    payload = {"module": raw.__module__, "file": inspect.getfile(raw), "function": raw.__name__,
               "fields": _variant_fields(variant), "arch": arch}
    return base64.b64encode(pickle.dumps(payload)) + b"\n"


def _import_source_module(name: str, file: str) -> Any:
    """The module ``name`` if it is the one defined in ``file``; else ``file`` loaded on its own."""
    with contextlib.suppress(ImportError, OSError):
        module = importlib.import_module(name)
        if os.path.samefile(getattr(module, "__file__", "") or os.devnull, file):
            return module
    alias = f"_aot_source_{abs(hash(file)):x}"
    if alias not in sys.modules:
        spec = importlib.util.spec_from_file_location(alias, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        spec.loader.exec_module(module)
    return sys.modules[alias]


def _rebuild(payload: dict[str, Any]) -> Variant:
    module = _import_source_module(payload["module"], payload["file"])
    kernel = _unwrap(getattr(module, payload["function"], None))
    if not _is_jit(kernel):
        raise ValueError(f"{payload['module']}.{payload['function']} is not a module-level "
                         "@triton.jit function")
    return Variant(kernel=kernel, **payload["fields"])


def _error_row(identity: dict[str, Any], message: str) -> dict[str, Any]:
    return {**identity, "error": message[-4000:], "ok": False, "over_budget": [],
            "problems": ["does not compile"], "notes": []}


def _serve() -> None:
    """Worker loop: one base64 pickled job per stdin line, one JSON row per reply line."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the compiler prints must not land in the reply channel
    for line in sys.stdin.buffer:
        payload = pickle.loads(base64.b64decode(line))
        identity = _identity(f"{payload['module'].rpartition('.')[2]}.{payload['function']}",
                             payload["fields"], payload["arch"])
        try:
            row = compile_variant(_rebuild(payload), payload["arch"])
        except Exception as exc:  # the row records the failure; the worker goes on
            row = _error_row(identity, f"{type(exc).__name__}: {exc}")
        replies.write(json.dumps(row) + "\n")
        replies.flush()


class _Worker:
    """One compiler process with ``TRITON_INTERPRET=0``, fed one job at a time."""

    def __init__(self) -> None:
        env = dict(os.environ, TRITON_INTERPRET="0")
        # Triton 3.9 warns once per process that fp fusion defaults to on; state the default.
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        boot = _worker_boot()
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)

    def run(self, job: bytes, timeout: float) -> dict[str, Any]:
        self.proc.stdin.write(job)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no result after {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"compiler process exited ({self.proc.wait()}):\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def compile_all(variants: Sequence[Variant], archs: Sequence[str], jobs: int | None = None,
                timeout: float = _JOB_TIMEOUT_S) -> list[dict[str, Any]]:
    """Compile every variant for every arch on a pool of worker processes.

    Rows come back in variant order, then arch order; a variant that does not compile yields a
    row with ``error`` set instead of raising.
    """
    archs = _check_archs(archs)
    work = [(i, v, a) for i, v in enumerate(variants) for a in archs]
    if not work:
        return []
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    todo: queue.Queue = queue.Queue()
    # Dot kernels take longest: start them first so that the pool finishes together.
    for item in sorted(work, key=lambda w: (w[1].kind != "dot", w[0])):
        todo.put(item)

    def drain() -> None:
        worker = None
        try:
            while True:
                try:
                    i, variant, arch = todo.get_nowait()
                except queue.Empty:
                    return
                identity = _identity(kernel_name(variant.kernel), _variant_fields(variant), arch)
                try:
                    job = _job(variant, arch)
                except Exception as exc:
                    rows[i, arch] = _error_row(identity, f"cannot send to a worker: {exc!r}")
                    continue
                try:
                    worker = worker or _Worker()
                    rows[i, arch] = worker.run(job, timeout)
                except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
                    rows[i, arch] = _error_row(identity, f"{type(exc).__name__}: {exc}")
                    if worker is not None:
                        worker.proc.kill()
                        worker.close()
                        worker = None
        finally:
            if worker is not None:
                worker.close()

    n_workers = max(1, min(jobs or available_cores(), len(work)))
    threads = [threading.Thread(target=drain, daemon=True) for _ in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [rows[i, a] for i, _, a in work]


# --------------------------------------------------------------------------------------------
# Autotune budget
# --------------------------------------------------------------------------------------------

def config_variants(kernel: Any, configs: Sequence[Any] | None = None, *, signature: dict[str, str],
                    kind: str, constexprs: dict[str, Any] | None = None,
                    aligned: tuple[str, ...] = (), label: str = "", keep_reason: str = "",
                    vector_stores: bool = True) -> list[Variant]:
    """One Variant per ``triton.Config`` of an autotuned kernel (its own list by default).

    Each config's kwargs are merged over ``constexprs`` (the switches the wrapper passes itself).
    """
    if configs is None:
        configs = kernel.configs
    variants = []
    for cfg in configs:
        switches = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
        name = " ".join(p for p in (label, switches, f"w{cfg.num_warps} s{cfg.num_stages}") if p)
        variants.append(Variant(kernel=_unwrap(kernel), name=name, signature=dict(signature),
                                constexprs={**(constexprs or {}), **cfg.kwargs},
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages, kind=kind,
                                aligned=tuple(aligned), keep_reason=keep_reason,
                                vector_stores=vector_stores))
    return variants


def over_budget(variants: Sequence[Variant], archs: Sequence[str] = DEFAULT_ARCHS,
                jobs: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``variants`` that spill, exceed shared memory or do not compile, per arch.

    Use it on an autotune list (``config_variants(kernel, ...)``) to see which configs to prune.
    """
    return [row for row in compile_all(variants, archs, jobs)
            if row["error"] or row["over_budget"]]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _matches(variant: Variant, pattern: str) -> bool:
    name = kernel_name(variant.kernel)
    return any(fnmatch.fnmatchcase(n, pattern) for n in (name, name.rpartition(".")[2]))


def report(archs: Sequence[str] = DEFAULT_ARCHS, kernel: str | None = None, *,
           variants: Sequence[Variant] | None = None, jobs: int | None = None) -> list[dict]:
    """Compile every discovered variant (or ``variants``) for ``archs`` and return the rows.

    ``kernel`` keeps the kernels whose name, ``"module.function"`` or ``"function"``, matches
    this glob.
    """
    archs = _check_archs(archs)
    if variants is None:
        variants = discover().variants
    if kernel:
        variants = [v for v in variants if _matches(v, kernel)]
    return compile_all(variants, archs, jobs)


def _share(row: dict[str, Any], kind: str) -> str:
    total = row[f"global_{kind}"]
    return f"{row[f'vector_{kind}']}/{total}" if total else "-"


def _matrix(row: dict[str, Any]) -> str:
    used = [f"{name} {row[name]}" for name in ("wgmma", "mma") if row[name]]
    return " + ".join(used) or "-"


def _status(row: dict[str, Any]) -> str:
    if row["error"]:
        return "ERROR: " + row["error"].strip().splitlines()[-1][:100]
    parts = [*row["problems"], *("OVER BUDGET: " + o for o in row["over_budget"])]
    if row["over_budget"] and row["keep_reason"]:
        parts.append(f"kept: {row['keep_reason']}")
    parts += [f"note: {n}" for n in row["notes"]]
    return "; ".join(parts) or "ok"


_COLUMNS = ("kernel", "variant", "arch", "warps/stages", "regs", "spill B", "smem KB", "matrix",
            "ld 128b", "st 128b", "warps/SM (limit)", "status")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of report rows, one line per kernel variant and arch."""
    lines = []
    for r in rows:
        head = [r["kernel"], r["variant"], r["arch"], f"{r['num_warps']}/{r['num_stages']}"]
        if r["error"]:
            lines.append(head + ["-"] * 7 + [_status(r)])
            continue
        lines.append(head + [
            str(r["registers"]), str(r["spill_bytes"]), f"{r['shared_bytes'] / 1024:.1f}",
            _matrix(r), _share(r, "loads"), _share(r, "stores"),
            f"{r['warps_per_sm']} ({r['occupancy_limiter']})", _status(r)])
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c)
              for i, c in enumerate(_COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(_COLUMNS), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``tritonforge kernels report``: 0 when every row passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="tritonforge kernels report",
        description="Compile every Triton kernel variant for GPUs without one and report "
                    "registers, spills, shared memory, matrix instructions, vector memory ops "
                    "and occupancy.")
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS),
                        help="comma-separated architectures (default: %(default)s)")
    parser.add_argument("--kernel", default=None,
                        help="only kernels whose name (function or module.function) matches "
                             "this glob")
    parser.add_argument("--json", dest="json_path", default=None, help="also write rows here")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compiler processes (default: available cores)")
    args = parser.parse_args(argv)
    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    try:
        _check_archs(archs)
    except ValueError as exc:
        parser.error(f"--arch: {exc}")

    start = time.perf_counter()
    variants = discover().variants
    if args.kernel:
        variants = [v for v in variants if _matches(v, args.kernel)]
    jobs = max(1, min(args.jobs or available_cores(), len(variants) * len(archs) or 1))
    rows = compile_all(variants, archs, jobs)
    total_s = time.perf_counter() - start

    print(_compat.describe())
    if rows:
        print(format_table(rows))
    else:
        print("no kernel variants" + (f" match --kernel {args.kernel}" if args.kernel else ""))
    failed = [r for r in rows if not r["ok"]]
    cached = sum(bool(r.get("cached")) for r in rows)
    print(f"\n{len(rows)} compiles ({len(variants)} variants x {len(archs)} archs, {cached} from "
          f"cache) in {total_s:.1f} s on {jobs} processes; {len(failed)} failing")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"archs": list(archs), "triton": _compat.version_tag(), "versions": _compat.describe(),
             "total_s": round(total_s, 3), "jobs": jobs, "rows": rows},
            indent=1))
    return 1 if failed or (args.kernel and not rows) else 0


if __name__ == "__main__":
    # Run as ``python -m kernels.aot``: use the package's module so that Variant is one class.
    from .aot import main as _main
    sys.exit(_main())
