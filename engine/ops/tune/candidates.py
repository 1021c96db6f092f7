"""2. The candidates: torch, PyTorch's other ways where the installed version has them, and the
project's Triton kernels (:func:`candidates`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import reference, select, table

# ---------------------------------------------------------------------------------------------------
# 2. The candidates
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One way to serve an op: its name in the table, the registry backend it counts as, its functions."""

    name: str
    backend: str
    functions: dict[str, Callable] = field(default_factory=dict, compare=False)


def _sdpa_backend(name: str) -> Callable:
    """The registry's torch attention with SDPA held to one backend (raises where that backend cannot serve
    the call: a mask flash does not take, a head dim cuDNN does not have)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)

    def attention(q, k, v, causal=True, window=None, scale=None, segment_ids=None):
        with sdpa_kernel(backend):
            return reference.dense_attention(q, k, v, causal, window, scale, segment_ids)
    return attention


#: Attention's SDPA backends, by candidate name.
SDPA_CANDIDATES = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                   "sdpa-cudnn": "CUDNN_ATTENTION"}


#: The torch head's two paths, by candidate name (``torch`` itself is the one its shape picks).
LINEAR_CROSS_ENTROPY_PATHS = {"torch-chunked": reference.torch_chunked_linear_cross_entropy,
                              "torch-logits": reference.torch_logits_linear_cross_entropy}


def torch_candidates(op: str, device: torch.device) -> list[Candidate]:
    """PyTorch's ways to serve ``op`` on ``device``, the registry's reference first."""
    found = [Candidate("torch", "torch", select.functions_for(op, "torch"))]
    if device.type != "cuda":
        return found
    if op == "attention":
        found += [Candidate(name, "torch", {"attention": _sdpa_backend(backend)})
                  for name, backend in SDPA_CANDIDATES.items()]
    if op == "cross_entropy" and reference.has_chunked_linear_cross_entropy():
        # torch's head picks one of its two paths by shape (reference.CHUNKED_CLASSES_PER_FEATURE): measure both
        found += [Candidate(name, "torch", {"cross_entropy": reference.torch_cross_entropy, "linear_cross_entropy": fn})
                  for name, fn in LINEAR_CROSS_ENTROPY_PATHS.items()]
    return found


def candidates(op: str, device: torch.device, deterministic: bool) -> tuple[list[Candidate], str]:
    """Every candidate for ``op`` here, and why the Triton kernel is not among them ("" when it is)."""
    found = torch_candidates(op, device)
    if not table.triton_available(op):
        return found, table.kernels_unavailable(op)
    return found + [Candidate("triton", "triton", select.functions_for(op, "triton", deterministic))], ""
