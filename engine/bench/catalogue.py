"""The ops ``bench ops`` and ``kernels check`` cover, the backends of each, dtypes and tolerances."""
from __future__ import annotations

import torch

from ..ops import table as op_table
from .args import BenchError


#: The backends of each built-in op: the project's own two first (through the registry), then the peers. An op
#: of the registry's table with an :class:`OpBench` has the project's two.
BACKENDS: dict[str, tuple[str, ...]] = {
    "attention": ("torch", "triton", "triton-nondet", "sdpa-flash", "sdpa-cudnn", "sdpa-mem_eff", "flex"),
    "layer_norm": ("torch", "triton", "compile", "liger"),
    "rms_norm": ("torch", "triton", "compile", "liger"),
    "mlp": ("torch", "triton", "compile"),
    # torch.compile hands a convolution to cuDNN unchanged: its row would be the torch row again
    "dwconv": ("torch", "triton"),
    "cross_entropy": ("torch", "triton", "torch-chunked", "torch-logits", "compile", "liger"),
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


def op_bench(op: str) -> "OpBench":
    bench = op_table.bench_of(op)
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


class NotAvailable(Exception):
    """A backend cannot run here (not installed, no kernel yet, unsupported shape or device)."""

LAYER_NORM_EPS, RMS_NORM_EPS = 1e-5, 1e-6
