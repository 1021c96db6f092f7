"""Backend selection: :func:`resolve` picks a backend per op of the table and hands models and the trainer
an :class:`Ops` object, whose functions they call (never a kernel directly)."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch

from ..errors import KernelSelectionError
from . import table
from .table import check_backend_name, find


def _choose(op: str, backend: str, device: torch.device) -> str:
    check_backend_name(op, backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and table.triton_available(op) else "torch"
    if not table.triton_available(op):
        raise KernelSelectionError(f"kernels.{op} = 'triton': {table.kernels_unavailable(op)}; use 'torch' or 'auto'")
    if device.type != "cuda" and not table.interpreting():
        raise KernelSelectionError(
            f"kernels.{op} = 'triton' needs a CUDA device (this run is on {device.type}); set "
            f"TRITON_INTERPRET=1 before starting to run the kernels through the Triton interpreter on CPU")
    return "triton"


# ---------------------------------------------------------------------------------------------------
# The resolved selection handed to models and the trainer.
# ---------------------------------------------------------------------------------------------------

class Ops:
    """The implementations chosen for one model: one attribute per function of the op table (``ops.attention``,
    ``ops.add_rms_norm``, ...). Call them; never a kernel directly."""

    def __init__(self, backends: dict[str, str], functions: dict[str, Callable], deterministic: bool = True):
        #: op -> "torch" or "triton", for every op of the table.
        self.backends = dict(backends)
        #: False: kernels may trade bitwise reproducibility for speed (see :func:`resolve`).
        self.deterministic = deterministic
        self._functions = dict(functions)

    def __getattr__(self, name: str) -> Callable:
        functions = self.__dict__.get("_functions", {})
        if name in functions:
            return functions[name]
        raise AttributeError(f"Ops has no function {name!r}; the op table provides {', '.join(functions)}")

    def replace(self, **functions: Callable) -> "Ops":
        """A copy with some functions swapped (tests, experiments); the names must be the table's."""
        unknown = set(functions) - set(self._functions)
        if unknown:
            raise AttributeError(f"Ops has no function {', '.join(sorted(unknown))}")
        return Ops(self.backends, {**self._functions, **functions}, self.deterministic)

    def set_functions(self, op: str, backend: str, functions: dict[str, Callable]) -> None:
        """Serve ``op`` with ``functions`` from now on, in place: models hold this object, so the tuner's
        choice (:mod:`engine.ops.tune`) reaches a model built before it was made."""
        unknown = set(functions) - set(find(op).functions)
        if unknown:
            raise AttributeError(f"op {op!r} has no function {', '.join(sorted(unknown))}")
        self.backends[op] = backend
        self._functions.update(functions)

    def describe(self, used: Iterable[str] | None = None) -> str:
        """``op=backend`` for the ops in ``used`` (all by default), in table order."""
        used = set(self.backends if used is None else used)
        text = ", ".join(f"{op}={b}" for op, b in self.backends.items() if op in used)
        return text if self.deterministic else text + " (deterministic=false: atomics allowed)"

def _warn_if_auto_lost_the_kernels(choices: dict[str, str], backends: dict[str, str], device: torch.device) -> None:
    """On CUDA, ``auto`` means the Triton kernels; serving torch instead because they cannot be imported
    (a broken install, a package that overwrote them) must never pass unnoticed."""
    if device.type != "cuda":
        return
    lost = [op.name for op in table.TABLE if choices.get(op.name, "auto") == "auto" and not table.triton_available(op.name)]
    if lost:
        warnings.warn(f"kernels = 'auto' on CUDA serves {', '.join(lost)} with torch, not the Triton kernels: "
                      f"{table.kernels_unavailable(lost[0])}. Fix the install, or set kernels.OP = 'torch' to choose "
                      f"torch on purpose.", RuntimeWarning, stacklevel=3)


def resolve(choices: dict[str, str] | None = None, device: torch.device | str = "cpu",
            deterministic: bool = True) -> Ops:
    """Pick a backend per op. ``choices`` maps op -> backend; missing ops are ``auto``.

    ``deterministic=False`` lets kernels trade bitwise run-to-run reproducibility for speed (the Triton
    attention backward then sums dQ with atomics); the torch backends are unaffected.
    """
    device = torch.device(device)
    choices = dict(choices or {})
    for op, backend in choices.items():
        check_backend_name(op, backend)
    backends = {op.name: _choose(op.name, choices.get(op.name, "auto"), device) for op in table.TABLE}
    _warn_if_auto_lost_the_kernels(choices, backends, device)
    functions: dict[str, Callable] = {}
    for op in table.TABLE:
        functions.update(functions_for(op.name, backends[op.name], deterministic))
    return Ops(backends, functions, deterministic)


def functions_for(op: str, backend: str, deterministic: bool = True) -> dict[str, Callable]:
    """``op``'s :class:`Ops` functions on ``backend`` ("torch" or "triton", already chosen: no checks)."""
    functions = {}
    for attr, (torch_fn, entry) in find(op).functions.items():
        if backend == "torch":
            functions[attr] = torch_fn
        elif isinstance(entry, str):
            functions[attr] = getattr(table.kernels_module(), entry)
        else:
            functions[attr] = entry(table.kernels_module(), deterministic)
    return functions
