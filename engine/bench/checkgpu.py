"""The rows of ``kernels check`` only a GPU shows: a device that is not the current one, and offsets past
2^31 elements (``attention_varlen`` over :data:`WIDE_VARLEN` tokens)."""
from __future__ import annotations

import importlib
import time
from typing import Sequence

import torch

from ..kernels_package import KERNELS_PACKAGE
from .catalogue import DTYPE_NAMES, TOLERANCE
from .checkrows import (MAIN_FUNCTION, CheckArgs, check_case, checkable, judge, new_check_row, raised, report,
                        row_line, run_op_row, shapes_for)
from .timing import free_memory, rel_error


# ---------------------------------------------------------------------------------------------------
# What only a GPU shows: a device that is not the current one, offsets past 2^31 elements
# ---------------------------------------------------------------------------------------------------

#: (T, H, D) of the ``past 2^31`` row: T * H * D > 2^31 elements, in documents of WIDE_VARLEN_DOC tokens
#: (attention costs the sum of the documents' squares: seconds).
WIDE_VARLEN = (530_000, 32, 128)
WIDE_VARLEN_DOC = 1025
#: Tensors of T * H * D elements alive at once in that row: q, k, v, dO, out and the three gradients, with
#: room for the reference and the allocator.
WIDE_VARLEN_TENSORS = 10


def _other_device_rows(ops: Sequence[str], dtype: torch.dtype, log, log_err) -> list[dict]:
    """The Triton backend of each op at its first small shape on a GPU other than the current one."""
    count = torch.cuda.device_count()
    if count < 2:
        row = new_check_row("all", "triton", "other GPU", "–", DTYPE_NAMES[dtype], "–", TOLERANCE[dtype])
        row["status"], row["note"] = "not checked", "needs two GPUs; this machine has one"
        log(row_line(row))
        return [row]
    current = torch.cuda.current_device()
    other = torch.device("cuda", (current + 1) % count)
    rows = []
    for op in ops:
        if op == "optimizer" or not checkable(op):
            continue
        shape = shapes_for(op, "small")[0]
        case = check_case(op, shape, dtype, other, "small")
        label = f"{MAIN_FUNCTION[op]} {shape.label}" if op in MAIN_FUNCTION else shape.label
        row = run_op_row(case, "triton", "other GPU", log_err, label)
        row["note"] = row["note"] or f"on {other} while cuda:{current} is current"
        rows.append(row)
        log(row_line(row))
        del case
    return rows


def _wide_varlen_row(dtype: torch.dtype, device: torch.device, log, log_err) -> dict:
    """attention_varlen where every tensor holds more than 2^31 elements; three documents (the first, the
    one holding element 2^31, the last) against SDPA on that document alone, in float32."""
    tokens, heads, head_dim = WIDE_VARLEN
    row = new_check_row("attention", "triton", "past 2^31", f"varlen T={tokens} H={heads} D={head_dim}",
                   DTYPE_NAMES[dtype], "fp32", TOLERANCE[dtype])
    need = WIDE_VARLEN_TENSORS * tokens * heads * head_dim * dtype.itemsize
    free = torch.cuda.mem_get_info(device)[0]
    if free < need:
        row["status"] = "not checked"
        row["note"] = f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free"
        log(row_line(row))
        return row
    start = time.perf_counter()
    try:
        varlen = importlib.import_module(f"{KERNELS_PACKAGE}.attention").attention_varlen
        gen = torch.Generator(device).manual_seed(0)
        q, k, v, do = (torch.randn((tokens, heads, head_dim), generator=gen, device=device, dtype=dtype)
                       for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        cu = torch.cat([torch.arange(0, tokens, WIDE_VARLEN_DOC), torch.tensor([tokens])]).to(device)
        out = varlen(q, k, v, cu, causal=True)
        out.backward(do)
        last = len(cu) - 2
        docs = (0, 2**31 // (heads * head_dim) // WIDE_VARLEN_DOC, last)
        got, want = {n: [] for n in ("out", "dq", "dk", "dv")}, {n: [] for n in ("out", "dq", "dk", "dv")}
        for doc in docs:
            lo, hi = int(cu[doc]), int(cu[doc + 1])
            ref = [t[lo:hi].detach().float().transpose(0, 1).requires_grad_() for t in (q, k, v)]
            ref_out = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True)
            ref_out.backward(do[lo:hi].float().transpose(0, 1))
            for name, ours, theirs in zip(got, (out, q.grad, k.grad, v.grad), (ref_out, *(t.grad for t in ref))):
                got[name].append(ours[lo:hi])
                want[name].append(theirs.transpose(0, 1))
        row["errors"] = {n: rel_error(torch.cat(got[n]), torch.cat(want[n])) for n in got}
        judge(row)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", "out of memory at this shape on this card"
    except Exception as e:  # noqa: BLE001  (a kernel that raises on this card fails the check)
        raised(row, e)
    row["seconds"] = time.perf_counter() - start
    report(row, log_err)
    log(row_line(row))
    return row


def gpu_only_rows(args: CheckArgs, log, log_err) -> list[dict]:
    dtype = next((d for d in args.dtypes if d != torch.float32), args.dtypes[0])
    rows = _other_device_rows([op for op in args.ops if checkable(op)], dtype, log, log_err)
    if "attention" in args.ops and "real" in args.sizes:
        rows.append(_wide_varlen_row(dtype, args.device, log, log_err))
        free_memory(args.device)
    return rows
