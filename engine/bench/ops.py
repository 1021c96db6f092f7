"""``tritonforge bench ops``: every backend of an op, checked and then timed, side by side.

For each op, dtype and shape, and each backend:

1. **Check.** The backend's output and input gradients (for a random upstream gradient) are compared with
   a reference computed once per shape on upcast inputs (float64 on CPU, float32 on CUDA, where float64
   attention would need an S x S matrix): ``‖out − ref‖ / ‖ref‖`` must stay within :data:`TOLERANCE` of
   the dtype. A mismatch is printed loudly, the row is FAILED in the table, JSON and CSV, its timing is
   skipped, and the command exits with status 1 at the end. The optimizer is checked on the parameter
   update of two AdamW steps against a float64 reference (:data:`OPTIMIZER_TOLERANCE`).
2. **Time.** fwd (the op), bwd (backward of one retained forward) and fwd+bwd, each the median of
   ``triton.testing.do_bench`` on CUDA, warm-up excluded. The optimizer's one step is in fwd+bwd.

Backends. ``torch`` and ``triton`` go through :func:`engine.ops.select.resolve`, exactly as models get
them; ``triton`` for an op that has no kernel yet is reported "not available" and the run goes on. Peers
a user might pick instead run when importable and are never required: ``sdpa-flash``, ``sdpa-cudnn``,
``sdpa-mem_eff`` (one SDPA backend each, through ``torch.nn.attention.sdpa_kernel``), ``flex``
(FlexAttention under ``torch.compile``), ``compile`` (``torch.compile`` of the torch norm, mlp, rope, swiglu or
head and loss, compiled afresh per shape with ``dynamic=False`` so no recompilation limit spoils it),
``liger`` (Liger-Kernel's LayerNorm/RMSNorm, fused linear cross-entropy, RoPE and SwiGLU), ``triton-nondet`` (the
triton attention with ``kernels.deterministic = false``: dQ summed with atomics), ``torch-fused`` and ``torch-foreach``
(``torch.optim.AdamW`` implementations; with ``:clip`` they run ``clip_grad_norm_`` first, as the
``torch`` backend does, while the ``triton`` optimizer clips inside its step), ``torch-muon`` and
``triton-muon`` (``optim.name = "muon"`` through the registry: Muon for the blocks' matrices, AdamW for the
rest, checked against a float64 Muon; their rates count AdamW's bytes, so they compare as times).

Shapes (``--shapes``, a comma list; ``op=SPEC`` targets one op when ``--op`` names several; ``default``
and ``tiny`` name the built-in sets):

=================  ===================================  ============================================
op                 spec                                 default (tiny: CPU default)
=================  ===================================  ============================================
attention          ``BxHxSxD[:causal|:full]`` (both if  hidden 2048 (D=64: H=32, D=128: H=16),
                   neither), then ``[:segments=N]``:    S in 1024/4096/16384, B*S = 16384, both masks
                   N equal packed documents per
                   sequence (a document mask)
layer_norm,        ``MxN``                              32768x768, 32768x1024, 16384x4096, 8192x8192
rms_norm
mlp                ``MxC`` (rows x channels, hidden     ConvNeXt-T's stages at batch 128, 224²:
                   4C: the whole MLP block)             401408x96, 100352x192, 25088x384, 6272x768
dwconv             ``NxCxHxW`` (a 7x7 depthwise         ConvNeXt-T's stages at batch 128, 224²:
                   filter, padding 3, channels_last)    128x96x56x56, 128x192x28x28,
                                                        128x384x14x14, 128x768x7x7
cross_entropy      ``NxDxV`` (tokens x hidden x         16384x768x50304 (GPT-2 small's head)
                   vocabulary: the head's matmul and
                   the loss)
optimizer          ``124M``, ``350M``, ``774M``,        124M and 1.5B, each without and with clipping
                   ``1.5B`` or ``LxD[xV[xT]]`` (GPT-2
                   shapes), ``[:clip|:noclip]``
rope               ``BxHxHkvxTxD`` (q and k heads of a  4x32x8x4096x128 (Llama-3-8B's heads),
                   fused QKV output)                    16x12x12x1024x64
swiglu             ``MxF`` (rows x output width; h is   16384x11008 (Llama-7B's MLP), 16384x2048
                   M x 2F)
=================  ===================================  ============================================

Work per call, for the rate columns (2-byte dtypes; ``s`` = bytes per element in general):
attention fwd = 4·B·H·S²·D FLOPs (half when causal), bwd = 2.5 × fwd, fwd+bwd = 3.5 × fwd; norms fwd =
2·M·N·s bytes (read x, write y), bwd = 3·M·N·s (read x and dy, write dx), fwd+bwd = 5·M·N·s (weight and
bias traffic not counted); mlp (``residual + layer_scale * fc2(gelu(fc1(x)))``, x of M x C, hidden 4C)
fwd = 16·M·C² FLOPs (the two linears), bwd = 2 × fwd (input and weight gradients); dwconv (P = N·C·H·W)
fwd = 2·P·s bytes (read x, write y), bwd = 3·P·s (read x and dy, write dx), fwd+bwd = 5·P·s; cross-entropy
(the head ``F.linear`` and the loss) fwd = 2·N·D·V FLOPs, bwd = 2 × fwd, fwd+bwd = 6·N·D·V (the fused triton
op computes its gradients during the forward, so its fwd column holds most of its work); AdamW 28 bytes per
fp32 parameter (read g, p, m, v; write p, m, v), 32 with clipping (the norm reads g once more); rope
(E = B·(H+Hkv)·T·D) fwd = bwd = 2·E·s (read and write q and k), fwd+bwd = 4·E·s, its output the rotated q and
k concatenated over heads (one copy of 2·E·s more in every backend's time); swiglu fwd = 3·M·F·s (read gate,
up; write out), bwd = 5·M·F·s (read gate, up, dout; write dgate, dup), fwd+bwd = 8·M·F·s. With
``:segments=N`` (documents of lengths L_n) attention counts Σ L_n² for S².

Table columns: op, backend, shape, dtype; ``err`` the largest relative error of the check; ``fwd ms``,
``bwd ms``, ``fwd+bwd ms``; ``fwd`` and ``fwd+bwd`` rates in ``unit`` (TFLOP/s or GB/s); ``% peak`` the
fwd+bwd rate over the card's ceiling measured by this command (bf16 matmul for FLOPs, device copy for
bytes); ``vs torch`` the torch backend's fwd+bwd time over this row's (above 1: faster than torch);
``peak MB`` the CUDA memory one fwd+bwd allocates at its peak beyond what was allocated before it
(gradients included; – off CUDA); ``status`` ok, FAILED or "not available" (with the reason in the
JSON/CSV ``note``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..ops import reference as op_reference, select as op_select, table as op_table
from ..optim.build import build_optimizer
from ..models.gpt import rotary_tables
from . import (ArgumentParser, BenchError, check_plot_support, describe_ceilings, environment, fmt,
               format_table, free_memory, measure_ceilings, pick_device, rel_error, time_ms, timer_label,
               write_csv, write_json)

#: The backends of each built-in op: the project's own two first (through the registry), then the peers. An op
#: of the registry's table with an :class:`OpBench` has the project's two.
BACKENDS: dict[str, tuple[str, ...]] = {
    "attention": ("torch", "triton", "triton-nondet", "sdpa-flash", "sdpa-cudnn", "sdpa-mem_eff", "flex"),
    "layer_norm": ("torch", "triton", "compile", "liger"),
    "rms_norm": ("torch", "triton", "compile", "liger"),
    "mlp": ("torch", "triton", "compile"),
    # torch.compile hands a convolution to cuDNN unchanged: its row would be the torch row again
    "dwconv": ("torch", "triton"),
    "cross_entropy": ("torch", "triton", "torch-chunked", "compile", "liger"),
    "optimizer": ("torch", "triton", "torch-fused", "torch-foreach", "torch-muon", "triton-muon"),
    "rope": ("torch", "triton", "compile", "liger"),
    "swiglu": ("torch", "triton", "compile", "liger"),
}
PROJECT_BACKENDS = ("torch", "triton")


def bench_ops() -> tuple[str, ...]:
    """Every op of the registry's table: each has a built-in benchmark here or an :class:`OpBench` in its row."""
    return op_table.op_names()


def backends_of(op: str) -> tuple[str, ...]:
    return BACKENDS.get(op, PROJECT_BACKENDS)


def _op_bench(op: str) -> "OpBench":
    bench = op_table.find(op).bench
    if bench is None:
        raise BenchError(f"--op: {op!r} has neither a built-in benchmark nor an OpBench in its registry row")
    return bench
#: Backends served through the registry: the project's two, and triton with kernels.deterministic = false.
REGISTRY_BACKENDS = PROJECT_BACKENDS + ("triton-nondet",)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

#: Largest ‖out − ref‖ / ‖ref‖ accepted for the output and each gradient, by the dtype the op runs in.
#: float32 allows for TF32 matrix units (Triton's default for an fp32 dot on a GPU, ~3e-4).
TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
#: Largest relative error of the parameter update after :data:`OPTIMIZER_CHECK_STEPS` AdamW steps (fp32).
OPTIMIZER_TOLERANCE = 1e-3
OPTIMIZER_CHECK_STEPS = 2
#: The same for Muon on CUDA, whose Newton-Schulz iterations run in bf16 (fp32 on CPU: OPTIMIZER_TOLERANCE).
MUON_CUDA_TOLERANCE = 5e-2
#: AdamW settings of the optimizer benchmark (a GPT-2-like recipe's).
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MAX_GRAD_NORM = 1.0

LAYER_NORM_EPS, RMS_NORM_EPS = 1e-5, 1e-6

COLUMNS = ("op", "backend", "shape", "dtype", "status", "max_err", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_rate",
           "fwdbwd_rate", "unit", "pct_peak", "vs_torch", "peak_mb", "timer", "note")


class NotAvailable(Exception):
    """A backend cannot run here (not installed, no kernel yet, unsupported shape or device)."""


# ---------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    #: packed documents per sequence, of equal length (within one token): a document mask when > 1
    segments: int = 1

    @property
    def label(self) -> str:
        docs = f" segments={self.segments}" if self.segments > 1 else ""
        return f"{self.batch}x{self.heads}x{self.seq}x{self.head_dim} {'causal' if self.causal else 'full'}{docs}"

    def segment_ids(self, device: torch.device) -> torch.Tensor | None:
        """(B, S) document ids, or None for one document (no mask)."""
        if self.segments == 1:
            return None
        ids = torch.arange(self.seq, device=device) * self.segments // self.seq
        return ids.expand(self.batch, self.seq)

    def score_pairs(self) -> float:
        """Sum over documents of L², the S² of the FLOP count."""
        lengths = torch.bincount(torch.arange(self.seq) * self.segments // self.seq)  # as segment_ids
        return float((lengths * lengths).sum())


@dataclass(frozen=True)
class MatrixShape:
    """Rows x columns: M x N for a norm, M x C for the mlp."""

    rows: int
    cols: int

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.cols}"


@dataclass(frozen=True)
class ImageShape:
    """An (N, C, H, W) activation."""

    batch: int
    channels: int
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}"


@dataclass(frozen=True)
class HeadShape:
    """A classifier head and its loss: ``tokens`` rows of ``hidden`` features onto ``vocab`` classes."""

    tokens: int
    hidden: int
    vocab: int

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}"


@dataclass(frozen=True)
class RopeShape:
    """q (B, H, T, D) and k (B, Hkv, T, D), views of a fused (B, T, (H + 2 Hkv) D) projection output."""

    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.heads}x{self.kv_heads}x{self.seq}x{self.head_dim}"


#: The depthwise filter the dwconv benchmark runs (ConvNeXt's): 7x7, padding 3.
DWCONV_KERNEL, DWCONV_PADDING = 7, 3


@dataclass(frozen=True)
class ParamSetShape:
    """The parameter tensors of a GPT-2-shaped model: ``layers`` blocks of width ``width``."""

    layers: int
    width: int
    vocab: int = 50304
    context: int = 1024
    clip: bool = False
    name: str = ""

    def tensor_shapes(self) -> list[tuple[int, ...]]:
        d = self.width
        block = [(d,), (d,),  # ln_1 weight and bias
                 (3 * d, d), (3 * d,),  # q, k, v projection
                 (d, d), (d,),  # attention output projection
                 (d,), (d,),  # ln_2
                 (4 * d, d), (4 * d,),  # MLP up
                 (d, 4 * d), (d,)]  # MLP down
        return [(self.vocab, d), (self.context, d)] + block * self.layers + [(d,), (d,)]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes())

    @property
    def label(self) -> str:
        name = self.name or f"{self.layers}x{self.width}x{self.vocab}x{self.context}"
        n = self.numel
        count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
        return f"{name} ({count}){' +clip' if self.clip else ''}"


#: Named GPT-2 parameter sets: (layers, width).
GPT2_SIZES = {"124M": (12, 768), "350M": (24, 1024), "774M": (36, 1280), "1.5B": (48, 1600)}

SHAPE_SYNTAX = {
    "attention": "BxHxSxD[:causal|:full][:segments=N], e.g. 4x16x4096x128:causal:segments=8",
    "layer_norm": "MxN, e.g. 32768x768",
    "rms_norm": "MxN, e.g. 32768x768",
    "mlp": "MxC (rows x channels; the hidden width is 4C), e.g. 401408x96",
    "dwconv": "NxCxHxW (the 7x7 filter's input), e.g. 128x96x56x56",
    "cross_entropy": "NxDxV (tokens x hidden x vocabulary), e.g. 16384x768x50304",
    "optimizer": f"{', '.join(GPT2_SIZES)} or LxD[xV[xT]] (GPT-2 shapes), then [:clip|:noclip], e.g. 124M:clip",
    "rope": "BxHxHkvxTxD (q heads, k heads, an even head dim), e.g. 4x32x8x4096x128",
    "swiglu": "MxF (rows x output width; h is M x 2F), e.g. 16384x11008",
}


def _attention_defaults() -> list[AttentionShape]:
    hidden, tokens = 2048, 16384
    return [AttentionShape(tokens // s, hidden // d, s, d, causal)
            for d in (64, 128) for s in (1024, 4096, 16384) for causal in (True, False)]


def _both_clips(layers: int, width: int, name: str = "", **kw) -> list[ParamSetShape]:
    return [ParamSetShape(layers, width, clip=clip, name=name, **kw) for clip in (False, True)]


SHAPE_SETS: dict[str, dict[str, list]] = {
    "default": {
        "attention": _attention_defaults(),
        "layer_norm": [MatrixShape(32768, 768), MatrixShape(32768, 1024), MatrixShape(16384, 4096),
                       MatrixShape(8192, 8192)],
        "rms_norm": [MatrixShape(32768, 768), MatrixShape(32768, 1024), MatrixShape(16384, 4096),
                     MatrixShape(8192, 8192)],
        # ConvNeXt-T's four stages at batch 128, 224x224: B*H*W rows x C channels.
        "mlp": [MatrixShape(128 * 56 * 56, 96), MatrixShape(128 * 28 * 28, 192), MatrixShape(128 * 14 * 14, 384),
                MatrixShape(128 * 7 * 7, 768)],
        "dwconv": [ImageShape(128, 96, 56, 56), ImageShape(128, 192, 28, 28), ImageShape(128, 384, 14, 14),
                   ImageShape(128, 768, 7, 7)],
        "cross_entropy": [HeadShape(16384, 768, 50304)],
        "optimizer": _both_clips(*GPT2_SIZES["124M"], name="124M") + _both_clips(*GPT2_SIZES["1.5B"], name="1.5B"),
        "rope": [RopeShape(4, 32, 8, 4096, 128), RopeShape(16, 12, 12, 1024, 64)],
        "swiglu": [MatrixShape(16384, 11008), MatrixShape(16384, 2048)],
    },
    # Small enough for the Triton interpreter on a CPU (a second or so per row).
    "tiny": {
        "attention": [AttentionShape(1, 2, 64, 32, causal) for causal in (True, False)],
        "layer_norm": [MatrixShape(64, 256)],
        "rms_norm": [MatrixShape(64, 256)],
        "mlp": [MatrixShape(64, 32)],
        "dwconv": [ImageShape(1, 8, 5, 5)],
        "cross_entropy": [HeadShape(64, 32, 512)],
        "optimizer": _both_clips(1, 64, vocab=512, context=64),
        "rope": [RopeShape(1, 2, 1, 16, 16)],
        "swiglu": [MatrixShape(16, 48)],
    },
}


def _positive_ints(text: str, spec: str, op: str) -> list[int]:
    values = [int(v) for v in text.split("x")]
    if any(v <= 0 for v in values):
        raise BenchError(f"--shapes: {spec!r}: every size of a {op} shape must be > 0")
    return values


def parse_shape(op: str, spec: str) -> list:
    """The shapes one spec names for ``op`` (attention without a mask suffix gives both masks)."""
    if op not in SHAPE_SYNTAX:
        bench = _op_bench(op)
        try:
            return list(bench.parse(spec))
        except ValueError:
            raise BenchError(f"--shapes: {spec!r} is not a {op} shape; expected {bench.syntax}") from None
    bad = BenchError(f"--shapes: {spec!r} is not a {op} shape; expected {SHAPE_SYNTAX[op]}")
    if op == "attention":
        m = re.fullmatch(r"(\d+x\d+x\d+x\d+)(?::(causal|full))?(?::segments=(\d+))?", spec)
        if not m:
            raise bad
        b, h, s, d = _positive_ints(m[1], spec, op)
        masks = (True, False) if m[2] is None else (m[2] == "causal",)
        segments = 1 if m[3] is None else int(m[3])
        if not 1 <= segments <= s:
            raise BenchError(f"--shapes: {spec!r}: segments={segments} must be between 1 and S={s}")
        return [AttentionShape(b, h, s, d, causal, segments) for causal in masks]
    if op in ("layer_norm", "rms_norm", "mlp", "swiglu"):
        if not re.fullmatch(r"\d+x\d+", spec):
            raise bad
        return [MatrixShape(*_positive_ints(spec, spec, op))]
    if op == "rope":
        if not re.fullmatch(r"\d+x\d+x\d+x\d+x\d+", spec):
            raise bad
        shape = RopeShape(*_positive_ints(spec, spec, op))
        if shape.head_dim % 2:
            raise BenchError(f"--shapes: {spec!r}: the rope head dim must be even")
        return [shape]
    if op == "dwconv":
        if not re.fullmatch(r"\d+x\d+x\d+x\d+", spec):
            raise bad
        return [ImageShape(*_positive_ints(spec, spec, op))]
    if op == "cross_entropy":
        if not re.fullmatch(r"\d+x\d+x\d+", spec):
            raise bad
        return [HeadShape(*_positive_ints(spec, spec, op))]
    assert op == "optimizer", op
    m = re.fullmatch(r"([^:]+?)(?::(clip|noclip))?", spec)
    if not m:
        raise bad
    body, clips = m[1], ((False, True) if m[2] is None else (m[2] == "clip",))
    named = {k.lower(): k for k in GPT2_SIZES}
    if body.lower() in named:
        name = named[body.lower()]
        return [ParamSetShape(*GPT2_SIZES[name], clip=clip, name=name) for clip in clips]
    if not re.fullmatch(r"\d+x\d+(x\d+){0,2}", body):
        raise bad
    sizes = _positive_ints(body, spec, op)
    return [ParamSetShape(*sizes, clip=clip) for clip in clips]


def parse_shapes(text: str, ops: Sequence[str]) -> dict[str, list]:
    """``--shapes``: a comma list of specs; ``op=SPEC`` targets one op, a bare spec every selected op."""
    chosen: dict[str, list] = {op: [] for op in ops}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise BenchError(f"--shapes: empty spec in {text!r}")
        targets, spec = list(ops), item
        if "=" in item and ":" not in item.split("=", 1)[0]:  # not a spec's own ``:segments=N``
            op, spec = (s.strip() for s in item.split("=", 1))
            if op not in bench_ops():
                raise BenchError(f"--shapes: unknown op {op!r} in {item!r}; valid ops: {', '.join(bench_ops())}")
            if op not in ops:
                raise BenchError(f"--shapes: {item!r} is for {op}, which --op does not select")
            targets = [op]
        for op in targets:
            if spec in SHAPE_SETS:
                chosen[op] += SHAPE_SETS[spec].get(op) or _op_bench(op).shapes[spec]
                continue
            try:
                chosen[op] += parse_shape(op, spec)
            except BenchError as e:
                if len(targets) > 1:
                    raise BenchError(f"{e}; with several ops, prefix a spec with its op (e.g. "
                                     f"layer_norm=32768x768)") from None
                raise
    return {op: list(dict.fromkeys(shapes)) for op, shapes in chosen.items()}


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
            reference = _REFERENCES.get(self.op) or _op_bench(self.op).reference
            self._reference = reference(self)
        return self._reference


@dataclass(frozen=True)
class OpBench:
    """How ``bench ops`` (and ``kernels check``) exercise an op that has no built-in case here; an op's
    registry row carries one (``Op(..., bench=OpBench(...))``), so a new op needs no edit of this module.

    ``syntax`` describes a shape spec; ``parse(spec)`` returns the shapes it names (each with a ``label``)
    or raises ValueError; ``shapes`` holds the ``default`` (GPU) and ``tiny`` (CPU) sets;
    ``make_case(shape, dtype, device)`` builds the :class:`Case` (inputs, upstream gradient, names, work);
    ``call(ops, case)`` runs the op through a resolved :class:`~engine.ops.select.Ops`; ``reference(case)``
    returns the output and the gradients on upcast inputs (see :func:`_upcast` and :func:`_backward_reference`).
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
        return _op_bench(op).make_case(shape, dtype, device)
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


def _upcast(case: Case) -> list[torch.Tensor]:
    return [t.detach().to(case.ref_dtype).requires_grad_() if t.is_floating_point() else t for t in case.inputs]


def _backward_reference(case: Case, out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    out.backward(case.dout.to(case.ref_dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _attention_reference(case: Case) -> list[torch.Tensor]:
    q, k, v = _upcast(case)
    context = contextlib.nullcontext()
    if case.device.type == "cuda":  # fp32 through the memory-efficient kernel: no S x S matrix
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    mask = _document_mask(case)
    with context:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case.shape.causal and mask is None)
    return _backward_reference(case, out, [q, k, v])


def _document_mask(case: Case) -> torch.Tensor | None:
    """(B, 1, S, S) boolean: same document (and causal), or None without documents."""
    ids = case.shape.segment_ids(case.device)
    if ids is None:
        return None
    mask = ids[:, None, :, None] == ids[:, None, None, :]
    if case.shape.causal:
        mask = mask & torch.ones(case.shape.seq, case.shape.seq, dtype=torch.bool, device=case.device).tril()
    return mask


def _norm_reference(case: Case) -> list[torch.Tensor]:
    leaves = _upcast(case)
    x = leaves[0]
    if case.op == "layer_norm":
        out = F.layer_norm(x, (x.shape[-1],), leaves[1], leaves[2], LAYER_NORM_EPS)
    else:
        out = F.rms_norm(x, (x.shape[-1],), leaves[1], RMS_NORM_EPS)
    return _backward_reference(case, out, leaves)


def _mlp_reference(case: Case) -> list[torch.Tensor]:
    leaves = _upcast(case)
    return _backward_reference(case, op_reference.torch_mlp(*leaves), leaves)


def _dwconv_reference(case: Case) -> list[torch.Tensor]:
    leaves = _upcast(case)
    return _backward_reference(case, op_reference.torch_depthwise_conv2d(*leaves, padding=DWCONV_PADDING), leaves)


def _cross_entropy_reference(case: Case) -> list[torch.Tensor]:
    x, weight, targets = _upcast(case)
    return _backward_reference(case, F.cross_entropy(F.linear(x, weight), targets), [x, weight])


def _rope_views(qkv: torch.Tensor, shape: RopeShape) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the GPT takes them: strided views of the fused projection output."""
    h, hkv = shape.heads, shape.kv_heads
    heads = qkv.view(shape.batch, shape.seq, h + 2 * hkv, shape.head_dim).transpose(1, 2)
    q, k, _ = heads.split((h, hkv, hkv), dim=1)
    return q, k


def _rope_reference(case: Case) -> list[torch.Tensor]:
    qkv = case.inputs[0].detach().to(case.ref_dtype).requires_grad_()
    cos, sin = (t.to(case.ref_dtype) for t in case.inputs[1:])
    out = torch.cat(op_reference.torch_rope(*_rope_views(qkv, case.shape), cos, sin), dim=1)
    return _backward_reference(case, out, [qkv])


def _swiglu_reference(case: Case) -> list[torch.Tensor]:
    leaves = _upcast(case)
    return _backward_reference(case, op_reference.torch_swiglu(leaves[0]), leaves)


_REFERENCES = {"attention": _attention_reference, "layer_norm": _norm_reference, "rms_norm": _norm_reference,
               "mlp": _mlp_reference, "dwconv": _dwconv_reference,
               "cross_entropy": _cross_entropy_reference, "rope": _rope_reference, "swiglu": _swiglu_reference}


# ---------------------------------------------------------------------------------------------------
# Backends: a forward callable over the case's inputs, and the tensors whose gradients are compared
# ---------------------------------------------------------------------------------------------------

@dataclass
class Runner:
    forward: Callable[[], torch.Tensor]
    #: Tensors whose ``.grad`` match the reference gradients, in order (a module's own parameters for
    #: peers that keep their weights in a module).
    leaves: list[torch.Tensor]


def _registry_runner(case: Case, backend: str) -> Runner:
    # "triton-nondet": the triton backend with ``kernels.deterministic = false`` (atomics allowed)
    deterministic = backend != "triton-nondet"
    ops = op_select.resolve({case.op: backend.removesuffix("-nondet")}, case.device,
                           deterministic)  # KernelSelectionError: not available
    if case.op not in SHAPE_SYNTAX:
        bench = _op_bench(case.op)
        return Runner(lambda: bench.call(ops, case), [t for t in case.inputs if t.requires_grad])
    if case.op == "attention":
        q, k, v = case.inputs
        ids = case.shape.segment_ids(case.device)
        return Runner(lambda: ops.attention(q, k, v, causal=case.shape.causal, segment_ids=ids), [q, k, v])
    if case.op == "layer_norm":
        x, w, b = case.inputs
        return Runner(lambda: ops.layer_norm(x, w, b, LAYER_NORM_EPS), [x, w, b])
    if case.op == "rms_norm":
        x, w = case.inputs
        return Runner(lambda: ops.rms_norm(x, w, RMS_NORM_EPS), [x, w])
    if case.op == "mlp":
        return Runner(lambda: ops.mlp(*case.inputs), list(case.inputs))
    if case.op == "dwconv":
        return Runner(lambda: ops.depthwise_conv2d(*case.inputs, padding=DWCONV_PADDING), list(case.inputs))
    if case.op == "rope":
        qkv, cos, sin = case.inputs
        return Runner(lambda: torch.cat(ops.rope(*_rope_views(qkv, case.shape), cos, sin), dim=1), [qkv])
    if case.op == "swiglu":
        return Runner(lambda: ops.swiglu(case.inputs[0]), list(case.inputs))
    x, weight, targets = case.inputs
    return Runner(lambda: ops.linear_cross_entropy(x, weight, targets), [x, weight])


def _sdpa_runner(case: Case, backend: str) -> Runner:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        raise NotAvailable("torch.nn.attention.sdpa_kernel is missing from this PyTorch") from None
    which = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
             "sdpa-mem_eff": SDPBackend.EFFICIENT_ATTENTION}[backend]
    q, k, v = case.inputs
    mask = _document_mask(case)
    if mask is not None and backend == "sdpa-flash":
        raise NotAvailable("SDPA's flash backend takes no attention mask (segments)")

    def forward():
        with sdpa_kernel(which):  # the backward kernel is fixed by the forward's choice
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case.shape.causal and mask is None)

    return Runner(forward, [q, k, v])


def _flex_runner(case: Case, backend: str) -> Runner:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        raise NotAvailable("FlexAttention is missing from this PyTorch") from None
    torch._dynamo.reset()  # compiled afresh for this shape: no recompilation limit in play
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = case.inputs
    s = case.shape.seq
    mask = None
    ids = case.shape.segment_ids(case.device)
    if ids is not None:  # a document block mask: blocks of other documents are skipped
        if case.shape.causal:
            def documents(b, h, qi, ki):
                return (ids[b, qi] == ids[b, ki]) & (qi >= ki)
        else:
            def documents(b, h, qi, ki):
                return ids[b, qi] == ids[b, ki]
        mask = create_block_mask(documents, case.shape.batch, None, s, s, device=str(case.device))
    elif case.shape.causal:
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, s, s, device=str(case.device))
    return Runner(lambda: flex(q, k, v, block_mask=mask), [q, k, v])


def _compile_runner(case: Case, backend: str) -> Runner:
    torch._dynamo.reset()
    if case.op == "rope":
        qkv, cos, sin = case.inputs
        rope = torch.compile(lambda qkv, cos, sin: torch.cat(op_reference.torch_rope(*_rope_views(qkv, case.shape), cos, sin),
                                                             dim=1), dynamic=False)
        return Runner(lambda: rope(qkv, cos, sin), [qkv])
    if case.op == "layer_norm":
        fn, eps, n_leaves = op_reference.torch_layer_norm, (LAYER_NORM_EPS,), 3
    elif case.op == "rms_norm":
        fn, eps, n_leaves = op_reference.torch_rms_norm, (RMS_NORM_EPS,), 2
    elif case.op == "mlp":
        fn, eps, n_leaves = op_reference.torch_mlp, (), 7
    elif case.op == "swiglu":
        fn, eps, n_leaves = op_reference.torch_swiglu, (), 1
    else:
        fn, eps, n_leaves = op_reference.torch_linear_cross_entropy, (), 2
    compiled = torch.compile(fn, dynamic=False)
    args = case.inputs
    return Runner(lambda: compiled(*args, *eps), list(args[:n_leaves]))


def _liger_llama_runner(case: Case) -> Runner:
    """Liger's RoPE (Hugging Face's convention: (1, T, D) tables, each half's angles repeated) and SwiGLU
    (gate and up as two tensors: the halves of h, which Liger makes contiguous)."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        raise NotAvailable("liger-kernel is not installed (pip install liger-kernel)") from None
    if case.op == "swiglu":
        (h,) = case.inputs
        return Runner(lambda: LigerSiLUMulFunction.apply(*h.chunk(2, dim=-1)), [h])
    qkv, cos, sin = case.inputs
    cos2, sin2 = (torch.cat((t, t), dim=-1)[None].to(case.dtype) for t in (cos, sin))
    return Runner(lambda: torch.cat(liger_rotary_pos_emb(*_rope_views(qkv, case.shape), cos2, sin2), dim=1), [qkv])


def _liger_runner(case: Case, backend: str) -> Runner:
    if case.op in ("rope", "swiglu"):
        return _liger_llama_runner(case)
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except ImportError:
        raise NotAvailable("liger-kernel is not installed (pip install liger-kernel)") from None
    if case.op == "cross_entropy":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        x, weight, targets = case.inputs
        return Runner(lambda: loss(weight, x, targets), [x, weight])
    x, *params = case.inputs
    n = x.shape[-1]
    if case.op == "layer_norm":
        module = LigerLayerNorm(n, eps=LAYER_NORM_EPS)
    else:
        module = LigerRMSNorm(n, eps=RMS_NORM_EPS)
    module = module.to(case.device, case.dtype)
    own = [module.weight] + ([module.bias] if case.op == "layer_norm" else [])
    with torch.no_grad():  # the module's weights take the case's random values
        for mine, theirs in zip(own, params):
            mine.copy_(theirs)
    return Runner(lambda: module(x), [x] + own)


def _chunked_runner(case: Case, backend: str) -> Runner:
    """``F.linear_cross_entropy``'s chunked path (torch 2.13 and later): the logits never in memory whole, as
    in the Triton kernel; its ``peak_mb`` is the figure to compare."""
    from ..ops.tune.candidates import chunked_linear_cross_entropy

    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise NotAvailable(f"F.linear_cross_entropy is missing from this PyTorch ({torch.__version__})")
    x, weight, targets = case.inputs
    return Runner(lambda: chunked_linear_cross_entropy(x, weight, targets), [x, weight])


_PEERS = {"sdpa-flash": _sdpa_runner, "sdpa-cudnn": _sdpa_runner, "sdpa-mem_eff": _sdpa_runner,
          "flex": _flex_runner, "compile": _compile_runner, "liger": _liger_runner, "torch-chunked": _chunked_runner}


def build_runner(case: Case, backend: str) -> Runner:
    if backend in REGISTRY_BACKENDS:
        try:
            return _registry_runner(case, backend)
        except op_table.KernelSelectionError as e:
            raise NotAvailable(str(e)) from None
    return _PEERS[backend](case, backend)


# ---------------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    device: torch.device
    warmup_ms: float = 25
    rep_ms: float = 100


def _new_row(op: str, backend: str, label: str, dtype: torch.dtype, unit: str, device: torch.device) -> dict:
    return {"op": op, "backend": backend, "shape": label, "dtype": DTYPE_NAMES[dtype], "status": "ok",
            "max_err": None, "errors": {}, "fwd_ms": None, "bwd_ms": None, "fwdbwd_ms": None, "fwd_rate": None,
            "fwdbwd_rate": None, "unit": unit, "pct_peak": None, "vs_torch": None, "peak_mb": None,
            "timer": timer_label(device),
            "note": ""}


def _check(case: Case, runner: Runner) -> dict[str, float]:
    """Relative error of the output and each gradient against the reference."""
    for t in runner.leaves:
        t.grad = None
    out = runner.forward()
    out.backward(case.dout)
    got = [out] + [t.grad for t in runner.leaves]
    errors = {name: rel_error(g, r) for name, g, r in zip(case.names, got, case.reference())}
    for t in runner.leaves:
        t.grad = None
    return errors


def _peak_mb(case: Case, runner: Runner, device: torch.device) -> float | None:
    """CUDA memory one fwd+bwd allocates at its peak beyond what was allocated before it (its
    gradients included), in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.forward().backward(case.dout)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for t in runner.leaves:
        t.grad = None
    return peak / 2 ** 20


def _time(case: Case, runner: Runner, s: Settings, row: dict) -> None:
    kw = dict(warmup_ms=s.warmup_ms, rep_ms=s.rep_ms)
    leaves = runner.leaves
    row["peak_mb"] = _peak_mb(case, runner, s.device)
    row["fwd_ms"] = time_ms(runner.forward, s.device, **kw)
    row["fwdbwd_ms"] = time_ms(lambda: runner.forward().backward(case.dout), s.device, grad_to_none=leaves, **kw)
    out = runner.forward()
    try:
        row["bwd_ms"] = time_ms(lambda: out.backward(case.dout, retain_graph=True), s.device, grad_to_none=leaves,
                                **kw)
    except RuntimeError as e:  # a compiled backward may not support retain_graph
        if "out of memory" in str(e).lower():
            raise
        row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
        row["note"] = "bwd = (fwd+bwd) - fwd: this backend's backward cannot be re-run"
    del out


def _fail(row: dict, message: str, log_err) -> None:
    row["status"] = "FAILED"
    row["note"] = message
    log_err(f"!!! FAILED {row['op']} / {row['backend']} / {row['shape']} / {row['dtype']}: {message}")


def run_backend(case: Case, backend: str, s: Settings, log_err=print) -> dict:
    """Check ``backend`` on ``case``, then time it; the row describes what happened."""
    row = _new_row(case.op, backend, case.shape.label, case.dtype, case.unit, s.device)
    project = backend in REGISTRY_BACKENDS
    stage = "build"
    try:
        runner = build_runner(case, backend)
        stage = "check"
        errors = _check(case, runner)
        row["errors"] = errors
        row["max_err"] = max(errors.values())
        tol = TOLERANCE[case.dtype]
        bad = {k: v for k, v in errors.items() if not v <= tol}
        if bad:
            worst = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
            _fail(row, f"relative error {worst} above the {DTYPE_NAMES[case.dtype]} tolerance {tol:g}; "
                       f"timing skipped", log_err)
            return row
        stage = "timing"
        _time(case, runner, s, row)
    except NotAvailable as e:
        row["status"], row["note"] = "not available", str(e)
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "not available", f"out of memory ({stage})"
    except Exception as e:  # noqa: BLE001  (a peer that cannot run a shape raises anything)
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        if project:
            _fail(row, f"{stage} raised {message}", log_err)
        else:
            row["status"], row["note"] = "not available", message
    finally:
        for t in case.inputs:
            t.grad = None
    return row


def _rates(row: dict, case_work: dict[str, float], ceilings: dict[str, float]) -> None:
    scale = 1e-9 if row["unit"] == "TFLOP/s" else 1e-6  # per ms -> TFLOP/s or GB/s
    for key, work in (("fwd", case_work.get("fwd")), ("fwdbwd", case_work["fwdbwd"])):
        ms = row[f"{key}_ms"]
        if work is not None and ms:
            row[f"{key}_rate"] = work / ms * scale
    ceiling = ceilings.get("matmul_tflops" if row["unit"] == "TFLOP/s" else "copy_gbps")
    if ceiling and row["fwdbwd_rate"] is not None:
        row["pct_peak"] = 100 * row["fwdbwd_rate"] / ceiling


def _ratios(rows: list[dict]) -> None:
    torch_row = next((r for r in rows if r["backend"] == "torch" and r["fwdbwd_ms"]), None)
    if torch_row is None:
        return
    for r in rows:
        if r["fwdbwd_ms"]:
            r["vs_torch"] = torch_row["fwdbwd_ms"] / r["fwdbwd_ms"]


def run_case(op: str, shape, dtype: torch.dtype, backends: Sequence[str], s: Settings, ceilings: dict,
             log=print, log_err=print) -> list[dict]:
    if op == "optimizer":
        return run_optimizer_case(shape, backends, s, ceilings, log=log, log_err=log_err)
    case = make_case(op, shape, dtype, s.device)
    rows = []
    for backend in backends:
        row = run_backend(case, backend, s, log_err=log_err)
        _rates(row, case.work, ceilings)
        rows.append(row)
        log(_progress_line(row))
    _ratios(rows)
    del case
    free_memory(s.device)
    return rows


# ---------------------------------------------------------------------------------------------------
# The optimizer: AdamW steps over a GPT-2 parameter set
# ---------------------------------------------------------------------------------------------------

def _optimizer_step(backend: str, params: list[torch.Tensor], clip: bool, device: torch.device) -> Callable[[], None]:
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
        opt, clips_in_step = build_optimizer(ops, "muon", _muon_groups(params), **ADAMW, nesterov=True,
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


def _muon_groups(params: list[torch.Tensor]) -> list[dict]:
    """The blocks' matrices (every 2-D tensor after the two embeddings) for Muon, the rest for AdamW."""
    hidden = [p for p in params[2:] if p.dim() == 2]
    rest = params[:2] + [p for p in params[2:] if p.dim() != 2]
    return [dict(params=hidden, use_muon=True), dict(params=rest, use_muon=False)]


def _muon_reference_deltas(p0: list[torch.Tensor], grads: list[list[torch.Tensor]], clip: bool) -> list[torch.Tensor]:
    """Parameter change after len(grads) Muon/AdamW steps of the registry's torch Muon in float64 (which
    iterates in float64), on the parameters' device."""
    params = [p.double().requires_grad_() for p in p0]
    opt, _ = build_optimizer(op_select.resolve({"optimizer": "torch"}, "cpu"),
        "muon", _muon_groups(params), **ADAMW, nesterov=True)
    for step_grads in grads:
        _set_grads(params, [g.double() for g in step_grads])
        if clip:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
    return [(p.detach() - start.double()).float() for p, start in zip(params, p0)]


def _adamw_reference_deltas(p0: list[torch.Tensor], grads: list[list[torch.Tensor]], clip: bool) -> list[torch.Tensor]:
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


def _delta_error(params: list[torch.Tensor], p0: list[torch.Tensor], deltas: list[torch.Tensor]) -> float:
    num = den = 0.0
    for p, start, ref in zip(params, p0, deltas):
        diff = (p.detach().double() - start.double()) - ref.double()
        num += float(diff.square().sum())
        den += float(ref.double().square().sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def run_optimizer_case(shape: ParamSetShape, backends: Sequence[str], s: Settings, ceilings: dict, log=print,
                       log_err=print) -> list[dict]:
    device = s.device
    torch.manual_seed(0)
    p0 = [torch.randn(t, device=device) for t in shape.tensor_shapes()]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(OPTIMIZER_CHECK_STEPS)]
    deltas, muon_deltas = None, None
    numel = shape.numel
    work = {"fwdbwd": (32 if shape.clip else 28) * numel}
    rows = []
    for backend in backends:
        row = _new_row("optimizer", backend, shape.label, torch.float32, "GB/s", device)
        stage = "build"
        params: list[torch.Tensor] = []
        try:
            params = [p.clone().requires_grad_() for p in p0]
            step = _optimizer_step(backend, params, shape.clip, device)
            stage = "check"
            for step_grads in grads:
                _set_grads(params, step_grads)
                step()
            muon = backend.endswith("-muon")
            if muon and muon_deltas is None:
                muon_deltas = _muon_reference_deltas(p0, grads, shape.clip)
            if not muon and deltas is None:
                deltas = _adamw_reference_deltas(p0, grads, shape.clip)
            err = _delta_error(params, p0, muon_deltas if muon else deltas)
            row["errors"], row["max_err"] = {"update": err}, err
            tolerance = MUON_CUDA_TOLERANCE if muon and device.type == "cuda" else OPTIMIZER_TOLERANCE
            if not err <= tolerance:
                _fail(row, f"relative error of the update {err:.2e} above {tolerance:g} after "
                           f"{OPTIMIZER_CHECK_STEPS} steps; timing skipped", log_err)
            else:
                stage = "timing"
                _set_grads(params, grads[0])
                row["fwdbwd_ms"] = time_ms(step, device, warmup_ms=s.warmup_ms, rep_ms=s.rep_ms)
        except NotAvailable as e:
            row["status"], row["note"] = "not available", str(e)
        except torch.OutOfMemoryError:
            row["status"], row["note"] = "not available", f"out of memory ({stage})"
        except Exception as e:  # noqa: BLE001
            message = f"{type(e).__name__}: {str(e).strip()[:300]}"
            if backend in PROJECT_BACKENDS or backend.endswith("-muon"):
                _fail(row, f"{stage} raised {message}", log_err)
            else:
                row["status"], row["note"] = "not available", message
        del params
        free_memory(device)
        _rates(row, work, ceilings)
        rows.append(row)
        log(_progress_line(row))
    _ratios(rows)
    return rows


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def _progress_line(row: dict) -> str:
    head = f"  {row['op']:<13} {row['backend']:<13} {row['shape']:<24} {row['dtype']:<5}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['note']}"
    return (f"{head} err {fmt(row['max_err'], '.1e')}  fwd {fmt(row['fwd_ms'])} ms  "
            f"fwd+bwd {fmt(row['fwdbwd_ms'])} ms  {fmt(row['fwdbwd_rate'], '.4g')} {row['unit']}")


def table(rows: list[dict], device: torch.device) -> str:
    ms = " (CPU)" if device.type != "cuda" else ""
    header = ["op", "backend", "shape", "dtype", "err", f"fwd ms{ms}", f"bwd ms{ms}", f"fwd+bwd ms{ms}", "fwd",
              "fwd+bwd", "unit", "% peak", "vs torch", "peak MB", "status"]
    cells = []
    for r in rows:
        cells.append([r["op"], r["backend"], r["shape"], r["dtype"], fmt(r["max_err"], ".1e"), fmt(r["fwd_ms"]),
                      fmt(r["bwd_ms"]), fmt(r["fwdbwd_ms"]), fmt(r["fwd_rate"], ".4g"), fmt(r["fwdbwd_rate"], ".4g"),
                      r["unit"], fmt(r["pct_peak"], ".0f"), fmt(r["vs_torch"], ".3g"), fmt(r["peak_mb"], ".0f"),
                      r["status"]])
    return format_table(header, cells)


@dataclass
class OpsArgs:
    ops: list[str]
    backends: dict[str, list[str]]
    dtypes: list[torch.dtype]
    shapes: dict[str, list]
    device: torch.device
    json: str | None = None
    csv: str | None = None
    plot: str | None = None
    warmup_ms: float = 25
    rep_ms: float = 100


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="tritonforge bench ops",
                       description="Check every backend of each op against an upcast reference, then time fwd, bwd "
                                   "and fwd+bwd.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                       epilog="Shapes: " + "; ".join(f"{op}: {syn}" for op, syn in SHAPE_SYNTAX.items())
                       + ". Prefix a spec with 'op=' when --op names several ops; 'default' and 'tiny' name the "
                       "built-in sets (default on CUDA, tiny on CPU).")
    p.add_argument("--op", default="all", help=f"comma list of {', '.join(bench_ops())} (default: all)")
    p.add_argument("--backends", default=None,
                   help="comma list (default: every backend of each op on CUDA; torch,triton on CPU). Known: "
                        + ", ".join(dict.fromkeys(b for bs in BACKENDS.values() for b in bs)))
    p.add_argument("--dtype", default=None, help="comma list of bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on "
                                                 "CPU); the optimizer always runs fp32")
    p.add_argument("--shapes", default=None, help="comma list of shape specs (see below)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--json", default=None, metavar="PATH", help="write every row (and the ceilings) as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw fwd+bwd rates as a PNG (needs matplotlib)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up per timing (default 25)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time per timing (default 100)")
    return p


def _comma_list(text: str, option: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise BenchError(f"{option}: empty name in {text!r}")
    return list(dict.fromkeys(items))


def parse_args(argv: Sequence[str]) -> OpsArgs:
    a = _parser().parse_args(list(argv))
    device = pick_device(a.device)
    cuda = device.type == "cuda"
    ops = list(bench_ops()) if a.op == "all" else _comma_list(a.op, "--op")
    for op in ops:
        if op not in bench_ops():
            raise BenchError(f"--op: unknown op {op!r}; valid ops: {', '.join(bench_ops())}")
    if a.backends is None:
        backends = {op: list(backends_of(op) if cuda else PROJECT_BACKENDS) for op in ops}
    else:
        names = _comma_list(a.backends, "--backends")
        known = {b for op in ops for b in backends_of(op)}
        for name in names:
            if name not in known:
                raise BenchError(f"--backends: {name!r} is not a backend of {', '.join(ops)}; valid: "
                                 f"{', '.join(dict.fromkeys(b for op in ops for b in backends_of(op)))}")
        # "torch" first, so every row of a case can be compared with it.
        names = sorted(names, key=lambda b: b != "torch")
        backends = {op: [b for b in names if b in backends_of(op)] for op in ops}
    dtype_names = _comma_list(a.dtype, "--dtype") if a.dtype else ["bf16" if cuda else "fp32"]
    for name in dtype_names:
        if name not in DTYPES:
            raise BenchError(f"--dtype: unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    shapes = parse_shapes(a.shapes or ("default" if cuda else "tiny"), ops)
    if a.warmup_ms < 0 or a.rep_ms <= 0:
        raise BenchError("--warmup-ms must be >= 0 and --rep-ms > 0")
    if a.plot:
        check_plot_support()
    return OpsArgs(ops, backends, [DTYPES[n] for n in dtype_names], shapes, device, a.json, a.csv, a.plot,
                   a.warmup_ms, a.rep_ms)


def run(args: OpsArgs, log=print, log_err=None) -> dict:
    """Run every case; return (and write) ``{"env", "ceilings", "rows"}``."""
    log_err = log_err or (lambda text: print(text, file=sys.stderr, flush=True))
    device = args.device
    s = Settings(device, args.warmup_ms, args.rep_ms)
    ceilings = measure_ceilings(device)
    log(describe_ceilings(ceilings))
    if device.type != "cuda":
        log("timings: CPU (perf_counter median of a few calls after a warm-up); not comparable with GPU figures")
    result = {"env": environment(device), "ceilings": ceilings, "rows": []}
    for op in args.ops:
        for dtype in ([torch.float32] if op == "optimizer" else args.dtypes):
            for shape in args.shapes[op]:
                log(f"{op} {shape.label} {DTYPE_NAMES[dtype]}")
                result["rows"] += run_case(op, shape, dtype, args.backends[op], s, ceilings, log, log_err)
                _write(args, result)
    return result


def _write(args: OpsArgs, result: dict) -> None:
    if args.json:
        write_json(args.json, result)
    if args.csv:
        write_csv(args.csv, COLUMNS, result["rows"])


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(args)
    rows = result["rows"]
    print()
    print(table(rows, args.device))
    print(describe_ceilings(result["ceilings"]))
    if args.plot:
        from .plot import plot_ops

        plot_ops(rows, args.plot, title=result["env"].get("gpu") or "CPU timing")
        print(f"plot: {Path(args.plot)}")
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {path}")
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:
        print(f"\n{len(failed)} row(s) FAILED the correctness check:", file=sys.stderr)
        for r in failed:
            print(f"  {r['op']} / {r['backend']} / {r['shape']} / {r['dtype']}: {r['note']}", file=sys.stderr)
        return 1
    return 0
