"""The kernel registry: one place decides which implementation serves each op.

Models and the trainer never import a kernel module. They ask :func:`resolve` for an :class:`Ops`
object and call its methods; the choice per op comes from the recipe's ``[kernels]`` table or the
command line (``--kernels.attention=torch``):

- ``torch``: PyTorch's own implementation (SDPA, ``F.layer_norm``, ``F.rms_norm``, ``F.linear`` +
  ``F.gelu`` for ``mlp``, ``F.conv2d`` with ``groups = C`` for ``dwconv``, ``F.cross_entropy``,
  ``torch.optim`` fused on CUDA). This is the reference every other backend is checked against.
- ``triton``: the project's fused kernels from the ``kernels`` package. Selecting it for an op that has
  no Triton kernel is an error, never a silent fallback.
- ``auto``: ``triton`` on CUDA where a kernel exists, ``torch`` otherwise (on CPU, for instance).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from engine.config import RecipeError

OPS = ("attention", "layer_norm", "rms_norm", "mlp", "dwconv", "cross_entropy", "optimizer")
BACKENDS = ("auto", "torch", "triton")

#: The public ``kernels`` names each op needs from the triton backend.
_TRITON_NAMES = {
    "attention": ("attention",),
    "layer_norm": ("layer_norm", "add_layer_norm"),
    "rms_norm": ("rms_norm", "add_rms_norm"),
    "mlp": ("gelu_linear_residual",),
    "dwconv": ("depthwise_conv2d",),
    "cross_entropy": ("cross_entropy", "linear_cross_entropy"),
    "optimizer": ("AdamW", "SGD", "Lion"),
}


class KernelSelectionError(RecipeError):
    """An op or backend name is unknown, or a backend cannot serve an op here."""


def check_backend_name(op: str, backend: str) -> None:
    if op not in OPS:
        raise KernelSelectionError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")
    if backend not in BACKENDS:
        raise KernelSelectionError(
            f"kernels.{op}: unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_kernels(op: str):
    """The ``kernels`` module if it provides every name ``op`` needs, else None."""
    try:
        kernels = importlib.import_module("kernels")
    except ImportError:  # triton missing on this platform
        return None
    if all(hasattr(kernels, name) for name in _TRITON_NAMES[op]):
        return kernels
    return None


def triton_available(op: str) -> bool:
    return _triton_kernels(op) is not None


def _choose(op: str, backend: str, device: torch.device) -> str:
    check_backend_name(op, backend)
    if backend == "torch":
        return "torch"
    has_kernel = triton_available(op)
    if backend == "auto":
        return "triton" if has_kernel and device.type == "cuda" else "torch"
    if not has_kernel:
        raise KernelSelectionError(
            f"kernels.{op} = 'triton': this build has no Triton kernel for {op!r} yet; "
            f"use 'torch' or 'auto'")
    if device.type != "cuda" and not _interpreting():
        raise KernelSelectionError(
            f"kernels.{op} = 'triton' needs a CUDA device (this run is on {device.type}); set "
            f"TRITON_INTERPRET=1 before starting to run the kernels through the Triton interpreter on CPU")
    return "triton"


# ---------------------------------------------------------------------------------------------------
# The torch reference implementations.
# ---------------------------------------------------------------------------------------------------

def _window_mask(s_q: int, s_k: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: causal and within the last ``window`` keys."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    return (j <= i) & (j > i - window)


def torch_attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None):
    mask = _window_mask(q.shape[-2], k.shape[-2], window, q.device) if window else None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])


def torch_layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5):
    residual = (residual + x).to(residual.dtype)  # the stream keeps its dtype, as in the fused kernel
    return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps), residual


def torch_rms_norm(x, weight=None, eps: float = 1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def torch_add_rms_norm(x, residual, weight=None, eps: float = 1e-6):
    residual = (residual + x).to(residual.dtype)
    return F.rms_norm(residual, (x.shape[-1],), weight, eps), residual


def torch_gelu_linear_residual(h, weight, bias=None, layer_scale=None, residual=None, row_scale=None):
    """``residual + row_scale * layer_scale * (gelu(h) @ weight.T + bias)``: the second half of an MLP block.

    ``h`` (..., K) is the first linear's output; ``weight`` (N, K); ``residual`` (..., N); ``row_scale`` a
    (rows,) factor per flattened row (stochastic depth's per-sample keep, spread over the sample's rows) or
    None. LayerScale multiplies in the branch's dtype (under autocast the branch stays bf16).
    """
    branch = F.linear(F.gelu(h), weight, bias)
    if layer_scale is not None:
        branch = branch * layer_scale.to(branch.dtype)
    if row_scale is not None:
        branch = (branch.reshape(-1, branch.shape[-1]) * row_scale.to(branch.dtype)[:, None]).view(branch.shape)
    return branch if residual is None else residual + branch


def torch_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale=None, residual=None, row_scale=None):
    """``residual + row_scale * layer_scale * fc2(gelu(fc1(x)))``: a whole MLP block (ConvNeXt's, from its
    LayerNorm's output on); ``fc*_weight``/``fc*_bias`` are ``nn.Linear``'s."""
    return torch_gelu_linear_residual(F.linear(x, fc1_weight, fc1_bias), fc2_weight, fc2_bias, layer_scale,
                                      residual, row_scale)


def torch_depthwise_conv2d(x, weight, bias=None, padding=0):
    """Depthwise 2D convolution (one ``(KH, KW)`` filter per channel, stride 1): ``F.conv2d`` with
    ``groups`` = the channels of ``x`` (N, C, H, W); ``weight`` is ``nn.Conv2d``'s (C, 1, KH, KW)."""
    return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])


def torch_cross_entropy(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0,
                        softcap: float = 0.0):
    """Mean cross-entropy over all positions, computed in fp32 whatever the logits' dtype; a nonzero
    ``softcap`` c takes the loss of ``c * tanh(logits / c)``."""
    logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def torch_linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, softcap: float = 0.0):
    """A classifier head and its loss, ``torch_cross_entropy(F.linear(x, weight, bias), targets)``: the
    (positions, classes) logits are materialized, and copied to fp32."""
    return torch_cross_entropy(F.linear(x, weight, bias), targets, ignore_index, label_smoothing, softcap)


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


# ---------------------------------------------------------------------------------------------------
# The resolved selection handed to models and the trainer.
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ops:
    """The implementations chosen for one model. Call its methods; never a kernel directly."""

    backends: dict[str, str]
    attention: Callable[..., torch.Tensor]
    layer_norm: Callable[..., torch.Tensor]
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    gelu_linear_residual: Callable[..., torch.Tensor]
    #: The whole MLP block, fc1 included (see :func:`torch_mlp`); ``gelu_linear_residual`` is its second half.
    mlp: Callable[..., torch.Tensor]
    depthwise_conv2d: Callable[..., torch.Tensor]
    #: ``(logits, targets, ignore_index=-100, label_smoothing=0.0, softcap=0.0)``: the mean loss (see
    #: :func:`torch_cross_entropy`).
    cross_entropy: Callable[..., torch.Tensor]
    #: ``(x, weight, targets, bias=None, ignore_index=-100, label_smoothing=0.0, softcap=0.0)``: the head's
    #: matmul and the mean loss; the Triton backend never holds more than a chunk of the logits.
    linear_cross_entropy: Callable[..., torch.Tensor]
    #: False: kernels may trade bitwise reproducibility for speed (see :func:`resolve`).
    deterministic: bool = True

    def describe(self) -> str:
        text = ", ".join(f"{op}={b}" for op, b in self.backends.items())
        return text if self.deterministic else text + " (deterministic=false: atomics allowed)"

    def make_optimizer(self, name: str, param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], *,
                       lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                       momentum: float = 0.0, nesterov: bool = False, max_grad_norm: float = 0.0,
                       device: torch.device | None = None):
        """Build the optimizer; returns ``(optimizer, clips_in_step)``.

        ``clips_in_step`` is True when the optimizer applies ``max_grad_norm`` inside its own step (the
        Triton optimizers fuse it); otherwise the trainer clips with ``clip_grad_norm_`` first.
        """
        on_cuda = device is not None and device.type == "cuda"
        if self.backends["optimizer"] == "triton":
            import kernels  # only reached when the triton backend was chosen
            clip = max_grad_norm or None
            if name == "adamw":
                opt = kernels.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                    max_grad_norm=clip)
            elif name == "sgd":
                opt = kernels.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov,
                                  weight_decay=weight_decay, max_grad_norm=clip)
            elif name == "lion":
                opt = kernels.Lion(param_groups, lr=lr, betas=betas, weight_decay=weight_decay,
                                   max_grad_norm=clip)
            else:
                raise KernelSelectionError(f"optim.name: unknown optimizer {name!r}")
            return opt, True
        if name == "adamw":
            opt = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                    fused=on_cuda or None)
        elif name == "sgd":
            opt = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov,
                                  weight_decay=weight_decay, fused=on_cuda or None)
        elif name == "lion":
            opt = TorchLion(param_groups, lr=lr, betas=betas, weight_decay=weight_decay)
        else:
            raise KernelSelectionError(f"optim.name: unknown optimizer {name!r}")
        return opt, False


def resolve(choices: dict[str, str] | None = None, device: torch.device | str = "cpu",
            deterministic: bool = True) -> Ops:
    """Pick a backend per op. ``choices`` maps op -> backend; missing ops are ``auto``.

    ``deterministic=False`` lets kernels trade bitwise run-to-run reproducibility for speed (the Triton
    attention backward then sums dQ with atomics); the torch backends are unaffected.
    """
    device = torch.device(device)
    choices = dict(choices or {})
    for op in choices:
        check_backend_name(op, choices[op])
    chosen = {op: _choose(op, choices.get(op, "auto"), device) for op in OPS}

    def pick(op: str, torch_fn: Callable, kernel_name: str) -> Callable:
        if chosen[op] == "triton":
            return getattr(_triton_kernels(op), kernel_name)
        return torch_fn

    def triton_attention(q, k, v, causal=True, window=None, scale=None):
        return _triton_kernels("attention").attention(q, k, v, causal=causal, scale=scale, window=window,
                                                      deterministic=deterministic)

    def triton_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale=None, residual=None,
                   row_scale=None):
        """:func:`torch_mlp` with fc1 as a bias-free matmul and the rest in the fused Triton op, which adds
        fc1's bias as it loads fc1's output and returns its gradient from the input-gradient GEMM (no
        separate column reduction over the 4C-wide gradient)."""
        return gelu_linear_residual(F.linear(x, fc1_weight), fc2_weight, fc2_bias, layer_scale, residual,
                                    row_scale, h_bias=fc1_bias)

    gelu_linear_residual = pick("mlp", torch_gelu_linear_residual, "gelu_linear_residual")

    triton_ce = chosen["cross_entropy"] == "triton"
    ce_kernels = _triton_kernels("cross_entropy") if triton_ce else None

    def triton_cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0, softcap=0.0):
        return ce_kernels.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                        softcap=softcap)

    def triton_linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, label_smoothing=0.0,
                                    softcap=0.0):
        """:func:`torch_linear_cross_entropy` a chunk of positions at a time, the gradients computed as the
        forward goes (``kernels.linear_cross_entropy``)."""
        return ce_kernels.linear_cross_entropy(x, weight, targets, bias, ignore_index=ignore_index,
                                               label_smoothing=label_smoothing, softcap=softcap)

    return Ops(
        backends=chosen,
        attention=triton_attention if chosen["attention"] == "triton" else torch_attention,
        layer_norm=pick("layer_norm", torch_layer_norm, "layer_norm"),
        add_layer_norm=pick("layer_norm", torch_add_layer_norm, "add_layer_norm"),
        rms_norm=pick("rms_norm", torch_rms_norm, "rms_norm"),
        add_rms_norm=pick("rms_norm", torch_add_rms_norm, "add_rms_norm"),
        gelu_linear_residual=gelu_linear_residual,
        mlp=triton_mlp if chosen["mlp"] == "triton" else torch_mlp,
        depthwise_conv2d=pick("dwconv", torch_depthwise_conv2d, "depthwise_conv2d"),
        cross_entropy=triton_cross_entropy if triton_ce else torch_cross_entropy,
        linear_cross_entropy=triton_linear_cross_entropy if triton_ce else torch_linear_cross_entropy,
        deterministic=deterministic,
    )
