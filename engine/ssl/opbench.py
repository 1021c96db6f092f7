"""How ``bench ops`` and ``kernels check`` exercise the ``nt_xent`` op: the registry row's ``OpBench``.

The module itself is that object (its attributes are the ``OpBench`` fields): the registry imports it while
the benchmark package may still be importing the registry, so ``engine.bench.cases`` is imported only inside
the functions, when a benchmark runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ViewsShape:
    """N = 2B views of width D."""

    views: int
    dim: int

    @property
    def label(self) -> str:
        return f"{self.views}x{self.dim}"


#: SimCLR's temperature for CIFAR-10 in solo-learn, used by every case.
TEMPERATURE = 0.2

syntax = "NxD (N = 2B views, even, >= 4; D <= 512), e.g. 8192x128"
#: GPU: a CIFAR-10 batch of 256 images, ImageNet's 4096 (SimCLR's own), and a wide projection;
#: CPU: a ragged size that crosses the interpreter's 16-row blocks.
shapes = {"default": [ViewsShape(512, 128), ViewsShape(8192, 128), ViewsShape(8192, 256)],
          "tiny": [ViewsShape(34, 20)]}


def parse(spec: str) -> list[ViewsShape]:
    if not re.fullmatch(r"\d+x\d+", spec):
        raise ValueError(spec)
    n, d = (int(v) for v in spec.split("x"))
    if n < 4 or n % 2 or not 0 < d <= 512:
        raise ValueError(spec)
    return [ViewsShape(n, d)]


def make_case(shape: ViewsShape, dtype: torch.dtype, device: torch.device):
    from ..bench import cases as bench_cases

    z = torch.randn(shape.views, shape.dim, dtype=dtype, device=device, requires_grad=True)
    # Forward: the similarities (2·N²·D); backward: recomputed and multiplied back (4·N²·D).
    fwd = 2.0 * shape.views ** 2 * shape.dim
    return bench_cases.Case("nt_xent", shape, dtype, device, [z], torch.ones((), device=device), ("loss", "dz"),
                          {"fwd": fwd, "bwd": 2 * fwd, "fwdbwd": 3 * fwd}, "TFLOP/s")


def call(ops, case) -> torch.Tensor:
    return ops.nt_xent(case.inputs[0], TEMPERATURE)


def reference(case) -> list[torch.Tensor]:
    from ..bench import cases as bench_cases
    from ..ops.reference import torch_nt_xent

    leaves = bench_cases.upcast(case)
    return bench_cases.backward_reference(case, torch_nt_xent(leaves[0], TEMPERATURE), leaves)
