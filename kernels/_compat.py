"""The Triton versions this package supports, and every choice or API that differs between them.

Supported: Triton 3.6 to 3.9, i.e. PyTorch 2.11 and newer (torch's CUDA wheels pin Triton: 2.11 ->
3.6.0, 2.13 -> 3.7.1). On 3.6 (in CI) and 3.9 every launch configuration the kernel modules list
compiles for sm_90 without spills and with the same matrix instructions (``python -m kernels.aot``).
Where a configuration holds only on some versions, the module lists its configs per version through
``by_version``, with the reason next to the table. Older Tritons are not supported: 3.4 spills in
the attention kernels and the looped norm forward; 3.2/3.3 cannot even import the kernels without a
GPU (their autotuner asks for a driver at import) and lack ``triton.knobs``.

- ``TRITON_VERSION``: the installed version as a tuple, e.g. ``(3, 6, 0)``.
- ``by_version(name, table)``: from ``{(major, minor): value}``, the value of the newest key not above
  the installed version; recorded under ``name`` for ``describe()``.
- ``describe()``: one line naming the installed Triton and the per-version tables that applied
  (``tritonforge kernels report`` prints it).
- ``jit_types()``: the classes of ``@triton.jit`` functions, compiled and interpreted (the
  interpreter's is no ``KernelInterface`` on 3.4).
- ``DOT_IEEE``, ``DOT_TF32``: how ``tl.dot(..., input_precision=...)`` names IEEE fp32 products and
  TF32 ones; 3.6 to 3.9 spell them alike (the older ``allow_tf32`` flag is deprecated throughout).
- ``compiler_knobs(force)``, ``tool_path(name)``, ``cache_dir()``: what ``kernels.aot`` needs from
  ``triton.knobs``: keep ptxas's log, bypass the cache, find ``cuobjdump``, the cache directory;
  ``version_tag()``: the version stored with each cached analysis.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping, TypeVar

import triton

__all__ = ["TRITON_VERSION", "MIN_TRITON", "NEWEST_CHECKED", "parse_version", "by_version", "describe",
           "DOT_IEEE", "DOT_TF32", "jit_types", "compiler_knobs", "tool_path", "cache_dir", "version_tag"]

T = TypeVar("T")

MIN_TRITON = (3, 6)  # the oldest version every configuration is checked on (in CI)
NEWEST_CHECKED = (3, 9)  # the newest one measured


def parse_version(text: str) -> tuple[int, int, int]:
    """``"3.6.0"``, ``"3.7.1+git1234"``, ``"3.9.0rc1"`` -> ``(3, 6, 0)``, ``(3, 7, 1)``, ``(3, 9, 0)``."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        raise ValueError(f"cannot read a Triton version from {text!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


TRITON_VERSION = parse_version(triton.__version__)

DOT_IEEE, DOT_TF32 = "ieee", "tf32"

_applied: dict[str, tuple[int, ...]] = {}


def by_version(name: str, table: Mapping[tuple[int, ...], T], version: tuple[int, ...] | None = None) -> T:
    """The entry of ``table`` for ``version`` (default: the installed Triton): the newest key <= it.

    Keys are version prefixes, ``(3, 6)`` meaning 3.6.0 and later. A version older than every key
    raises: the table must start at ``MIN_TRITON`` or earlier.
    """
    version = TRITON_VERSION if version is None else tuple(version)
    keys = sorted(table)
    fitting = [k for k in keys if tuple(k) <= version[:len(k)]]
    if not keys or not fitting:
        raise ValueError(f"{name}: no entry for Triton {_dotted(version)} (entries from "
                         f"{_dotted(keys[0]) if keys else 'nowhere'})")
    key = fitting[-1]
    if version == TRITON_VERSION:
        _applied[name] = tuple(key)
    return table[key]


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def describe() -> str:
    """``"triton 3.6.0 (supported 3.6-3.9); per-version configs: attention from 3.6"``."""
    line = f"triton {triton.__version__} (supported {_dotted(MIN_TRITON)} to {_dotted(NEWEST_CHECKED)})"
    if TRITON_VERSION[:2] < MIN_TRITON:
        line += ": OLDER THAN SUPPORTED, configurations are not checked for it"
    if _applied:
        line += "; per-version configs: " + ", ".join(
            f"{name} from {_dotted(key)}" for name, key in sorted(_applied.items()))
    return line


def jit_types() -> tuple[type, ...]:
    """The classes ``@triton.jit`` returns, compiled (``JITFunction``) and interpreted."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return JITFunction, InterpretedFunction


@contextlib.contextmanager
def compiler_knobs(force: bool) -> Iterator[None]:
    """Within: ``triton.compile`` prints ptxas's ``-v`` log, and with ``force`` ignores the cache."""
    from triton import knobs
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        if force:
            knobs.compilation.always_compile = True
        yield


def tool_path(tool: str) -> str:
    """Path of a CUDA tool shipped with Triton (``"cuobjdump"``, ``"ptxas"``, ``"nvdisasm"``)."""
    from triton import knobs
    return getattr(knobs.nvidia, tool).path


def cache_dir() -> str:
    """Triton's on-disk cache directory (``TRITON_CACHE_DIR`` or its default)."""
    from triton import knobs
    return knobs.cache.dir


def version_tag() -> str:
    """The installed Triton version as stored with cached analyses: ``"3.6.0"``."""
    return triton.__version__

