"""The training loop.

:class:`Trainer` assembles the pieces a recipe names (device, kernels, task with its model and data,
optimizer, precision, logging, checkpoints) and :meth:`Trainer.fit` runs the loop. One optimizer step is
:meth:`Trainer.train_step`: forward and backward over the micro-batches, then clipping, the update and
the loss-scale update, with no host synchronisation: the step's figures stay on the device until a
logging, evaluation or checkpoint step reads them (see :class:`TrainStep`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from . import checkpoint, distributed, transfer
from .checkpoint import CheckpointError
from .config import BUDGET_MIN_WARMUP, Recipe, RecipeError, dump_toml
from .ops import select as op_select, tune
from .optim.build import recipe_optimizer
from .optim.sharing import sharing_for_run
from .runlog import RunLogger, environment, format_duration, peak_flops
from .precision import LossScaler, autocast
from .tasks import Task, build_task


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss past the allowed skips, out of memory, ...)."""


class Interrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, path: Path | None):
        self.signum, self.path = signum, path
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved to {path}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"run.device = {name!r} but CUDA is not available on this machine")
        if name == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(name)


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine, constant, linear or
    warmup-stable-decay ("wsd")."""
    o, total = recipe.optim, recipe.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "onecycle":  # warmup, then a straight line down to min_lr at the last step
        progress = (step - o.warmup_steps) / max(1, total - 1 - o.warmup_steps)
        return o.lr + min(1.0, progress) * (o.min_lr - o.lr)
    if o.schedule == "wsd":
        decay = max(1, min(round(o.cooldown * total), total - o.warmup_steps))
        progress = max(0.0, (step - (total - decay)) / decay)
        return o.lr + min(1.0, progress) * (o.min_lr - o.lr)
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


#: Share added to the measured step time when a time budget fixes the step count (machines vary while they run).
BUDGET_MARGIN = 0.06
#: A re-timed budget raises its step count only by more than this share (pace measurements are noisy).
BUDGET_RAISE = 0.02

_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")


def _new_run_dir(name: str) -> Path:
    """``runs/<name>-<timestamp>``, with a counter if a run of that name started in the same second."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _latest_run_dir(name: str) -> Path | None:
    """The newest ``runs/<name>-<timestamp>`` holding a complete checkpoint, or None."""
    runs = [d for d in Path("runs").glob(f"{name}-*") if _STAMP.fullmatch(d.name[len(name):])
            and checkpoint.latest(d / "checkpoints") is not None]
    return max(runs, key=lambda d: checkpoint.latest(d / "checkpoints").stat().st_mtime, default=None)


def _checkpoint_in(where: Path) -> Path:
    """The checkpoint to resume from, given a checkpoint file, a run directory or its checkpoints folder."""
    if where.is_file():
        return where
    folder = where / "checkpoints" if (where / "checkpoints").is_dir() else where
    found = checkpoint.latest(folder)
    if found is None:
        raise CheckpointError(f"no complete checkpoint to resume in {folder}")
    return found


def restarted_by_torchrun() -> bool:
    """torchrun started this process again after a worker failed (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def locate_run(recipe: Recipe) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a fresh run).

    Resuming writes into the resumed run's directory unless ``run.dir`` names another; a fresh run gets
    ``run.dir`` or a new ``runs/<name>-<timestamp>``, and refuses a directory that already holds
    checkpoints (it would mix two runs; resume it or choose another run.dir). When torchrun restarts a
    job after a worker failed, the job resumes from its latest checkpoint by itself.
    """
    r = recipe
    resume = r.checkpoint.resume
    if not resume and restarted_by_torchrun():
        previous = Path(r.run.dir) if r.run.dir else _latest_run_dir(r.run.name)
        if previous is not None and checkpoint.latest(previous / "checkpoints") is not None:
            return previous, checkpoint.latest(previous / "checkpoints")
    if not resume:
        run_dir = Path(r.run.dir) if r.run.dir else _new_run_dir(r.run.name)
        if checkpoint.list_checkpoints(run_dir / "checkpoints"):
            raise RecipeError(f"run.dir: {run_dir} already holds the checkpoints of a run; resume it "
                              f"(--resume / checkpoint.resume = 'latest') or choose another run.dir")
        return run_dir, None
    if resume == "latest":
        source = Path(r.run.dir) if r.run.dir else _latest_run_dir(r.run.name)
        if source is None:
            raise RecipeError(f"checkpoint.resume = 'latest': no run named {r.run.name!r} with a checkpoint under "
                              f"runs/; set run.dir to the run directory, or resume from a checkpoint path")
    else:
        source = Path(resume)
        if not source.exists():
            raise RecipeError(f"checkpoint.resume: no such checkpoint or run directory: {source}")
    ckpt = _checkpoint_in(source)
    if r.run.dir:
        return Path(r.run.dir), ckpt
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent, ckpt
    return _new_run_dir(r.run.name), ckpt


def _rng_state(device: torch.device) -> dict:
    """Every RNG the run draws from, as tensors and plain values (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _recipe_changes(saved: dict, current: dict) -> list[str]:
    """``section.key: old -> new`` for each field that differs (the run directory and resume excepted)."""
    changes = []
    for section, values in current.items():
        for key, value in values.items():
            if (section, key) in (("run", "dir"), ("checkpoint", "resume")) or key not in saved.get(section, {}):
                continue
            old = saved[section][key]
            if (list(old) if isinstance(old, (list, tuple)) else old) != \
                    (list(value) if isinstance(value, (list, tuple)) else value):
                changes.append(f"{section}.{key}: {old!r} -> {value!r}")
    return changes


@dataclass
class StepResult:
    """What one optimizer step leaves behind, as device tensors: reading them is the only host sync."""

    step: int
    lr: float
    #: Mean loss over the micro-batches (this process's).
    loss: torch.Tensor
    #: Global gradient norm before clipping, or None when nothing computed it.
    grad_norm: torch.Tensor | None
    #: The loss or the gradients were not finite and the update was not applied (fp16 overflow excepted).
    bad: torch.Tensor
    #: fp16 gradients overflowed: the loss scaler skipped the update and backs off.
    scaler_skip: torch.Tensor


class Prefetcher:
    """Micro-batches one optimizer step ahead: while step N computes, step N + 1's batches are already on
    their way to the device (the task pins them and copies with ``non_blocking=True``; on CUDA the copies
    are queued on a side stream, so they overlap step N's kernels). On a CPU there is nothing to copy: the
    batches are built when asked for. Batches are a pure function of the step, so prefetching changes
    nothing a run computes."""

    def __init__(self, task: Task, grad_accum: int, device: torch.device):
        self.task, self.grad_accum = task, grad_accum
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[int, list] | None = None

    def _fetch(self, step: int) -> list:
        return [self.task.batch(step, micro) for micro in range(self.grad_accum)]

    def batches(self, step: int) -> list:
        if self.stream is None:
            return self._fetch(step)
        current = torch.cuda.current_stream(self.stream.device)
        if self._ahead is not None and self._ahead[0] == step:
            current.wait_stream(self.stream)
            batches = self._ahead[1]
            for t in tree_leaves(batches):  # the side stream's memory is now also the compute stream's
                if isinstance(t, torch.Tensor):
                    t.record_stream(current)
        else:
            batches = self._fetch(step)
        with torch.cuda.stream(self.stream):
            self._ahead = (step + 1, self._fetch(step + 1))
        return batches


class TrainStep:
    """One optimizer step: forward and backward over the micro-batches, clipping, the update, the loss-scale
    update and ``zero_grad``, deciding everything on the device. The trainer runs it and ``bench train``
    times it.

    No host synchronisation: a non-finite loss or gradient masks the update on the device (torch's fused
    optimizers skip on their ``found_inf``, the Triton ones on theirs or on their ``skip`` flag; others
    restore the parameters and state they had) and is reported from the :class:`StepResult` when the trainer next reads it. ``batches(step)`` yields the
    ``(inputs, targets)`` micro-batches of a step, already on the device.
    """

    def __init__(self, task: Task, model: nn.Module, forward_model: nn.Module, optimizer, clips_in_step: bool,
                 scaler: LossScaler, recipe: Recipe, device: torch.device, batches=None):
        self.task, self.model, self.forward_model = task, model, forward_model
        self.optimizer, self.clips_in_step, self.scaler = optimizer, clips_in_step, scaler
        self.recipe, self.device = recipe, device
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.batches = batches or (lambda step: [task.batch(step, m) for m in range(recipe.train.grad_accum)])
        # torch's fused optimizers skip the update when their ``found_inf`` is set, on the device.
        self._fused_skip = not clips_in_step and bool(optimizer.defaults.get("fused"))

    def __call__(self, step: int, lr: float) -> StepResult:
        t = self.recipe.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro, (inputs, targets) in enumerate(self.batches(step)):
            # Only the last micro-batch reduces gradients across processes.
            with distributed.no_sync(self.model, skip=micro < t.grad_accum - 1):
                with autocast(t.precision, self.device):
                    loss = self.task.loss(self.forward_model, inputs, targets)
                self.scaler.scale_loss(loss / t.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / t.grad_accum
        loss_ok = torch.isfinite(loss_mean)

        grad_norm = None
        if self.clips_in_step:
            # The fused optimizer unscales, clips, detects inf/NaN and skips on the device; a non-finite
            # loss (whose gradients may well be finite) skips it too, as the step is reported.
            self.optimizer.grad_scale = self.scaler.scale
            self.optimizer.skip = ~loss_ok
            self.optimizer.step()
            found_inf, grad_norm = self.optimizer.found_inf.float(), self.optimizer.grad_norm
        else:
            found_inf = self.scaler.unscale_(self.params)
            if t.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
                if isinstance(grad_norm, DTensor):  # sharded parameters: the norm over all shards
                    grad_norm = grad_norm.full_tensor()
                found_inf = torch.maximum(found_inf, (~torch.isfinite(grad_norm)).float())
            skip = found_inf.bool() | ~loss_ok
            if self._fused_skip:
                # Shaped like the step counts on CPU, whose foreach fallback does not broadcast (1,) into them.
                self.optimizer.found_inf = skip.float().reshape(1 if self.device.type == "cuda" else ())
                self.optimizer.step()
                self.optimizer.found_inf = None
            else:
                masked_step(self.optimizer, ~skip)
        self.scaler.update(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        overflow = found_inf.bool()
        scaler_skip = loss_ok & overflow if t.precision == "fp16" else torch.zeros_like(overflow)
        return StepResult(step, lr, loss_mean, grad_norm, ~loss_ok | (overflow & ~scaler_skip), scaler_skip)


def masked_step(optimizer, apply: torch.Tensor) -> None:
    """``optimizer.step()`` where the device flag ``apply`` is true, and no change at all where it is false,
    without reading the flag on the host: each parameter and its state are restored with ``torch.where``
    from a copy. State this step creates is reset to zeros where ``apply`` is false: the state a fresh AdamW,
    SGD (momentum without dampening) or Lion starts from. (Costs a copy of parameters and state per step;
    the Triton and torch's fused optimizers skip on the device without one.)"""
    changed, fresh = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p)
            tensors = [p, *state.values()] if state else [p]
            changed += [t for t in tensors if torch.is_tensor(t) and t.device == apply.device]
            if not state:
                fresh.append(p)
    with torch.no_grad():
        before = _copies(changed)
        optimizer.step()
        for t, old in zip(changed, before):
            torch.where(apply, t, old, out=t)  # in place: no temporary, no second pass
        for p in fresh:
            for t in optimizer.state[p].values():
                if torch.is_tensor(t) and t.device == apply.device:
                    torch.where(apply, t, t.new_zeros(()), out=t)


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of each tensor, made as one concatenation per dtype (one launch, not one clone per tensor)."""
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            copies[i] = part.view(tensors[i].shape)
    return copies


class _BudgetClock:
    """Fixes a time-budgeted run's step count once its warmup steps are timed, then keeps the run inside it.

    The steps before the count is fixed are warmup steps, whose learning rate does not depend on the count,
    so fixing it changes nothing that already ran. The count fits the budget (counted from the trainer's
    start) with the periodic and final evaluations, the end-of-run sample, and a margin of
    :data:`BUDGET_MARGIN` on the measured step time. Machines also change speed while they run (a
    neighbour's job, a throttled clock), and an evaluation's cost is known only once one has run: at every
    logging step the clock re-times the steps since the last one (and the last evaluation) and sets the
    count to what fits at that pace: lower whenever the rest no longer fits, higher when at least
    :data:`BUDGET_RAISE` more steps fit (so noise does not move it), never past ``train.steps``. Each change
    is printed and recorded like the first, and the rest of the learning rate is scheduled over the new
    count. All processes take the smallest count any of them computes. Timing reads the clock only where
    the trainer already waits for the device (logging and evaluation steps), except at the two ends of
    the warmup window.
    """

    #: Steps a re-timing needs since the previous one (shorter windows are too noisy to act on).
    MIN_WINDOW = 10

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        r = trainer.recipe
        warmup = r.optim.warmup_steps
        self.window_end = max(BUDGET_MIN_WARMUP, min(warmup, 50)) if r.optim.schedule == "constant" \
            else min(warmup, 50)
        self.window_start: float | None = None
        self.paused = 0.0
        self.fixed = False
        self.forward = 0.0  # seconds of one evaluation batch: timed at the fix, then from each evaluation
        self.ceiling = r.train.steps

    def after_step(self) -> None:
        """Called after each step; fixes the count at the end of the warmup window."""
        t = self.trainer
        if self.fixed:
            return
        if t.step == 1 or self.window_start is None:  # the first step pays one-time costs: not timed
            _sync(t.device)
            self.window_start, self.start_step, self.paused = time.perf_counter(), t.step, 0.0
            return
        if t.step < max(self.window_end, self.start_step + 2):
            return
        _sync(t.device)
        now = time.perf_counter()
        per_step = (now - self.window_start - self.paused) / (t.step - self.start_step)
        self.forward = self._forward_seconds()
        steps = self._agree(self.fit(per_step, self.forward))
        self._set(steps, per_step, f"{steps} steps fit ({1e3 * per_step:.0f} ms/step measured over steps "
                                   f"{self.start_step + 1}-{t.step}")
        self.fixed = True
        self.window_start, self.start_step, self.paused = time.perf_counter(), t.step, 0.0

    def after_eval(self, seconds: float) -> None:
        """A periodic evaluation took ``seconds``: the cost of the ones still to come."""
        self.forward = seconds / max(1, self.trainer.task.eval_batches(final=False))

    def after_log(self) -> None:
        """Called at logging steps (the device is idle): move the count to what fits at the pace just measured."""
        t = self.trainer
        if not self.fixed or t.step >= t.recipe.train.steps or t.step - self.start_step < self.MIN_WINDOW:
            return
        now = time.perf_counter()
        per_step = (now - self.window_start - self.paused) / (t.step - self.start_step)
        window = f"{self.start_step + 1}-{t.step}"
        self.window_start, self.start_step, self.paused = now, t.step, 0.0
        steps, current = self._agree(self.fit(per_step, self.forward)), t.recipe.train.steps
        if steps < current or steps > current * (1 + BUDGET_RAISE):
            self._set(steps, per_step, f"{steps} steps fit (steps {window} ran at {1e3 * per_step:.0f} ms/step")

    def _set(self, steps: int, per_step: float, how: str) -> None:
        t = self.trainer
        t._fix_steps(steps)
        left = t.recipe.train.budget_seconds() - (time.perf_counter() - t._t_created)
        t.log.print(f"time budget {t.recipe.train.time_budget}: {how}, {left:.0f} s left); the learning rate is "
                    f"scheduled over them")
        t.log.record({"kind": "budget", "step": t.step, "steps": steps, "step_ms": 1e3 * per_step,
                      "eval_forward_ms": 1e3 * self.forward, "seconds_left": left})
        if t.dist.is_main:
            (t.run_dir / "recipe.toml").write_text(dump_toml(t.resolved))

    def _agree(self, steps: int) -> int:
        """The smallest count over all processes (their clocks differ; their loops must end together)."""
        t = self.trainer
        if t.dist.world == 1:
            return steps
        box = torch.tensor([steps], device=t.device, dtype=torch.int64)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MIN)
        return int(box.item())

    def _forward_seconds(self) -> float:
        """One evaluation-sized forward (no gradients, eval mode) of a training batch, timed."""
        t = self.trainer
        model = t.forward_model
        inputs, targets = t.task.batch(0, 0)
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(t.recipe.train.precision, t.device):
            begin = time.perf_counter()
            t.task.loss(model, inputs, targets)
            _sync(t.device)
            seconds = time.perf_counter() - begin
        model.train(was_training)
        return seconds

    def fit(self, per_step: float, forward: float) -> int:
        """The step count that fits what is left of the budget, at ``per_step`` seconds a step and
        ``forward`` seconds an evaluation batch (never fewer than the steps already taken)."""
        t = self.trainer
        r = t.recipe.train
        left = r.budget_seconds() - (time.perf_counter() - t._t_created)
        per_step *= 1 + BUDGET_MARGIN
        fixed = forward * (t.task.eval_batches(final=True) + r.sample_tokens / r.batch_size)
        steps = t.step
        for _ in range(3):  # the periodic evaluations depend on the count
            evals = max(0, steps // r.eval_every - t.step // r.eval_every) if r.eval_every else 0
            cost = fixed + evals * forward * t.task.eval_batches(final=False)
            steps = t.step + max(0, int((left - cost) / per_step))
        return min(steps, self.ceiling)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One training run: build everything from the recipe, check it, then :meth:`fit`.

    Everything that can be checked is checked before the run writes anything: the recipe, the kernels,
    the data and the model (building the task), wandb's presence and the checkpoint to resume from. A
    checkpoint holds the model, the optimizer, the loss scaler, the step, every RNG state and the recipe;
    the learning rate and the data sampler are pure functions of the step, so resuming restores them too.
    A task with state of its own (a weight EMA) provides ``state_dict()`` and ``load_state_dict()``.
    """

    def __init__(self, recipe: Recipe, stream=None):
        self._t_created = time.perf_counter()  # a time budget counts from here
        self.recipe = r = recipe
        self.dist = distributed.init("cuda" if r.run.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(r.run.device, self.dist.local_rank)
        if r.run.threads:
            torch.set_num_threads(r.run.threads)
        torch.manual_seed(r.run.seed)
        np.random.seed(r.run.seed)
        random.seed(r.run.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.log = RunLogger(stream=stream, enabled=self.dist.is_main, wandb_mode=r.logging.wandb)
        transfer.adopt_hf_config(r, log=self.log.print)  # a Hugging Face folder sets the model's architecture
        # What the run is, as written to recipe.toml and checkpoints: resuming does not change the run.
        self.resolved = copy.deepcopy(r)
        self.resolved.checkpoint.resume = ""

        self.run_dir, resume_from = self._locate_run()
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Under kernels.tune = "measure" on CUDA, auto ops start on torch until the tuner has measured them.
        self.ops = op_select.resolve(tune.starting_choices(r.kernels.backends(), r.kernels.tune, self.device),
                                    self.device, r.kernels.deterministic)
        self.log.print(f"device: {self.device} | world: {self.dist.world} | precision: {r.train.precision}")
        self.task: Task = build_task(r, self.ops, self.device, self.dist.rank, self.dist.world, log=self.log.print)
        transfer.apply(r, self.task, log=self.log.print, load=resume_from is None)  # before the optimizer
        # After transfer (the weights and frozen parameters the run trains), before the optimizer and wrapping.
        #: op -> the tuner's decision (empty where nothing was tuned), recorded in env.json and checkpoints.
        self.tuned = tune.tune_run(r, self.ops, self.task, self.device, self.dist.rank, self.dist.world,
                                   recorded=tune.recorded_choice(resume_from), log=self.log.print)
        self.log.print(f"kernels: {self.ops.describe(self.task.ops_used())}")
        self.model: nn.Module = distributed.wrap(self.task.model, r, self.device) if self.dist.world > 1 else self.task.model
        self.forward_model = torch.compile(self.model) if r.train.compile else self.model
        o = r.optim
        groups = self.task.param_groups(o.weight_decay, muon=o.name == "muon")
        sharing = None
        if o.name == "muon" and self.dist.world > 1:
            sharing = sharing_for_run(self.task.model, groups[0]["params"], r.parallel.strategy)
            self.log.print(sharing.describe(groups[0]["params"]))
        self.optimizer, self.clips_in_step = recipe_optimizer(self.ops, r, groups, self.device, muon_sharing=sharing)
        self.scaler = LossScaler(self.device, enabled=r.train.precision == "fp16")
        self.prefetcher = Prefetcher(self.task, r.train.grad_accum, self.device)
        self.step_fn = TrainStep(self.task, self.model, self.forward_model, self.optimizer, self.clips_in_step,
                                 self.scaler, r, self.device, batches=self.prefetcher.batches)
        self.items_per_step = self.task.items_per_micro_batch * r.train.grad_accum * self.dist.world
        self.step = 0
        self.bad_steps = 0
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}
        self._signal: int | None = None
        #: The step count a time budget fixed (None: not fixed yet, or no budget).
        self.budget_steps: int | None = None
        state = self._load(resume_from) if resume_from is not None else {}

        # Everything is checked: from here on the run writes.
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.toml").write_text(dump_toml(self.resolved))
            used = self.task.ops_used()
            env = environment(self.device, {op: b for op, b in self.ops.backends.items() if op in used},
                              world=self.dist.world, unit=self.task.unit,
                              **({"tuning": tune.record(self.tuned)} if self.tuned else {}))
            (self.run_dir / "env.json").write_text(json.dumps(env, indent=1))
        self.log.open(self.run_dir, state.get("step"), project=r.logging.wandb_project, name=r.run.name,
                      config=self.resolved.to_dict(), wandb_id=state.get("wandb_id"))
        self.log.print(f"run: {self.run_dir}")
        if state:
            _set_rng_state(state["rng"], self.device)  # last: nothing may draw from the RNGs before the loop
            self.log.print(f"resumed from {resume_from} at step {self.step}")

    def _locate_run(self) -> tuple[Path, Path | None]:
        """:func:`locate_run`, decided by the main process so that every rank agrees."""
        if self.dist.world == 1:
            return locate_run(self.recipe)
        box: list = [None]
        if self.dist.is_main:
            try:
                box[0] = locate_run(self.recipe)
            except (RecipeError, CheckpointError) as e:
                box[0] = e
        torch.distributed.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The replicated part of a checkpoint (the model and optimizer go in :meth:`sharded_state_dict`)."""
        state = {"step": self.step, "scaler": self.scaler.state_dict(), "rng": _rng_state(self.device),
                 "bad_steps": self.bad_steps, "recipe": self.resolved.to_dict(), "wandb_id": self.log.wandb_id,
                 "budget_steps": self.budget_steps}
        if self.tuned:  # a resumed run keeps the measured choice
            state["kernels_tuned"] = {op: d.choice for op, d in self.tuned.items()}
        if hasattr(self.task, "state_dict"):
            state["task"] = self.task.state_dict()
        return state

    def sharded_state_dict(self) -> dict:
        """Model and optimizer state keyed by parameter names, sharded as the run is (DTensors under FSDP).

        Saved through DCP, so a checkpoint loads at any world size, with DDP, FSDP or neither.
        """
        model_state, optim_state = get_state_dict(self.task.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save(self) -> Path | None:
        """Checkpoint the current step (every process takes part); refuses parameters that are not finite."""
        if not distributed.all_finite(self.task.model.parameters()):
            raise TrainingError(f"step {self.step}: the model's parameters are not finite; no checkpoint written; "
                                f"{self._last_good()}")
        path = checkpoint.save(self.ckpt_dir, self.step, self.state_dict(), keep=self.recipe.checkpoint.keep,
                               sharded=self.sharded_state_dict())
        self.last_checkpoint = path
        self.log.print(f"checkpoint: {path}")
        return path

    def _load(self, path: Path) -> dict:
        """Load and apply a checkpoint (all but the RNG states); returns it."""
        state = checkpoint.load(path, map_location=self.device)
        if state.get("budget_steps"):  # the count the time budget fixed: the resumed run keeps it
            self._fix_steps(state["budget_steps"])
        changes = _recipe_changes(state["recipe"], self.resolved.to_dict())
        model_changes = [c for c in changes if c.startswith("model.")]
        if model_changes:
            raise CheckpointError(f"checkpoint {path} holds a different model ({'; '.join(model_changes)}); "
                                  f"resume with the recipe it was saved with")
        if changes:
            self.log.print(f"warning: resuming with recipe changes: {'; '.join(changes)}")
        template = self.sharded_state_dict()
        checkpoint.load_sharded(path, template)
        try:
            set_state_dict(self.task.model, self.optimizer, model_state_dict=template["model"],
                           optim_state_dict=template["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run's model or optimizer: {e}") from None
        self.scaler.load_state_dict(state["scaler"])
        if "task" in state:
            self.task.load_state_dict(state["task"])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.last_checkpoint = path
        return state

    def _last_good(self) -> str:
        return f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint written yet"

    # ------------------------------------------------------------------------------------------------
    # One optimizer step
    # ------------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        """One optimizer step (see :class:`TrainStep`); its figures stay on the device."""
        return self.step_fn(step, lr_at(step, self.recipe))

    @contextlib.contextmanager
    def _oom_hint(self, where: str):
        """Turn a CUDA out-of-memory error into a message naming the batch, the context and what to change."""
        try:
            yield
        except torch.OutOfMemoryError:
            t = self.recipe.train
            batch = f"train.batch_size={t.batch_size}"
            if self.task.unit == "tok":
                batch += f" and train.seq_len={t.seq_len} (model.context={self.recipe.model.context})"
            raise TrainingError(
                f"CUDA out of memory {where} with {batch}: lower train.batch_size (raise train.grad_accum to "
                f"keep the global batch)" + (", shorten train.seq_len" if self.task.unit == "tok" else "")
                + ", or use train.precision='bf16'") from None

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self._signal is None:  # the loop saves a checkpoint and stops after the current step
            self._signal = signum
            return
        # A second signal: stop at once. The last complete checkpoint stays intact.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _signalled(self) -> int | None:
        """The signal to stop on; every rank agrees, so all save and stop at the same step."""
        if self.dist.world == 1:
            return self._signal
        flag = torch.tensor([self._signal or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def fit(self) -> dict:
        """Run the loop to ``train.steps``. A step that neither logs, evaluates nor checkpoints never waits on
        the device: its figures are read, and a bad step's ``train.on_nan`` policy applied, at the next such
        step (in a multi-process run, a signal is also agreed on there)."""
        r = self.recipe
        total = r.train.steps
        if self.step >= total:
            self.log.print(f"nothing to do: the run is at step {self.step} and train.steps = {total}")
            return {"steps": self.step, "run_dir": str(self.run_dir), "seconds": 0.0, **self.last_eval}
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        t_start = t_last = time.perf_counter()
        steps_since, first_step = 0, self.step
        pending: list[StepResult] = []
        budget = _BudgetClock(self) if r.train.time_budget and self.budget_steps is None else None
        try:
            while self.step < r.train.steps:
                if self.dist.world == 1 or self.step % r.train.log_every == 0:
                    signum = self._signalled()
                    if signum is not None:
                        self.log.print(f"{signal.Signals(signum).name} received: saving a checkpoint at step {self.step}")
                        self._drain(pending)
                        raise Interrupted(signum, self.save())
                step = self.step
                with self._oom_hint(f"at step {step + 1}"):
                    out = self.train_step(step)
                self.step = step + 1
                steps_since += 1
                self.task.on_step_end(self.step)
                pending.append(out)
                if budget is not None:
                    budget.after_step()
                total = r.train.steps
                log_now = self.step % r.train.log_every == 0 or self.step == total
                eval_now = bool(r.train.eval_every) and self.step % r.train.eval_every == 0 and self.step != total
                save_now = bool(r.checkpoint.every) and self.step % r.checkpoint.every == 0 and self.step != total
                if not (log_now or eval_now or save_now):
                    continue
                self._drain(pending)
                pending = []
                if log_now:
                    self._log(out, t_last, steps_since, t_start, first_step)
                    t_last, steps_since = time.perf_counter(), 0
                    if budget is not None:
                        budget.after_log()
                paused = time.perf_counter()
                if eval_now:
                    self.evaluate()
                    if budget is not None:
                        _sync(self.device)
                        budget.after_eval(time.perf_counter() - paused)
                if save_now:
                    self.save()
                if eval_now or save_now:  # throughput counts training steps only
                    t_last, steps_since = time.perf_counter(), 0
                    if budget is not None:
                        budget.paused += t_last - paused
            self.evaluate(final=True)
            self.save()
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
        sample = self.task.finish(self.task.model) if self.dist.is_main else None
        if sample is not None:
            self.log.print("sample:\n" + sample)
        elapsed = time.perf_counter() - t_start
        self.log.print(f"done: {self.step} steps in {format_duration(elapsed)}"
                       + "".join(f" | {k} {v:.4f}" for k, v in self.last_eval.items()))
        return {"steps": self.step, "run_dir": str(self.run_dir), "seconds": elapsed, **self.last_eval}

    def evaluate(self, final: bool = False) -> dict[str, float]:
        with self._oom_hint(f"evaluating at step {self.step}"):
            metrics = self.task.evaluate(self.forward_model, final=final)
        self.last_eval = metrics
        record = {"kind": "eval", "step": self.step, "items": self.step * self.items_per_step, **metrics}
        self.log.record(record)
        self.log.eval_line(record)
        return metrics

    def _fix_steps(self, steps: int) -> None:
        """Set the run's step count (the time budget's choice): the schedule, the loop and the records follow it."""
        self.budget_steps = steps
        self.recipe.train.steps = self.resolved.train.steps = steps

    def _log(self, out: StepResult, t_last: float, steps: int, t_start: float, first_step: int) -> None:
        """The progress line and metrics record of a logging step (reads the step's loss: a host sync), timing
        the ``steps`` steps since ``t_last``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds_per_step = (time.perf_counter() - t_last) / steps
        total = self.recipe.train.steps
        record = {"kind": "train", "step": self.step, "loss": distributed.mean(out.loss).item(), "lr": out.lr,
                  "step_ms": 1e3 * seconds_per_step, "throughput": self.items_per_step / seconds_per_step,
                  "items": self.step * self.items_per_step}
        if out.grad_norm is not None:
            record["grad_norm"] = float(out.grad_norm)
        flops_item, peak = self.task.flops_per_item(), peak_flops(self.device)
        if flops_item and self.device.type == "cuda":
            record["tflops"] = flops_item * record["throughput"] / 1e12 / self.dist.world
            if peak:
                record["mfu"] = record["tflops"] * 1e12 / peak
        self.log.record(record)
        eta = (time.perf_counter() - t_start) / (self.step - first_step) * (total - self.step)
        self.log.progress(record, total, self.task.unit, eta)

    def _drain(self, pending: list[StepResult]) -> None:
        """Read the flags of the steps since the last read (one host sync) and apply ``train.on_nan``."""
        if not pending:
            return
        flags = torch.stack([torch.stack([out.bad, out.scaler_skip]) for out in pending]).tolist()
        for out, (bad, scaler_skip) in zip(pending, flags):
            if scaler_skip:
                self.log.print(f"step {out.step + 1}: fp16 gradients overflowed; update skipped, loss scale "
                               f"now {self.scaler.scale.item():g}")
            self._check_bad(out, bad)

    def _check_bad(self, out: StepResult, bad: bool) -> None:
        """Apply train.on_nan to a step whose loss or gradients were not finite (its update was not applied)."""
        if not bad:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        r = self.recipe.train
        step, loss = out.step + 1, out.loss.item()
        where = (f"step {step}: the loss is {loss}" if not math.isfinite(loss)
                 else f"step {step}: the gradients are not finite (loss {loss:.4f})")
        if r.on_nan == "stop" or self.bad_steps > r.max_bad_steps:
            reason = "train.on_nan = 'stop'" if r.on_nan == "stop" else \
                f"{self.bad_steps} bad steps in a row, more than train.max_bad_steps = {r.max_bad_steps}"
            raise TrainingError(f"{where}; stopping ({reason}); the update was not applied; {self._last_good()}")
        self.log.print(f"warning: {where}; update skipped ({self.bad_steps}/{r.max_bad_steps} in a row); "
                       f"{self._last_good()}")

    def close(self, exit_code: int = 0) -> None:
        self.log.close(exit_code)
        # All ranks stop together after a clean end or a signal: drain the process group first. Freeing DDP's
        # reducer while the group's worker thread still waits for the GIL to free a finished work item
        # deadlocks; a barrier releases the GIL until that thread is idle. After an error a peer may be gone,
        # so no collective is attempted then.
        clean = exit_code in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM)
        self.model = self.forward_model = None
        distributed.cleanup(drain=clean)


def train(recipe: Recipe, stream=None) -> dict:
    """Build a trainer for ``recipe``, run it to the end, and return its summary."""
    trainer = Trainer(recipe, stream=stream)
    exit_code = 1
    try:
        summary = trainer.fit()
        exit_code = 0
        return summary
    except Interrupted as e:
        exit_code = 128 + e.signum
        raise
    finally:
        trainer.close(exit_code)
