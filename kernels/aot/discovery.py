"""Finding the kernels: every module of the kernel package, its variants and its jit functions."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
from dataclasses import dataclass
from typing import Any, Iterable

from .._compat import jit_types
from ..variant import Variant

# The kernel package this tool package lives in; the tool itself is not one of its kernel modules.
KERNEL_PACKAGE = __package__.rpartition(".")[0]


def _jit_types() -> tuple[type, ...]:
    return jit_types()


def unwrap(obj: Any) -> Any:
    """The jit function under any ``triton.autotune``/``triton.heuristics`` wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    while isinstance(obj, (Autotuner, Heuristics)):
        obj = obj.fn
    return obj


def is_jit(obj: Any) -> bool:
    return isinstance(unwrap(obj), _jit_types())


def kernel_name(kernel: Any) -> str:
    """``"<module>.<function>"`` with the module's last component, e.g. ``"norm._norm_fwd_kernel"``."""
    fn = unwrap(kernel).fn
    return f"{fn.__module__.rpartition('.')[2]}.{fn.__name__}"


@dataclass
class Discovery:
    """What ``discover()`` found: every variant, and every jit function of the kernel modules."""

    variants: list[Variant]
    jit_functions: dict[str, Any]
    modules: list[str]

    def uncovered(self) -> list[str]:
        """Names of jit functions that no variant launches, directly or through calls."""
        reached = covered_functions(self.variants)
        return sorted(name for name, fn in self.jit_functions.items() if id(fn.fn) not in reached)


def module_jit_functions(module: Any) -> dict[str, Any]:
    found = {}
    for value in vars(module).values():
        fn = unwrap(value)
        if isinstance(fn, _jit_types()) and fn.fn.__module__ == module.__name__:
            found[kernel_name(fn)] = fn
    return found


def discover(package: str = KERNEL_PACKAGE) -> Discovery:
    """Import every module of ``package`` and collect its variants and jit functions.

    A module that fails to import raises: a broken kernel module must fail the check, not vanish
    from it. A module with jit functions but no ``aot_variants()`` leaves them uncovered.
    """
    pkg = importlib.import_module(package)
    tool = __package__
    variants, jit_functions, modules = [], {}, []
    for info in sorted(pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."), key=lambda i: i.name):
        if info.name == tool or info.name.startswith(f"{tool}."):
            continue
        module = importlib.import_module(info.name)
        modules.append(info.name)
        jit_functions.update(module_jit_functions(module))
        if hasattr(module, "aot_variants"):
            for variant in module.aot_variants():
                if not isinstance(variant, Variant):
                    raise TypeError(f"{info.name}.aot_variants() returned {type(variant).__name__}, "
                                    "expected kernels.variant.Variant")
                variants.append(variant)
    return Discovery(variants=variants, jit_functions=jit_functions, modules=modules)


def referenced_jit_functions(fn: Any) -> list[Any]:
    """Jit functions that the source of jit function ``fn`` names (calls or passes as combiners)."""
    raw = fn.fn
    tree = ast.parse(textwrap.dedent(inspect.getsource(raw)))
    found = []
    for node in ast.walk(tree):
        path = []
        while isinstance(node, ast.Attribute):
            path.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in raw.__globals__:
            continue
        obj = raw.__globals__[node.id]
        for attr in reversed(path):
            obj = getattr(obj, attr, None)
        obj = unwrap(obj)
        # Triton's own library (tl.sum, tl.cdiv, ...) is not the project's to cover.
        if isinstance(obj, _jit_types()) and not obj.fn.__module__.startswith("triton."):
            found.append(obj)
    return found


def covered_functions(variants: Iterable[Variant]) -> set[int]:
    """``id`` of the Python function under every jit function the variants launch or reach."""
    pending = [unwrap(v.kernel) for v in variants]
    seen: set[int] = set()
    while pending:
        fn = pending.pop()
        if id(fn.fn) in seen:
            continue
        seen.add(id(fn.fn))
        pending.extend(referenced_jit_functions(fn))
    return seen
