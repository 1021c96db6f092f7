"""``tritonforge bench ops``: every backend of an op, checked against an upcast reference and then timed.

For each op, dtype and shape, each backend's output and input gradients are compared with a reference on
upcast inputs (within :data:`TOLERANCE`; the optimizer's update within :data:`OPTIMIZER_TOLERANCE`); a
mismatch fails the row, skips its timing and makes the command exit with status 1. Then fwd, bwd and
fwd+bwd are timed. The rows go to a table and, when asked, JSON, CSV and a plot.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .args import ArgumentParser, BenchError, comma_list
from .cases import Case, make_case
from .catalogue import (BACKENDS, DTYPES, DTYPE_NAMES, MUON_CUDA_TOLERANCE, OPTIMIZER_CHECK_STEPS,
                        OPTIMIZER_TOLERANCE, PROJECT_BACKENDS, REGISTRY_BACKENDS, TOLERANCE, NotAvailable,
                        backends_of, bench_ops)
from .optimizer import adamw_reference_deltas, delta_error, muon_reference_deltas, optimizer_step, set_grads
from .peers import Runner, build_runner, runner_errors
from .shapes import SHAPE_SYNTAX, ParamSetShape, parse_shapes
from .tables import check_plot_support, fmt, format_table, write_results
from .timing import (describe_ceilings, environment, free_memory, measure_ceilings, pick_device, time_after_ms, time_ms,
                     timer_label)


COLUMNS = ("op", "backend", "shape", "dtype", "status", "max_err", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_rate",
           "fwdbwd_rate", "unit", "pct_peak", "vs_torch", "peak_mb", "timer", "note")


# ---------------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    device: torch.device
    warmup_ms: float = 25
    rep_ms: float = 100


def _new_row(op: str, backend: str, label: str, dtype: torch.dtype, unit: str, device: torch.device) -> dict:
    return {"op": op, "backend": backend, "shape": label, "dtype": DTYPE_NAMES[dtype], "status": "ok",
            "max_err": None, "errors": {}, "fwd_ms": None, "bwd_ms": None, "fwdbwd_ms": None, "fwd_rate": None,
            "fwdbwd_rate": None, "unit": unit, "pct_peak": None, "vs_torch": None, "peak_mb": None,
            "timer": timer_label(device),
            "note": ""}


def _peak_mb(case: Case, runner: Runner, device: torch.device) -> float | None:
    """CUDA memory one fwd+bwd allocates at its peak beyond what was allocated before it (its
    gradients included), in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.forward().backward(case.dout)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for t in runner.leaves:
        t.grad = None
    return peak / 2 ** 20


def _time(case: Case, runner: Runner, s: Settings, row: dict) -> None:
    kw = dict(warmup_ms=s.warmup_ms, rep_ms=s.rep_ms)
    leaves = runner.leaves
    row["peak_mb"] = _peak_mb(case, runner, s.device)
    row["fwd_ms"] = time_ms(runner.forward, s.device, **kw)
    row["fwdbwd_ms"] = time_ms(lambda: runner.forward().backward(case.dout), s.device, grad_to_none=leaves, **kw)
    out = runner.forward()
    try:
        row["bwd_ms"] = time_ms(lambda: out.backward(case.dout, retain_graph=True), s.device, grad_to_none=leaves,
                                **kw)
    except RuntimeError as e:  # a compiled backward, or torch's chunked linear_cross_entropy, refuses retain_graph
        if "out of memory" in str(e).lower():
            raise
        # Timed alone after a fresh forward each repeat: (fwd+bwd) - fwd would be the difference of two noisy
        # medians, below zero on a busy machine when the backward is short.
        row["bwd_ms"] = time_after_ms(runner.forward, lambda y: y.backward(case.dout), s.device,
                                      grad_to_none=leaves)
        row["note"] = "bwd timed after a fresh forward each repeat: this backend's backward cannot be re-run"
    del out


def _fail(row: dict, message: str, log_err) -> None:
    row["status"] = "FAILED"
    row["note"] = message
    log_err(f"!!! FAILED {row['op']} / {row['backend']} / {row['shape']} / {row['dtype']}: {message}")


def run_backend(case: Case, backend: str, s: Settings, log_err=print) -> dict:
    """Check ``backend`` on ``case``, then time it; the row describes what happened."""
    row = _new_row(case.op, backend, case.shape.label, case.dtype, case.unit, s.device)
    project = backend in REGISTRY_BACKENDS
    stage = "build"
    try:
        runner = build_runner(case, backend)
        stage = "check"
        errors = runner_errors(case, runner)
        row["errors"] = errors
        row["max_err"] = max(errors.values())
        tol = TOLERANCE[case.dtype]
        bad = {k: v for k, v in errors.items() if not v <= tol}
        if bad:
            worst = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
            _fail(row, f"relative error {worst} above the {DTYPE_NAMES[case.dtype]} tolerance {tol:g}; "
                       f"timing skipped", log_err)
            return row
        stage = "timing"
        _time(case, runner, s, row)
    except NotAvailable as e:
        row["status"], row["note"] = "not available", str(e)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", f"out of memory ({stage})"
    except Exception as e:  # noqa: BLE001  (a peer that cannot run a shape raises anything)
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        if project:
            _fail(row, f"{stage} raised {message}", log_err)
        else:
            row["status"], row["note"] = "not available", message
    finally:
        for t in case.inputs:
            t.grad = None
    return row


def _rates(row: dict, case_work: dict[str, float], ceilings: dict[str, float]) -> None:
    scale = 1e-9 if row["unit"] == "TFLOP/s" else 1e-6  # per ms -> TFLOP/s or GB/s
    for key, work in (("fwd", case_work.get("fwd")), ("fwdbwd", case_work["fwdbwd"])):
        ms = row[f"{key}_ms"]
        if work is not None and ms:
            row[f"{key}_rate"] = work / ms * scale
    ceiling = ceilings.get("matmul_tflops" if row["unit"] == "TFLOP/s" else "copy_gbps")
    if ceiling and row["fwdbwd_rate"] is not None:
        row["pct_peak"] = 100 * row["fwdbwd_rate"] / ceiling


def _ratios(rows: list[dict]) -> None:
    torch_row = next((r for r in rows if r["backend"] == "torch" and r["fwdbwd_ms"]), None)
    if torch_row is None:
        return
    for r in rows:
        if r["fwdbwd_ms"]:
            r["vs_torch"] = torch_row["fwdbwd_ms"] / r["fwdbwd_ms"]


def run_case(op: str, shape, dtype: torch.dtype, backends: Sequence[str], s: Settings, ceilings: dict,
             log=print, log_err=print) -> list[dict]:
    if op == "optimizer":
        return run_optimizer_case(shape, backends, s, ceilings, log=log, log_err=log_err)
    case = make_case(op, shape, dtype, s.device)
    rows = []
    for backend in backends:
        row = run_backend(case, backend, s, log_err=log_err)
        _rates(row, case.work, ceilings)
        rows.append(row)
        log(_progress_line(row))
    _ratios(rows)
    del case
    free_memory(s.device)
    return rows


def run_optimizer_case(shape: ParamSetShape, backends: Sequence[str], s: Settings, ceilings: dict, log=print,
                       log_err=print) -> list[dict]:
    device = s.device
    torch.manual_seed(0)
    p0 = [torch.randn(t, device=device) for t in shape.tensor_shapes()]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(OPTIMIZER_CHECK_STEPS)]
    deltas, muon_deltas = None, None
    numel = shape.numel
    work = {"fwdbwd": (32 if shape.clip else 28) * numel}
    rows = []
    for backend in backends:
        row = _new_row("optimizer", backend, shape.label, torch.float32, "GB/s", device)
        stage = "build"
        params: list[torch.Tensor] = []
        try:
            params = [p.clone().requires_grad_() for p in p0]
            step = optimizer_step(backend, params, shape.clip, device)
            stage = "check"
            for step_grads in grads:
                set_grads(params, step_grads)
                step()
            muon = backend.endswith("-muon")
            if muon and muon_deltas is None:
                muon_deltas = muon_reference_deltas(p0, grads, shape.clip)
            if not muon and deltas is None:
                deltas = adamw_reference_deltas(p0, grads, shape.clip)
            err = delta_error(params, p0, muon_deltas if muon else deltas)
            row["errors"], row["max_err"] = {"update": err}, err
            tolerance = MUON_CUDA_TOLERANCE if muon and device.type == "cuda" else OPTIMIZER_TOLERANCE
            if not err <= tolerance:
                _fail(row, f"relative error of the update {err:.2e} above {tolerance:g} after "
                           f"{OPTIMIZER_CHECK_STEPS} steps; timing skipped", log_err)
            else:
                stage = "timing"
                set_grads(params, grads[0])
                row["fwdbwd_ms"] = time_ms(step, device, warmup_ms=s.warmup_ms, rep_ms=s.rep_ms)
        except NotAvailable as e:
            row["status"], row["note"] = "not available", str(e)
        except torch.OutOfMemoryError:
            row["status"], row["note"] = "not available", f"out of memory ({stage})"
        except Exception as e:  # noqa: BLE001
            message = f"{type(e).__name__}: {str(e).strip()[:300]}"
            if backend in PROJECT_BACKENDS or backend.endswith("-muon"):
                _fail(row, f"{stage} raised {message}", log_err)
            else:
                row["status"], row["note"] = "not available", message
        del params
        free_memory(device)
        _rates(row, work, ceilings)
        rows.append(row)
        log(_progress_line(row))
    _ratios(rows)
    return rows


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def _progress_line(row: dict) -> str:
    head = f"  {row['op']:<13} {row['backend']:<13} {row['shape']:<24} {row['dtype']:<5}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['note']}"
    return (f"{head} err {fmt(row['max_err'], '.1e')}  fwd {fmt(row['fwd_ms'])} ms  "
            f"fwd+bwd {fmt(row['fwdbwd_ms'])} ms  {fmt(row['fwdbwd_rate'], '.4g')} {row['unit']}")


def table(rows: list[dict], device: torch.device) -> str:
    ms = " (CPU)" if device.type != "cuda" else ""
    header = ["op", "backend", "shape", "dtype", "err", f"fwd ms{ms}", f"bwd ms{ms}", f"fwd+bwd ms{ms}", "fwd",
              "fwd+bwd", "unit", "% peak", "vs torch", "peak MB", "status"]
    cells = []
    for r in rows:
        cells.append([r["op"], r["backend"], r["shape"], r["dtype"], fmt(r["max_err"], ".1e"), fmt(r["fwd_ms"]),
                      fmt(r["bwd_ms"]), fmt(r["fwdbwd_ms"]), fmt(r["fwd_rate"], ".4g"), fmt(r["fwdbwd_rate"], ".4g"),
                      r["unit"], fmt(r["pct_peak"], ".0f"), fmt(r["vs_torch"], ".3g"), fmt(r["peak_mb"], ".0f"),
                      r["status"]])
    return format_table(header, cells)


@dataclass
class OpsArgs:
    ops: list[str]
    backends: dict[str, list[str]]
    dtypes: list[torch.dtype]
    shapes: dict[str, list]
    device: torch.device
    json: str | None = None
    csv: str | None = None
    plot: str | None = None
    warmup_ms: float = 25
    rep_ms: float = 100


def _ops_parser() -> ArgumentParser:
    p = ArgumentParser(prog="tritonforge bench ops",
                       description="Check every backend of each op against an upcast reference, then time fwd, bwd "
                                   "and fwd+bwd.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                       epilog="Shapes: " + "; ".join(f"{op}: {syn}" for op, syn in SHAPE_SYNTAX.items())
                       + ". Prefix a spec with 'op=' when --op names several ops; 'default' and 'tiny' name the "
                       "built-in sets (default on CUDA, tiny on CPU).")
    p.add_argument("--op", default="all", help=f"comma list of {', '.join(bench_ops())} (default: all)")
    p.add_argument("--backends", default=None,
                   help="comma list (default: every backend of each op on CUDA; torch,triton on CPU). Known: "
                        + ", ".join(dict.fromkeys(b for bs in BACKENDS.values() for b in bs)))
    p.add_argument("--dtype", default=None, help="comma list of bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on "
                                                 "CPU); the optimizer always runs fp32")
    p.add_argument("--shapes", default=None, help="comma list of shape specs (see below)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--json", default=None, metavar="PATH", help="write every row (and the ceilings) as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw fwd+bwd rates as a PNG (needs matplotlib)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up per timing (default 25)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time per timing (default 100)")
    return p


def parse_args(argv: Sequence[str]) -> OpsArgs:
    a = _ops_parser().parse_args(list(argv))
    device = pick_device(a.device)
    cuda = device.type == "cuda"
    ops = list(bench_ops()) if a.op == "all" else comma_list(a.op, "--op")
    for op in ops:
        if op not in bench_ops():
            raise BenchError(f"--op: unknown op {op!r}; valid ops: {', '.join(bench_ops())}")
    if a.backends is None:
        backends = {op: list(backends_of(op) if cuda else PROJECT_BACKENDS) for op in ops}
    else:
        names = comma_list(a.backends, "--backends")
        known = {b for op in ops for b in backends_of(op)}
        for name in names:
            if name not in known:
                raise BenchError(f"--backends: {name!r} is not a backend of {', '.join(ops)}; valid: "
                                 f"{', '.join(dict.fromkeys(b for op in ops for b in backends_of(op)))}")
        # "torch" first, so every row of a case can be compared with it.
        names = sorted(names, key=lambda b: b != "torch")
        backends = {op: [b for b in names if b in backends_of(op)] for op in ops}
    dtype_names = comma_list(a.dtype, "--dtype") if a.dtype else ["bf16" if cuda else "fp32"]
    for name in dtype_names:
        if name not in DTYPES:
            raise BenchError(f"--dtype: unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    shapes = parse_shapes(a.shapes or ("default" if cuda else "tiny"), ops)
    if a.warmup_ms < 0 or a.rep_ms <= 0:
        raise BenchError("--warmup-ms must be >= 0 and --rep-ms > 0")
    if a.plot:
        check_plot_support()
    return OpsArgs(ops, backends, [DTYPES[n] for n in dtype_names], shapes, device, a.json, a.csv, a.plot,
                   a.warmup_ms, a.rep_ms)


def run(args: OpsArgs, log=print, log_err=None) -> dict:
    """Run every case; return (and write) ``{"env", "ceilings", "rows"}``."""
    log_err = log_err or (lambda text: print(text, file=sys.stderr, flush=True))
    device = args.device
    s = Settings(device, args.warmup_ms, args.rep_ms)
    ceilings = measure_ceilings(device)
    log(describe_ceilings(ceilings))
    if device.type != "cuda":
        log("timings: CPU (perf_counter median of a few calls after a warm-up); not comparable with GPU figures")
    result = {"env": environment(device), "ceilings": ceilings, "rows": []}
    for op in args.ops:
        for dtype in ([torch.float32] if op == "optimizer" else args.dtypes):
            for shape in args.shapes[op]:
                log(f"{op} {shape.label} {DTYPE_NAMES[dtype]}")
                result["rows"] += run_case(op, shape, dtype, args.backends[op], s, ceilings, log, log_err)
                write_results(result, args.json, args.csv, COLUMNS)
    return result


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(args)
    rows = result["rows"]
    print()
    print(table(rows, args.device))
    print(describe_ceilings(result["ceilings"]))
    if args.plot:
        from .plot import plot_ops

        plot_ops(rows, args.plot, title=result["env"].get("gpu") or "CPU timing")
        print(f"plot: {Path(args.plot)}")
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {path}")
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:
        print(f"\n{len(failed)} row(s) FAILED the correctness check:", file=sys.stderr)
        for r in failed:
            print(f"  {r['op']} / {r['backend']} / {r['shape']} / {r['dtype']}: {r['note']}", file=sys.stderr)
        return 1
    return 0
