"""The rows of ``tritonforge kernels check``: one per op, backend, size, shape and dtype, judged against a
tolerance; the ops' other functions (fused residual norms, cross-entropy of logits, windowed attention)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..ops import reference as op_reference, select as op_select, table as op_table
from ..optim.build import build_optimizer
from .cases import Case, backward_reference, make_case, upcast
from .catalogue import DTYPE_NAMES, MAX_GRAD_NORM, MUON_CUDA_TOLERANCE, OPTIMIZER_TOLERANCE, TOLERANCE, NotAvailable
from .optimizer import INIT_STD, OPTIMIZERS, OPTIMIZER_STEPS, clip_coefs, is_muon_matrix, optimizer_errors, seeded_grad
from .peers import Runner, build_runner, runner_errors
from .shapes import ODD_SHAPES, SHAPE_SETS, ParamSetShape
from .tables import fmt
from .timing import free_memory


#: The ops whose kernels never multiply with ``tl.dot``: their bf16 rows are checked in the interpreter too.
#: Every other op's bf16 Triton rows wait for a GPU (the interpreter's bf16 dot is wrong).
DOT_FREE_OPS = frozenset({"layer_norm", "rms_norm", "dwconv", "rope", "swiglu"})
BACKENDS = {"attention": ("torch", "triton", "triton-nondet")}
DEFAULT_BACKENDS = ("torch", "triton")
SIZES = ("small", "odd", "real")


def shapes_for(op: str, size: str) -> list:
    """An op with a built-in ``bench ops`` case: the sets above; any other row of the registry's table: its
    ``OpBench``'s ``tiny``, ``odd`` (when it has one) and ``default`` shapes."""
    if op in ODD_SHAPES:
        sets = {"small": SHAPE_SETS["tiny"], "odd": ODD_SHAPES, "real": SHAPE_SETS["default"]}
        return sets[size][op]
    shapes = op_table.bench_of(op).shapes
    return shapes.get({"small": "tiny", "odd": "odd", "real": "default"}[size], [])


def backends_for(op: str) -> tuple[str, ...]:
    return BACKENDS.get(op, DEFAULT_BACKENDS)


def checkable(op: str) -> bool:
    """Whether this module knows how to build ``op``'s inputs and reference."""
    return op in ODD_SHAPES or op_table.bench_of(op) is not None


# ---------------------------------------------------------------------------------------------------
# One row: an op, backend, shape and dtype
# ---------------------------------------------------------------------------------------------------

def row_line(row: dict) -> str:
    head = f"  {row['op']:<13} {row['backend']:<13} {row['shape']:<28} {row['dtype']:<5}"
    if row["errors"]:
        return f"{head} fwd {fmt(row['forward'], '.1e')} bwd {fmt(row['backward'], '.1e')}  {row['status']}"
    return f"{head} {row['status']}: {row['note']}"


def new_check_row(op: str, backend: str, size: str, shape: str, dtype: str, reference: str, tolerance: float) -> dict:
    return {"op": op, "backend": backend, "size": size, "shape": shape, "dtype": dtype, "reference": reference,
            "errors": {}, "forward": None, "backward": None, "worst": "", "tolerance": tolerance, "status": "ok",
            "note": "", "seconds": 0.0}


def judge(row: dict) -> None:
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


class _Upcast64(Case):
    """A bench case whose reference is float64 on any device."""

    @property
    def ref_dtype(self) -> torch.dtype:
        return torch.float64


def _upcast_to_64(op: str, device: torch.device, size: str) -> bool:
    return not (device.type == "cuda" and (size == "real" or op == "attention"))  # else float32 (see above)


def check_case(op: str, shape, dtype: torch.dtype, device: torch.device, size: str) -> Case:
    case = make_case(op, shape, dtype, device)
    if not _upcast_to_64(op, device, size):
        return case
    return _Upcast64(**{f.name: getattr(case, f.name) for f in fields(case)})


# ---------------------------------------------------------------------------------------------------
# The op's other functions: the fused residual add of the norms, cross-entropy of given logits
# ---------------------------------------------------------------------------------------------------

def _variant_case(function: str, op: str, shape, dtype: torch.dtype, device: torch.device, size: str):
    """The case (inputs, upstream gradient, names) and reference of one of ``op``'s other functions."""
    torch.manual_seed(0)
    cls = _Upcast64 if _upcast_to_64(op, device, size) else Case
    rand = lambda *s: torch.randn(*s, dtype=dtype, device=device).requires_grad_()  # noqa: E731
    if function == WINDOWED_GQA:
        b, h, seq, d = shape.batch, shape.heads, shape.seq, shape.head_dim
        q, k, v = rand(b, h, seq, d), rand(b, 1, seq, d), rand(b, 1, seq, d)
        case = cls(op, shape, dtype, device, [q, k, v], torch.randn_like(q), ("out", "dq", "dk", "dv"), {}, "")
        ref = upcast(case)
        out = op_reference.dense_attention(*ref, causal=True, window=WINDOW, segment_ids=shape.segment_ids(device))
        case._reference = backward_reference(case, out, ref)
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
        case._reference = backward_reference(case, out, ref[:1])
        return case
    m, n = shape.rows, shape.cols
    inputs = [rand(m, n), rand(m, n), rand(n)] + ([rand(n)] if op == "layer_norm" else [])
    names = ("y|sum", "dx", "dresidual", "dw") + (("db",) if op == "layer_norm" else ())
    case = cls(op, shape, dtype, device, inputs, torch.randn(2 * m * n, dtype=dtype, device=device), names, {}, "")
    ref = upcast(case)
    case._reference = backward_reference(case, _joined(getattr(op_reference, f"torch_{function}"), ref), ref)
    return case


def _joined(fn: Callable, inputs: list[torch.Tensor]) -> torch.Tensor:
    """A fused add + norm's two outputs (the normalized sum, the sum) as one tensor, for one backward."""
    y, total = fn(*inputs)
    return torch.cat([y.reshape(-1), total.reshape(-1)])


def _variant_runner(function: str):
    def build(case: Case, backend: str) -> Runner:
        try:  # "triton-nondet": the triton backend with kernels.deterministic = false
            ops = op_select.resolve({case.op: backend.removesuffix("-nondet")}, case.device,
                                   deterministic=backend != "triton-nondet")
        except op_table.KernelSelectionError as e:
            raise NotAvailable(str(e)) from None
        if function == WINDOWED_GQA:
            q, k, v = case.inputs
            ids = case.shape.segment_ids(case.device)
            return Runner(lambda: ops.attention(q, k, v, causal=True, window=WINDOW, segment_ids=ids),
                                    [q, k, v])
        fn = getattr(ops, function)
        if function == "cross_entropy":
            logits, targets = case.inputs
            return Runner(lambda: fn(logits, targets, ignore_index=-100), [logits])
        return Runner(lambda: _joined(fn, case.inputs), list(case.inputs))
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
    row = new_check_row(op, backend, size, label, DTYPE_NAMES[dtype], "–", TOLERANCE[dtype])
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
                rows.append(run_op_row(case, backend, size, log_err, label, _variant_runner(function)))
            log(row_line(rows[-1]))
        del case
    return rows


def run_op_row(case: Case, backend: str, size: str, log_err, label: str | None = None,
                build: Callable = build_runner) -> dict:
    row = new_check_row(case.op, backend, size, label or case.shape.label, DTYPE_NAMES[case.dtype],
                   DTYPE_NAMES.get(case.ref_dtype, "fp64"), TOLERANCE[case.dtype])
    start = time.perf_counter()
    try:
        runner = build(case, backend)
        row["errors"] = runner_errors(case, runner)
        judge(row)
    except NotAvailable as e:
        row["status"], row["note"] = "not available", str(e)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", "out of memory at this shape on this card"
    except Exception as e:  # noqa: BLE001  (a kernel that raises on this card fails the check)
        raised(row, e)
    finally:
        for t in case.inputs:
            t.grad = None
    row["seconds"] = time.perf_counter() - start
    report(row, log_err)
    return row


def raised(row: dict, e: Exception) -> None:
    message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    if row["backend"] == "torch":  # PyTorch lacks this dtype here (fp16 on some CPUs): nothing of ours
        row["status"], row["note"] = "not available", message
    else:
        row["status"], row["note"] = "FAIL", f"raised {message}"


def report(row: dict, log_err) -> None:
    if row["status"] == "FAIL":
        log_err(f"!!! FAIL {row['op']} / {row['backend']} / {row['shape']} / {row['dtype']}: {row['note']}")


def _run_optimizer_row(name: str, shape: ParamSetShape, backend: str, size: str, p0: list[torch.Tensor],
                       coefs: list[float], device: torch.device, log_err) -> dict:
    row = new_check_row("optimizer", backend, size, f"{name} {shape.label}", "fp32", "fp64", OPTIMIZER_TOLERANCE)
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
            groups = [dict(params=[p for i, p in enumerate(params) if is_muon_matrix(i, p)], use_muon=True),
                      dict(params=[p for i, p in enumerate(params) if not is_muon_matrix(i, p)], use_muon=False)]
            if device.type == "cuda":  # the Newton-Schulz iterations run in bf16 on a GPU
                row["tolerance"] = MUON_CUDA_TOLERANCE
        opt, clips_in_step = build_optimizer(ops, name, groups, **settings, max_grad_norm=max_norm, device=device)
        for step in range(OPTIMIZER_STEPS):
            for i, p in enumerate(params):
                p.grad = seeded_grad(step, i, p)
            if shape.clip and not clips_in_step:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
        for p in params:
            p.grad = None
        row["errors"] = optimizer_errors(name, params, opt.state, p0, coefs)
        judge(row)
    except NotAvailable as e:
        row["status"], row["note"] = "not available", str(e)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", "out of memory at this shape on this card"
    except Exception as e:  # noqa: BLE001
        raised(row, e)
    del params, opt  # the parameters and their state, before the next row allocates its own
    free_memory(device)
    row["seconds"] = time.perf_counter() - start
    report(row, log_err)
    return row


def optimizer_rows(shape: ParamSetShape, size: str, device: torch.device, log, log_err) -> list[dict]:
    torch.manual_seed(0)
    # at GPT-2's init scale: a parameter's own rounding stays well below the few steps' update
    p0 = [INIT_STD * torch.randn(s, device=device) for s in shape.tensor_shapes()]
    coefs = clip_coefs(p0, shape.clip)
    rows = []
    for name in OPTIMIZERS:
        for backend in backends_for("optimizer"):
            rows.append(_run_optimizer_row(name, shape, backend, size, p0, coefs, device, log_err))
            log(row_line(rows[-1]))
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


def op_rows(op: str, dtype: torch.dtype, size: str, device: torch.device, log, log_err) -> list[dict]:
    rows = []
    for shape in shapes_for(op, size):
        case = check_case(op, shape, dtype, device, size)
        label = f"{MAIN_FUNCTION[op]} {shape.label}" if op in MAIN_FUNCTION else shape.label
        for backend in backends_for(op):
            if _interpreter_cannot_check(op, DOT_FREE_OPS, backend, dtype, device):
                row = _not_checked(op, backend, size, label, dtype)
            else:
                row = run_op_row(case, backend, size, log_err, label)
            rows.append(row)
            log(row_line(row))
        del case
        rows += _variant_rows(op, shape, dtype, size, device, log, log_err)
        free_memory(device)
    return rows
