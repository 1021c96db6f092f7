"""What several kernel modules share: the interpreter switch, the SM count, dtype names, the launch
helper every launcher goes through, the store that keeps autotuned configurations, the dot precision
torch's settings ask for, and the fixed-order partial-sum reduction that turns per-program partial
gradients into one (no atomics)."""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Callable, Protocol, Sequence, Union

import torch
import triton
import triton.language as tl

from ._compat import DOT_IEEE, DOT_TF32
from .variant import Variant

#: The Triton interpreter runs the kernels on CPU tensors (tests). Read once, at import, as Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Stands in for the SM count when kernels run in the interpreter: grids stay small but above one program.
INTERPRETER_SMS = 4
#: torch dtype -> Triton's type name in kernel signatures.
TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: The partial-sum reduction's tile (BLOCK_G partial rows x BLOCK_N columns per step) and warps.
SUM_BLOCK_G, SUM_BLOCK_N, SUM_WARPS = 128, 32, 4


#: CUDA's grid limits, programs per axis: 2^31 - 1 along axis 0, 65,535 along axes 1 and 2. Triton checks
#: none of them, and the interpreter has none, so a launcher whose grid grows with the batch or the head
#: count puts that product on axis 0 (the kernel splits its program id) and every launch is checked here.
MAX_GRID = (2**31 - 1, 65535, 65535)

Grid = Union[Sequence[int], Callable[[dict], Sequence[int]]]


def use_triton(t: torch.Tensor) -> bool:
    """The Triton kernels can run on ``t``: it is on a GPU, or the interpreter is on."""
    return t.is_cuda or INTERPRET


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


def launch(kernel, grid: Grid, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on the device of the first tensor argument, every grid axis checked.

    Triton launches on the current CUDA device, and neither ``torch.library.custom_op`` nor autograd
    makes the tensors' device current: a model on ``cuda:1`` while ``cuda:0`` is current would launch
    on the wrong GPU. ``grid`` is a tuple, or for an autotuned kernel a function of the chosen config's
    meta-parameters; either way each axis must fit ``MAX_GRID`` (checked on the host, no sync), so an
    oversized launch raises here instead of failing inside the driver.
    """
    device = next(a.device for a in (*args, *meta.values()) if isinstance(a, torch.Tensor))
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    if callable(grid):
        def checked(config: dict) -> tuple[int, ...]:
            return _checked_grid(name, grid(config))
    else:
        checked = _checked_grid(name, grid)
    _launch_on(device, kernel, checked, args, meta)


def _checked_grid(name: str, grid: Sequence[int]) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    for axis, (size, cap) in enumerate(zip(grid, MAX_GRID)):
        if size > cap:
            raise ValueError(f"{name}: grid axis {axis} has {size} programs; CUDA allows at most {cap}")
    return grid


def _launch_on(device: torch.device, kernel, grid: Grid, args: tuple, meta: dict) -> None:
    """The launch itself, inside ``device_guard(device)`` (tests record launches by patching this)."""
    with device_guard(device):
        kernel[grid](*args, **meta)


class ConfigStore(Protocol):
    """Where an autotuned kernel's chosen configuration is kept, so that a later process launches the same one
    without timing again. ``kernel`` names the kernel (``"attention.fwd"``); ``key`` is a JSON-able dict of
    what the choice depends on (shape buckets, head dim, dtype, flags); ``config`` a JSON-able dict of the
    meta-parameters and ``num_warps``/``num_stages``. The store adds what the kernels cannot know: the card,
    the versions, the kernel sources (the engine keeps it in its tuning cache)."""

    def get(self, kernel: str, key: dict) -> dict | None: ...

    def put(self, kernel: str, key: dict, config: dict) -> None: ...


_config_store: ConfigStore | None = None


def set_config_store(store: ConfigStore | None) -> ConfigStore | None:
    """Keep autotuned configurations in ``store`` from now on (None: autotune in each process, Triton's
    default); returns the previous store."""
    global _config_store
    previous, _config_store = _config_store, store
    return previous


def kept_config(kernel: str, key: dict) -> dict | None:
    """The store's configuration for ``kernel`` at ``key`` (None: no store, no entry, or the store failed,
    which is warned about and never stops a launch)."""
    if _config_store is None:
        return None
    try:
        return _config_store.get(kernel, key)
    except Exception as error:  # noqa: BLE001  (a broken store costs a timing, never a launch)
        warnings.warn(f"{kernel}: the configuration store failed ({type(error).__name__}: {error}); autotuning",
                      RuntimeWarning, stacklevel=2)
        return None


def keep_config(kernel: str, key: dict, config: dict) -> None:
    """Give the store the configuration the autotuner chose for ``kernel`` at ``key`` (nothing without one)."""
    if _config_store is None:
        return
    try:
        _config_store.put(kernel, key, config)
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"{kernel}: the configuration store could not keep {config} ({type(error).__name__}: "
                      f"{error})", RuntimeWarning, stacklevel=2)


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device within (nothing for other devices)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``, following torch's own fp32 setting.

    fp32 operands: IEEE products unless the user allowed TF32 for torch's matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, which ``torch.set_float32_matmul_precision("high")``
    also sets), as torch does. Triton's own default would be TF32 whatever the user asked. 16-bit
    operands run on the tensor cores either way; they get Triton's default, so their kernels compile
    as before.
    """
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return DOT_IEEE if ieee else DOT_TF32


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def sum_partials_kernel(
    PART,  # *[P, G, N] fp32 partial sums, contiguous; P = 1 or 2 (e.g. dw and db)
    OUT0,  # *[N] sum over G of PART[0], in its parameter's dtype
    OUT1,  # *[N] sum over G of PART[1] (when P = 2)
    G,  # number of partial rows
    N,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """OUT_p[n] = sum_g PART[p, g, n], program (column block, p), in a fixed order (deterministic).

    Memory: reads P*G*N fp32 once, writes P*N values.
    """
    pid_n = tl.program_id(0)
    part = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base = PART + part.to(tl.int64) * G * N
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g_start in range(0, G, BLOCK_G):
        offs_g = g_start + tl.arange(0, BLOCK_G)
        mask = (offs_g < G)[:, None] & mask_n[None, :]
        acc += tl.load(base + offs_g.to(tl.int64)[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if part == 0:
        tl.store(OUT0 + offs_n, total.to(OUT0.dtype.element_ty), mask=mask_n)
    else:
        tl.store(OUT1 + offs_n, total.to(OUT1.dtype.element_ty), mask=mask_n)


def sum_partials_variant(dtype: str, block_g: int = SUM_BLOCK_G, block_n: int = SUM_BLOCK_N,
                         num_warps: int = SUM_WARPS, label: str = "", vector_stores: bool = False) -> Variant:
    """The AOT variant of :func:`sum_partials_kernel` writing ``dtype`` outputs with the given tile.

    Its output is N values in all (its loads are 128-bit); 128-bit stores would need >= 8 output columns
    per thread, i.e. few wide programs that read G rows serially, so the default narrow tile trades store
    width (irrelevant at N values) for parallelism (``vector_stores=False``).
    """
    return Variant(
        kernel=sum_partials_kernel, name=f"{dtype} BLOCK_G={block_g} BLOCK_N={block_n}{label}",
        signature={"PART": "*fp32", "OUT0": f"*{dtype}", "OUT1": f"*{dtype}", "G": "i32", "N": "i32"},
        constexprs={"BLOCK_G": block_g, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=3,
        kind="memory", aligned=("PART", "OUT0", "OUT1", "N"), vector_stores=vector_stores)


def aot_variants() -> list[Variant]:
    """The default tile, for every parameter dtype (the norms', the depthwise conv's and mlp's sums)."""
    return [sum_partials_variant(dt) for dt in TL_DTYPES.values()]
