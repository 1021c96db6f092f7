"""3. Measure: check each candidate against the upcast reference, then time it (:func:`measure_op`);
4. decide: the fastest, if it beats torch by more than the noise (:func:`choose`)."""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map

# The relative errors ``tritonforge kernels check`` allows, by dtype, for the optimizer, and for Muon on a GPU.
from ...bench.catalogue import MUON_CUDA_TOLERANCE, OPTIMIZER_TOLERANCE, TOLERANCE
from .candidates import Candidate
from .record import Call, describe

#: Timed repeats of every candidate before the first decision; doubled while the answer is unclear, up to
#: MAX_REPEATS or the op's time; never fewer than MIN_REPEATS, whatever the time.
START_REPEATS = 5
MAX_REPEATS = 40
MIN_REPEATS = 3
#: A decision is clear (no more repeats) when the gap to torch is this many times the noise.
CLEAR_GAP = 4.0


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
            {**{k: describe(v) for k, v in sorted(g.items()) if k not in ("params", "lr")},
             "params": [describe(p) for p in g["params"]]} for g in groups]}, sort_keys=True)
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
