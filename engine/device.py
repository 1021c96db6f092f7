"""The device a run computes on: choosing it from a recipe's ``run.device``, and waiting for it."""
from __future__ import annotations

import torch

from .errors import RecipeError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``run.device`` names: ``auto`` is CUDA when present, else CPU; a bare ``cuda`` is this
    process's GPU (``local_rank``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"run.device = {name!r} but CUDA is not available on this machine")
        if name == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
