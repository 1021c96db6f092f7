"""The op table: one row per op, with its torch reference and Triton entry point.

Models and the trainer never import a kernel module. They ask :func:`engine.ops.select.resolve` for an
:class:`~engine.ops.select.Ops` object and
call its functions; the backend per op comes from the recipe's ``[kernels]`` table or the command line
(``--kernels.attention=torch``):

- ``torch``: PyTorch's own implementation (the ``torch_*`` functions of :mod:`engine.ops.reference`). The reference every other
  backend is checked against.
- ``triton``: the project's fused kernels from the ``kernels`` package. Selecting it for an op whose kernel
  this build lacks, or on a CPU without ``TRITON_INTERPRET=1``, is an error, never a silent fallback.
- ``auto``: here, ``triton`` on CUDA and ``torch`` elsewhere (``kernels.tune = "trust"``). A training run
  with the default ``kernels.tune = "measure"`` replaces that guess on CUDA by a measurement on the card,
  at the run's own shapes (:mod:`engine.ops.tune`): the fastest backend that is correct there, torch unless
  another is faster by more than the noise. If ``tritonforge kernels check`` fails for an op on your card,
  select ``torch`` for that op (``--kernels.OP=torch``) and report the check's table.

Each op is one :class:`Op` row of :data:`TABLE`: its recipe name, the :class:`Ops` functions it provides
with their torch reference and Triton entry point. The recipe's ``[kernels]`` keys, ``resolve``,
``bench ops`` and ``kernels check`` all read the table, so a new op is a row here plus its kernel module
and tests.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
import importlib
from typing import Any, Callable, Literal, get_args

import torch.nn.functional as F

from ..kernels_package import KERNELS_PACKAGE
from ..errors import KernelSelectionError
from .reference import (torch_add_layer_norm, torch_add_rms_norm, torch_attention, torch_cross_entropy,
                        torch_depthwise_conv2d, torch_layer_norm, torch_linear_cross_entropy, torch_mlp, torch_nt_xent,
                        torch_rms_norm, torch_rope, torch_swiglu)

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)

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
    #: How ``bench ops`` and ``kernels check`` exercise the op when they have no built-in case for it: an
    #: ``engine.bench.cases.OpBench``, or the name of a module under the engine that is one (imported by
    #: :func:`bench_of` on first use, so that the table never imports the benchmarks).
    bench: Any = field(default=None, compare=False)

    def needs(self) -> tuple[str, ...]:
        return self.kernel_names or tuple(e for _, e in self.functions.values() if isinstance(e, str))


#: Optimizers by ``optim.name``: the name of the Triton one in ``kernels`` (the torch classes are
#: :data:`engine.optim.build.OPTIMIZERS`).
OPTIMIZER_KERNELS: dict[str, str] = {"adamw": "AdamW", "sgd": "SGD", "lion": "Lion", "muon": "Muon"}

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
       {"nt_xent": (torch_nt_xent, "nt_xent")}, bench="ssl.opbench"),
    Op("optimizer", "the optimizer step (optim.name), with clipping, loss-scale unscaling and overflow skips",
       {}, kernel_names=tuple(OPTIMIZER_KERNELS.values())),
]


def op_names() -> tuple[str, ...]:
    return tuple(op.name for op in TABLE)


def find(name: str) -> Op:
    for op in TABLE:
        if op.name == name:
            return op
    raise KernelSelectionError(f"unknown op {name!r}; valid ops: {', '.join(op_names())}")


def bench_of(name: str) -> Any:
    """The ``bench`` of op ``name``'s row (None without one), its module imported if it names one."""
    bench = find(name).bench
    if isinstance(bench, str):
        bench = importlib.import_module(f"{__name__.rsplit('.', 2)[0]}.{bench}")
    return bench


def check_backend_name(op: str, backend: str) -> None:
    find(op)
    if backend not in BACKENDS:
        raise KernelSelectionError(
            f"kernels.{op}: unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_module():
    """The kernels package, or None where it cannot be imported (:func:`kernels_unavailable` says why)."""
    try:
        return importlib.import_module(KERNELS_PACKAGE)
    except ImportError:
        return None


def triton_available(op: str) -> bool:
    """This build's kernels package provides everything ``op``'s Triton backend needs."""
    kernels = kernels_module()
    return kernels is not None and all(hasattr(kernels, name) for name in find(op).needs())


def kernels_unavailable(op: str) -> str:
    """Why ``op``'s Triton backend cannot be served here: the import error, or the names the package lacks."""
    try:
        importlib.import_module(KERNELS_PACKAGE)
    except ImportError as error:
        return f"{KERNELS_PACKAGE} cannot be imported ({type(error).__name__}: {error})"
    return f"the kernels package cannot be imported here or lacks {', '.join(find(op).needs())}"
