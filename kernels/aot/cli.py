"""The report and its command line: autotune budgets, the table, and ``main()`` behind
``tritonforge kernels report`` / ``python -m kernels.aot``."""
from __future__ import annotations

import argparse
import fnmatch
import json
import time
from pathlib import Path
from typing import Any, Sequence

from .._compat import describe, version_tag
from ..variant import Variant
from .archs import DEFAULT_ARCHS, check_archs
from .compiling import available_cores, compile_all
from .discovery import discover, kernel_name, unwrap


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
        variants.append(Variant(kernel=unwrap(kernel), name=name, signature=dict(signature),
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


def _matches(variant: Variant, pattern: str) -> bool:
    name = kernel_name(variant.kernel)
    return any(fnmatch.fnmatchcase(n, pattern) for n in (name, name.rpartition(".")[2]))


def report(archs: Sequence[str] = DEFAULT_ARCHS, kernel: str | None = None, *,
           variants: Sequence[Variant] | None = None, jobs: int | None = None) -> list[dict]:
    """Compile every discovered variant (or ``variants``) for ``archs`` and return the rows.

    ``kernel`` keeps the kernels whose name, ``"module.function"`` or ``"function"``, matches
    this glob.
    """
    archs = check_archs(archs)
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
        check_archs(archs)
    except ValueError as exc:
        parser.error(f"--arch: {exc}")

    start = time.perf_counter()
    variants = discover().variants
    if args.kernel:
        variants = [v for v in variants if _matches(v, args.kernel)]
    jobs = max(1, min(args.jobs or available_cores(), len(variants) * len(archs) or 1))
    rows = compile_all(variants, archs, jobs)
    total_s = time.perf_counter() - start

    print(describe())
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
            {"archs": list(archs), "triton": version_tag(), "versions": describe(),
             "total_s": round(total_s, 3), "jobs": jobs, "rows": rows},
            indent=1))
    return 1 if failed or (args.kernel and not rows) else 0
