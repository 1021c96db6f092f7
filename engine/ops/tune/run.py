"""The whole decision for a run, and the wiring for the trainer, ``kernels tune`` and ``bench train``."""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ...optim.build import recipe_optimizer
from .. import select
from ..select import Ops
from ..table import op_names
from .cache import TuneCache, cache_dir, environment_key
from .candidates import Candidate, candidates
from .kept import KeptConfigs, install
from .measure import Budget, CallWork, CudaClock, OptimizerWork, choose, measure_op
from .record import record_calls

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
    return [op for op in op_names() if op in used and choices.get(op, "auto") == "auto"]


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


def agree(decisions: dict[str, Decision] | None, world: int, kept: KeptConfigs | None = None) -> dict[str, Decision]:
    """Rank 0's decisions on every rank (``decisions`` is None on the others), and rank 0's kept Triton
    configurations (autotuned while it measured) in every rank's ``kept``."""
    if world == 1:
        return decisions
    box = [decisions, kept.entries() if kept is not None else []]
    torch.distributed.broadcast_object_list(box, src=0)
    if kept is not None and torch.distributed.get_rank() != 0:
        kept.adopt(box[1])
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
             notes: dict[str, str] | None = None, log=print, configs: KeptConfigs | None = None) -> dict[str, Decision]:
    """Decide the ops of ``cands`` (rank 0: the ``recorded`` choices kept unless ``settings.retune``, the
    rest measured or read from the cache), agree across ranks (``configs``: the kept Triton configurations too),
    serve them from ``ops``, print the table."""
    decisions = None
    if rank == 0:
        kept = {} if settings.retune else {op: name for op, name in (recorded or {}).items() if op in cands}
        decisions = {op: Decision(op, name, "checkpoint", "recorded by the resumed run") for op, name in kept.items()}
        rest = {op: c for op, c in cands.items() if op not in kept}
        if rest:
            decisions.update(decide(works, rest, settings, clock, cache, env, notes, log))
    decisions = agree(decisions, world, configs)
    apply(ops, decisions, cands)
    log("kernels tune:\n" + table(decisions))
    return decisions


def table(decisions: dict[str, Decision]) -> str:
    """One line per op: each candidate's ms per micro-batch (or why it has none), the choice, why."""
    from ...bench.tables import format_table

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
    from ...precision import autocast

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
        return recipe_optimizer(Ops({"optimizer": backend}, {}), recipe, groups, on)
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
    a resumed run's choices, kept unless ``kernels.retune``. On CUDA it also installs the kernels'
    configuration store (:mod:`.kept`), whatever is tuned: Triton's autotuned tiles are kept from then on."""
    settings = Settings.of(recipe.kernels)
    choices = recipe.kernels.backends()
    used = task.ops_used()
    cache = TuneCache(cache_dir(settings.cache))
    kept = install(cache, device, settings.retune)
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
    decisions = tune_ops(ops, works, cands, settings, CudaClock(device), cache, kept.env if kept else
                         environment_key(device), rank, world, recorded, notes, log, kept)
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
        references = select.functions_for(op, "torch")
        works[op] = [CallWork(c, references[c.function], device) for c in op_calls]
    if "optimizer" in to_tune:
        works["optimizer"] = [optimizer_work(task, recipe, device)]
    return works
