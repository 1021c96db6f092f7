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

Time on one H100, estimated from the work, not measured: per dtype and backend the real shapes hold ~35 TFLOP
of matrix products (attention 30), ~5 s per dtype with the float32 attention reference (SDPA without tensor
cores, ~20 TFLOP/s) the slowest part; ~8 TB of memory traffic (the optimizer: 3.4B parameters, three
optimizers, two backends, float64 references), ~3 s; about 20 s in all. Compiling and autotuning the kernels
with an empty Triton cache comes on top (not measured; tens of seconds), and so does compiling FlexAttention
for the torch backend's packed-documents rows, once per dtype.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

from .. import KERNELS_PACKAGE
from ..ops import reference as op_reference, select as op_select, table as op_table
from ..optim import lion
from ..optim.build import build_optimizer
from . import (ArgumentParser, BenchError, environment, fmt, format_table, free_memory, pick_device,
               rel_error, write_json)
from . import ops as bench_ops
from .ops import (TOLERANCE, AttentionShape, HeadShape, ImageShape, MatrixShape, NotAvailable,
                  ParamSetShape, RopeShape)

DTYPES = bench_ops.DTYPES
DTYPE_NAMES = bench_ops.DTYPE_NAMES
#: Largest relative error of the parameter update and of each state tensor after the steps (fp32).
OPTIMIZER_TOLERANCE = bench_ops.OPTIMIZER_TOLERANCE
OPTIMIZER_STEPS = 3
#: The optimizers of the ``optimizer`` op, with the settings they are checked at, and their state tensors.
OPTIMIZERS = {
    "adamw": (dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), ("exp_avg", "exp_avg_sq")),
    "sgd": (dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1), ("momentum_buffer",)),
    "lion": (dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1), ("exp_avg",)),
    # Muon for the blocks' matrices (momentum buffer), AdamW for the rest (moments): see _muon_groups
    "muon": (dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, nesterov=True),
             ("momentum_buffer", "exp_avg", "exp_avg_sq")),
}
MAX_GRAD_NORM = bench_ops.MAX_GRAD_NORM
INIT_STD = 0.02
#: The ops whose kernels never multiply with ``tl.dot``: their bf16 rows are checked in the interpreter too.
#: Every other op's bf16 Triton rows wait for a GPU (the interpreter's bf16 dot is wrong).
DOT_FREE_OPS = frozenset({"layer_norm", "rms_norm", "dwconv", "rope", "swiglu"})
BACKENDS = {"attention": ("torch", "triton", "triton-nondet")}
DEFAULT_BACKENDS = ("torch", "triton")
SIZES = ("small", "odd", "real")

#: Shapes whose sizes no block size divides, past one block where a kernel tiles.
ODD_SHAPES: dict[str, list] = {
    # documents of 23, 22 and 22 tokens: the Triton kernels' segment mask and, on CUDA, the torch
    # backend's FlexAttention path
    "attention": [AttentionShape(2, 3, 67, 80, causal) for causal in (True, False)]
                 + [AttentionShape(2, 3, 67, 80, True, segments=3)],
    "layer_norm": [MatrixShape(1, 1000), MatrixShape(37, 1000)],
    "rms_norm": [MatrixShape(1, 1000), MatrixShape(37, 1000)],
    "mlp": [MatrixShape(37, 24)],
    "dwconv": [ImageShape(1, 11, 5, 7)],
    "cross_entropy": [HeadShape(37, 40, 1001)],
    "optimizer": [ParamSetShape(1, 40, vocab=101, context=13, clip=True)],
    "rope": [RopeShape(2, 3, 1, 37, 18)],
    "swiglu": [MatrixShape(37, 1000)],
}


def shapes_for(op: str, size: str) -> list:
    """An op with a built-in ``bench ops`` case: the sets above; any other row of the registry's table: its
    ``OpBench``'s ``tiny``, ``odd`` (when it has one) and ``default`` shapes."""
    if op in ODD_SHAPES:
        sets = {"small": bench_ops.SHAPE_SETS["tiny"], "odd": ODD_SHAPES, "real": bench_ops.SHAPE_SETS["default"]}
        return sets[size][op]
    shapes = op_table.find(op).bench.shapes
    return shapes.get({"small": "tiny", "odd": "odd", "real": "default"}[size], [])


def backends_for(op: str) -> tuple[str, ...]:
    return BACKENDS.get(op, DEFAULT_BACKENDS)


def checkable(op: str) -> bool:
    """Whether this module knows how to build ``op``'s inputs and reference."""
    return op in ODD_SHAPES or op_table.find(op).bench is not None


class CheckError(BenchError):
    """The check cannot run as asked (a bad option, or the interpreter cannot be switched on)."""


# ---------------------------------------------------------------------------------------------------
# One row: an op, backend, shape and dtype
# ---------------------------------------------------------------------------------------------------

def _new_row(op: str, backend: str, size: str, shape: str, dtype: str, reference: str, tolerance: float) -> dict:
    return {"op": op, "backend": backend, "size": size, "shape": shape, "dtype": dtype, "reference": reference,
            "errors": {}, "forward": None, "backward": None, "worst": "", "tolerance": tolerance, "status": "ok",
            "note": "", "seconds": 0.0}


def _judge(row: dict) -> None:
    """Fill the forward (the first error) and backward (the largest of the others) columns from
    ``row["errors"]`` and mark the row FAIL past the tolerance."""
    errors = row["errors"]
    first, *rest = errors
    row["forward"] = errors[first]
    if rest:
        row["backward"] = max((errors[n] for n in rest), key=lambda e: math.inf if math.isnan(e) else e)
    bad = {n: e for n, e in errors.items() if not e <= row["tolerance"]}  # NaN fails
    if bad:
        row["status"] = "FAIL"
        row["worst"] = max(bad, key=lambda n: math.inf if math.isnan(bad[n]) else bad[n])
        row["note"] = "above the tolerance: " + ", ".join(f"{n} {e:.2e}" for n, e in bad.items())
    elif errors:
        row["worst"] = max(errors, key=errors.get)


class _Upcast64(bench_ops.Case):
    """A bench case whose reference is float64 on any device."""

    @property
    def ref_dtype(self) -> torch.dtype:
        return torch.float64


def _upcast_to_64(op: str, device: torch.device, size: str) -> bool:
    return not (device.type == "cuda" and (size == "real" or op == "attention"))  # else float32 (see above)


def _make_case(op: str, shape, dtype: torch.dtype, device: torch.device, size: str) -> bench_ops.Case:
    case = bench_ops.make_case(op, shape, dtype, device)
    if not _upcast_to_64(op, device, size):
        return case
    return _Upcast64(**{f.name: getattr(case, f.name) for f in fields(case)})


# ---------------------------------------------------------------------------------------------------
# The op's other functions: the fused residual add of the norms, cross-entropy of given logits
# ---------------------------------------------------------------------------------------------------

def _variant_case(function: str, op: str, shape, dtype: torch.dtype, device: torch.device, size: str):
    """The case (inputs, upstream gradient, names) and reference of one of ``op``'s other functions."""
    torch.manual_seed(0)
    cls = _Upcast64 if _upcast_to_64(op, device, size) else bench_ops.Case
    rand = lambda *s: torch.randn(*s, dtype=dtype, device=device).requires_grad_()  # noqa: E731
    if function == WINDOWED_GQA:
        b, h, seq, d = shape.batch, shape.heads, shape.seq, shape.head_dim
        q, k, v = rand(b, h, seq, d), rand(b, 1, seq, d), rand(b, 1, seq, d)
        case = cls(op, shape, dtype, device, [q, k, v], torch.randn_like(q), ("out", "dq", "dk", "dv"), {}, "")
        ref = bench_ops._upcast(case)
        out = op_reference.dense_attention(*ref, causal=True, window=WINDOW, segment_ids=shape.segment_ids(device))
        case._reference = bench_ops._backward_reference(case, out, ref)
        return case
    if function == "cross_entropy":
        n, v = shape.tokens, shape.vocab
        logits = (3 * torch.randn(n, v, device=device)).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device=device)
        targets[::7] = -100  # ignored positions count in neither the sum nor the mean
        case = cls(op, shape, dtype, device, [logits, targets], torch.rand((), device=device) + 0.5,
                   ("loss", "dlogits"), {}, "")
        ref = [t.detach().to(case.ref_dtype).requires_grad_() if t.is_floating_point() else t for t in case.inputs]
        out = torch.nn.functional.cross_entropy(ref[0], ref[1], ignore_index=-100)
        case._reference = bench_ops._backward_reference(case, out, ref[:1])
        return case
    m, n = shape.rows, shape.cols
    inputs = [rand(m, n), rand(m, n), rand(n)] + ([rand(n)] if op == "layer_norm" else [])
    names = ("y|sum", "dx", "dresidual", "dw") + (("db",) if op == "layer_norm" else ())
    case = cls(op, shape, dtype, device, inputs, torch.randn(2 * m * n, dtype=dtype, device=device), names, {}, "")
    ref = bench_ops._upcast(case)
    case._reference = bench_ops._backward_reference(case, _joined(getattr(op_reference, f"torch_{function}"), ref), ref)
    return case


def _joined(fn: Callable, inputs: list[torch.Tensor]) -> torch.Tensor:
    """A fused add + norm's two outputs (the normalized sum, the sum) as one tensor, for one backward."""
    y, total = fn(*inputs)
    return torch.cat([y.reshape(-1), total.reshape(-1)])


def _variant_runner(function: str):
    def build(case: bench_ops.Case, backend: str) -> bench_ops.Runner:
        try:  # "triton-nondet": the triton backend with kernels.deterministic = false
            ops = op_select.resolve({case.op: backend.removesuffix("-nondet")}, case.device,
                                   deterministic=backend != "triton-nondet")
        except op_table.KernelSelectionError as e:
            raise NotAvailable(str(e)) from None
        if function == WINDOWED_GQA:
            q, k, v = case.inputs
            ids = case.shape.segment_ids(case.device)
            return bench_ops.Runner(lambda: ops.attention(q, k, v, causal=True, window=WINDOW, segment_ids=ids),
                                    [q, k, v])
        fn = getattr(ops, function)
        if function == "cross_entropy":
            logits, targets = case.inputs
            return bench_ops.Runner(lambda: fn(logits, targets, ignore_index=-100), [logits])
        return bench_ops.Runner(lambda: _joined(fn, case.inputs), list(case.inputs))
    return build


#: The function ``bench ops`` times, where the op has several (see :data:`VARIANTS`).
MAIN_FUNCTION = {"cross_entropy": "linear_cross_entropy"}
#: Attention with one key/value head for all query heads (the extreme of grouped-query attention) and a
#: causal sliding window of :data:`WINDOW` keys, at the small and odd causal shapes (with their documents).
WINDOWED_GQA = "gqa+window"
WINDOW = 16
#: An op's functions beyond the one ``bench ops`` times, or its options that take another code path.
VARIANTS = {"attention": (WINDOWED_GQA,), "layer_norm": ("add_layer_norm",), "rms_norm": ("add_rms_norm",),
            "cross_entropy": ("cross_entropy",)}
#: The variants whose kernels never use ``tl.dot`` (checked in bf16 by the interpreter too).
DOT_FREE_VARIANTS = frozenset({"add_layer_norm", "add_rms_norm", "cross_entropy"})


def _interpreter_cannot_check(name: str, dot_free: frozenset, backend: str, dtype: torch.dtype,
                              device: torch.device) -> bool:
    return backend != "torch" and dtype == torch.bfloat16 and name not in dot_free and device.type != "cuda"


def _not_checked(op: str, backend: str, size: str, label: str, dtype: torch.dtype) -> dict:
    row = _new_row(op, backend, size, label, DTYPE_NAMES[dtype], "–", TOLERANCE[dtype])
    row["status"] = "not checked"
    row["note"] = "bf16 tl.dot is wrong in the Triton interpreter: checked on a GPU only"
    return row


def _variant_rows(op: str, shape, dtype: torch.dtype, size: str, device: torch.device, log, log_err) -> list[dict]:
    rows = []
    for function in VARIANTS.get(op, ()):
        if function == WINDOWED_GQA and (size == "real" or not shape.causal):
            continue  # the window's boolean mask in the reference would be S x S at the real shapes
        case = _variant_case(function, op, shape, dtype, device, size)
        size_label = f"{shape.tokens}x{shape.vocab}" if function == "cross_entropy" else shape.label
        label = f"{function} {size_label}"
        for backend in backends_for(op):
            if _interpreter_cannot_check(function, DOT_FREE_VARIANTS, backend, dtype, device):
                rows.append(_not_checked(op, backend, size, label, dtype))
            else:
                rows.append(_run_op_row(case, backend, size, log_err, label, _variant_runner(function)))
            log(_progress_line(rows[-1]))
        del case
    return rows


def _run_op_row(case: bench_ops.Case, backend: str, size: str, log_err, label: str | None = None,
                build: Callable = bench_ops.build_runner) -> dict:
    row = _new_row(case.op, backend, size, label or case.shape.label, DTYPE_NAMES[case.dtype],
                   DTYPE_NAMES.get(case.ref_dtype, "fp64"), TOLERANCE[case.dtype])
    start = time.perf_counter()
    try:
        runner = build(case, backend)
        row["errors"] = bench_ops._check(case, runner)
        _judge(row)
    except NotAvailable as e:
        row["status"], row["note"] = "not available", str(e)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", "out of memory at this shape on this card"
    except Exception as e:  # noqa: BLE001  (a kernel that raises on this card fails the check)
        _raised(row, e)
    finally:
        for t in case.inputs:
            t.grad = None
    row["seconds"] = time.perf_counter() - start
    _report(row, log_err)
    return row


def _raised(row: dict, e: Exception) -> None:
    message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    if row["backend"] == "torch":  # PyTorch lacks this dtype here (fp16 on some CPUs): nothing of ours
        row["status"], row["note"] = "not available", message
    else:
        row["status"], row["note"] = "FAIL", f"raised {message}"


def _report(row: dict, log_err) -> None:
    if row["status"] == "FAIL":
        log_err(f"!!! FAIL {row['op']} / {row['backend']} / {row['shape']} / {row['dtype']}: {row['note']}")


# ---------------------------------------------------------------------------------------------------
# The optimizer: a few steps over a parameter set, parameters and state against float64 torch
# ---------------------------------------------------------------------------------------------------

def _grad(step: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """The gradient of tensor ``index`` at ``step``: random, regenerated on demand rather than stored."""
    gen = torch.Generator(device=like.device).manual_seed(7919 * step + index)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def _clip_coefs(p0: list[torch.Tensor], clip: bool) -> list[float]:
    """``clip_grad_norm_``'s factor per step, from the float64 global norm of that step's gradients."""
    coefs = []
    for step in range(OPTIMIZER_STEPS):
        if not clip:
            coefs.append(1.0)
            continue
        norm = math.sqrt(sum(float(_grad(step, i, p).double().square().sum()) for i, p in enumerate(p0)))
        coefs.append(min(1.0, MAX_GRAD_NORM / (norm + 1e-6)))
    return coefs


def _is_muon_matrix(index: int, param: torch.Tensor) -> bool:
    """As ``bench ops`` splits a GPT-2 parameter set: the 2-D tensors after the two embeddings."""
    return index >= 2 and param.dim() == 2


def _reference_optimizer(name: str, param: torch.Tensor, index: int = 0):
    settings, _ = OPTIMIZERS[name]
    if name == "muon":  # the registry's torch Muon, which iterates in float64 for float64 parameters
        return build_optimizer(op_select.resolve({"optimizer": "torch"}, "cpu"),
            "muon", [dict(params=[param], use_muon=_is_muon_matrix(index, param))], **settings)[0]
    if name == "adamw":
        return torch.optim.AdamW([param], **settings, foreach=False)
    if name == "sgd":
        return torch.optim.SGD([param], **settings, foreach=False)
    return lion.TorchLion([param], **settings)


def _optimizer_errors(name: str, params: list[torch.Tensor], state: dict, p0: list[torch.Tensor],
                      coefs: list[float]) -> dict[str, float]:
    """Relative errors of the update ``p − p0`` and of each state tensor, over all tensors together,
    against torch's optimizer in float64 run tensor by tensor (so the reference never holds a second copy
    of the whole set)."""
    keys = OPTIMIZERS[name][1]
    sums = {k: [0.0, 0.0] for k in ("update",) + keys}

    def add(key: str, got: torch.Tensor | None, ref: torch.Tensor) -> None:
        if got is None:
            sums[key][0] = math.inf
            return
        sums[key][0] += float((got.double() - ref).square().sum())
        sums[key][1] += float(ref.square().sum())

    for i, (p, start) in enumerate(zip(params, p0)):
        ref = start.detach().double().clone().requires_grad_()
        opt = _reference_optimizer(name, ref, i)
        for step, coef in enumerate(coefs):
            ref.grad = _grad(step, i, start).double() * coef
            opt.step()
        add("update", p.detach() - start, (ref.detach() - start.double()))
        for key in keys:
            if key in opt.state[ref]:  # Muon: a matrix has a momentum buffer, the rest AdamW's moments
                add(key, state.get(p, {}).get(key), opt.state[ref][key])
    return {k: math.sqrt(num / den) if den > 0 else math.sqrt(num) for k, (num, den) in sums.items()}


def _run_optimizer_row(name: str, shape: ParamSetShape, backend: str, size: str, p0: list[torch.Tensor],
                       coefs: list[float], device: torch.device, log_err) -> dict:
    row = _new_row("optimizer", backend, size, f"{name} {shape.label}", "fp32", "fp64", OPTIMIZER_TOLERANCE)
    start = time.perf_counter()
    params: list[torch.Tensor] = []
    opt = None
    try:
        try:
            ops = op_select.resolve({"optimizer": backend}, device)
        except op_table.KernelSelectionError as e:
            raise NotAvailable(str(e)) from None
        params = [p.clone().requires_grad_() for p in p0]
        settings, _ = OPTIMIZERS[name]
        max_norm = MAX_GRAD_NORM if shape.clip else 0.0
        groups = params
        if name == "muon":
            groups = [dict(params=[p for i, p in enumerate(params) if _is_muon_matrix(i, p)], use_muon=True),
                      dict(params=[p for i, p in enumerate(params) if not _is_muon_matrix(i, p)], use_muon=False)]
            if device.type == "cuda":  # the Newton-Schulz iterations run in bf16 on a GPU
                row["tolerance"] = bench_ops.MUON_CUDA_TOLERANCE
        opt, clips_in_step = build_optimizer(ops, name, groups, **settings, max_grad_norm=max_norm, device=device)
        for step in range(OPTIMIZER_STEPS):
            for i, p in enumerate(params):
                p.grad = _grad(step, i, p)
            if shape.clip and not clips_in_step:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
        for p in params:
            p.grad = None
        row["errors"] = _optimizer_errors(name, params, opt.state, p0, coefs)
        _judge(row)
    except NotAvailable as e:
        row["status"], row["note"] = "not available", str(e)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", "out of memory at this shape on this card"
    except Exception as e:  # noqa: BLE001
        _raised(row, e)
    del params, opt  # the parameters and their state, before the next row allocates its own
    free_memory(device)
    row["seconds"] = time.perf_counter() - start
    _report(row, log_err)
    return row


def _optimizer_rows(shape: ParamSetShape, size: str, device: torch.device, log, log_err) -> list[dict]:
    torch.manual_seed(0)
    # at GPT-2's init scale: a parameter's own rounding stays well below the few steps' update
    p0 = [INIT_STD * torch.randn(s, device=device) for s in shape.tensor_shapes()]
    coefs = _clip_coefs(p0, shape.clip)
    rows = []
    for name in OPTIMIZERS:
        for backend in backends_for("optimizer"):
            rows.append(_run_optimizer_row(name, shape, backend, size, p0, coefs, device, log_err))
            log(_progress_line(rows[-1]))
    del p0
    free_memory(device)
    return rows


# ---------------------------------------------------------------------------------------------------
# The whole check
# ---------------------------------------------------------------------------------------------------

@dataclass
class CheckArgs:
    ops: list[str]
    dtypes: list[torch.dtype]
    sizes: list[str]
    device: torch.device
    json: str | None = None


def _op_rows(op: str, dtype: torch.dtype, size: str, device: torch.device, log, log_err) -> list[dict]:
    rows = []
    for shape in shapes_for(op, size):
        case = _make_case(op, shape, dtype, device, size)
        label = f"{MAIN_FUNCTION[op]} {shape.label}" if op in MAIN_FUNCTION else shape.label
        for backend in backends_for(op):
            if _interpreter_cannot_check(op, DOT_FREE_OPS, backend, dtype, device):
                row = _not_checked(op, backend, size, label, dtype)
            else:
                row = _run_op_row(case, backend, size, log_err, label)
            rows.append(row)
            log(_progress_line(row))
        del case
        rows += _variant_rows(op, shape, dtype, size, device, log, log_err)
        free_memory(device)
    return rows


def run(args: CheckArgs, log=print, log_err=None) -> dict:
    """Every row; returns (and writes, as it goes) ``{"env", "tolerances", "rows", "seconds"}``."""
    log_err = log_err or (lambda text: print(text, file=sys.stderr, flush=True))
    start = time.perf_counter()
    result = {"env": environment(args.device), "tolerances": tolerances(), "rows": [], "seconds": 0.0}
    for op in args.ops:
        if not checkable(op):
            row = _new_row(op, "–", "–", "–", "–", "–", math.nan)
            row["status"], row["note"] = "not checked", "this command has no inputs and reference for this op yet"
            result["rows"].append(row)
            continue
        for size in args.sizes:
            if op == "optimizer":
                for shape in shapes_for(op, size):
                    result["rows"] += _optimizer_rows(shape, size, args.device, log, log_err)
                continue
            for dtype in args.dtypes:
                result["rows"] += _op_rows(op, dtype, size, args.device, log, log_err)
        result["seconds"] = time.perf_counter() - start
        if args.json:
            write_json(args.json, result)
    if args.device.type == "cuda":
        result["rows"] += _gpu_only_rows(args, log, log_err)
    result["seconds"] = time.perf_counter() - start
    if args.json:
        write_json(args.json, result)
    return result


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
        row = _new_row("all", "triton", "other GPU", "–", DTYPE_NAMES[dtype], "–", TOLERANCE[dtype])
        row["status"], row["note"] = "not checked", "needs two GPUs; this machine has one"
        log(_progress_line(row))
        return [row]
    current = torch.cuda.current_device()
    other = torch.device("cuda", (current + 1) % count)
    rows = []
    for op in ops:
        if op == "optimizer" or not checkable(op):
            continue
        shape = shapes_for(op, "small")[0]
        case = _make_case(op, shape, dtype, other, "small")
        label = f"{MAIN_FUNCTION[op]} {shape.label}" if op in MAIN_FUNCTION else shape.label
        row = _run_op_row(case, "triton", "other GPU", log_err, label)
        row["note"] = row["note"] or f"on {other} while cuda:{current} is current"
        rows.append(row)
        log(_progress_line(row))
        del case
    return rows


def _wide_varlen_row(dtype: torch.dtype, device: torch.device, log, log_err) -> dict:
    """attention_varlen where every tensor holds more than 2^31 elements; three documents (the first, the
    one holding element 2^31, the last) against SDPA on that document alone, in float32."""
    tokens, heads, head_dim = WIDE_VARLEN
    row = _new_row("attention", "triton", "past 2^31", f"varlen T={tokens} H={heads} D={head_dim}",
                   DTYPE_NAMES[dtype], "fp32", TOLERANCE[dtype])
    need = WIDE_VARLEN_TENSORS * tokens * heads * head_dim * dtype.itemsize
    free = torch.cuda.mem_get_info(device)[0]
    if free < need:
        row["status"] = "not checked"
        row["note"] = f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free"
        log(_progress_line(row))
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
        _judge(row)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", "out of memory at this shape on this card"
    except Exception as e:  # noqa: BLE001  (a kernel that raises on this card fails the check)
        _raised(row, e)
    row["seconds"] = time.perf_counter() - start
    _report(row, log_err)
    log(_progress_line(row))
    return row


def _gpu_only_rows(args: CheckArgs, log, log_err) -> list[dict]:
    dtype = next((d for d in args.dtypes if d != torch.float32), args.dtypes[0])
    rows = _other_device_rows([op for op in args.ops if checkable(op)], dtype, log, log_err)
    if "attention" in args.ops and "real" in args.sizes:
        rows.append(_wide_varlen_row(dtype, args.device, log, log_err))
        free_memory(args.device)
    return rows


def tolerances() -> dict[str, float]:
    return {**{DTYPE_NAMES[d]: t for d, t in TOLERANCE.items()}, "optimizer (fp32)": OPTIMIZER_TOLERANCE}


def _progress_line(row: dict) -> str:
    head = f"  {row['op']:<13} {row['backend']:<13} {row['shape']:<28} {row['dtype']:<5}"
    if row["errors"]:
        return f"{head} fwd {fmt(row['forward'], '.1e')} bwd {fmt(row['backward'], '.1e')}  {row['status']}"
    return f"{head} {row['status']}: {row['note']}"


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

def _parser() -> ArgumentParser:
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


def _comma_list(text: str, option: str, valid: Sequence[str]) -> list[str]:
    items = list(dict.fromkeys(s.strip() for s in text.split(",")))
    for item in items:
        if item not in valid:
            raise CheckError(f"{option}: unknown name {item!r}; valid: {', '.join(valid)}")
    return items


def parse_args(argv: Sequence[str]) -> CheckArgs:
    a = _parser().parse_args(list(argv))
    device = pick_device(a.device)
    ops = list(op_table.op_names()) if a.op == "all" else _comma_list(a.op, "--op", op_table.op_names())
    dtypes = [DTYPES[n] for n in _comma_list(a.dtype, "--dtype", tuple(DTYPES))]
    cuda = device.type == "cuda"
    sizes = _comma_list(a.sizes, "--sizes", SIZES) if a.sizes else list(SIZES if cuda else SIZES[:2])
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
