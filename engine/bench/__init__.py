"""Benchmarks: swap kernels and compare them side by side, per op and end to end.

    tritonforge bench ops   [--op OPS] [--backends NAMES] [--dtype bf16] [--shapes SPECS] [--json PATH] ...
    tritonforge bench train RECIPE [--kernels triton] [--vs torch] [--checkpointing none,blocks] [--steps N] ...
    python -m engine.bench.gpu [--anchors DIR]      # everything, in one call, on a GPU machine

:mod:`engine.bench.ops` checks each backend of an op against a higher-precision reference and then times
it; :mod:`engine.bench.train` runs a recipe's model once per kernel set; :mod:`engine.bench.gpu` runs the
GPU tests and both benchmarks and prints one summary. This module holds what they share: the timer, the
card's measured ceilings, relative errors, the table printer and the JSON/CSV writers.

Timing on CUDA is ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, warm-up excluded)
asked for the median. Without a GPU the same code runs on CPU tensors and is timed with
``time.perf_counter`` (median of a few calls after one warm-up call); such figures are labelled CPU and
say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..config import RecipeError

USAGE = """usage: tritonforge bench SUBCOMMAND ...

subcommands:
  ops    [--op OPS] [--backends NAMES] [--dtype bf16] [--shapes SPECS] [--json PATH] [--csv PATH] [--plot PATH]
         check each op's backends against a reference, then time fwd, bwd and fwd+bwd
  train  RECIPE [--kernels SET] [--vs SET] [--checkpointing POLICIES] [--steps N] [--warmup N] [--compile]
         [--json PATH] [--csv PATH] [--section.key=value ...]
         train the recipe's model on synthetic inputs once per kernel set (and activation-checkpointing
         policy) and compare throughput and memory

`tritonforge bench ops --help` and `tritonforge bench train --help` describe the options.
"""


class BenchError(RecipeError):
    """A benchmark option is invalid. The message names the option."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`BenchError` instead of exiting, so callers and tests see the error."""

    def error(self, message: str):
        raise BenchError(f"{message} (see `{self.prog} --help`)")


def main(argv: Sequence[str]) -> int:
    """``tritonforge bench ...``: dispatch to the subcommand."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub == "ops":
        from . import ops

        return ops.main(rest)
    if sub == "train":
        from . import train

        return train.main(rest)
    print(f"error: unknown bench subcommand {sub!r}\n{USAGE}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------
# Timing and ceilings
# ---------------------------------------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: CUDA is not available on this machine")
    return device


def timer_label(device: torch.device) -> str:
    return "GPU" if device.type == "cuda" else "CPU"


def time_ms(fn: Callable[[], Any], device: torch.device, *, grad_to_none: Sequence[torch.Tensor] | None = None,
            warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 5, cpu_budget_s: float = 2.0) -> float:
    """Median milliseconds of one call of ``fn`` (warm-up excluded).

    ``grad_to_none``: tensors whose ``.grad`` is reset before every call, outside the timed region, so a
    backward is not timed accumulating into old gradients.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))

    def once() -> float:
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    once()  # warm-up: first-call costs (allocation, the interpreter's setup) stay out
    times, start = [], time.perf_counter()
    while len(times) < cpu_reps and (not times or time.perf_counter() - start < cpu_budget_s):
        times.append(once())
    return 1e3 * statistics.median(times)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """The card's bf16 matrix-product rate and device copy bandwidth, measured here (CUDA only).

    The product is 8192^3 on random data (2·n^3 FLOPs); the copy moves a 2 GiB fp32 tensor and counts bytes
    read plus bytes written. Both are do_bench medians. Empty on CPU.
    """
    if device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, device)
    del a, b
    x = torch.randn(2 ** 29, device=device)
    y = torch.empty_like(x)
    copy_ms = time_ms(lambda: y.copy_(x), device)
    del x, y
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n ** 3 / mm_ms * 1e-9, "copy_gbps": 2 * 2 ** 29 * 4 / copy_ms * 1e-6}


def describe_ceilings(ceilings: dict[str, float]) -> str:
    if not ceilings:
        return "ceilings: not measured (no GPU)"
    return (f"ceilings measured here: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
            f"device copy {ceilings['copy_gbps']:.0f} GB/s")


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device, for the JSON (the run directory's env.json record, plus the interpreter switch)."""
    from ..runlog import environment as run_environment

    return run_environment(device, {}, triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Errors against a reference
# ---------------------------------------------------------------------------------------------------

def rel_error(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in the reference's precision; inf for a missing or misshapen output, NaN
    when ``out`` holds NaN (so that ``not err <= tol`` fails it)."""
    if out is None or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    diff = torch.linalg.vector_norm(out.detach().to(ref.dtype) - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------------------------------
# Output: table, JSON, CSV
# ---------------------------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: '–' for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically (a reader, or a run killed mid-write, never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write_csv(path: str | Path, columns: Sequence[str], records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: _csv_cell(record.get(k)) for k in columns})
    os.replace(tmp, path)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return value


def check_plot_support(option: str = "--plot") -> None:
    """Fail before any work if matplotlib, needed for ``option``, is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(f"{option} needs matplotlib: pip install matplotlib (or leave out {option})") from None
