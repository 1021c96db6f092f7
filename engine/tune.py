"""``auto`` that measures: on this card, at this run's shapes, each op gets its fastest correct backend.

With ``kernels.tune = "measure"`` (the default) a run on CUDA decides every op left on ``auto`` before its
first step, in five parts, each a section below:

1. **The run's calls** (:func:`record_calls`). One forward and backward of the real model on the real first
   batch, with the :class:`~engine.registry.Ops` functions wrapped, records every call each op receives:
   argument shapes, strides, dtypes, flags (causal, window, softcap, ...), autocast. Calls that agree on all
   of that are one :class:`Call`, counted. The optimizer is one :class:`OptimizerWork` over the run's
   parameter groups. RNG, buffers (BatchNorm statistics) and gradients are restored afterwards.
2. **The candidates** (:func:`candidates`): torch (the registry's reference), PyTorch's other ways where the
   installed version has them (each SDPA backend for attention, ``F.linear_cross_entropy``'s chunked path
   for a classifier head; torch's optimizer is already its fused one on CUDA), and the project's Triton
   kernels.
3. **Measure** (:func:`measure_op`). Each candidate runs every call once, forward and backward, on the
   recorded inputs (the first call of each kind: real activations, real targets and document ids); that
   first run is timed apart (compiling, autotuning). Its outputs and input gradients are compared with the
   torch function on upcast inputs (float64; float32 without TF32 on a GPU), relative error against the
   tolerance ``tritonforge kernels check`` uses for the dtype (or twice torch's own error, where torch
   cannot come closer). A candidate that raises or disagrees is rejected (with a warning when its result
   is wrong or it is one of the project's kernels). The rest are timed (CUDA events around back-to-back
   runs), :data:`START_REPEATS` repeats of a micro-batch's calls of the op, interleaved, doubled up to
   :data:`MAX_REPEATS` while the answer is unclear, within
   ``kernels.tune_op_seconds`` per op (compiling apart; at least :data:`MIN_REPEATS` repeats whatever the
   time) and ``kernels.tune_seconds`` in all (an op that would start after it keeps torch, uncached).
4. **Decide** (:func:`choose`): the fastest candidate by median milliseconds per micro-batch, if it beats
   torch by more than the noise (the median absolute deviations of both added); else torch.
5. **Keep** (:class:`TuneCache`). The decision and its figures go to one JSON file per (card, driver,
   torch, triton, kernel sources, op, calls, flags), written atomically; a later run with the same key reads
   it, and spends only the recording forward and backward. A damaged file is ignored with a warning. A checkpoint records the choice, and a
   resumed run keeps it (``kernels.retune = true`` measures again). Under torchrun rank 0 decides and
   broadcasts, so every rank runs the same backends.

An op set explicitly (``--kernels.OP=torch|triton``) is never tuned; ``kernels.tune = "trust"`` takes the
Triton kernels untimed (:func:`engine.registry.resolve`'s ``auto``), ``"off"`` takes torch. On a CPU ``auto``
is torch and nothing is measured.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from . import KERNELS_PACKAGE, registry
# The relative errors ``tritonforge kernels check`` allows, by dtype, for the optimizer, and for Muon on a GPU.
from .bench.catalogue import MUON_CUDA_TOLERANCE, OPTIMIZER_TOLERANCE, TOLERANCE
from .registry import Ops

#: Timed repeats of every candidate before the first decision; doubled while the answer is unclear, up to
#: MAX_REPEATS or the op's time; never fewer than MIN_REPEATS, whatever the time.
START_REPEATS = 5
MAX_REPEATS = 40
MIN_REPEATS = 3
#: A decision is clear (no more repeats) when the gap to torch is this many times the noise.
CLEAR_GAP = 4.0
#: Bumped when the meaning of a cache entry changes.
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# 1. The run's calls
# ---------------------------------------------------------------------------------------------------

def _describe(value: Any) -> Any:
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
        return json.dumps({"function": self.function, "args": [_describe(a) for a in self.args],
                           "kwargs": {k: _describe(v) for k, v in sorted(self.kwargs.items())},
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
        originals[op] = {attr: getattr(ops, attr) for attr in registry.find(op).functions}
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


# ---------------------------------------------------------------------------------------------------
# 2. The candidates
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One way to serve an op: its name in the table, the registry backend it counts as, its functions."""

    name: str
    backend: str
    functions: dict[str, Callable] = field(default_factory=dict, compare=False)


def _sdpa_backend(name: str) -> Callable:
    """The registry's torch attention with SDPA held to one backend (raises where that backend cannot serve
    the call: a mask flash does not take, a head dim cuDNN does not have)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)

    def attention(q, k, v, causal=True, window=None, scale=None, segment_ids=None):
        with sdpa_kernel(backend):
            return registry.dense_attention(q, k, v, causal, window, scale, segment_ids)
    return attention


#: Attention's SDPA backends, by candidate name.
SDPA_CANDIDATES = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                   "sdpa-cudnn": "CUDNN_ATTENTION"}


def chunked_linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, softcap: float = 0.0):
    """``F.linear_cross_entropy`` with its chunked path: the (positions, classes) logits are never
    materialized. What the chunked path does not do (a logit soft-cap; label smoothing, which torch serves
    unchunked, with a warning per call) raises, and the candidate is rejected."""
    if softcap or label_smoothing:
        raise NotImplementedError("F.linear_cross_entropy's chunked path has no logit soft-cap or label smoothing")
    x2 = x.reshape(-1, x.shape[-1])
    return F.linear_cross_entropy(x2, weight, targets.reshape(-1), linear_bias=bias, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, options=torch.nn.LinearCrossEntropyOptions())


def torch_candidates(op: str, device: torch.device) -> list[Candidate]:
    """PyTorch's ways to serve ``op`` on ``device``, the registry's reference first."""
    found = [Candidate("torch", "torch", registry.functions_for(op, "torch"))]
    if device.type != "cuda":
        return found
    if op == "attention":
        found += [Candidate(name, "torch", {"attention": _sdpa_backend(backend)})
                  for name, backend in SDPA_CANDIDATES.items()]
    if op == "cross_entropy" and hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        found.append(Candidate("torch-chunked", "torch", {"cross_entropy": registry.torch_cross_entropy,
                                                          "linear_cross_entropy": chunked_linear_cross_entropy}))
    return found


def candidates(op: str, device: torch.device, deterministic: bool) -> tuple[list[Candidate], str]:
    """Every candidate for ``op`` here, and why the Triton kernel is not among them ("" when it is)."""
    found = torch_candidates(op, device)
    if not registry.triton_available(op):
        return found, registry.kernels_unavailable(op)
    return found + [Candidate("triton", "triton", registry.functions_for(op, "triton", deterministic))], ""


# ---------------------------------------------------------------------------------------------------
# 3. Measure: check each candidate against the upcast reference, then time it
# ---------------------------------------------------------------------------------------------------

class CudaClock:
    """Wall time for budgets; CUDA events around a few back-to-back runs of a function for its time: the
    device's time, with the host's launching hidden behind the device's work as it is in training (a lone
    run between two events would charge a kernel for the host's launch overhead while the device waits)."""

    #: Runs per reading; the reading is their mean.
    BURST = 3

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        return time.perf_counter()

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(self.BURST):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / self.BURST


def _relative_error(got: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if got is None or ref is None:
        return 0.0 if got is None and ref is None else math.inf
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class CallWork:
    """An op's calls in one micro-batch of a given kind, replayed on their recorded inputs."""

    def __init__(self, call: Call, reference: Callable, device: torch.device):
        self.call, self.reference_fn, self.device = call, reference, device
        self.count, self.label, self.tolerance = call.count, call.label, TOLERANCE.get(call.dtype, 2e-3)
        self.signature = f"{call.signature} x{call.count}"
        self._upstream: list[torch.Tensor] | None = None
        self._reference: list[torch.Tensor] | None = None

    def _inputs(self, dtype: torch.dtype | None = None):
        """(args, kwargs, leaves): floating tensors as fresh leaves (upcast to ``dtype`` if given), needing a
        gradient where the recorded one did; other arguments as recorded."""
        leaves = []

        def leaf(v):
            if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                return v
            t = (v.to(dtype) if dtype is not None else v).detach().requires_grad_(v.requires_grad)
            if t.requires_grad:
                leaves.append(t)
            return t
        args, kwargs = tree_map(leaf, (self.call.args, self.call.kwargs))
        return args, kwargs, leaves

    def _run(self, fn: Callable, args, kwargs, leaves, autocast: torch.dtype | None) -> list[torch.Tensor]:
        """Forward and backward once; the outputs and the leaves' gradients."""
        for t in leaves:
            t.grad = None
        context = torch.autocast(self.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            outs = _tensors(fn(*args, **kwargs))
        grads_of = [o for o in outs if o.requires_grad]
        if self._upstream is None:
            generator = torch.Generator(device=self.device).manual_seed(0)
            self._upstream = [torch.randn(o.shape, generator=generator, device=self.device, dtype=torch.float32)
                              for o in grads_of]
        if grads_of:
            torch.autograd.backward(grads_of, [g.to(o.dtype) for g, o in zip(self._upstream, grads_of)])
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    def reference(self) -> list[torch.Tensor]:
        """The torch function on upcast inputs, without autocast or TF32."""
        if self._reference is None:
            dtype = torch.float32 if self.device.type == "cuda" else torch.float64
            args, kwargs, leaves = self._inputs(dtype)
            with _no_tf32():
                self._reference = self._run(self.reference_fn, args, kwargs, leaves, None)
        return self._reference

    def first_run(self, candidate: Candidate) -> tuple[Callable[[], Any], float]:
        """Run ``candidate`` once; the function that runs it again (for timing) and its worst error."""
        fn = candidate.functions[self.call.function]
        args, kwargs, leaves = self._inputs()
        got = self._run(fn, args, kwargs, leaves, self.call.autocast)
        error = max((_relative_error(g, r) for g, r in zip(got, self.reference())), default=0.0)
        return (lambda: self._run(fn, args, kwargs, leaves, self.call.autocast)), error


@contextlib.contextmanager
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class OptimizerWork:
    """One optimizer step over copies of the run's parameter groups, gradients random; clipping as the
    trainer does it (inside the Triton optimizers' step, ``clip_grad_norm_`` before torch's)."""

    count = 1

    def __init__(self, groups: list[dict], make: Callable[[str, list[dict], torch.device | None], tuple],
                 max_grad_norm: float, device: torch.device, name: str):
        self.groups, self.make, self.max_grad_norm, self.device = groups, make, max_grad_norm, device
        params = [p for g in groups for p in g["params"]]
        numel = sum(p.numel() for p in params)
        self.label = f"{name} step {len(params)} tensors {numel / 1e6:.1f}M params"
        self.signature = json.dumps({"optimizer": name, "max_grad_norm": max_grad_norm, "groups": [
            {**{k: _describe(v) for k, v in sorted(g.items()) if k not in ("params", "lr")},
             "params": [_describe(p) for p in g["params"]]} for g in groups]}, sort_keys=True)
        self.tolerance = MUON_CUDA_TOLERANCE if name == "muon" and device.type == "cuda" else OPTIMIZER_TOLERANCE
        generator = torch.Generator(device=device).manual_seed(0)
        self.grads = [1e-2 * torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) for p in params]
        self._reference: torch.Tensor | None = None

    def _copies(self, dtype: torch.dtype | None = None) -> tuple[list[dict], list[torch.Tensor]]:
        groups, params = [], []
        for g in self.groups:
            copies = [p.detach().to(dtype or p.dtype, copy=True).requires_grad_() for p in g["params"]]
            params += copies
            groups.append({**g, "params": copies})
        return groups, params

    def _stepper(self, backend: str, dtype: torch.dtype | None, device: torch.device | None):
        groups, params = self._copies(dtype)
        optimizer, clips_in_step = self.make(backend, groups, device)
        # Each candidate its own gradients: clip_grad_norm_ scales them in place, which must not reach the
        # next candidate's check. (Later steps clip already-clipped gradients: the same work.)
        grads = [g.to(p.dtype, copy=True) for p, g in zip(params, self.grads)]

        def step():
            for p, g in zip(params, grads):
                p.grad = g
            if self.max_grad_norm and not clips_in_step:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
        return step, params

    def _delta(self, step: Callable, params: list[torch.Tensor]) -> torch.Tensor:
        before = torch.cat([p.detach().double().reshape(-1) for p in params])
        step()
        return torch.cat([p.detach().double().reshape(-1) for p in params]) - before

    def reference(self) -> torch.Tensor:
        """One step of torch's unfused optimizer in float64."""
        if self._reference is None:
            self._reference = self._delta(*self._stepper("torch", torch.float64, None))
        return self._reference

    def first_run(self, candidate: Candidate) -> tuple[Callable[[], Any], float]:
        step, params = self._stepper(candidate.backend, None, self.device)
        return step, _relative_error(self._delta(step, params), self.reference())


@dataclass
class Measured:
    """One candidate's figures for one op: ms per micro-batch (every call of the op, counted)."""

    name: str
    status: str = "ok"  # ok | wrong | raised
    samples: list[float] = field(default_factory=list)
    compile_ms: float = 0.0
    error: float | None = None
    note: str = ""

    @property
    def ms(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def noise(self) -> float:
        """Median absolute deviation of the samples."""
        if len(self.samples) < 2:
            return 0.0
        middle = statistics.median(self.samples)
        return statistics.median(abs(s - middle) for s in self.samples)

    def to_dict(self) -> dict:
        return {"status": self.status, "ms": self.ms, "noise_ms": self.noise, "repeats": len(self.samples),
                "compile_ms": self.compile_ms, "error": self.error, "note": self.note}


class Budget:
    """Seconds left for all ops, and for the op being measured."""

    def __init__(self, clock, total_s: float, per_op_s: float):
        self.clock, self.per_op_s = clock, per_op_s
        self.deadline = clock.now() + total_s
        self.op_deadline = self.deadline

    def start_op(self) -> None:
        self.op_deadline = min(self.deadline, self.clock.now() + self.per_op_s)

    def spent(self) -> bool:
        return self.clock.now() >= self.op_deadline

    def all_spent(self) -> bool:
        return self.clock.now() >= self.deadline


def _check(op: str, candidate: Candidate, works: Sequence, clock, floor: float = 0.0) -> tuple[Measured, list]:
    """Run ``candidate`` once on every work (timed apart: compiling), against the reference: wrong past the
    work's tolerance, or past ``floor`` where that is larger (twice torch's own error: where torch itself
    cannot come closer, say an update below its parameters' rounding, neither can a candidate be asked to)."""
    result, runners = Measured(candidate.name), []
    begin = clock.now()
    try:
        for work in works:
            with warnings.catch_warnings():  # torch's notes on a backend that cannot serve a call: the table says it
                warnings.simplefilter("ignore", UserWarning)
                runner, error = work.first_run(candidate)
            runners.append(runner)
            result.error = max(result.error or 0.0, error)
            limit = max(work.tolerance, floor)
            if not error <= limit and candidate.name != "torch":  # NaN disagrees too
                result.status = "wrong"
                result.note = f"{work.label}: relative error {error:.2e} > {limit:.2g}"
                break
    except Exception as e:  # noqa: BLE001  (any failure of a candidate is its rejection, never the run's)
        result.status, result.note = "raised", f"{type(e).__name__}: {str(e).strip()[:200]}"
    if hasattr(clock, "sync"):
        clock.sync()
    result.compile_ms = 1e3 * (clock.now() - begin)
    # A wrong result, or a project kernel that fails, is news; a torch variant that cannot serve a call is not.
    if result.status == "wrong" or (result.status == "raised" and candidate.backend == "triton"):
        warnings.warn(f"kernels tune: {op}: candidate {candidate.name} rejected: {result.note}", RuntimeWarning,
                      stacklevel=2)
    return result, runners


def _time_once(runners: list[Callable], works: Sequence, clock) -> float:
    """One sample: ms of a micro-batch's calls of the op (each kind once, weighted by its count)."""
    return sum(work.count * clock.time_ms(runner) for runner, work in zip(runners, works))


def measure_op(op: str, works: Sequence, cands: Sequence[Candidate], clock, budget: Budget) -> dict[str, Measured]:
    """Check every candidate (its first run, compiling included, timed apart), then time the correct ones
    until the choice is clear or the op's time is spent, never fewer than :data:`MIN_REPEATS` times."""
    try:  # computed first, so that no candidate's first-run time includes it
        for work in works:
            work.reference()
    except Exception as e:  # noqa: BLE001  (out of memory for a float32 copy, say: nothing can be checked)
        return {"torch": Measured("torch", "raised", note=f"the reference failed: {type(e).__name__}: {e}"[:200])}
    results, runners = {}, {}
    for candidate in cands:  # torch first: its own error sets the floor of the others'
        floor = 2 * (results["torch"].error or 0.0) if "torch" in results else 0.0
        results[candidate.name], runners[candidate.name] = _check(op, candidate, works, clock, floor)
    timed = [name for name, r in results.items() if r.status == "ok"]
    budget.start_op()
    target = START_REPEATS
    while timed:
        while len(results[timed[0]].samples) < target:
            if len(results[timed[0]].samples) >= MIN_REPEATS and budget.spent():
                break
            for name in timed:  # interleaved, so a drifting clock shifts all candidates alike
                results[name].samples.append(_time_once(runners[name], works, clock))
        if target >= MAX_REPEATS or _clear(results) or budget.spent():
            break
        target *= 2
    return results


def _clear(results: dict[str, Measured]) -> bool:
    """The candidates are far enough apart that more repeats would not change the choice."""
    torch_r = results.get("torch")
    timed = [r for r in results.values() if r.samples]
    if torch_r is None or not torch_r.samples or len(timed) < 2:
        return True
    best = min((r for r in timed if r is not torch_r), key=lambda r: r.ms)
    return abs(torch_r.ms - best.ms) > CLEAR_GAP * (torch_r.noise + best.noise)


# ---------------------------------------------------------------------------------------------------
# 4. Decide
# ---------------------------------------------------------------------------------------------------

def choose(results: dict[str, Measured]) -> tuple[str, str]:
    """The candidate to keep and why: the fastest, if it beats torch by more than both noises together."""
    torch_r = results["torch"]
    if not torch_r.samples:
        return "torch", f"torch was not timed ({torch_r.note or torch_r.status}): torch kept"
    best = min((r for r in results.values() if r.samples), key=lambda r: r.ms)
    if best is torch_r:
        return "torch", "torch is the fastest"
    gain, noise = torch_r.ms - best.ms, torch_r.noise + best.noise
    if gain > noise:
        return best.name, f"{torch_r.ms / best.ms:.2f}x torch's speed ({gain:.3g} ms faster, noise {noise:.2g} ms)"
    return "torch", f"{best.name} is within the noise of torch ({gain:.3g} ms faster, noise {noise:.2g} ms)"


# ---------------------------------------------------------------------------------------------------
# 5. Keep: the on-disk cache
# ---------------------------------------------------------------------------------------------------

def cache_dir(setting: str = "") -> Path:
    """``kernels.tune_cache``, else $XDG_CACHE_HOME/tritonforge, else ~/.cache/tritonforge."""
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tritonforge"


def _driver_version() -> str:
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return f"cuda {torch.version.cuda}"


def kernel_sources_hash() -> str:
    """SHA-256 of the kernels package's sources and of the registry and this module (the candidates)."""
    import importlib.util

    digest = hashlib.sha256()
    kernels_dir = Path(importlib.util.find_spec(KERNELS_PACKAGE).origin).parent
    for path in sorted(kernels_dir.glob("*.py")) + [Path(registry.__file__), Path(__file__)]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def environment_key(device: torch.device) -> dict[str, Any]:
    """What makes a measurement stale when it changes: the card, its driver, torch, triton, the kernels."""
    key: dict[str, Any] = {"version": CACHE_VERSION, "torch": torch.__version__, "kernels": kernel_sources_hash()}
    try:
        import triton
        key["triton"] = triton.__version__
    except ImportError:
        key["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key.update(gpu=props.name, sms=props.multi_processor_count, driver=_driver_version())
    else:
        key.update(gpu=device.type)
    return key


class TuneCache:
    """One JSON file per key under ``<folder>/tune/``: ``{"key": ..., "value": ...}``.

    Written to a temporary file and renamed into place, so a reader sees a whole entry or none; an entry
    that does not parse, or holds another key, is ignored with a warning and measured again.
    Besides the ops' decisions it holds any per-kernel choice (``kind="kernel-config"``: a Triton kernel's
    tile configuration, say) under the same environment key.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder) / "tune"

    def _path(self, key: dict) -> Path:
        text = json.dumps(key, sort_keys=True)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def get(self, key: dict) -> dict | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry["key"] != json.loads(json.dumps(key)):
                raise ValueError("the entry holds another key")
            return entry["value"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"kernels tune: ignoring the damaged cache entry {path} ({type(e).__name__}: {e}); "
                          f"measuring again", RuntimeWarning, stacklevel=2)
            return None

    def put(self, key: dict, value: dict) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".entry.", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "value": value}, f, indent=1)
            os.replace(tmp, self._path(key))
        except OSError as e:  # a read-only or full disk costs the next run a measurement, nothing more
            warnings.warn(f"kernels tune: could not write the cache in {self.folder}: {e}", RuntimeWarning,
                          stacklevel=2)

    def kernel_config(self, kernel: str, key: dict, device: torch.device) -> dict | None:
        """A kernel's kept configuration for ``key`` (its shapes) on this card and these versions."""
        return self.get({"kind": "kernel-config", "kernel": kernel, "env": environment_key(device), "key": key})

    def keep_kernel_config(self, kernel: str, key: dict, device: torch.device, config: dict) -> None:
        self.put({"kind": "kernel-config", "kernel": kernel, "env": environment_key(device), "key": key}, config)


# ---------------------------------------------------------------------------------------------------
# The whole decision, for a run
# ---------------------------------------------------------------------------------------------------

@dataclass
class Decision:
    """What serves one op, how it was decided (measured, cache, checkpoint, explicit, trust, off, cpu),
    why, and the figures behind it."""

    op: str
    choice: str
    source: str
    why: str = ""
    candidates: dict[str, dict] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"choice": self.choice, "source": self.source, "why": self.why, "candidates": self.candidates,
                "calls": self.calls}


@dataclass
class Settings:
    """The ``[kernels]`` fields the tuner reads, and the run's flags that change its answer."""

    mode: str = "measure"
    op_seconds: float = 10.0
    total_seconds: float = 120.0
    cache: str = ""
    retune: bool = False
    deterministic: bool = True

    @classmethod
    def of(cls, kernels) -> "Settings":
        return cls(kernels.tune, kernels.tune_op_seconds, kernels.tune_seconds, kernels.tune_cache, kernels.retune,
                   kernels.deterministic)


def starting_choices(choices: dict[str, str], mode: str, device: torch.device) -> dict[str, str]:
    """The backends a run resolves before its model exists: explicit ones as given; ``auto`` as the
    registry has it under "trust" and on a CPU, torch under "off" and under "measure" on CUDA (the
    safe side, until the measurement replaces it)."""
    if mode == "trust" or device.type != "cuda":
        return dict(choices)
    return {op: "torch" if b == "auto" else b for op, b in choices.items()}


def tunable(choices: dict[str, str], used: Iterable[str], settings: Settings, device: torch.device) -> list[str]:
    """The ops the tuner decides: used by the model, left on ``auto``, measuring, on CUDA."""
    if settings.mode != "measure" or device.type != "cuda":
        return []
    return [op for op in registry.op_names() if op in used and choices.get(op, "auto") == "auto"]


def _cache_key(env: dict, op: str, works: Sequence, cands: Sequence[Candidate], settings: Settings) -> dict:
    return {"env": env, "op": op, "candidates": [c.name for c in cands], "deterministic": settings.deterministic,
            "calls": sorted(w.signature for w in works)}


def decide(works: dict[str, Sequence], cands: dict[str, list[Candidate]], settings: Settings, clock,
           cache: TuneCache | None, env: dict, notes: dict[str, str] | None = None, log=print) -> dict[str, Decision]:
    """Measure (or read from the cache) each op of ``cands`` over its ``works``; ``notes``: op -> why it has
    no Triton candidate."""
    budget = Budget(clock, settings.total_seconds, settings.op_seconds)
    decisions = {}
    for op, op_cands in cands.items():
        op_works = works.get(op, [])
        labels = [w.label for w in op_works]
        if not op_works:
            decisions[op] = Decision(op, "torch", "measured", "the model made no call of it: torch kept")
            continue
        key = _cache_key(env, op, op_works, op_cands, settings)
        cached = None if cache is None or settings.retune else cache.get(key)
        if cached is not None:
            decisions[op] = Decision(op, cached["choice"], "cache", cached["why"], cached["candidates"], labels)
            continue
        if budget.all_spent():
            decisions[op] = Decision(op, "torch", "measured", "the tuning budget (kernels.tune_seconds) was spent "
                                     "before this op: torch kept", calls=labels)
            continue
        log(f"kernels tune: measuring {op} ({', '.join(c.name for c in op_cands)}) on {'; '.join(labels)}")
        results = measure_op(op, op_works, op_cands, clock, budget)
        choice, why = choose(results)
        if (notes or {}).get(op):
            why += f"; no Triton candidate: {notes[op]}"
        decisions[op] = Decision(op, choice, "measured", why, {n: r.to_dict() for n, r in results.items()}, labels)
        if cache is not None:
            cache.put(key, {k: v for k, v in decisions[op].to_dict().items() if k != "source"})
    return decisions


def agree(decisions: dict[str, Decision] | None, world: int) -> dict[str, Decision]:
    """Rank 0's decisions on every rank (``decisions`` is None on the others)."""
    if world == 1:
        return decisions
    box = [decisions]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def apply(ops: Ops, decisions: dict[str, Decision], cands: dict[str, list[Candidate]]) -> None:
    """Serve each decided op with its chosen candidate; torch, with a warning, where this process has no
    candidate of that name (a checkpoint's choice, resumed on another machine)."""
    for op, d in decisions.items():
        by_name = {c.name: c for c in cands[op]}
        if d.choice not in by_name:
            warnings.warn(f"kernels tune: {op}: the recorded choice {d.choice!r} cannot be served here; torch serves "
                          f"it", RuntimeWarning, stacklevel=2)
            d.choice, d.why = "torch", f"{d.choice} cannot be served here: torch"
        candidate = by_name[d.choice]
        ops.set_functions(op, candidate.backend, candidate.functions)


def tune_ops(ops: Ops, works: dict[str, Sequence], cands: dict[str, list[Candidate]], settings: Settings, clock,
             cache: TuneCache | None, env: dict, rank: int = 0, world: int = 1, recorded: dict[str, str] | None = None,
             notes: dict[str, str] | None = None, log=print) -> dict[str, Decision]:
    """Decide the ops of ``cands`` (rank 0: the ``recorded`` choices kept unless ``settings.retune``, the
    rest measured or read from the cache), agree across ranks, serve them from ``ops``, print the table."""
    decisions = None
    if rank == 0:
        kept = {} if settings.retune else {op: name for op, name in (recorded or {}).items() if op in cands}
        decisions = {op: Decision(op, name, "checkpoint", "recorded by the resumed run") for op, name in kept.items()}
        rest = {op: c for op, c in cands.items() if op not in kept}
        if rest:
            decisions.update(decide(works, rest, settings, clock, cache, env, notes, log))
    decisions = agree(decisions, world)
    apply(ops, decisions, cands)
    log("kernels tune:\n" + table(decisions))
    return decisions


def table(decisions: dict[str, Decision]) -> str:
    """One line per op: each candidate's ms per micro-batch (or why it has none), the choice, why."""
    from .bench.tables import format_table

    rows = []
    for op, d in decisions.items():
        cells = []
        for name, c in d.candidates.items():
            figure = f"{c['ms']:.3g}" if c.get("ms") is not None else c["status"]
            compile_s = f" (+{c['compile_ms'] / 1e3:.1f} s first)" if c.get("compile_ms", 0) >= 100 else ""
            cells.append(f"{name} {figure}{compile_s}")
        rows.append([op, ", ".join(cells) or "–", d.choice, d.source, d.why])
    return format_table(["op", "candidates (ms per micro-batch)", "choice", "from", "why"], rows)


def record(decisions: dict[str, Decision]) -> dict[str, dict]:
    return {op: d.to_dict() for op, d in decisions.items()}


# ---------------------------------------------------------------------------------------------------
# Wiring for the trainer, ``kernels tune`` and ``bench train``
# ---------------------------------------------------------------------------------------------------

#: Task attributes a training forward advances (a recurrent language model's carried state, with
#: train.carry_state): the probe puts them back.
TASK_STATE = ("carried", "forwards")


def probe_step(task, model: torch.nn.Module, precision: str, device: torch.device) -> Callable[[], None]:
    """One forward and backward of ``model`` on the task's first micro-batch, under the run's autocast,
    leaving the task's :data:`TASK_STATE` as it was."""
    from .precision import autocast

    def step():
        saved = {name: copy.copy(getattr(task, name)) for name in TASK_STATE if hasattr(task, name)}
        inputs, targets = task.batch(0, 0)
        with autocast(precision, device):
            loss = task.loss(model, inputs, targets)
        loss.float().backward()
        for name, value in saved.items():
            setattr(task, name, value)
    return step


def optimizer_work(task, recipe, device: torch.device) -> OptimizerWork:
    """The run's optimizer step as :class:`OptimizerWork`: its parameter groups and settings."""
    o = recipe.optim

    def make(backend: str, groups: list[dict], on: torch.device | None):
        ops = Ops({"optimizer": backend}, {})
        return ops.make_optimizer(o.name, groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  momentum=o.momentum, nesterov=o.nesterov, muon_momentum=o.muon_momentum,
                                  max_grad_norm=recipe.train.grad_clip, device=on)
    groups = task.param_groups(o.weight_decay, muon=o.name == "muon")
    return OptimizerWork(groups, make, recipe.train.grad_clip, device, o.name)


def recorded_choice(checkpoint_path: Path | None) -> dict[str, str]:
    """The op -> candidate a checkpoint recorded (empty for a fresh run or an older checkpoint)."""
    if checkpoint_path is None:
        return {}
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (the checkpoint's own load reports what is wrong with it)
        return {}
    return dict(state.get("kernels_tuned") or {})


NO_CUDA = "kernels tune: no CUDA device here: auto serves torch, nothing is measured"


def tune_run(recipe, ops: Ops, task, device: torch.device, rank: int = 0, world: int = 1,
             recorded: dict[str, str] | None = None, log=print) -> dict[str, Decision]:
    """Decide every op ``task`` uses whose backend is ``auto`` and serve the decisions from ``ops`` (which
    the model holds); returns them (op -> :class:`Decision`) for env.json and the checkpoint. ``recorded``:
    a resumed run's choices, kept unless ``kernels.retune``."""
    settings = Settings.of(recipe.kernels)
    choices = recipe.kernels.backends()
    used = task.ops_used()
    to_tune = tunable(choices, used, settings, device)
    if not to_tune:
        if settings.mode == "measure" and device.type != "cuda" and any(choices.get(op) == "auto" for op in used):
            log(NO_CUDA)
        return {}
    found = {op: candidates(op, device, settings.deterministic) for op in to_tune}
    cands, notes = {op: c for op, (c, _) in found.items()}, {op: n for op, (_, n) in found.items() if n}
    if notes:  # a broken install must not pass for a measurement that found torch faster
        warnings.warn(f"kernels tune: {', '.join(notes)} can only be measured on torch's candidates: "
                      f"{next(iter(notes.values()))}", RuntimeWarning, stacklevel=2)
    works = record_works(recipe, ops, task, device, to_tune) if rank == 0 else {}
    started = time.perf_counter()
    decisions = tune_ops(ops, works, cands, settings, CudaClock(device), TuneCache(cache_dir(settings.cache)),
                         environment_key(device), rank, world, recorded, notes, log)
    del works  # the recorded inputs and references: give their memory back before training allocates
    torch.cuda.empty_cache()
    log(f"kernels tune: decided in {time.perf_counter() - started:.1f} s")
    return decisions


def record_works(recipe, ops: Ops, task, device: torch.device, to_tune: Sequence[str]) -> dict[str, list]:
    """What each op of ``to_tune`` does in one micro-batch of this run: the model's recorded calls, and
    the optimizer step."""
    functional = [op for op in to_tune if op != "optimizer"]
    calls = record_calls(ops, functional, probe_step(task, task.model, recipe.train.precision, device),
                         task.model, device)
    works: dict[str, list] = {}
    for op, op_calls in calls.items():
        references = registry.functions_for(op, "torch")
        works[op] = [CallWork(c, references[c.function], device) for c in op_calls]
    if "optimizer" in to_tune:
        works["optimizer"] = [optimizer_work(task, recipe, device)]
    return works


# ---------------------------------------------------------------------------------------------------
# ``tritonforge kernels tune RECIPE``
# ---------------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    from .bench.args import ArgumentParser
    from .config import RecipeError, load_recipe
    from .errors import KernelSelectionError

    p = ArgumentParser(prog="tritonforge kernels tune", allow_abbrev=False, description=(
        "Measure, on this GPU and at RECIPE's shapes, which backend serves each op left on auto (what a training "
        "run does before its first step, measuring again whatever the cache holds), store the choices in the "
        "cache that runs read, and print the table; any --section.key=value overrides the recipe."))
    p.add_argument("recipe", metavar="RECIPE", help="a TOML recipe")
    p.add_argument("--synthetic", action="store_true", help="random inputs of the recipe's shapes instead of its "
                   "data (no dataset, tokenizer or download; packed documents are not represented)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the decisions, their figures and the versions")
    try:
        a, overrides = p.parse_known_args(list(argv))
        return _tune_command(load_recipe(a.recipe, overrides), a.synthetic, a.json)
    except (RecipeError, KernelSelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _tune_command(recipe, synthetic: bool, json_path: str | None) -> int:
    from .metrics import environment
    from .tasks import build_task
    from .trainer import resolve_device

    device = resolve_device(recipe.run.device)
    if device.type != "cuda":  # before building the task: its data would be read for nothing
        print(NO_CUDA)
        return 0
    recipe.kernels.tune, recipe.kernels.retune = "measure", True
    torch.manual_seed(recipe.run.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer sets them
    ops = registry.resolve(starting_choices(recipe.kernels.backends(), "measure", device), device,
                           recipe.kernels.deterministic)
    if synthetic:
        from .bench.synthetic import SyntheticTask

        task = SyntheticTask(recipe, ops, device)
    else:
        task = build_task(recipe, ops, device, log=print)
    decisions = tune_run(recipe, ops, task, device)
    if json_path:
        from .bench.tables import write_json

        write_json(json_path, {"env": environment(device, dict(ops.backends)), "recipe": recipe.to_dict(),
                               "synthetic": synthetic, "tuning": record(decisions)})
        print(f"wrote {json_path}")
    return 0
