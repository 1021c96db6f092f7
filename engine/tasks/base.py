"""The interface every task implements (:class:`Task`) and the table of builders by ``model.arch``
(:func:`register`)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..config import RecipeError


class Task:
    """The interface the trainer relies on.

    Attributes set by subclasses: ``model`` (the nn.Module), ``unit`` ("tok", "img" or "win": what throughput
    counts), ``items_per_micro_batch`` (tokens, images or windows per micro-batch on one process).
    """

    model: nn.Module
    unit: str
    items_per_micro_batch: int

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of micro-batch ``micro`` of optimizer step ``step``, on the device."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """Validation metrics (averaged over processes), e.g. {"val_loss": ...}; ``final`` at the end of the
        run (a task may then evaluate more thoroughly)."""
        raise NotImplementedError

    def eval_batches(self, final: bool) -> int:
        """Batches one evaluation runs (the final one, or a periodic one): what a time budget reserves."""
        return self.recipe.train.eval_batches

    def flops_per_item(self) -> float | None:
        """Training FLOPs per token/image, for TFLOP/s and MFU; None if unknown."""
        return None

    def param_groups(self, weight_decay: float, muon: bool = False, embed_lr_scale: float = 1.0) -> list[dict]:
        """Decay matrices and conv kernels; leave 1-D parameters (norms, biases, LayerScale) undecayed.

        With ``muon``, the :meth:`muon_params` come first in a ``use_muon=True`` group and the other
        groups are marked ``use_muon=False`` (AdamW). With ``embed_lr_scale`` other than 1, the model's
        ``embedding_tables()`` form a decayed group of their own whose ``lr_scale`` multiplies the
        schedule's learning rate (the trainer reads it each step).
        """
        hidden = {id(p) for p in self.muon_params()} if muon else set()
        tables = getattr(self.model, "embedding_tables", None)
        apart = {id(p) for p in tables()} if tables is not None and embed_lr_scale != 1.0 else set()
        matrices, decay, no_decay, embeds = [], [], [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (matrices if id(p) in hidden else embeds if id(p) in apart else decay if p.dim() >= 2
                 else no_decay).append(p)
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
        if embeds:
            groups.append(dict(params=embeds, weight_decay=weight_decay, lr_scale=embed_lr_scale))
        if not muon:
            return groups
        for group in groups:
            group["use_muon"] = False
        return [dict(params=matrices, weight_decay=weight_decay, use_muon=True), *groups]

    def muon_params(self) -> list[nn.Parameter]:
        """The hidden 2-D weights that Muon updates (``optim.name = "muon"``): the model's
        ``hidden_matrices()``; AdamW takes the rest."""
        hidden = getattr(self.model, "hidden_matrices", None)
        if hidden is None:
            raise RecipeError(f'optim.name = "muon" needs a model that names its hidden matrices '
                              f'(model.arch = "gpt"); {type(self.model).__name__} does not')
        return hidden()

    def ops_used(self) -> tuple[str, ...]:
        """The registry ops this task's model and loss call (the run prints and records their backends):
        the model's ``ops_used`` and the optimizer."""
        return (*getattr(self.model, "ops_used", ()), "optimizer")

    def on_step_end(self, step: int) -> None:
        """Called after each optimizer step (``step`` steps done), e.g. to update a weight EMA."""

    def finish(self, model: nn.Module) -> str | None:
        """Something to show at the end of a run (a text sample); None for nothing."""
        return None


#: model.arch -> builder(recipe, ops, device, rank, world, log) -> Task
BUILDERS: dict[str, Callable[..., Task]] = {}


def register(arch: str):
    def deco(fn):
        BUILDERS[arch] = fn
        return fn
    return deco
