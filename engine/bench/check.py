"""``tritonforge kernels check``: every op's kernels against an upcast reference, on this machine.

Each op of the registry's table runs through each backend (``torch``, ``triton``; attention also
``triton-nondet``, the backward that sums dQ with atomics), dtype and shape, forward and backward (a random
upstream gradient, the gradient of every input), and ``‖out − ref‖ / ‖ref‖`` against the same computation
on upcast inputs must stay within the dtype's :data:`TOLERANCE`. The optimizer (AdamW, SGD with Nesterov
momentum, Lion) takes :data:`OPTIMIZER_STEPS` steps on fp32 parameters; its update and every state tensor
are compared with torch's optimizers in float64. :data:`VARIANTS` adds the fused residual add + norm,
cross-entropy of given logits and windowed multi-query attention. One table; exit status 1 on a failure.

Shapes: ``small`` (``bench ops``' tiny set), ``odd`` (sizes no block divides: 67 keys, head dim 80, also
as three packed documents; 1000 columns, 11 channels, 1001 classes...) and, on a GPU, ``real`` (the
``bench ops`` defaults, up to S = 16384, 8192x8192 norms, GPT-2's head and its 124M and 1.5B parameter
sets). The reference is float64, except on a GPU for attention and the real shapes: float32 (no S x S
matrix in float64). Without CUDA the kernels run
through the Triton interpreter at the small and odd shapes (the command sets ``TRITON_INTERPRET=1`` itself,
before the kernels are imported, and says so); the Triton bf16 rows of ops built on ``tl.dot`` then wait for
a GPU (see :data:`DOT_FREE_OPS`). A new row of the table is checked through its ``OpBench``.

Two kinds of rows only a GPU shows. ``other GPU``: each op's first small shape on a GPU that is not the
current one (Triton launches on the current device unless the launcher enters the tensors'); with one
GPU the row says it needs two. ``past 2^31`` (with the real shapes): ``attention_varlen`` over
:data:`WIDE_VARLEN` tokens, more than 2^31 elements per tensor, so row offsets overflow 32 bits; a few
documents, one of them past the 2^31st element, against SDPA in float32, forward and backward; skipped,
with the memory it needs, where the card lacks it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Sequence

import torch

from ..kernels_package import KERNELS_PACKAGE
from ..ops import table as op_table
from .args import ArgumentParser, BenchError, CheckError, known_names
from .catalogue import DTYPES, DTYPE_NAMES, OPTIMIZER_TOLERANCE, TOLERANCE
from .checkgpu import gpu_only_rows
from .checkrows import SIZES, CheckArgs, checkable, new_check_row, op_rows, optimizer_rows, shapes_for
from .optimizer import OPTIMIZER_STEPS
from .tables import fmt, format_table, write_json
from .timing import environment, pick_device


def run(args: CheckArgs, log=print, log_err=None) -> dict:
    """Every row; returns (and writes, as it goes) ``{"env", "tolerances", "rows", "seconds"}``."""
    log_err = log_err or (lambda text: print(text, file=sys.stderr, flush=True))
    start = time.perf_counter()
    result = {"env": environment(args.device), "tolerances": tolerances(), "rows": [], "seconds": 0.0}
    for op in args.ops:
        if not checkable(op):
            row = new_check_row(op, "–", "–", "–", "–", "–", math.nan)
            row["status"], row["note"] = "not checked", "this command has no inputs and reference for this op yet"
            result["rows"].append(row)
            continue
        for size in args.sizes:
            if op == "optimizer":
                for shape in shapes_for(op, size):
                    result["rows"] += optimizer_rows(shape, size, args.device, log, log_err)
                continue
            for dtype in args.dtypes:
                result["rows"] += op_rows(op, dtype, size, args.device, log, log_err)
        result["seconds"] = time.perf_counter() - start
        if args.json:
            write_json(args.json, result)
    if args.device.type == "cuda":
        result["rows"] += gpu_only_rows(args, log, log_err)
    result["seconds"] = time.perf_counter() - start
    if args.json:
        write_json(args.json, result)
    return result


def tolerances() -> dict[str, float]:
    return {**{DTYPE_NAMES[d]: t for d, t in TOLERANCE.items()}, "optimizer (fp32)": OPTIMIZER_TOLERANCE}


def _error_cell(value: float | None) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else fmt(value, ".1e")


def table(rows: list[dict]) -> str:
    header = ["op", "backend", "size", "shape", "dtype", "ref", "forward", "backward", "worst", "tolerance",
              "status"]
    cells = [[r["op"], r["backend"], r["size"], r["shape"], r["dtype"], r["reference"], _error_cell(r["forward"]),
              _error_cell(r["backward"]), r["worst"], fmt(r["tolerance"], "g"), r["status"]] for r in rows]
    return format_table(header, cells)


LEGEND = ("forward: relative error ‖out − ref‖ / ‖ref‖ of the output (optimizer: of the parameter update after "
          f"{OPTIMIZER_STEPS} steps); backward: the largest over the input gradients (optimizer: over the state "
          "tensors); worst: the tensor with the largest error; ref: the reference's dtype")

ADVICE = ("A FAIL row means that kernel computes wrong results on this machine. Train with the torch backend for "
          "that op (--kernels.OP=torch on the command line, or OP = \"torch\" under [kernels] in the recipe; the "
          "`auto` backend would pick triton on a GPU) and report the table above (--json FILE writes it) with "
          "your GPU, driver, torch and triton versions.")


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def _check_parser() -> ArgumentParser:
    p = ArgumentParser(prog="tritonforge kernels check", allow_abbrev=False,
                       description="Check every op's Triton kernel and torch backend, forward and backward, "
                                   "against an upcast reference on this machine; exit 1 on any failure.")
    p.add_argument("--op", default="all", help=f"comma list of {', '.join(op_table.op_names())} (default: all)")
    p.add_argument("--dtype", default="bf16,fp16,fp32",
                   help="comma list of bf16, fp16, fp32 (default: all three); the optimizer runs fp32")
    p.add_argument("--sizes", default=None,
                   help="comma list of small, odd, real (default: all three on CUDA, small,odd on CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--json", default=None, metavar="FILE", help="write every row, its errors and the tolerances")
    return p


def parse_args(argv: Sequence[str]) -> CheckArgs:
    a = _check_parser().parse_args(list(argv))
    device = pick_device(a.device)
    ops = list(op_table.op_names()) if a.op == "all" else known_names(a.op, "--op", op_table.op_names())
    dtypes = [DTYPES[n] for n in known_names(a.dtype, "--dtype", tuple(DTYPES))]
    cuda = device.type == "cuda"
    sizes = known_names(a.sizes, "--sizes", SIZES) if a.sizes else list(SIZES if cuda else SIZES[:2])
    if "real" in sizes and not cuda:
        raise CheckError("--sizes: 'real' needs a CUDA device (the interpreter would take hours); "
                         "use small,odd on a CPU")
    return CheckArgs(ops, dtypes, [s for s in SIZES if s in sizes], device, a.json)


def prepare_kernels(device: torch.device) -> str | None:
    """Make the kernels run where the check runs; returns a line to print when that is the interpreter.

    ``TRITON_INTERPRET`` is read when the kernel modules are imported, so it is set here before that, or
    the check refuses to run with a mismatched setting.
    """
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if interpret:
            raise CheckError("TRITON_INTERPRET=1 is set: the kernels would run through the interpreter, not on "
                             "the GPU; unset it to check the compiled kernels, or pass --device cpu")
        return None
    if not interpret:
        loaded = sorted(m for m in sys.modules if m == KERNELS_PACKAGE or m.startswith(f"{KERNELS_PACKAGE}."))
        if loaded:
            raise CheckError("the kernels were imported before the Triton interpreter could be switched on; run "
                             "`TRITON_INTERPRET=1 tritonforge kernels check`")
        os.environ["TRITON_INTERPRET"] = "1"
    return ("no CUDA device: the Triton kernels run through the Triton interpreter on the CPU "
            "(TRITON_INTERPRET=1), at the small and odd shapes; bf16 matrix products are checked on a GPU only")


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
        note = prepare_kernels(args.device)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note:
        print(note)
    result = run(args)
    rows = result["rows"]
    env = result["env"]
    print()
    print(table(rows))
    print(LEGEND)
    print("tolerances: " + ", ".join(f"{k} {v:g}" for k, v in result["tolerances"].items()))
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    print(f"{len(rows)} rows ({', '.join(f'{n} {s}' for s, n in counts.items())}) in {result['seconds']:.0f} s on "
          f"{env.get('gpu') or 'CPU'}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}")
    if args.json:
        print(f"wrote {args.json}")
    failed = [r for r in rows if r["status"] == "FAIL"]
    if failed:
        print(f"\n{len(failed)} row(s) FAILED:", file=sys.stderr)
        for r in failed:
            print(f"  {r['op']} / {r['backend']} / {r['shape']} / {r['dtype']}: {r['note']}", file=sys.stderr)
        print(ADVICE, file=sys.stderr)
        return 1
    return 0
