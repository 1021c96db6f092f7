"""One optimizer step, decided on the device: :class:`TrainStep` runs it and leaves a :class:`StepResult`;
:func:`masked_step` applies an update only where a device flag says so."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .. import distributed
from ..config import Recipe
from ..precision import LossScaler, autocast
from ..tasks import Task


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
        settings = self.recipe.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device)
        for micro, (inputs, targets) in enumerate(self.batches(step)):
            # Only the last micro-batch reduces gradients across processes.
            with distributed.no_sync(self.model, skip=micro < settings.grad_accum - 1):
                with autocast(settings.precision, self.device):
                    loss = self.task.loss(self.forward_model, inputs, targets)
                self.scaler.scale_loss(loss / settings.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / settings.grad_accum
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
            if settings.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, settings.grad_clip)
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
        scaler_skip = loss_ok & overflow if settings.precision == "fp16" else torch.zeros_like(overflow)
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
            changed += [_local(t) for t in tensors if torch.is_tensor(t) and t.device == apply.device]
            if not state:
                fresh.append(p)
    apply = _local(apply)
    with torch.no_grad():
        before = _copies(changed)
        optimizer.step()
        for t, old in zip(changed, before):
            torch.where(apply, t, old, out=t)  # in place: no temporary, no second pass
        for p in fresh:
            for t in optimizer.state[p].values():
                if torch.is_tensor(t) and t.device == apply.device:
                    shard = _local(t)
                    torch.where(apply, shard, shard.new_zeros(()), out=shard)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2's) shard on this process, sharing its storage, else ``t``: the copies and restores
    work shard by shard, with no collective, and a shard smaller than the mesh (a 2-element gain on 4
    ranks, empty on some) needs no sharding rule."""
    return t.to_local() if hasattr(t, "to_local") else t


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

