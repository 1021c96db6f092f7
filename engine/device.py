"""The device a run computes on: choosing it from a recipe's ``run.device``, and waiting for it."""
from __future__ import annotations

import torch

from .errors import RecipeError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``run.device`` names: ``auto`` is CUDA when present, else CPU; a bare ``cuda`` is this
    process's GPU (``local_rank``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"run.device = {name!r} but CUDA is not available on this machine")
        if name == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: glibc's ``mallopt`` parameters, and the values :func:`keep_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap, not from a fresh mapping: glibc's largest allowed (64-bit).
KEEP_BLOCKS_UP_TO = 32 << 20
#: Freed memory at the top of the heap is kept up to this much before glibc returns it (C int range).
KEEP_FREE_UP_TO = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees, for the next step to reuse.

    By default glibc hands each block over 128 KiB (the threshold then adapts, to at most 32 MiB) to a fresh
    ``mmap`` and returns it on ``free``, and trims the heap's free top: a CPU training step allocates and frees
    its activations and gradients each step, so each step faults their pages in again, and the kernel clears
    every page first (3,000 to 45,000 faults per step on the main job's model at nanoGPT's batch; with this,
    about 15). Blocks up to 32 MiB then come from the heap and freed memory stays with the process, as
    PyTorch's CUDA caching allocator does on a GPU: the process keeps its peak memory until it exits.

    Returns whether it applied: False where the C library is not glibc (macOS, musl), where nothing changes.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: another libc's mallopt may mean something else
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_UP_TO))


def set_up_host(device: torch.device, threads: int = 0, cpu_memory: str = "keep") -> bool:
    """The process's CPU settings for a run: torch's intra-op threads (``run.threads``; 0 keeps torch's
    default) and, computing on a CPU, the memory policy (``run.cpu_memory``). Returns whether freed memory
    is kept (:func:`keep_freed_memory` applied)."""
    if threads:
        torch.set_num_threads(threads)
    return device.type == "cpu" and cpu_memory == "keep" and keep_freed_memory()
