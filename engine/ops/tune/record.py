"""1. The run's calls: one forward and backward of the real model, with the op functions wrapped, records
every call each op receives (:func:`record_calls`)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..select import Ops
from .. import table

# ---------------------------------------------------------------------------------------------------
# 1. The run's calls
# ---------------------------------------------------------------------------------------------------

def describe(value: Any) -> Any:
    """What of an argument changes the answer: a tensor's shape, strides, dtype and whether it needs a
    gradient; any other value itself."""
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "stride": list(value.stride()),
                "dtype": str(value.dtype).removeprefix("torch."), "grad": value.requires_grad}
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    return repr(value)


@dataclass
class Call:
    """One kind of call of an op's function: its first inputs (kept to replay it) and how often a
    micro-batch makes it."""

    function: str
    args: tuple
    kwargs: dict
    autocast: torch.dtype | None
    count: int = 1

    @property
    def signature(self) -> str:
        return json.dumps({"function": self.function, "args": [describe(a) for a in self.args],
                           "kwargs": {k: describe(v) for k, v in sorted(self.kwargs.items())},
                           "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None},
                          sort_keys=True)

    @property
    def dtype(self) -> torch.dtype:
        """The precision the call computes in: its autocast dtype, else its first floating input's."""
        floats = [t.dtype for t in tree_flatten((self.args, self.kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return self.autocast or (floats[0] if floats else torch.float32)

    @property
    def label(self) -> str:
        """A short human description: the function and its first tensor's shape and dtype."""
        first = next((a for a in self.args if isinstance(a, torch.Tensor)), None)
        shape = "x".join(map(str, first.shape)) if first is not None else ""
        return f"{self.function} {shape} {str(self.dtype).removeprefix('torch.')} x{self.count}"


def _autocast_now(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _kept(value: Any) -> Any:
    """A recorded argument as replays use it: a tensor becomes a leaf on the same storage (same strides and
    values) that needs a gradient where the argument did."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    return value


@contextlib.contextmanager
def _recording(ops: Ops, op_names: Iterable[str], calls: dict[str, dict[str, Call]]):
    """Wrap ``op_names``' functions in ``ops`` (in place: the model holds it) to fill ``calls``: op ->
    signature -> :class:`Call`."""
    originals = {}
    for op in op_names:
        originals[op] = {attr: getattr(ops, attr) for attr in table.find(op).functions}
        wrapped = {attr: _recorder(op, attr, fn, calls) for attr, fn in originals[op].items()}
        ops.set_functions(op, ops.backends[op], wrapped)
    try:
        yield
    finally:
        for op, functions in originals.items():
            ops.set_functions(op, ops.backends[op], functions)


def _recorder(op: str, attr: str, fn: Callable, calls: dict[str, dict[str, Call]]) -> Callable:
    def record(*args, **kwargs):
        device = next((t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), "cpu")
        call = Call(attr, tree_map(_kept, args), tree_map(_kept, kwargs), _autocast_now(device))
        seen = calls.setdefault(op, {}).get(call.signature)
        if seen is None:
            calls[op][call.signature] = call
        else:
            seen.count += 1
        return fn(*args, **kwargs)
    return record


def record_calls(ops: Ops, op_names: Iterable[str], step: Callable[[], None], model: torch.nn.Module,
                 device: torch.device) -> dict[str, list[Call]]:
    """The calls each of ``op_names`` receives while ``step()`` runs one forward and backward of ``model``;
    the RNGs, the model's buffers and its gradients are as before afterwards."""
    calls: dict[str, dict[str, Call]] = {}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with _recording(ops, op_names, calls):
            step()
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    for p in model.parameters():
        p.grad = None
    return {op: list(by_signature.values()) for op, by_signature in calls.items()}
