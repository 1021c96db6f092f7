"""Choosing the task a recipe trains."""
from __future__ import annotations

import torch

from ..config import SSL_TASKS, Recipe, RecipeError
from ..ops.select import Ops
from . import lm, vision  # noqa: F401  (each registers its architectures on import)
from .base import BUILDERS, Task


def build_task(recipe: Recipe, ops: Ops, device: torch.device, rank: int = 0, world: int = 1, log=print) -> Task:
    if recipe.train.task == "forecast":
        from .forecast import ForecastTask

        return ForecastTask(recipe, ops, device, rank, world, log)
    if recipe.train.task in SSL_TASKS:
        from . import ssl

        return ssl.build(recipe, ops, device, rank, world, log)
    if recipe.model.arch not in BUILDERS:
        raise RecipeError(f"model.arch: unknown architecture {recipe.model.arch!r}; valid: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[recipe.model.arch](recipe, ops, device, rank, world, log)
