"""Reading what the compiler produced: resources, matrix instructions and vector memory operations from
``cuobjdump`` and the PTX, spills and warnings from ptxas's log, the analysis cached beside Triton's own
cache, and the verdict on a compiled row."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .._compat import cache_dir, tool_path, version_tag
from ..variant import Variant
from .archs import ARCHS, keep_reason_on


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

_ANALYSIS_VERSION = 2


def run_tool(tool: str, *args: str) -> str:
    return subprocess.run([tool_path(tool), *args], check=True, capture_output=True, text=True).stdout


def analyze(compiled, ptxas_log: str) -> dict[str, Any]:
    """Resources and instruction mix of a kernel compiled in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        resources = parse_resource_usage(run_tool("cuobjdump", "--dump-resource-usage", cubin),
                                         compiled.metadata.name)
    analysis = {**resources, **count_ptx(compiled.asm["ptx"]), **parse_ptxas_log(ptxas_log)}
    analysis["spill_bytes"] = resources["stack_bytes"] + resources["local_bytes"]
    analysis["shared_dynamic"] = compiled.metadata.shared
    analysis["shared_bytes"] = resources["shared_static"] + compiled.metadata.shared
    return analysis


def _sidecar_path(kernel_hash: str) -> Path:
    return Path(cache_dir()) / "tritonforge_aot" / f"{kernel_hash}.json"


def load_analysis(kernel_hash: str) -> dict[str, Any] | None:
    try:
        stored = json.loads(_sidecar_path(kernel_hash).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("version") != _ANALYSIS_VERSION:
        return None
    # The hash already covers Triton's own sources and ptxas; the version is checked as well, so
    # that one Triton never reports another's analysis from a shared cache directory.
    if stored.get("triton") != version_tag():
        return None
    return stored.get("analysis")


def store_analysis(kernel_hash: str, analysis: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``."""
    path = _sidecar_path(kernel_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _ANALYSIS_VERSION, "triton": version_tag(),
                       "analysis": analysis}, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

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
    excused = bool(over) and bool(keep_reason_on(variant.keep_reason, variant.keep_archs, row["arch"]))
    return {"over_budget": over, "problems": problems, "notes": notes,
            "ok": not problems and (not over or excused)}
