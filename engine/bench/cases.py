"""A case: one op at one shape and dtype, its inputs, its upcast reference and its work per call."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..ops import reference as op_reference, select as op_select
from ..models.gpt import rotary_tables
from .catalogue import LAYER_NORM_EPS, RMS_NORM_EPS, op_bench
from .shapes import DWCONV_KERNEL, DWCONV_PADDING, SHAPE_SYNTAX, RopeShape


# ---------------------------------------------------------------------------------------------------
# Cases: one op at one shape and dtype, with its inputs, reference and work
# ---------------------------------------------------------------------------------------------------

@dataclass
class Case:
    op: str
    shape: Any
    dtype: torch.dtype
    device: torch.device
    #: Leaf tensors the op reads (those that need gradients first) and an upstream gradient.
    inputs: list[torch.Tensor]
    dout: torch.Tensor
    #: Names of the compared tensors: the output, then the gradient of each input that has one.
    names: tuple[str, ...]
    #: FLOPs or bytes of one fwd, bwd and fwd+bwd, in ``unit``'s numerator.
    work: dict[str, float]
    unit: str
    _reference: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def ref_dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "cuda" else torch.float64

    def reference(self) -> list[torch.Tensor]:
        """Output and gradients on upcast inputs, computed once."""
        if self._reference is None:
            reference = _REFERENCES.get(self.op) or op_bench(self.op).reference
            self._reference = reference(self)
        return self._reference


@dataclass(frozen=True)
class OpBench:
    """How ``bench ops`` (and ``kernels check``) exercise an op that has no built-in case here; an op's
    registry row carries one (``Op(..., bench=OpBench(...))``), so a new op needs no edit of this module.

    ``syntax`` describes a shape spec; ``parse(spec)`` returns the shapes it names (each with a ``label``)
    or raises ValueError; ``shapes`` holds the ``default`` (GPU) and ``tiny`` (CPU) sets;
    ``make_case(shape, dtype, device)`` builds the :class:`Case` (inputs, upstream gradient, names, work);
    ``call(ops, case)`` runs the op through a resolved :class:`~engine.op_select.Ops`; ``reference(case)``
    returns the output and the gradients on upcast inputs (see :func:`upcast` and :func:`backward_reference`).
    """

    syntax: str
    parse: Callable[[str], list]
    shapes: dict[str, list]
    make_case: Callable[[Any, torch.dtype, torch.device], "Case"]
    call: Callable[[Any, "Case"], torch.Tensor]
    reference: Callable[["Case"], list[torch.Tensor]]


def _random(shape, dtype, device, requires_grad=True) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def make_case(op: str, shape, dtype: torch.dtype, device: torch.device) -> Case:
    torch.manual_seed(0)
    if op not in SHAPE_SYNTAX:
        return op_bench(op).make_case(shape, dtype, device)
    size = torch.tensor([], dtype=dtype).element_size()
    if op == "attention":
        b, h, s, d = shape.batch, shape.heads, shape.seq, shape.head_dim
        qkv = [_random((b, h, s, d), dtype, device) for _ in range(3)]
        fwd = 4 * b * h * shape.score_pairs() * d * (0.5 if shape.causal else 1.0)
        return Case(op, shape, dtype, device, qkv, torch.randn_like(qkv[0]), ("out", "dq", "dk", "dv"),
                    {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}, "TFLOP/s")
    if op in ("layer_norm", "rms_norm"):
        m, n = shape.rows, shape.cols
        x, w = _random((m, n), dtype, device), _random((n,), dtype, device)
        inputs, names = [x, w], ("y", "dx", "dw")
        if op == "layer_norm":
            inputs.append(_random((n,), dtype, device))
            names += ("db",)
        return Case(op, shape, dtype, device, inputs, torch.randn_like(x), names,
                    {"fwd": 2 * m * n * size, "bwd": 3 * m * n * size, "fwdbwd": 5 * m * n * size}, "GB/s")
    if op == "mlp":
        m, c = shape.rows, shape.cols
        # x: the block's normalized input (M, C); fc1 (4C, C) and fc2 (C, 4C) at nn.Linear's init scale;
        # LayerScale near 1 so that the branch, not the residual, dominates the compared output.
        x = _random((m, c), dtype, device)
        w1 = (torch.randn(4 * c, c, device=device) / math.sqrt(c)).to(dtype).requires_grad_()
        w2 = (torch.randn(c, 4 * c, device=device) / math.sqrt(4 * c)).to(dtype).requires_grad_()
        b1, b2 = _random((4 * c,), dtype, device), _random((c,), dtype, device)
        gamma = (1 + 0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
        res = _random((m, c), dtype, device)
        flops = 2 * 2 * m * 4 * c * c  # the two linears
        return Case(op, shape, dtype, device, [x, w1, b1, w2, b2, gamma, res], torch.randn_like(res),
                    ("out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dlayer_scale",
                     "dresidual"), {"fwd": flops, "bwd": 2 * flops, "fwdbwd": 3 * flops}, "TFLOP/s")
    if op == "dwconv":
        n, c, h, w = shape.batch, shape.channels, shape.height, shape.width
        x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        k = DWCONV_KERNEL
        weight = (torch.randn(c, 1, k, k, device=device) / k).to(dtype).requires_grad_()
        bias = _random((c,), dtype, device)
        p = n * c * h * w * size
        return Case(op, shape, dtype, device, [x.requires_grad_(), weight, bias], torch.randn_like(x),
                    ("y", "dx", "dweight", "dbias"), {"fwd": 2 * p, "bwd": 3 * p, "fwdbwd": 5 * p}, "GB/s")
    if op == "rope":
        b, t, d = shape.batch, shape.seq, shape.head_dim
        heads = shape.heads + shape.kv_heads
        qkv = _random((b, t, (heads + shape.kv_heads) * d), dtype, device)
        cos, sin = (table.to(device) for table in rotary_tables(d, t, 10000.0))
        moved = 2 * b * heads * t * d * size
        return Case(op, shape, dtype, device, [qkv, cos, sin], torch.randn(b, heads, t, d, dtype=dtype, device=device),
                    ("out", "dqkv"), {"fwd": moved, "bwd": moved, "fwdbwd": 2 * moved}, "GB/s")
    if op == "swiglu":
        m, f = shape.rows, shape.cols
        h = _random((m, 2 * f), dtype, device)
        return Case(op, shape, dtype, device, [h], torch.randn(m, f, dtype=dtype, device=device), ("out", "dh"),
                    {"fwd": 3 * m * f * size, "bwd": 5 * m * f * size, "fwdbwd": 8 * m * f * size}, "GB/s")
    assert op == "cross_entropy", op
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    # hidden states of unit scale and a head at nn.Linear's init scale x 4: logits of a few units, a
    # softmax neither flat nor one-hot
    x = _random((n, d), dtype, device)
    weight = (4 * torch.randn(v, d, device=device) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    dout = torch.rand((), device=device) + 0.5
    flops = 2 * n * d * v
    return Case(op, shape, dtype, device, [x, weight, targets], dout, ("loss", "dx", "dweight"),
                {"fwd": flops, "bwd": 2 * flops, "fwdbwd": 3 * flops}, "TFLOP/s")


def upcast(case: Case) -> list[torch.Tensor]:
    return [t.detach().to(case.ref_dtype).requires_grad_() if t.is_floating_point() else t for t in case.inputs]


def backward_reference(case: Case, out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    out.backward(case.dout.to(case.ref_dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _attention_reference(case: Case) -> list[torch.Tensor]:
    q, k, v = upcast(case)
    context = contextlib.nullcontext()
    if case.device.type == "cuda":  # fp32 through the memory-efficient kernel: no S x S matrix
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    mask = document_mask(case)
    with context:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case.shape.causal and mask is None)
    return backward_reference(case, out, [q, k, v])


def document_mask(case: Case) -> torch.Tensor | None:
    """(B, 1, S, S) boolean: same document (and causal), or None without documents."""
    ids = case.shape.segment_ids(case.device)
    if ids is None:
        return None
    mask = ids[:, None, :, None] == ids[:, None, None, :]
    if case.shape.causal:
        mask = mask & torch.ones(case.shape.seq, case.shape.seq, dtype=torch.bool, device=case.device).tril()
    return mask


def _norm_reference(case: Case) -> list[torch.Tensor]:
    leaves = upcast(case)
    x = leaves[0]
    if case.op == "layer_norm":
        out = F.layer_norm(x, (x.shape[-1],), leaves[1], leaves[2], LAYER_NORM_EPS)
    else:
        out = F.rms_norm(x, (x.shape[-1],), leaves[1], RMS_NORM_EPS)
    return backward_reference(case, out, leaves)


def _mlp_reference(case: Case) -> list[torch.Tensor]:
    leaves = upcast(case)
    return backward_reference(case, op_reference.torch_mlp(*leaves), leaves)


def _dwconv_reference(case: Case) -> list[torch.Tensor]:
    leaves = upcast(case)
    return backward_reference(case, op_reference.torch_depthwise_conv2d(*leaves, padding=DWCONV_PADDING), leaves)


def _cross_entropy_reference(case: Case) -> list[torch.Tensor]:
    x, weight, targets = upcast(case)
    return backward_reference(case, F.cross_entropy(F.linear(x, weight), targets), [x, weight])


def rope_views(qkv: torch.Tensor, shape: RopeShape) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the GPT takes them: strided views of the fused projection output."""
    h, hkv = shape.heads, shape.kv_heads
    heads = qkv.view(shape.batch, shape.seq, h + 2 * hkv, shape.head_dim).transpose(1, 2)
    q, k, _ = heads.split((h, hkv, hkv), dim=1)
    return q, k


def _rope_reference(case: Case) -> list[torch.Tensor]:
    qkv = case.inputs[0].detach().to(case.ref_dtype).requires_grad_()
    cos, sin = (t.to(case.ref_dtype) for t in case.inputs[1:])
    out = torch.cat(op_reference.torch_rope(*rope_views(qkv, case.shape), cos, sin), dim=1)
    return backward_reference(case, out, [qkv])


def _swiglu_reference(case: Case) -> list[torch.Tensor]:
    leaves = upcast(case)
    return backward_reference(case, op_reference.torch_swiglu(leaves[0]), leaves)


_REFERENCES = {"attention": _attention_reference, "layer_norm": _norm_reference, "rms_norm": _norm_reference,
               "mlp": _mlp_reference, "dwconv": _dwconv_reference,
               "cross_entropy": _cross_entropy_reference, "rope": _rope_reference, "swiglu": _swiglu_reference}
