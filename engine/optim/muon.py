"""Muon for hidden matrices and AdamW for the rest, as one optimizer in plain PyTorch.

:class:`TorchMuon` is the ``torch`` backend of ``optim.name = "muon"`` and the reference the Triton
``kernels.Muon`` is tested against (it runs in float64 when the parameters are float64). Each param
group carries ``use_muon``: True groups hold 2-D matrices and follow ``torch.optim.Muon``, False
groups follow ``torch.optim.AdamW``; the state keys are theirs (``momentum_buffer``; ``step``,
``exp_avg``, ``exp_avg_sq``), as are the group keys.

Muon step for a matrix W (m x n) with gradient G, momentum mu, Newton-Schulz coefficients (a, b, c):

    B = lerp(B, G, 1 - mu);  U = lerp(G, B, mu) (Nesterov) or B
    X = U / max(||U||_F, eps);  k times: A = X X^T;  X = a X + (b A + c A^2) X   (X^T X for tall W)
    W = W (1 - lr wd) - lr * s * X,   s = 0.2 sqrt(max(m, n))  ("match_rms_adamw", the default)

``adjust_lr_fn = "match_rms_adamw"`` scales Muon's update to AdamW's typical RMS (Moonshot's rule),
so one learning rate and one schedule serve both kinds of group; ``"original"`` (s = sqrt(max(1,
m/n)), Keller Jordan's) is what ``torch.optim.Muon`` does by default and needs a larger lr for the
matrices. The iterations run in bf16 on CUDA (as torch's do) and in fp32 elsewhere; float64
parameters iterate in float64 on any device (the reference). Tensors of other ranks (conv kernels included) are refused in Muon groups:
put them in a ``use_muon=False`` group.

A step takes the momentum of every matrix first, then orthogonalizes them all, then applies them: under
DDP or FSDP2 an ``orthogonalizer`` (``engine.optim.sharing.MuonSharing``) shares the middle part out over the
ranks, and every part of the step works on what this rank holds (an FSDP2 shard's local rows).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def muon_lr_scale(shape: torch.Size, adjust_lr_fn: Optional[str]) -> float:
    """The factor Muon's update is multiplied by on top of ``lr`` for a matrix of ``shape``."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def newton_schulz(update: Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> Tensor:
    """``steps`` quintic Newton-Schulz iterations toward the orthogonal factor of ``update``."""
    a, b, c = coefficients
    if update.dtype == torch.float64:
        dtype = torch.float64
    else:
        dtype = torch.bfloat16 if update.is_cuda else torch.float32
    x = update.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.mT
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def newton_schulz_stack_(stack: Tensor, coefficients: tuple[float, float, float], steps: int,
                         eps: float) -> None:
    """:func:`newton_schulz` on each matrix of ``stack`` ([L, m, n]), in place (a shared step's owner)."""
    for x in stack:
        x.copy_(newton_schulz(x, coefficients, steps, eps))


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself: the step works on what this rank holds."""
    return t.to_local() if isinstance(t, DTensor) else t


def _check_group(group: dict[str, Any], name: str, shared: bool = False) -> None:
    """Refuse a group Muon cannot run. ``kernels.Muon`` checks its groups alike in its own package: the
    kernels never import the engine, and this optimizer must run where triton (so the kernels) is absent."""
    if not 0.0 <= group["lr"]:
        raise ValueError(f"{name}: invalid lr {group['lr']}; expected lr >= 0")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"{name}: invalid weight_decay {group['weight_decay']}; expected >= 0")
    if group["use_muon"]:
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"{name}: invalid momentum {group['momentum']}; expected 0 <= momentum < 1")
        if not (isinstance(group["ns_steps"], int) and 1 <= group["ns_steps"] < 100):
            raise ValueError(f"{name}: invalid ns_steps {group['ns_steps']!r}; expected an int in [1, 100)")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"{name}: ns_coefficients must be 3 numbers (a, b, c), got "
                             f"{group['ns_coefficients']!r}")
        if group["adjust_lr_fn"] is not None and group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"{name}: invalid adjust_lr_fn {group['adjust_lr_fn']!r}; expected one of "
                             f"{', '.join(ADJUST_LR_FNS)} or None")
        for p in group["params"]:
            if isinstance(p, DTensor) and not shared:
                raise ValueError(f"{name}: use_muon=True groups take DTensor (FSDP2-sharded) parameters "
                                 "only with an orthogonalizer that assembles whole matrices "
                                 "(engine.optim.sharing.MuonSharing)")
            if p.ndim != 2:
                raise ValueError(f"{name}: a use_muon=True group holds a parameter of shape "
                                 f"{tuple(p.shape)}; Muon takes 2-D matrices, put the others in a "
                                 "use_muon=False (AdamW) group")
    else:
        for i, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}: invalid betas[{i}] {beta}; expected 0 <= beta < 1")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"{name}: invalid eps {group['eps']}; expected eps >= 0")


def muon_group_defaults(group: dict[str, Any], defaults: dict[str, Any], adamw_betas, adamw_eps) -> None:
    """Fill ``group`` in place with its kind's defaults: Muon's, or AdamW's ``betas``/``eps``."""
    use_muon = group.get("use_muon", defaults["use_muon"])
    group["use_muon"] = bool(use_muon)
    if not use_muon:
        group.setdefault("betas", tuple(adamw_betas))
        group.setdefault("eps", adamw_eps)
        for key in ("momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn"):
            group.setdefault(key, None)


class TorchMuon(torch.optim.Optimizer):
    """Muon (use_muon=True groups) and AdamW (use_muon=False groups) in one optimizer.

    Arguments are ``torch.optim.Muon``'s (``eps`` is the Newton-Schulz normalization's) except the
    default ``adjust_lr_fn="match_rms_adamw"``; ``adamw_betas`` and ``adamw_eps`` are the defaults of
    the AdamW groups, whose own ``betas``/``eps`` keys override them. A group without ``use_muon``
    is a Muon group. ``weight_decay`` is decoupled in both (``p *= 1 - lr*wd``).

    ``orthogonalizer`` (``engine.optim.sharing.MuonSharing``) shares the iterations out over the ranks of a
    DDP or FSDP2 run; without it every matrix is orthogonalized here, whole (DTensors are refused).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: Optional[str] = "match_rms_adamw",
                 *, adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 orthogonalizer=None):
        self._adamw_defaults = (tuple(adamw_betas), adamw_eps)
        self.orthogonalizer = orthogonalizer
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, use_muon=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        muon_group_defaults(param_group, self.defaults, *self._adamw_defaults)
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], type(self).__name__, shared=self.orthogonalizer is not None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also loads a ``torch.optim.Muon`` or ``AdamW`` state dict: group keys it lacks keep ours."""
        own = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, own):
            for key, value in before.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon = []  # (parameter, group, U): orthogonalized together, then applied
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    muon.append((p, group, self._momentum(p, group)))
                else:
                    self._adamw_step(p, group)
        for (p, group, _), ortho in zip(muon, self._orthogonalize(muon)):
            lr, scale = group["lr"], muon_lr_scale(p.shape, group["adjust_lr_fn"])  # the whole matrix's shape
            w = _local(p)
            w.mul_(1 - lr * group["weight_decay"])
            w.add_(ortho.to(w.dtype), alpha=-lr * scale)
        return loss

    def _momentum(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """Update the momentum buffer; returns U, this rank's part of the matrix to orthogonalize."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, mu = _local(state["momentum_buffer"]), group["momentum"]
        grad = _local(p.grad).to(buf.dtype)
        buf.lerp_(grad, 1 - mu)
        return grad.lerp(buf, mu) if group["nesterov"] else buf.clone()

    def _orthogonalize(self, muon: list[tuple[Tensor, dict[str, Any], Tensor]]) -> list[Tensor]:
        """X for each U: here, or shared out by the orthogonalizer (in place)."""
        settings = [(group["ns_coefficients"], group["ns_steps"], group["eps"]) for _, group, _ in muon]
        if self.orthogonalizer is None:
            return [newton_schulz(u, *s) for (_, _, u), s in zip(muon, settings)]
        updates = [u for _, _, u in muon]
        self.orthogonalizer([p for p, _, _ in muon], updates, settings, newton_schulz_stack_)
        return updates

    def _adamw_step(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "step" not in state:  # on the parameter's device: no host sync, and a masked step restores it
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        lr, grad = group["lr"], _local(p.grad)
        exp_avg, exp_avg_sq, p = _local(state["exp_avg"]), _local(state["exp_avg_sq"]), _local(p)
        state["step"] += 1
        t = state["step"].to(p.dtype)
        p.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** t).sqrt()).add_(group["eps"])
        p.addcdiv_(exp_avg / (1 - beta1 ** t), denom, value=-lr)


#: The state keys ``torch.optim.Muon`` and ``torch.optim.AdamW`` keep per parameter.
TORCH_STATE_KEYS = {True: ("momentum_buffer",), False: ("step", "exp_avg", "exp_avg_sq")}


def torch_optimizer_states(optim_state: dict[str, Any], model) -> tuple[dict[str, Any], dict[str, Any]]:
    """The engine's Muon state as two state dicts: ``torch.optim.Muon``'s and ``torch.optim.AdamW``'s.

    ``optim_state`` is the optimizer part of a checkpoint, keyed by parameter names: ``checkpoint.consolidate
    (path)["optimizer"]`` (any world size, any backend) or ``get_state_dict(model, optimizer)[1]`` of a
    one-process run. ``model`` (a module, or a ``{name: tensor}`` state dict such as the checkpoint's
    ``"model"``) is checked against it: every state entry must name one of its parameters, with its shape,
    and a module's every parameter must be in a group (a state dict also holds buffers and tied names).

    Returns ``(muon, adamw)``: the ``use_muon=True`` groups and the others, in the engine's group order,
    each group with the torch optimizer's own hyperparameter keys (ours where it has them, its defaults
    otherwise) and ``param_names``, the order its parameters must be given in::

        params = dict(model.named_parameters())
        muon_sd, adamw_sd = torch_optimizer_states(state, model)
        muon = torch.optim.Muon([{"params": [params[n] for n in g["param_names"]]}
                                 for g in muon_sd["param_groups"]])
        muon.load_state_dict(muon_sd)   # likewise torch.optim.AdamW with adamw_sd

    Only the keys torch keeps are carried (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``): the
    Triton backend's fp32 ``master_param`` copies stay out (load the weights from the model state).
    Raises ``ValueError`` naming the parameter when the state is sharded (consolidate it first), keyed by
    position, missing a parameter or a state key, or does not fit ``model``.
    """
    shapes = _parameter_shapes(model)
    groups, state = optim_state.get("param_groups"), optim_state.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("optimizer state: expected a state dict with 'state' and 'param_groups'")
    seen = set()
    out = {True: {"state": {}, "param_groups": []}, False: {"state": {}, "param_groups": []}}
    defaults = {True: torch.optim.Muon([torch.zeros(1, 1)]).param_groups[0],
                False: torch.optim.AdamW([torch.zeros(1)]).param_groups[0]}
    for group in groups:
        use_muon = bool(group.get("use_muon", True))
        target = out[use_muon]
        ids = []
        for name in group["params"]:
            _check_entry(name, state, shapes, use_muon)
            seen.add(name)
            ids.append(len(target["state"]))
            target["state"][ids[-1]] = {k: state[name][k] for k in TORCH_STATE_KEYS[use_muon]}
        keys = {k: group.get(k, v) for k, v in defaults[use_muon].items() if k != "params"}
        if use_muon:
            keys["ns_coefficients"] = tuple(keys["ns_coefficients"])
        else:
            keys["betas"] = tuple(keys["betas"])
        target["param_groups"].append({**keys, "params": ids, "param_names": list(group["params"])})
    missing = [n for n in shapes if n not in seen] if isinstance(model, torch.nn.Module) else []
    if missing:
        raise ValueError(f"optimizer state: no param group holds {', '.join(missing)} of the model "
                         "(the state of another model?)")
    return out[True], out[False]


def _parameter_shapes(model) -> dict[str, torch.Size]:
    if isinstance(model, torch.nn.Module):
        return {n: p.shape for n, p in model.named_parameters()}
    return {n: t.shape for n, t in model.items()}


def _check_entry(name, state: dict, shapes: dict, use_muon: bool) -> None:
    """One parameter of the optimizer state: named, in the model with its shape, whole, with its keys."""
    kind = "Muon" if use_muon else "AdamW"
    if not isinstance(name, str):
        raise ValueError(f"optimizer state: parameter {name!r} is keyed by position; pass the state keyed by "
                         "parameter names (a checkpoint's, or get_state_dict(model, optimizer)[1])")
    if name not in shapes:
        raise ValueError(f"optimizer state: {name} is not a parameter of the model (the state of another "
                         "model?)")
    if name not in state:
        raise ValueError(f"optimizer state: {name} ({kind}) has no state (was a step taken?)")
    absent = [k for k in TORCH_STATE_KEYS[use_muon] if k not in state[name]]
    if absent:
        raise ValueError(f"optimizer state: {name} ({kind}) lacks {', '.join(absent)}")
    for key in TORCH_STATE_KEYS[use_muon]:
        value = state[name][key]
        if isinstance(value, DTensor):
            raise ValueError(f"optimizer state: {name}.{key} is sharded (a DTensor); consolidate the checkpoint "
                             "first (checkpoint.consolidate)")
        if key != "step" and value.shape != shapes[name]:
            raise ValueError(f"optimizer state: {name}.{key} has shape {tuple(value.shape)}, the model's "
                             f"parameter {tuple(shapes[name])} (the state of another model?)")
