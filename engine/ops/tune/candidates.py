"""2. The candidates: torch, PyTorch's other ways where the installed version has them, and the
project's Triton kernels (:func:`candidates`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

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


def chunked_linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, softcap: float = 0.0):
    """``F.linear_cross_entropy`` with its chunked path: the (positions, classes) logits are never
    materialized. What the chunked path does not do (a logit soft-cap; label smoothing, which torch serves
    unchunked, with a warning per call) raises, and the candidate is rejected."""
    if softcap or label_smoothing:
        raise NotImplementedError("F.linear_cross_entropy's chunked path has no logit soft-cap or label smoothing")
    x2 = x.reshape(-1, x.shape[-1])
    return F.linear_cross_entropy(x2, weight, targets.reshape(-1), linear_bias=bias, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, options=torch.nn.LinearCrossEntropyOptions())


def torch_candidates(op: str, device: torch.device) -> list[Candidate]:
    """PyTorch's ways to serve ``op`` on ``device``, the registry's reference first."""
    found = [Candidate("torch", "torch", select.functions_for(op, "torch"))]
    if device.type != "cuda":
        return found
    if op == "attention":
        found += [Candidate(name, "torch", {"attention": _sdpa_backend(backend)})
                  for name, backend in SDPA_CANDIDATES.items()]
    if op == "cross_entropy" and hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        found.append(Candidate("torch-chunked", "torch", {"cross_entropy": reference.torch_cross_entropy,
                                                          "linear_cross_entropy": chunked_linear_cross_entropy}))
    return found


def candidates(op: str, device: torch.device, deterministic: bool) -> tuple[list[Candidate], str]:
    """Every candidate for ``op`` here, and why the Triton kernel is not among them ("" when it is)."""
    found = torch_candidates(op, device)
    if not table.triton_available(op):
        return found, table.kernels_unavailable(op)
    return found + [Candidate("triton", "triton", select.functions_for(op, "triton", deterministic))], ""
