"""Mixed precision: autocast contexts and a dynamic loss scaler for fp16 that never syncs the host.

``bf16`` runs the forward under ``torch.autocast`` with bfloat16 (same exponent range as fp32: no loss
scaling needed). ``fp16`` adds dynamic loss scaling: the loss is multiplied by a scale before backward,
gradients are divided by it before the update, and a step whose gradients overflowed is skipped while
the scale backs off; after ``growth_interval`` clean steps the scale grows again.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling with all state on the device.

    The scale, growth tracker and the last step's overflow flag are device tensors: checking and updating
    them queues kernels and never waits for the GPU. A fused optimizer reads :attr:`scale` itself and reports
    overflow through its ``found_inf``; for other optimizers :meth:`unscale_` does the check.
    """

    def __init__(self, device: torch.device, enabled: bool, init_scale: float = 2.0 ** 16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scale = torch.full((), init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params) -> torch.Tensor:
        """Divide gradients by the scale in place; return a device flag, 1.0 if any was inf/NaN."""
        from .distributed import local

        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled and grads:
            inv = self.scale.double().reciprocal().float().reshape(1)
            for device_grads in _by_device([local(g) for g in grads]).values():
                torch._amp_foreach_non_finite_check_and_unscale_(device_grads, found_inf.view(1), inv)
            if local(grads[0]) is not grads[0] and torch.distributed.is_initialized():
                # Sharded gradients (FSDP): an overflow in any shard skips the step everywhere.
                torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps (on the device)."""
        if self.enabled:
            torch._amp_update_scale_(self.scale.view(1), self._growth_tracker.view(1),
                                     found_inf.float().reshape(1), self.growth_factor, self.backoff_factor,
                                     self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self._growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self._growth_tracker.copy_(state["growth_tracker"])


def _by_device(tensors):
    out: dict[tuple, list] = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out
