"""The kernel registry: one table of ops, and the one place that decides which implementation serves each.

Models and the trainer never import a kernel module. They ask :func:`resolve` for an :class:`Ops` object and
call its functions; the backend per op comes from the recipe's ``[kernels]`` table or the command line
(``--kernels.attention=torch``):

- ``torch``: PyTorch's own implementation (the ``torch_*`` functions below). The reference every other
  backend is checked against.
- ``triton``: the project's fused kernels from the ``kernels`` package. Selecting it for an op whose kernel
  this build lacks, or on a CPU without ``TRITON_INTERPRET=1``, is an error, never a silent fallback.
- ``auto``: here, ``triton`` on CUDA and ``torch`` elsewhere (``kernels.tune = "trust"``). A training run
  with the default ``kernels.tune = "measure"`` replaces that guess on CUDA by a measurement on the card,
  at the run's own shapes (:mod:`engine.tune`): the fastest backend that is correct there, torch unless
  another is faster by more than the noise. If ``tritonforge kernels check`` fails for an op on your card,
  select ``torch`` for that op (``--kernels.OP=torch``) and report the check's table.

Each op is one :class:`Op` row of :data:`TABLE`: its recipe name, the :class:`Ops` functions it provides
with their torch reference and Triton entry point. The recipe's ``[kernels]`` keys, :func:`resolve`,
``bench ops`` and ``kernels check`` all read the table, so a new op is a row here plus its kernel module
and tests.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, get_args

import torch
import torch.nn.functional as F

from . import KERNELS_PACKAGE, flex
from .errors import KernelSelectionError
from .optim_muon import TorchMuon
from .ssl import opbench as ntxent_bench

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# ---------------------------------------------------------------------------------------------------
# The torch reference implementations.
# ---------------------------------------------------------------------------------------------------

def _window_mask(s_q: int, s_k: int, window: int, causal: bool, device: torch.device) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: within the last ``window`` keys, and causal or
    within the next ``window - 1`` (the kernels' band, i - window < j <= i + right)."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    return (j > i - window) & (j <= i if causal else j < i + window)


def torch_attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None,
                    segment_ids: torch.Tensor | None = None):
    """SDPA. With ``segment_ids`` (B, S) (packed documents: key j visible from query i only if both carry
    the same id): FlexAttention with a block mask on CUDA (:mod:`engine.flex`: blocks of other documents
    are skipped), SDPA with a dense boolean mask elsewhere (:func:`dense_attention`)."""
    if segment_ids is not None and flex.usable(q, k, v):
        return flex.attention(q, k, v, causal, window, scale, segment_ids, fallback=dense_attention)
    return dense_attention(q, k, v, causal, window, scale, segment_ids)


def dense_attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None,
                    segment_ids: torch.Tensor | None = None):
    """SDPA with the band and the documents as one dense boolean mask, (S, S) or (B, 1, S, S): the
    reference on every device."""
    mask = _window_mask(q.shape[-2], k.shape[-2], window, causal, q.device) if window else None
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        if mask is None and causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = same if mask is None else mask & same
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


def _rotate_pairs(x, cos, sin):
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, T, D) by the angles whose cos/sin broadcast over it."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def torch_rope(q, k, cos, sin, position_ids=None):
    """Rotary position embedding of q (B, H, T, D) and k (B, Hkv, T, D): ``(q_rot, k_rot)``.

    ``cos``/``sin`` are (positions, D/2) tables; position ``t`` (or ``position_ids[b, t]``, a (B, T) integer
    tensor) picks a row. The math runs in the inputs' dtype, the tables cast to it.
    """
    if position_ids is None:
        cos, sin = cos[:q.shape[2]], sin[:q.shape[2]]
    else:
        cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]
    return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)


def torch_swiglu(h):
    """``silu(gate) * up`` with ``gate, up = h.chunk(2, dim=-1)``: a SwiGLU MLP's activation of its fused
    gate/up projection output h (..., 2F)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


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


def torch_nt_xent(z, temperature: float, row_start: int = 0, num_rows: int | None = None):
    """SimCLR's NT-Xent over views ``z`` (N, D) laid out in pairs (rows 2k and 2k+1 are the two views of
    image k): the mean over the query rows ``row_start .. row_start + num_rows - 1`` (all by default) of
    ``-log softmax`` of the positive's cosine similarity / temperature among every other row. Materializes
    the (num_rows, N) similarities, in fp32 for 16-bit ``z``."""
    num_rows = z.shape[0] - row_start if num_rows is None else num_rows
    u = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1, eps=1e-12)
    rows = torch.arange(row_start, row_start + num_rows, device=z.device)
    sim = u[rows] @ u.T / temperature
    sim = sim.masked_fill(rows[:, None] == torch.arange(z.shape[0], device=z.device)[None, :], float("-inf"))
    return F.cross_entropy(sim, rows ^ 1)


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
# The Triton entry points that need adapting to the torch reference's signature.
# ---------------------------------------------------------------------------------------------------

def _triton_attention(kernels, deterministic: bool):
    def attention(q, k, v, causal=True, window=None, scale=None, segment_ids=None):
        return kernels.attention(q, k, v, causal=causal, scale=scale, window=window, deterministic=deterministic,
                                 segment_ids=segment_ids)
    return attention


def _triton_mlp(kernels, deterministic: bool):
    def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale=None, residual=None, row_scale=None):
        """:func:`torch_mlp` with fc1 as a bias-free matmul and the rest in the fused Triton op, which adds
        fc1's bias as it loads fc1's output and returns its gradient from the input-gradient GEMM (no
        separate column reduction over the 4C-wide gradient)."""
        return kernels.gelu_linear_residual(F.linear(x, fc1_weight), fc2_weight, fc2_bias, layer_scale, residual,
                                            row_scale, h_bias=fc1_bias)
    return mlp


def _triton_cross_entropy(kernels, deterministic: bool):
    def cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0, softcap=0.0):
        return kernels.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                     softcap=softcap)
    return cross_entropy


def _triton_linear_cross_entropy(kernels, deterministic: bool):
    def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, label_smoothing=0.0, softcap=0.0):
        """:func:`torch_linear_cross_entropy` a chunk of positions at a time, the gradients computed as the
        forward goes (``kernels.linear_cross_entropy``)."""
        return kernels.linear_cross_entropy(x, weight, targets, bias, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing, softcap=softcap)
    return linear_cross_entropy


# ---------------------------------------------------------------------------------------------------
# The op table.
# ---------------------------------------------------------------------------------------------------

#: A Triton entry point: the name of a public ``kernels`` function, or a factory
#: ``(kernels_module, deterministic) -> function`` where the call needs adapting.
TritonEntry = str | Callable[[Any, bool], Callable]


@dataclass(frozen=True)
class Op:
    """One row of the op table: a recipe key under ``[kernels]`` and the functions it serves."""

    name: str
    summary: str
    #: :class:`Ops` attribute -> (torch reference, Triton entry point).
    functions: dict[str, tuple[Callable, TritonEntry]]
    #: Public ``kernels`` names the Triton backend needs (default: the functions' string entries).
    kernel_names: tuple[str, ...] = ()
    #: How ``bench ops`` and ``kernels check`` exercise the op when they have no built-in case for it (an
    #: ``engine.bench.cases.OpBench``).
    bench: Any = field(default=None, compare=False)

    def needs(self) -> tuple[str, ...]:
        return self.kernel_names or tuple(e for _, e in self.functions.values() if isinstance(e, str))


#: Optimizers by ``optim.name``: the torch class and the name of the Triton one in ``kernels``.
OPTIMIZERS: dict[str, tuple[Callable, str]] = {
    "adamw": (torch.optim.AdamW, "AdamW"),
    "sgd": (torch.optim.SGD, "SGD"),
    "lion": (TorchLion, "Lion"),
    "muon": (TorchMuon, "Muon"),
}

TABLE: list[Op] = [
    Op("attention", "scaled dot-product attention: causal, full or sliding window; grouped-query; "
                    "packed documents (segment ids)",
       {"attention": (torch_attention, _triton_attention)}, kernel_names=("attention",)),
    Op("layer_norm", "LayerNorm over the last dim, and the pre-norm block's fused residual add + LayerNorm",
       {"layer_norm": (torch_layer_norm, "layer_norm"), "add_layer_norm": (torch_add_layer_norm, "add_layer_norm")}),
    Op("rms_norm", "RMSNorm over the last dim, and the fused residual add + RMSNorm",
       {"rms_norm": (torch_rms_norm, "rms_norm"), "add_rms_norm": (torch_add_rms_norm, "add_rms_norm")}),
    Op("mlp", "a ConvNeXt block's MLP: Linear -> GELU -> Linear -> LayerScale -> stochastic depth -> residual",
       {"mlp": (torch_mlp, _triton_mlp)}, kernel_names=("gelu_linear_residual",)),
    Op("dwconv", "depthwise conv2d at stride 1 (ConvNeXt's 7x7 token mixer)",
       {"depthwise_conv2d": (torch_depthwise_conv2d, "depthwise_conv2d")}),
    Op("cross_entropy", "cross-entropy of logits, and a classifier head's matmul with its loss",
       {"cross_entropy": (torch_cross_entropy, _triton_cross_entropy),
        "linear_cross_entropy": (torch_linear_cross_entropy, _triton_linear_cross_entropy)},
       kernel_names=("cross_entropy", "linear_cross_entropy")),
    Op("rope", "rotary position embedding of q and k, read from the QKV projection output, with position ids",
       {"rope": (torch_rope, "rope")}),
    Op("swiglu", "SwiGLU's silu(gate) * up on the fused gate/up projection output",
       {"swiglu": (torch_swiglu, "swiglu")}),
    Op("nt_xent", "SimCLR's contrastive loss: normalize, cosine similarities / temperature, the positive's "
                  "log-softmax with the diagonal masked",
       {"nt_xent": (torch_nt_xent, "nt_xent")}, bench=ntxent_bench),
    Op("optimizer", "the optimizer step (optim.name), with clipping, loss-scale unscaling and overflow skips",
       {}, kernel_names=tuple(name for _, name in OPTIMIZERS.values())),
]


def op_names() -> tuple[str, ...]:
    return tuple(op.name for op in TABLE)


def find(name: str) -> Op:
    for op in TABLE:
        if op.name == name:
            return op
    raise KernelSelectionError(f"unknown op {name!r}; valid ops: {', '.join(op_names())}")


def check_backend_name(op: str, backend: str) -> None:
    find(op)
    if backend not in BACKENDS:
        raise KernelSelectionError(
            f"kernels.{op}: unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_module():
    """The kernels package, or None where it cannot be imported (:func:`kernels_unavailable` says why)."""
    try:
        return importlib.import_module(KERNELS_PACKAGE)
    except ImportError:
        return None


def triton_available(op: str) -> bool:
    """This build's kernels package provides everything ``op``'s Triton backend needs."""
    kernels = _kernels_module()
    return kernels is not None and all(hasattr(kernels, name) for name in find(op).needs())


def kernels_unavailable(op: str) -> str:
    """Why ``op``'s Triton backend cannot be served here: the import error, or the names the package lacks."""
    try:
        importlib.import_module(KERNELS_PACKAGE)
    except ImportError as error:
        return f"{KERNELS_PACKAGE} cannot be imported ({type(error).__name__}: {error})"
    return f"the kernels package cannot be imported here or lacks {', '.join(find(op).needs())}"


def _choose(op: str, backend: str, device: torch.device) -> str:
    check_backend_name(op, backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(op) else "torch"
    if not triton_available(op):
        raise KernelSelectionError(f"kernels.{op} = 'triton': {kernels_unavailable(op)}; use 'torch' or 'auto'")
    if device.type != "cuda" and not _interpreting():
        raise KernelSelectionError(
            f"kernels.{op} = 'triton' needs a CUDA device (this run is on {device.type}); set "
            f"TRITON_INTERPRET=1 before starting to run the kernels through the Triton interpreter on CPU")
    return "triton"


# ---------------------------------------------------------------------------------------------------
# The resolved selection handed to models and the trainer.
# ---------------------------------------------------------------------------------------------------

class Ops:
    """The implementations chosen for one model: one attribute per function of the op table (``ops.attention``,
    ``ops.add_rms_norm``, ...). Call them; never a kernel directly."""

    def __init__(self, backends: dict[str, str], functions: dict[str, Callable], deterministic: bool = True):
        #: op -> "torch" or "triton", for every op of the table.
        self.backends = dict(backends)
        #: False: kernels may trade bitwise reproducibility for speed (see :func:`resolve`).
        self.deterministic = deterministic
        self._functions = dict(functions)

    def __getattr__(self, name: str) -> Callable:
        functions = self.__dict__.get("_functions", {})
        if name in functions:
            return functions[name]
        raise AttributeError(f"Ops has no function {name!r}; the op table provides {', '.join(functions)}")

    def replace(self, **functions: Callable) -> "Ops":
        """A copy with some functions swapped (tests, experiments); the names must be the table's."""
        unknown = set(functions) - set(self._functions)
        if unknown:
            raise AttributeError(f"Ops has no function {', '.join(sorted(unknown))}")
        return Ops(self.backends, {**self._functions, **functions}, self.deterministic)

    def set_functions(self, op: str, backend: str, functions: dict[str, Callable]) -> None:
        """Serve ``op`` with ``functions`` from now on, in place: models hold this object, so the tuner's
        choice (:mod:`engine.tune`) reaches a model built before it was made."""
        unknown = set(functions) - set(find(op).functions)
        if unknown:
            raise AttributeError(f"op {op!r} has no function {', '.join(sorted(unknown))}")
        self.backends[op] = backend
        self._functions.update(functions)

    def describe(self, used: Iterable[str] | None = None) -> str:
        """``op=backend`` for the ops in ``used`` (all by default), in table order."""
        used = set(self.backends if used is None else used)
        text = ", ".join(f"{op}={b}" for op, b in self.backends.items() if op in used)
        return text if self.deterministic else text + " (deterministic=false: atomics allowed)"

    def make_optimizer(self, name: str, param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], *,
                       lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                       momentum: float = 0.0, nesterov: bool = False, max_grad_norm: float = 0.0,
                       muon_momentum: float = 0.95, device: torch.device | None = None, muon_sharing=None):
        """Build the optimizer ``optim.name`` names; returns ``(optimizer, clips_in_step)``.

        ``muon_sharing`` (an ``engine.muon_dist.MuonSharing``): Muon's iterations shared out over the ranks
        of a DDP or FSDP2 run.

        ``clips_in_step`` is True when the optimizer applies ``max_grad_norm`` inside its own step (the
        Triton optimizers fuse it); otherwise the trainer clips with ``clip_grad_norm_`` first.
        """
        if name not in OPTIMIZERS:
            raise KernelSelectionError(f"optim.name: unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
        torch_cls, triton_name = OPTIMIZERS[name]
        kw = {"adamw": dict(betas=betas, eps=eps), "sgd": dict(momentum=momentum, nesterov=nesterov),
              "lion": dict(betas=betas),
              "muon": dict(momentum=muon_momentum, nesterov=nesterov, adamw_betas=betas, adamw_eps=eps,
                           orthogonalizer=muon_sharing)}[name]
        if self.backends["optimizer"] == "triton":
            cls = getattr(_kernels_module(), triton_name)
            return cls(param_groups, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, **kw), True
        # torch's fused ones: one pass over all the tensors instead of about ten launches per parameter, and a
        # skip on the device (``found_inf``) instead of the trainer's masked step. On CPU only AdamW: fused SGD
        # leaves a momentum buffer it creates in a skipped step uninitialised.
        if torch_cls is torch.optim.AdamW and device is not None:
            kw["fused"] = True
        elif torch_cls is torch.optim.SGD:
            kw["fused"] = (device is not None and device.type == "cuda") or None
        return torch_cls(param_groups, lr=lr, weight_decay=weight_decay, **kw), False


def _warn_if_auto_lost_the_kernels(choices: dict[str, str], backends: dict[str, str], device: torch.device) -> None:
    """On CUDA, ``auto`` means the Triton kernels; serving torch instead because they cannot be imported
    (a broken install, a package that overwrote them) must never pass unnoticed."""
    if device.type != "cuda":
        return
    lost = [op.name for op in TABLE if choices.get(op.name, "auto") == "auto" and not triton_available(op.name)]
    if lost:
        warnings.warn(f"kernels = 'auto' on CUDA serves {', '.join(lost)} with torch, not the Triton kernels: "
                      f"{kernels_unavailable(lost[0])}. Fix the install, or set kernels.OP = 'torch' to choose "
                      f"torch on purpose.", RuntimeWarning, stacklevel=3)


def resolve(choices: dict[str, str] | None = None, device: torch.device | str = "cpu",
            deterministic: bool = True) -> Ops:
    """Pick a backend per op. ``choices`` maps op -> backend; missing ops are ``auto``.

    ``deterministic=False`` lets kernels trade bitwise run-to-run reproducibility for speed (the Triton
    attention backward then sums dQ with atomics); the torch backends are unaffected.
    """
    device = torch.device(device)
    choices = dict(choices or {})
    for op, backend in choices.items():
        check_backend_name(op, backend)
    backends = {op.name: _choose(op.name, choices.get(op.name, "auto"), device) for op in TABLE}
    _warn_if_auto_lost_the_kernels(choices, backends, device)
    functions: dict[str, Callable] = {}
    for op in TABLE:
        functions.update(functions_for(op.name, backends[op.name], deterministic))
    return Ops(backends, functions, deterministic)


def functions_for(op: str, backend: str, deterministic: bool = True) -> dict[str, Callable]:
    """``op``'s :class:`Ops` functions on ``backend`` ("torch" or "triton", already chosen: no checks)."""
    functions = {}
    for attr, (torch_fn, entry) in find(op).functions.items():
        if backend == "torch":
            functions[attr] = torch_fn
        elif isinstance(entry, str):
            functions[attr] = getattr(_kernels_module(), entry)
        else:
            functions[attr] = entry(_kernels_module(), deterministic)
    return functions
