"""The optimizer harness shared by ``bench ops`` and ``kernels check``: the step each backend takes over a
parameter set, and float64 references for its update and state."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..ops import select as op_select, table as op_table
from ..optim import lion
from ..optim.build import build_optimizer
from .catalogue import ADAMW, MAX_GRAD_NORM, PROJECT_BACKENDS, NotAvailable


# ---------------------------------------------------------------------------------------------------
# The optimizer: AdamW steps over a GPT-2 parameter set
# ---------------------------------------------------------------------------------------------------

def optimizer_step(backend: str, params: list[torch.Tensor], clip: bool, device: torch.device) -> Callable[[], None]:
    """One training step's optimizer work: (clipping, then) the update."""
    max_norm = MAX_GRAD_NORM if clip else 0.0
    clips_in_step = False
    if backend in PROJECT_BACKENDS:
        try:
            ops = op_select.resolve({"optimizer": backend}, device)
        except op_table.KernelSelectionError as e:
            raise NotAvailable(str(e)) from None
        opt, clips_in_step = build_optimizer(ops, "adamw", params, **ADAMW, max_grad_norm=max_norm, device=device)
    elif backend.endswith("-muon"):
        try:
            ops = op_select.resolve({"optimizer": backend.removesuffix("-muon")}, device)
        except op_table.KernelSelectionError as e:
            raise NotAvailable(str(e)) from None
        opt, clips_in_step = build_optimizer(ops, "muon", muon_groups(params), **ADAMW, nesterov=True,
                                                max_grad_norm=max_norm, device=device)
    else:
        impl = {"torch-fused": dict(fused=True), "torch-foreach": dict(foreach=True)}[backend]
        opt = torch.optim.AdamW(params, **ADAMW, **impl)
    if clip and not clips_in_step:
        def step():
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
        return step
    return opt.step


def muon_groups(params: list[torch.Tensor]) -> list[dict]:
    """The blocks' matrices (every 2-D tensor after the two embeddings) for Muon, the rest for AdamW."""
    hidden = [p for p in params[2:] if p.dim() == 2]
    rest = params[:2] + [p for p in params[2:] if p.dim() != 2]
    return [dict(params=hidden, use_muon=True), dict(params=rest, use_muon=False)]


def muon_reference_deltas(p0: list[torch.Tensor], grads: list[list[torch.Tensor]], clip: bool) -> list[torch.Tensor]:
    """Parameter change after len(grads) Muon/AdamW steps of the registry's torch Muon in float64 (which
    iterates in float64), on the parameters' device."""
    params = [p.double().requires_grad_() for p in p0]
    opt, _ = build_optimizer(op_select.resolve({"optimizer": "torch"}, "cpu"), "muon", muon_groups(params), **ADAMW, nesterov=True)
    for step_grads in grads:
        set_grads(params, [g.double() for g in step_grads])
        if clip:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
    return [(p.detach() - start.double()).float() for p, start in zip(params, p0)]


def adamw_reference_deltas(p0: list[torch.Tensor], grads: list[list[torch.Tensor]], clip: bool) -> list[torch.Tensor]:
    """Parameter change after len(grads) AdamW steps (torch's semantics), computed in float64 tensor by tensor."""
    lr, (b1, b2), eps, wd = ADAMW["lr"], ADAMW["betas"], ADAMW["eps"], ADAMW["weight_decay"]
    coefs = []
    for step_grads in grads:
        coef = 1.0
        if clip:
            norm = math.sqrt(sum(float(g.double().square().sum()) for g in step_grads))
            coef = min(1.0, MAX_GRAD_NORM / (norm + 1e-6))
        coefs.append(coef)
    deltas = []
    for i, start in enumerate(p0):
        p = start.double()
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        for t, (step_grads, coef) in enumerate(zip(grads, coefs), start=1):
            g = step_grads[i].double() * coef
            p = p * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - (lr / (1 - b1 ** t)) * m / (v.sqrt() / math.sqrt(1 - b2 ** t) + eps)
        deltas.append((p - start.double()).float())
    return deltas


def delta_error(params: list[torch.Tensor], p0: list[torch.Tensor], deltas: list[torch.Tensor]) -> float:
    num = den = 0.0
    for p, start, ref in zip(params, p0, deltas):
        diff = (p.detach().double() - start.double()) - ref.double()
        num += float(diff.square().sum())
        den += float(ref.double().square().sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
OPTIMIZER_STEPS = 3
#: The optimizers of the ``optimizer`` op, with the settings they are checked at, and their state tensors.
OPTIMIZERS = {
    "adamw": (dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), ("exp_avg", "exp_avg_sq")),
    "sgd": (dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1), ("momentum_buffer",)),
    "lion": (dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1), ("exp_avg",)),
    # Muon for the blocks' matrices (momentum buffer), AdamW for the rest (moments): see muon_groups
    "muon": (dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, nesterov=True),
             ("momentum_buffer", "exp_avg", "exp_avg_sq")),
}
INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------------
# The optimizer: a few steps over a parameter set, parameters and state against float64 torch
# ---------------------------------------------------------------------------------------------------

def seeded_grad(step: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """The gradient of tensor ``index`` at ``step``: random, regenerated on demand rather than stored."""
    gen = torch.Generator(device=like.device).manual_seed(7919 * step + index)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def clip_coefs(p0: list[torch.Tensor], clip: bool) -> list[float]:
    """``clip_grad_norm_``'s factor per step, from the float64 global norm of that step's gradients."""
    coefs = []
    for step in range(OPTIMIZER_STEPS):
        if not clip:
            coefs.append(1.0)
            continue
        norm = math.sqrt(sum(float(seeded_grad(step, i, p).double().square().sum()) for i, p in enumerate(p0)))
        coefs.append(min(1.0, MAX_GRAD_NORM / (norm + 1e-6)))
    return coefs


def is_muon_matrix(index: int, param: torch.Tensor) -> bool:
    """As ``bench ops`` splits a GPT-2 parameter set: the 2-D tensors after the two embeddings."""
    return index >= 2 and param.dim() == 2


def reference_optimizer(name: str, param: torch.Tensor, index: int = 0):
    settings, _ = OPTIMIZERS[name]
    if name == "muon":  # the registry's torch Muon, which iterates in float64 for float64 parameters
        return build_optimizer(op_select.resolve({"optimizer": "torch"}, "cpu"), "muon", [dict(params=[param], use_muon=is_muon_matrix(index, param))], **settings)[0]
    if name == "adamw":
        return torch.optim.AdamW([param], **settings, foreach=False)
    if name == "sgd":
        return torch.optim.SGD([param], **settings, foreach=False)
    return lion.TorchLion([param], **settings)


def optimizer_errors(name: str, params: list[torch.Tensor], state: dict, p0: list[torch.Tensor],
                      coefs: list[float]) -> dict[str, float]:
    """Relative errors of the update ``p − p0`` and of each state tensor, over all tensors together,
    against torch's optimizer in float64 run tensor by tensor (so the reference never holds a second copy
    of the whole set)."""
    keys = OPTIMIZERS[name][1]
    sums = {k: [0.0, 0.0] for k in ("update",) + keys}

    def add(key: str, got: torch.Tensor | None, ref: torch.Tensor) -> None:
        if got is None:
            sums[key][0] = math.inf
            return
        sums[key][0] += float((got.double() - ref).square().sum())
        sums[key][1] += float(ref.square().sum())

    for i, (p, start) in enumerate(zip(params, p0)):
        ref = start.detach().double().clone().requires_grad_()
        opt = reference_optimizer(name, ref, i)
        for step, coef in enumerate(coefs):
            ref.grad = seeded_grad(step, i, start).double() * coef
            opt.step()
        add("update", p.detach() - start, (ref.detach() - start.double()))
        for key in keys:
            if key in opt.state[ref]:  # Muon: a matrix has a momentum buffer, the rest AdamW's moments
                add(key, state.get(p, {}).get(key), opt.state[ref][key])
    return {k: math.sqrt(num / den) if den > 0 else math.sqrt(num) for k, (num, den) in sums.items()}
