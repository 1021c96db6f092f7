"""The training loop.

:class:`Trainer` assembles the pieces a recipe names (device, kernels, task with its model and data,
optimizer, precision, logging, checkpoints) and :meth:`Trainer.fit` runs the loop. One optimizer step is
:meth:`Trainer.train_step`: forward and backward over the micro-batches, then clipping, the update and
the loss-scale update, with no host synchronisation: the step's figures stay on the device until a
logging, evaluation or checkpoint step reads them (see :class:`~.step.TrainStep`). Run directories and
resuming are :mod:`.resume`'s, a time budget's step count :mod:`.budget`'s.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import checkpoint, distributed, transfer
from ..checkpoint import CheckpointError
from ..config import Recipe, RecipeError, dump_toml, validate
from ..device import resolve_device, set_up_host, sync
from ..ops import select as op_select, tune
from ..optim.build import recipe_optimizer
from ..optim.sharing import sharing_for_run
from ..optim.schedule import lr_at
from ..precision import LossScaler
from ..runlog import RunLogger, environment, format_duration, peak_flops
from ..tasks import Task, build_task
from .budget import BudgetClock
from .prefetch import Prefetcher
from .resume import locate_run, recipe_changes, rng_state, set_rng_state
from .step import StepResult, TrainStep


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss past the allowed skips, out of memory, ...)."""


class Interrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, path: Path | None):
        self.signum, self.path = signum, path
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved to {path}")


class Trainer:
    """One training run: build everything from the recipe, check it, then :meth:`fit`.

    Everything that can be checked is checked before the run writes anything: the recipe, the kernels,
    the data and the model (building the task), wandb's presence and the checkpoint to resume from. A
    checkpoint holds the model, the optimizer, the loss scaler, the step, every RNG state and the recipe;
    the learning rate and the data sampler are pure functions of the step, so resuming restores them too.
    A task with state of its own (a weight EMA) provides ``state_dict()`` and ``load_state_dict()``.
    """

    def __init__(self, recipe: Recipe, stream=None, started: float | None = None):
        self._t_created = time.perf_counter() if started is None else started  # a time budget counts from here
        self.recipe = r = recipe  # replaced, never changed in place, where the run settles a field
        self.dist = distributed.init("cuda" if r.run.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(r.run.device, self.dist.local_rank)
        distributed.check_sync_bn(r, self.device, self.dist.world)
        self.memory_kept = set_up_host(self.device, r.run.threads, r.run.cpu_memory)
        torch.manual_seed(r.run.seed)
        np.random.seed(r.run.seed)
        random.seed(r.run.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.log = RunLogger(stream=stream, enabled=self.dist.is_main, wandb_mode=r.logging.wandb)
        # A Hugging Face folder sets the model's architecture.
        self.recipe = r = transfer.adopt_hf_config(r, log=self.log.print)
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
        self.model: nn.Module = (distributed.wrap(self.task.model, r, self.device, self.log.print) if self.dist.world > 1
                                 else self.task.model)
        self.forward_model = torch.compile(self.model) if r.train.compile else self.model
        o = r.optim
        groups = self.task.param_groups(o.weight_decay, muon=o.name == "muon", embed_lr_scale=o.embed_lr_scale)
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
                              world=self.dist.world, unit=self.task.unit, cpu_memory_kept=self.memory_kept,
                              **({"tuning": tune.record(self.tuned)} if self.tuned else {}))
            (self.run_dir / "env.json").write_text(json.dumps(env, indent=1))
        self.log.open(self.run_dir, state.get("step"), project=r.logging.wandb_project, name=r.run.name,
                      config=self.resolved.to_dict(), wandb_id=state.get("wandb_id"))
        self.log.print(f"run: {self.run_dir}")
        if state:
            set_rng_state(state["rng"], self.device)  # last: nothing may draw from the RNGs before the loop
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
        state = {"step": self.step, "scaler": self.scaler.state_dict(), "rng": rng_state(self.device),
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
        changes = recipe_changes(state["recipe"], self.resolved.to_dict())
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
            settings = self.recipe.train
            batch = f"train.batch_size={settings.batch_size}"
            if self.task.unit == "tok":
                batch += f" and train.seq_len={settings.seq_len} (model.context={self.recipe.model.context})"
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
        recipe = self.recipe
        total = recipe.train.steps
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
        budget = None
        if recipe.train.time_budget and self.budget_steps is None:
            budget = BudgetClock(recipe, self._t_created, self.task, self.forward_model, self.device,
                                 self.dist.world, on_change=self._budget_changed, log=self.log)
        try:
            while self.step < self.recipe.train.steps:  # the time budget may change the count
                if self.dist.world == 1 or self.step % recipe.train.log_every == 0:
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
                    budget.after_step(self.step)
                total = self.recipe.train.steps
                log_now = self.step % recipe.train.log_every == 0 or self.step == total
                eval_now = bool(recipe.train.eval_every) and self.step % recipe.train.eval_every == 0 and self.step != total
                save_now = bool(recipe.checkpoint.every) and self.step % recipe.checkpoint.every == 0 and self.step != total
                if not (log_now or eval_now or save_now):
                    continue
                self._drain(pending)
                pending = []
                if log_now:
                    counted = budget is None or budget.fixed
                    self._log(out, t_last, steps_since, t_start, first_step,
                              budget_left=None if counted else budget.seconds_left())
                    t_last, steps_since = time.perf_counter(), 0
                    if budget is not None:
                        budget.after_log(self.step)
                paused = time.perf_counter()
                if eval_now:
                    self.evaluate()
                    if budget is not None:
                        sync(self.device)
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
        sample = self.task.finish(self.task.model)  # every rank: a sharded model's forward is a collective
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
        """Set the run's step count (the time budget's choice): the schedule, the loop and the records follow it.

        The run's recipes are replaced by validated copies with the new count; the recipe the run was given
        is left as it is."""
        self.budget_steps = steps
        self.recipe, self.resolved = _with_steps(self.recipe, steps), _with_steps(self.resolved, steps)

    def _budget_changed(self, steps: int) -> None:
        """The time budget set the step count: the run follows it, and its recipe.toml records it."""
        self._fix_steps(steps)
        if self.dist.is_main:
            (self.run_dir / "recipe.toml").write_text(dump_toml(self.resolved))

    def _log(self, out: StepResult, t_last: float, steps: int, t_start: float, first_step: int,
             budget_left: float | None = None) -> None:
        """The progress line and metrics record of a logging step (reads the step's loss: a host sync), timing
        the ``steps`` steps since ``t_last``. ``budget_left``: the seconds left of a time budget that has not
        fixed the step count yet; the line then shows them instead of a step total and an ETA."""
        sync(self.device)
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
        if budget_left is not None:  # the count is not known yet: neither is the time to reach it
            self.log.progress(record, None, self.task.unit, None, budget_left_s=budget_left)
            return
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
        settings = self.recipe.train
        step, loss = out.step + 1, out.loss.item()
        where = (f"step {step}: the loss is {loss}" if not math.isfinite(loss)
                 else f"step {step}: the gradients are not finite (loss {loss:.4f})")
        if settings.on_nan == "stop" or self.bad_steps > settings.max_bad_steps:
            reason = "train.on_nan = 'stop'" if settings.on_nan == "stop" else \
                f"{self.bad_steps} bad steps in a row, more than train.max_bad_steps = {settings.max_bad_steps}"
            raise TrainingError(f"{where}; stopping ({reason}); the update was not applied; {self._last_good()}")
        self.log.print(f"warning: {where}; update skipped ({self.bad_steps}/{settings.max_bad_steps} in a row); "
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


def train(recipe: Recipe, stream=None, started: float | None = None) -> dict:
    """Build a trainer for ``recipe``, run it to the end, and return its summary; a time budget counts from
    ``started`` (a ``time.perf_counter()``: the command's start), else from now."""
    trainer = Trainer(recipe, stream=stream, started=started)
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


def _with_steps(recipe: Recipe, steps: int) -> Recipe:
    """A validated copy of ``recipe`` that runs ``steps`` steps."""
    settled = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=steps))
    validate(settled)
    return settled
