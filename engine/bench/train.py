"""``tritonforge bench train RECIPE``: the recipe's model, once per kernel set, in the same process.

    tritonforge bench train RECIPE [--kernels SET] [--vs SET] [--tuned] [--checkpointing POLICIES] [--steps N]
                                   [--warmup N] [--compile] [--json PATH] [--csv PATH] [--section.key=value ...]
    torchrun --nproc_per_node=N -m engine bench train RECIPE [...] [--muon-sharing on,off]

Kernel sets (``--kernels``, default ``triton``; ``--vs``, default ``torch``):

- ``torch``: every op on PyTorch's implementation.
- ``triton``: every op on the project's Triton kernel where this build has one and the device can run it
  (CUDA, or CPU under ``TRITON_INTERPRET=1``); the other ops on torch. The output lists which op got which.
- ``auto``: the registry's ``auto`` for every op (the Triton kernels on CUDA, untimed); ``recipe``: the recipe's
  own ``[kernels]`` table.
- ``tuned``, labelled ``auto (tuned)``: every op on what ``kernels.tune = "measure"`` picks here (see
  :mod:`engine.tune`: measured on the recipe's shapes, or read from the cache); its choices are listed under
  the table. ``--tuned`` adds this set to the other two, so one table compares it with them.
- ``OP=BACKEND[,OP=BACKEND...]`` (e.g. ``attention=triton,layer_norm=torch``): those ops exactly as given
  (a ``triton`` without a kernel is an error), every op not named on torch.

Each set builds the model afresh from the same seed and trains it on synthetic inputs of the recipe's
shapes: for a GPT, ``train.batch_size`` x ``train.seq_len`` tokens drawn uniformly from the tokenizer's
vocabulary (no dataset, tokenizer or download); for an image classifier, Gaussian images of
``model.image_size`` (channels_last on CUDA) and random labels. A step is the trainer's: ``train.grad_accum``
micro-batches under the recipe's precision (autocast; loss scaling for fp16), gradient clipping at
``train.grad_clip`` (inside the Triton optimizer's step, or ``clip_grad_norm_`` for torch's), the recipe's
optimizer, ``zero_grad``: the very :class:`~engine.train.step.TrainStep` the trainer runs, at the recipe's peak
learning rate.
``--compile`` adds a ``torch.compile`` run of each set. ``--checkpointing none,blocks`` (any
``train.activation_checkpointing`` policies, comma-separated; default the recipe's own) runs every set
once per policy, so the memory activation checkpointing saves and the step time its recomputation costs
stand side by side.

Timing: ``--warmup`` steps (default 5, 8 with ``--compile``; 1 on CPU) are run and excluded, then each of
``--steps`` steps (default 20; 3 on CPU) is timed with CUDA events; figures are medians. Columns: the
``checkpointing`` policy; ``tok/s`` (or ``img/s``) items per step over the median step time; ``step ms``;
``peak GB`` the most memory CUDA allocated over the run (2^30 bytes; CUDA only: a CPU keeps no allocator
statistics); ``activations MB`` the most memory (2^20 bytes) held at once, over one more untimed step, by
the tensors autograd saved for the backward (:class:`SavedActivations`; on every device: it is what
activation checkpointing shrinks); ``TFLOP/s`` the model's training FLOPs per item (the task's
``flops_per_item``: 6·N + 6·L·T·d per token for a GPT, 3x the forward's conv and linear FLOPs per image)
times items/s; ``MFU`` that over the card's datasheet bf16 peak; ``% matmul`` over the bf16 matmul rate
measured here; ``GPU idle %`` the share of a few back-to-back steps in which the GPU ran nothing, waiting
for the host (:func:`gpu_idle_share`; not measured on a CPU); ``loss@0`` the first step's loss, which must
agree with the ``--vs`` set's of the same mode and policy (same weights, same batch) within
:data:`LOSS_TOLERANCE`, or the row is FAILED and the command exits with status 1; ``vs`` the ratio of this
row's throughput to that ``--vs`` row's. On CPU the timings are labelled CPU.

Under ``torchrun`` the model is wrapped as ``parallel.strategy`` says (DDP or FSDP2) and every process
runs the same rows; rank 0's times are reported and ``tok/s`` counts every process's items. With
``optim.name = "muon"``, ``--muon-sharing on,off`` runs every set with the Newton-Schulz iterations shared
out over the ranks (``engine.optim.sharing``; what the trainer does) and, under DDP only, repeated whole on
every rank (how Muon ran under DDP before the ranks shared it), one row each.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

import dataclasses

from .. import distributed
from ..config import Recipe, RecipeError, load_recipe
from ..device import set_up_host
from ..errors import KernelSelectionError
from ..ops import table as op_table, tune
from ..optim.build import recipe_optimizer
from ..optim.sharing import sharing_for_run
from ..precision import LossScaler
from ..train.step import TrainStep
from .args import ArgumentParser, BenchError
from .kernelsets import kernel_set_label, parse_kernel_set, parse_muon_sharing, parse_policies, resolve_set, with_policy
from .synthetic import SavedActivations, SyntheticTask
from .tables import fmt, format_table, write_results
from .timing import describe_ceilings, environment, free_memory, measure_ceilings, pick_device, timer_label


#: Largest relative difference of the first step's loss between two kernel sets, by precision.
LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 1e-2}

COLUMNS = ("kernels", "mode", "checkpointing", "world", "muon_sharing", "status", "unit", "items_per_s", "step_ms", "step_ms_mean", "peak_gb",
           "activations_mb", "tflops", "mfu", "pct_matmul", "gpu_idle_pct", "first_loss", "last_loss", "vs",
           "backends", "timer", "note")


# ---------------------------------------------------------------------------------------------------
# One run: build, warm up, time
# ---------------------------------------------------------------------------------------------------

@dataclass
class TrainArgs:
    recipe: Recipe
    kernels: str | dict[str, str]
    vs: str | dict[str, str]
    checkpointing: list[str]
    steps: int
    warmup: int | None
    compile: bool
    device: torch.device
    json: str | None = None
    csv: str | None = None
    overrides: list[str] = field(default_factory=list)
    #: Add the ``tuned`` set to ``kernels`` and ``vs``.
    tuned: bool = False
    #: Muon's iterations under torchrun: "on" shared over the ranks, "off" repeated on every rank (DDP).
    muon_sharing: list[str] = field(default_factory=lambda: ["on"])


def gpu_idle_share(step, first: int, steps: int, device: torch.device) -> tuple[float | None, str]:
    """Percent of ``steps`` back-to-back steps' GPU time in which no kernel or copy ran: the GPU waiting for
    the host. From the CUDA activity the profiler records (kernel and copy start and end times), over the
    span from the first to the last; profiling adds some host overhead, so this errs high. ``(None, why)``
    where it cannot be measured (on a CPU: not measured)."""
    if device.type != "cuda":
        return None, ""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        _sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(first, first + steps):
                step(i)
            _sync(device)
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001  (no CUPTI, an old profiler: the other figures stand)
        return None, f"GPU idle share not measured: {type(e).__name__}: {e}"[:200]
    if not spans:
        return None, "GPU idle share not measured: the profiler recorded no CUDA activity"
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:  # the union of the intervals
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    total = spans[-1][1] - spans[0][0]
    return (100.0 * (1.0 - busy / total) if total > 0 else None), ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(args: TrainArgs, kernel_set, compiled: bool, ceilings: dict, policy: str | None = None,
            sharing: str = "on") -> dict:
    """Build the model with ``kernel_set`` (and checkpointing ``policy``, the recipe's by default; Muon's
    ``sharing`` under torchrun) and time it; a row for the table."""
    r, device, world = args.recipe, args.device, distributed.world()
    if policy is not None:
        r = with_policy(r, policy)
    row = {"kernels": kernel_set_label(kernel_set), "mode": "compile" if compiled else "eager",
           "checkpointing": r.train.activation_checkpointing, "status": "ok", "unit": None,
           "timer": timer_label(device), "note": "", "backends": None, "world": world,
           "muon_sharing": sharing if world > 1 and r.optim.name == "muon" else None}
    free_memory(device)
    if compiled:
        torch._dynamo.reset()
    torch.manual_seed(r.run.seed)
    ops = resolve_set(kernel_set, r, device)
    task = SyntheticTask(r, ops, device)
    if kernel_set == "tuned":
        measured = dataclasses.replace(r.kernels, ops={op: "auto" for op in op_table.op_names()}, tune="measure")
        decisions = tune.tune_run(dataclasses.replace(r, kernels=measured), ops, task, device)
        row["tuned"] = {op: d.choice for op, d in decisions.items()}
    row["backends"] = {op: b for op, b in ops.backends.items() if op in task.ops_used()}
    row["unit"] = task.unit
    model = distributed.wrap(task.model, r, device, log=lambda text: None) if world > 1 else task.model
    forward_model = torch.compile(model) if compiled else model
    o = r.optim
    groups = task.param_groups(o.weight_decay, muon=o.name == "muon")
    muon_sharing = None
    if row["muon_sharing"] == "on":
        muon_sharing = sharing_for_run(task.model, groups[0]["params"], r.parallel.strategy)
    optimizer, clips_in_step = recipe_optimizer(ops, r, groups, device, muon_sharing=muon_sharing)
    scaler = LossScaler(device, enabled=r.train.precision == "fp16")
    train_step = TrainStep(task, model, forward_model, optimizer, clips_in_step, scaler, r, device)

    def step(i: int) -> torch.Tensor:  # the trainer's step, at the recipe's peak learning rate
        return train_step(i, o.lr).loss
    warmup = args.warmup if args.warmup is not None else (1 if device.type != "cuda" else 8 if compiled else 5)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    first_loss = step(0)
    for i in range(1, warmup):
        step(i)
    _sync(device)
    row["warmup_s"] = time.perf_counter() - start
    times_ms = []
    for i in range(warmup, warmup + args.steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            loss = step(i)
            end.record()
            times_ms.append((begin, end))
        else:
            t0 = time.perf_counter()
            loss = step(i)
            times_ms.append(1e3 * (time.perf_counter() - t0))
    _sync(device)
    if device.type == "cuda":
        times_ms = [b.elapsed_time(e) for b, e in times_ms]
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    row["gpu_idle_pct"], idle_note = gpu_idle_share(step, warmup + args.steps, min(args.steps, 5), device)
    if idle_note:
        row["note"] = idle_note
    with SavedActivations(task.model) as saved:  # one more step, untimed: the hooks cost host time
        step(warmup + args.steps + min(args.steps, 5))
    _sync(device)
    row["activations_mb"] = saved.peak / 2 ** 20
    row["first_loss"], row["last_loss"] = float(first_loss), float(loss)
    row["step_ms"] = statistics.median(times_ms)
    row["step_ms_mean"] = statistics.fmean(times_ms)
    items_per_step = task.items_per_micro_batch * r.train.grad_accum * world
    row["items_per_s"] = items_per_step / (row["step_ms"] / 1e3)
    row["tflops"] = task.flops_per_item() * row["items_per_s"] / 1e12
    from ..runlog import peak_flops

    peak = peak_flops(device)
    row["mfu"] = 100 * row["tflops"] * 1e12 / peak if peak else None
    row["pct_matmul"] = 100 * row["tflops"] / ceilings["matmul_tflops"] if ceilings else None
    if not (math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])):
        row["status"], row["note"] = "FAILED", f"non-finite loss (first {row['first_loss']}, last {row['last_loss']})"
    del task, model, forward_model, optimizer, train_step, step
    free_memory(device)
    return row


def _compare(rows: list[dict], args: TrainArgs, log_err) -> None:
    """Throughput ratio and first-loss agreement of each row with the ``--vs`` row of the same mode."""
    vs_label = kernel_set_label(args.vs)
    tol = LOSS_TOLERANCE[args.recipe.train.precision]
    for key in dict.fromkeys(_group_key(r) for r in rows):
        group = [r for r in rows if _group_key(r) == key]
        base = next((r for r in group if r["kernels"] == vs_label and r.get("items_per_s")), None)
        if base is None:
            continue
        for r in group:
            if not r.get("items_per_s"):
                continue
            r["vs"] = r["items_per_s"] / base["items_per_s"]
            diff = abs(r["first_loss"] - base["first_loss"]) / max(abs(base["first_loss"]), 1e-12)
            if r["status"] == "ok" and not diff <= tol:
                r["status"] = "FAILED"
                r["note"] = (f"first-step loss {r['first_loss']:.5f} differs from {vs_label}'s {base['first_loss']:.5f} "
                             f"by {diff:.1e} (relative; tolerance {tol:g} for {args.recipe.train.precision})")
                log_err(f"!!! FAILED bench train {_label(r)}: {r['note']}")


def _group_key(row: dict) -> tuple:
    """Rows compared with each other: same mode, checkpointing policy and Muon sharing."""
    return row["mode"], row.get("checkpointing"), row.get("muon_sharing")


def run(args: TrainArgs, log=print, log_err=None) -> dict:
    """Every row in this process; under torchrun every process runs them together (rank 0 logs)."""
    info = distributed.init(args.device.type)
    if info.world > 1 and args.device.type == "cuda":
        args = dataclasses.replace(args, device=torch.device("cuda", info.local_rank))
    if not info.is_main:
        log = log_err = lambda text: None
    try:
        distributed.check_sync_bn(args.recipe, args.device, info.world)
        result = _run_rows(args, log, log_err)
    finally:
        distributed.cleanup()
    result["rank"], result["world"] = info.rank, info.world
    return result


def _run_rows(args: TrainArgs, log, log_err) -> dict:
    log_err = log_err or (lambda text: print(text, file=sys.stderr, flush=True))
    device = args.device
    r = args.recipe
    set_up_host(device, r.run.threads, r.run.cpu_memory)  # as the trainer sets the process up
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer sets it
        torch.backends.cudnn.allow_tf32 = True
    ceilings = measure_ceilings(device)
    log(describe_ceilings(ceilings))
    result = {"env": environment(device), "ceilings": ceilings, "recipe": r.to_dict(), "overrides": args.overrides,
              "rows": []}
    # Two equal sets still run twice: their difference is the run-to-run noise.
    for compiled in ([False, True] if args.compile else [False]):
        sets = (args.kernels, args.vs) + (("tuned",) if args.tuned else ())
        for policy, sharing, kernel_set in [(p, s, k) for p in args.checkpointing for s in args.muon_sharing
                                            for k in sets]:
            head = {"kernels": kernel_set_label(kernel_set), "mode": "compile" if compiled else "eager",
                    "checkpointing": policy, "timer": timer_label(device),
                    "muon_sharing": sharing if distributed.world() > 1 and r.optim.name == "muon" else None}
            log(f"{_label(head)}: {args.steps} timed steps")
            try:
                row = run_one(args, kernel_set, compiled, ceilings, policy, sharing)
            except torch.OutOfMemoryError:
                row = {**head, "status": "not available", "note": "out of memory: lower train.batch_size"}
                free_memory(device)
            except (RecipeError, KernelSelectionError):
                raise
            except Exception as e:  # noqa: BLE001  (report it and go on with the other set)
                row = {**head, "status": "FAILED", "note": f"{type(e).__name__}: {str(e).strip()[:300]}"}
                log_err(f"!!! FAILED bench train {_label(head)}: {row['note']}")
                free_memory(device)
            result["rows"].append(row)
            log("  " + _row_line(row))
            _write_on_rank0(args, result)
    _compare(result["rows"], args, log_err)
    _write_on_rank0(args, result)
    return result


def _megabytes(mb: float | None) -> str:
    """Three significant figures for a small figure (a tiny model's), tenths of a megabyte above 10."""
    return fmt(mb, ",.1f" if mb is not None and mb >= 10 else ".3g")


def _label(r: dict) -> str:
    """A row's kernel set, mode, checkpointing policy (left out when it is "none") and Muon sharing."""
    policy = r.get("checkpointing") or "none"
    sharing = {"on": ", Muon shared", "off": ", Muon on every rank", None: ""}[r.get("muon_sharing")]
    return f"{r['kernels']} ({r['mode']}{'' if policy == 'none' else f', checkpointing {policy}'}{sharing})"


def _row_line(r: dict) -> str:
    if r.get("items_per_s") is None:
        return f"{_label(r)}: {r['status']} {r.get('note', '')}"
    return (f"{_label(r)}: {r['items_per_s']:,.0f} {r['unit']}/s, {r['step_ms']:.1f} ms/step, "
            f"{_megabytes(r['activations_mb'])} MB of activations, "
            f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")


def _write_on_rank0(args: TrainArgs, result: dict) -> None:
    if distributed.rank() != 0:  # under torchrun every rank holds the same rows; rank 0 writes them
        return
    write_results(result, args.json, args.csv, COLUMNS)


def table(result: dict, args: TrainArgs) -> str:
    rows = result["rows"]
    unit = next((r["unit"] for r in rows if r.get("unit")), "item")
    ms = " (CPU)" if args.device.type != "cuda" else ""
    header = ["kernels", "mode", "checkpointing", "Muon sharing", f"{unit}/s{ms}", f"step ms{ms}", "peak GB", "activations MB",
              "TFLOP/s", "MFU %", "% matmul", "GPU idle %", "loss@0", f"vs {kernel_set_label(args.vs)}", "status"]
    cells = [[r["kernels"], r["mode"], r.get("checkpointing") or "–", r.get("muon_sharing") or "–",
              fmt(r.get("items_per_s"), ",.0f"),
              fmt(r.get("step_ms"), ".1f"), fmt(r.get("peak_gb"), ".1f"), _megabytes(r.get("activations_mb")),
              fmt(r.get("tflops"), ".3g"), fmt(r.get("mfu"), ".1f"),
              fmt(r.get("pct_matmul"), ".1f"), fmt(r.get("gpu_idle_pct"), ".1f"), fmt(r.get("first_loss"), ".4f"),
              fmt(r.get("vs"), ".3f"), r["status"]]
             for r in rows]
    lines = [format_table(header, cells)]
    for r in rows:
        if r.get("backends"):
            used = ", ".join(f"{op}={r.get('tuned', {}).get(op, b)}" for op, b in r["backends"].items())
            lines.append(f"  {_label(r)}: {used}")
        if r.get("note"):
            lines.append(f"  {_label(r)}: {r['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def _train_parser() -> ArgumentParser:
    p = ArgumentParser(prog="tritonforge bench train", allow_abbrev=False,
                       description="Train RECIPE's model on synthetic inputs once per kernel set (and "
                                   "activation-checkpointing policy) and compare throughput and memory; any "
                                   "--section.key=value overrides the recipe.")
    p.add_argument("recipe", metavar="RECIPE", help="a TOML recipe")
    p.add_argument("--kernels", default="triton",
                   help="torch, triton (Triton where a kernel exists), auto, tuned (measured), recipe, or "
                        "OP=BACKEND,... (default triton)")
    p.add_argument("--vs", default="torch", help="the kernel set to compare with, same forms (default torch)")
    p.add_argument("--tuned", action="store_true",
                   help="also run 'auto (tuned)': each op on what kernels.tune = measure picks on this machine")
    p.add_argument("--checkpointing", default=None, metavar="POLICIES",
                   help="activation-checkpointing policies to run each set with, comma-separated: none, blocks, "
                        "every_N (default: the recipe's train.activation_checkpointing)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, 8 with --compile; 1 on CPU)")
    p.add_argument("--compile", action="store_true", help="also time each set under torch.compile")
    p.add_argument("--muon-sharing", default="on", metavar="MODES",
                   help="under torchrun with optim.name = muon: on (the iterations shared over the ranks), off "
                        "(repeated on every rank; DDP only), or both, comma-separated (default on)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="write the rows as CSV")
    return p


def parse_args(argv: Sequence[str]) -> TrainArgs:
    a, overrides = _train_parser().parse_known_args(list(argv))
    kernels = parse_kernel_set(a.kernels, "--kernels")
    vs = parse_kernel_set(a.vs, "--vs")
    if a.steps is not None and a.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {a.steps}")
    if a.warmup is not None and a.warmup < 1:
        raise BenchError(f"--warmup must be >= 1 (the first step compiles and allocates), got {a.warmup}")
    recipe = load_recipe(a.recipe, overrides)  # RecipeError names a bad override or field
    policies = parse_policies(a.checkpointing, recipe)
    device = pick_device(recipe.run.device)
    steps = a.steps if a.steps is not None else (20 if device.type == "cuda" else 3)
    return TrainArgs(recipe, kernels, vs, policies, steps, a.warmup, a.compile, device, a.json, a.csv,
                     list(overrides), a.tuned, parse_muon_sharing(a.muon_sharing, recipe))


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except (RecipeError, KernelSelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in result["rows"] if r["status"] == "FAILED"]
    if result["rank"] == 0:
        print()
        print(table(result, args))
        print(describe_ceilings(result["ceilings"]))
        for path in (args.json, args.csv):
            if path:
                print(f"wrote {path}")
    return 1 if failed else 0
