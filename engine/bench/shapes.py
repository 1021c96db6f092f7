"""The shapes of each op's cases: one dataclass per kind, the built-in sets, and ``--shapes`` parsing.

``bench ops --help`` lists each op's spec; docs/benchmarks.md lists the default shapes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .args import BenchError
from .catalogue import bench_ops, op_bench


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
        bench = op_bench(op)
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
                chosen[op] += SHAPE_SETS[spec].get(op) or op_bench(op).shapes[spec]
                continue
            try:
                chosen[op] += parse_shape(op, spec)
            except BenchError as e:
                if len(targets) > 1:
                    raise BenchError(f"{e}; with several ops, prefix a spec with its op (e.g. "
                                     f"layer_norm=32768x768)") from None
                raise
    return {op: list(dict.fromkeys(shapes)) for op, shapes in chosen.items()}

#: Shapes whose sizes no block size divides, past one block where a kernel tiles.
ODD_SHAPES: dict[str, list] = {
    # documents of 23, 22 and 22 tokens: the Triton kernels' segment mask and, on CUDA, the torch
    # backend's FlexAttention path
    "attention": [AttentionShape(2, 3, 67, 80, causal) for causal in (True, False)]
                 + [AttentionShape(2, 3, 67, 80, True, segments=3)],
    "layer_norm": [MatrixShape(1, 1000), MatrixShape(37, 1000)],
    "rms_norm": [MatrixShape(1, 1000), MatrixShape(37, 1000)],
    "mlp": [MatrixShape(37, 24)],
    "dwconv": [ImageShape(1, 11, 5, 7)],
    "cross_entropy": [HeadShape(37, 40, 1001)],
    "optimizer": [ParamSetShape(1, 40, vocab=101, context=13, clip=True)],
    "rope": [RopeShape(2, 3, 1, 37, 18)],
    "swiglu": [MatrixShape(37, 1000)],
}
