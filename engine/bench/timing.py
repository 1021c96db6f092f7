"""Where and how a benchmark times: the device, the timer, the card's measured ceilings, relative errors.

Timing on CUDA is ``triton.testing.do_bench`` asked for the median; on CPU tensors it is the median of a few
``time.perf_counter`` calls after one warm-up call, labelled CPU.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from .args import BenchError


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


def time_after_ms(setup: Callable[[], Any], fn: Callable[[Any], Any], device: torch.device, *,
                  grad_to_none: Sequence[torch.Tensor] | None = None, reps: int = 10, budget_s: float = 2.0) -> float:
    """Median milliseconds of ``fn(setup())`` with ``setup`` outside the timed region, one warm-up pair
    first: for work that cannot be repeated on its own input (a backward whose graph frees itself).
    CUDA events on CUDA, ``time.perf_counter`` on CPU; ``reps`` repeats within ``budget_s`` (at least one)."""
    cuda = device.type == "cuda"

    def once() -> float:
        for t in grad_to_none or ():
            t.grad = None
        arg = setup()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(arg)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn(arg)
        return time.perf_counter() - start

    once()
    times, start = [], time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
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
