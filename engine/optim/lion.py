"""Lion in plain PyTorch: the reference the Triton Lion is checked against, and the torch backend of
``optim.name = "lion"``."""
from __future__ import annotations

import torch

class TorchLion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023) in plain PyTorch; the reference for the Triton Lion.

    update = sign(β1·m + (1-β1)·g);  p ← p·(1 - lr·wd) - lr·update;  m ← β2·m + (1-β2)·g
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                update = (m * beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss
