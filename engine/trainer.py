"""The training loop.

:class:`Trainer` assembles the pieces a recipe names (device, kernels, task with its model and data,
optimizer, precision, logging, checkpoints) and :meth:`Trainer.fit` runs the loop. One optimizer step is
:meth:`Trainer.train_step`: forward and backward over the micro-batches, then clipping, the update and
the loss-scale update, with one host synchronisation to read the loss and the overflow flag.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine import checkpoint, distributed, registry
from engine.config import Recipe, RecipeError, dump_toml
from engine.metrics import RunLogger, environment, format_duration, peak_flops
from engine.precision import LossScaler, autocast
from engine.tasks import Task, build_task


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
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine, constant or linear decay."""
    o, total = recipe.optim, recipe.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "onecycle":  # warmup, then a straight line down to min_lr at the last step
        progress = (step - o.warmup_steps) / max(1, total - 1 - o.warmup_steps)
        return o.lr + min(1.0, progress) * (o.min_lr - o.lr)
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


def _run_dir(recipe: Recipe, dist_info: distributed.DistInfo) -> Path:
    if recipe.run.dir:
        return Path(recipe.run.dir)
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if dist_info.world > 1:  # every rank must agree on the folder
        torch.distributed.broadcast_object_list(stamp, src=0)
    return Path("runs") / f"{recipe.run.name}-{stamp[0]}"


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    def __init__(self, recipe: Recipe, stream=None):
        self.recipe = recipe
        r = recipe
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

        resume = r.checkpoint.resume
        if resume == "latest" and not r.run.dir:
            raise RecipeError("checkpoint.resume = 'latest' needs run.dir: the run directory to resume")
        if resume and resume != "latest" and not Path(resume).exists():
            raise RecipeError(f"checkpoint.resume: no such checkpoint or run directory: {resume}")
        self.run_dir = _run_dir(r, self.dist)
        self.ckpt_dir = self.run_dir / "checkpoints"

        self.log = RunLogger(self.run_dir, enabled=self.dist.is_main, wandb_mode=r.logging.wandb,
                             wandb_project=r.logging.wandb_project, run_name=r.run.name, config=r.to_dict(),
                             stream=stream)
        self.ops = registry.resolve(vars(r.kernels), self.device)
        self.log.print(f"run: {self.run_dir} | device: {self.device} | world: {self.dist.world} | "
                       f"precision: {r.train.precision}")
        self.log.print(f"kernels: {self.ops.describe()}")
        if self.dist.is_main:
            (self.run_dir / "recipe.toml").write_text(dump_toml(r))
            (self.run_dir / "env.json").write_text(json.dumps(environment(self.device, self.ops.backends), indent=1))

        self.task: Task = build_task(r, self.ops, self.device, self.dist.rank, self.dist.world, log=self.log.print)
        self.model: nn.Module = distributed.wrap(self.task.model, r, self.device) if self.dist.world > 1 else self.task.model
        self.forward_model = torch.compile(self.model) if r.train.compile else self.model
        o = r.optim
        self.optimizer, self.clips_in_step = self.ops.make_optimizer(
            o.name, self.task.param_groups(o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
            weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov,
            max_grad_norm=r.train.grad_clip, device=self.device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = LossScaler(self.device, enabled=r.train.precision == "fp16")
        self.step = 0
        self.bad_steps = 0
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}
        self._signal: int | None = None
        if resume:
            self.load(self.run_dir if resume == "latest" else Path(resume))

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": _rng_state(self.device), "bad_steps": self.bad_steps,
                "recipe": self.recipe.to_dict()}

    def save(self) -> Path | None:
        path = None
        if self.dist.is_main:
            path = checkpoint.save(self.ckpt_dir, self.step, self.state_dict(), keep=self.recipe.checkpoint.keep)
            self.last_checkpoint = path
        return path

    def load(self, path: Path) -> None:
        if path.is_dir():
            ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            found = checkpoint.latest(ckpt_dir)
            if found is None:
                raise checkpoint.CheckpointError(f"no complete checkpoint to resume in {ckpt_dir}")
            path = found
        state = checkpoint.load(path, map_location=self.device)
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.device)
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.last_checkpoint = path
        self.log.print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------------
    # One optimizer step
    # ------------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        """Forward/backward over the micro-batches and one update. Returns host-side figures."""
        r = self.recipe
        accum = r.train.grad_accum
        lr = lr_at(step, r)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            inputs, targets = self.task.batch(step, micro)
            # Under DDP, only the last micro-batch all-reduces gradients.
            no_sync = getattr(self.model, "no_sync", None)
            sync = contextlib.nullcontext() if micro == accum - 1 or no_sync is None else no_sync()
            with sync:
                with autocast(r.train.precision, self.device):
                    loss = self.task.loss(self.forward_model, inputs, targets)
                self.scaler.scale_loss(loss / accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / accum

        grad_norm = None
        if self.clips_in_step:
            # The fused optimizer unscales, clips, detects inf/NaN and skips on the device.
            self.optimizer.grad_scale = self.scaler.scale
            self.optimizer.step()
            found_inf, grad_norm = self.optimizer.found_inf, self.optimizer.grad_norm
            loss_ok, overflow = torch.stack([torch.isfinite(loss_mean).float(), found_inf.float()]).tolist()
        else:
            found_inf = self.scaler.unscale_(self.params)
            if r.train.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, r.train.grad_clip)
                found_inf = torch.maximum(found_inf, (~torch.isfinite(grad_norm)).float())
            loss_ok, overflow = torch.stack([torch.isfinite(loss_mean).float(), found_inf]).tolist()
            if loss_ok and not overflow:
                self.optimizer.step()
        self.scaler.update(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = distributed.mean(loss_mean).item() if self.dist.world > 1 else loss_mean.item()
        scaler_skip = r.train.precision == "fp16" and loss_ok and overflow
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "bad": not loss_ok or (overflow and not scaler_skip),
                "scaler_skip": bool(scaler_skip)}

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def fit(self) -> dict:
        r = self.recipe
        total = r.train.steps
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        items_per_step = self.task.items_per_micro_batch * r.train.grad_accum * self.dist.world
        flops_item, peak = self.task.flops_per_item(), peak_flops(self.device)
        t_start = t_last = time.perf_counter()
        steps_since, first_step = 0, self.step
        try:
            while self.step < total:
                if self._signal is not None:
                    raise Interrupted(self._signal, self.save())
                step = self.step
                try:
                    out = self.train_step(step)
                except torch.OutOfMemoryError:
                    raise TrainingError(
                        f"CUDA out of memory at step {step} with train.batch_size={r.train.batch_size} and "
                        f"train.seq_len={r.train.seq_len}: lower train.batch_size (raise train.grad_accum to keep "
                        f"the global batch), or use train.precision='bf16'") from None
                self.step = step + 1
                steps_since += 1
                self.task.on_step_end(self.step)
                self._check_bad(out, step)
                if out["scaler_skip"]:
                    self.log.print(f"step {self.step}: fp16 gradients overflowed; update skipped, loss scale "
                                   f"now {self.scaler.scale.item():g}")
                if self.step % r.train.log_every == 0 or self.step == total:
                    now = time.perf_counter()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = (now - t_last) / steps_since
                    record = {"kind": "train", "step": self.step, "loss": out["loss"], "lr": out["lr"],
                              "step_ms": 1e3 * dt, "throughput": items_per_step / dt,
                              "items": self.step * items_per_step}
                    if out["grad_norm"] is not None:
                        record["grad_norm"] = float(out["grad_norm"])
                    if flops_item and self.device.type == "cuda":
                        record["tflops"] = flops_item * record["throughput"] / 1e12 / self.dist.world
                        if peak:
                            record["mfu"] = record["tflops"] * 1e12 / peak
                    self.log.record(record)
                    elapsed = now - t_start
                    eta = elapsed / (self.step - first_step) * (total - self.step)
                    self.log.progress(record, total, self.task.unit, eta)
                    t_last, steps_since = time.perf_counter(), 0
                if r.train.eval_every and (self.step % r.train.eval_every == 0) and self.step != total:
                    self.evaluate()
                if r.checkpoint.every and self.step % r.checkpoint.every == 0 and self.step != total:
                    self.save()
            self.evaluate()
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

    def evaluate(self) -> dict[str, float]:
        metrics = self.task.evaluate(self.forward_model)
        self.last_eval = metrics
        self.log.record({"kind": "eval", "step": self.step, **metrics})
        self.log.print(f"eval @ step {self.step}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _check_bad(self, out: dict, step: int) -> None:
        """Apply train.on_nan to a step whose loss or gradients were not finite (the update was skipped)."""
        if not out["bad"]:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        r = self.recipe.train
        where = (f"the loss is {out['loss']} at step {step}" if not math.isfinite(out["loss"])
                 else f"the gradients are not finite at step {step} (loss {out['loss']:.4f})")
        last = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint written yet"
        if r.on_nan == "stop" or self.bad_steps > r.max_bad_steps:
            reason = "train.on_nan = 'stop'" if r.on_nan == "stop" else \
                f"{self.bad_steps} bad steps in a row (train.max_bad_steps = {r.max_bad_steps})"
            raise TrainingError(f"{where}; stopping ({reason}); the update was not applied; {last}")
        self.log.print(f"warning: {where}; update skipped ({self.bad_steps}/{r.max_bad_steps} in a row); {last}")

    def close(self) -> None:
        self.log.close()
        distributed.cleanup()


def train(recipe: Recipe, stream=None) -> dict:
    """Build a trainer for ``recipe``, run it to the end, and return its summary."""
    trainer = Trainer(recipe, stream=stream)
    try:
        return trainer.fit()
    finally:
        trainer.close()
