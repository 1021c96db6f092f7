"""The learning-rate schedule: the rate of each optimizer step, a pure function of the step and the recipe
(so a resumed run follows the same schedule without saving it)."""
from __future__ import annotations

import math

from ..config import Recipe


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

