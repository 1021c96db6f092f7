"""Building the optimizer ``optim.name`` names, on the backend the op table's ``optimizer`` op resolved to: the
one function the trainer and ``tritonforge bench`` call."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..errors import KernelSelectionError
from ..ops import table
from .lion import TorchLion
from .muon import TorchMuon

#: Optimizers by ``optim.name``: the torch class and the name of the Triton one in ``kernels``.
OPTIMIZERS: dict[str, tuple[Callable, str]] = {
    "adamw": (torch.optim.AdamW, table.OPTIMIZER_KERNELS["adamw"]),
    "sgd": (torch.optim.SGD, table.OPTIMIZER_KERNELS["sgd"]),
    "lion": (TorchLion, table.OPTIMIZER_KERNELS["lion"]),
    "muon": (TorchMuon, table.OPTIMIZER_KERNELS["muon"]),
}


def build_optimizer(ops, name: str, param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], *,
                    lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                    momentum: float = 0.0, nesterov: bool = False, max_grad_norm: float = 0.0,
                    muon_momentum: float = 0.95, ns_steps: int = 5, device: torch.device | None = None,
                    muon_sharing=None):
    """Build the optimizer ``optim.name`` names on ``ops``'s optimizer backend (an
    :class:`engine.ops.select.Ops`); returns ``(optimizer, clips_in_step)``.

    ``ns_steps``: Muon's Newton-Schulz iterations per step. ``muon_sharing`` (an
    ``engine.optim.sharing.MuonSharing``): Muon's iterations shared out over the ranks of a DDP or FSDP2 run.

    ``clips_in_step`` is True when the optimizer applies ``max_grad_norm`` inside its own step (the
    Triton optimizers fuse it); otherwise the trainer clips with ``clip_grad_norm_`` first.
    """
    if name not in OPTIMIZERS:
        raise KernelSelectionError(f"optim.name: unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    torch_cls, triton_name = OPTIMIZERS[name]
    kw = {"adamw": dict(betas=betas, eps=eps), "sgd": dict(momentum=momentum, nesterov=nesterov),
          "lion": dict(betas=betas),
          "muon": dict(momentum=muon_momentum, nesterov=nesterov, adamw_betas=betas, adamw_eps=eps,
                       ns_steps=ns_steps, orthogonalizer=muon_sharing)}[name]
    if ops.backends["optimizer"] == "triton":
        cls = getattr(table.kernels_module(), triton_name)
        return cls(param_groups, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, **kw), True
    # torch's fused ones: one pass over all the tensors instead of about ten launches per parameter, and a
    # skip on the device (``found_inf``) instead of the trainer's masked step. On CPU only AdamW: fused SGD
    # leaves a momentum buffer it creates in a skipped step uninitialised.
    if torch_cls is torch.optim.AdamW and device is not None:
        kw["fused"] = True
    elif torch_cls is torch.optim.SGD:
        kw["fused"] = (device is not None and device.type == "cuda") or None
    return torch_cls(param_groups, lr=lr, weight_decay=weight_decay, **kw), False


def recipe_optimizer(ops, recipe, groups: list[dict[str, Any]], device: torch.device | None, muon_sharing=None):
    """:func:`build_optimizer` with the recipe's ``[optim]`` settings and ``train.grad_clip``, over ``groups``
    (a task's ``param_groups``); returns ``(optimizer, clips_in_step)``."""
    o = recipe.optim
    return build_optimizer(ops, o.name, groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                           momentum=o.momentum, nesterov=o.nesterov, muon_momentum=o.muon_momentum, ns_steps=o.ns_steps,
                           max_grad_norm=recipe.train.grad_clip, device=device, muon_sharing=muon_sharing)
