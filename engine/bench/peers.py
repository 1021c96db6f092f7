"""The backends of a case: the registry's torch and triton, and the peers (SDPA, FlexAttention,
torch.compile, Liger-Kernel), each a forward callable over the case's inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import reference as op_reference, select as op_select, table as op_table
from .cases import Case, document_mask, rope_views
from .catalogue import LAYER_NORM_EPS, REGISTRY_BACKENDS, RMS_NORM_EPS, NotAvailable, op_bench
from .shapes import DWCONV_PADDING, SHAPE_SYNTAX
from .timing import rel_error


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
        bench = op_bench(case.op)
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
        return Runner(lambda: torch.cat(ops.rope(*rope_views(qkv, case.shape), cos, sin), dim=1), [qkv])
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
    mask = document_mask(case)
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
        rope = torch.compile(lambda qkv, cos, sin: torch.cat(op_reference.torch_rope(*rope_views(qkv, case.shape), cos, sin),
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
        # the materialized logits and their loss, for inductor to fuse
        fn, eps, n_leaves = op_reference.torch_logits_linear_cross_entropy, (), 2
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
    return Runner(lambda: torch.cat(liger_rotary_pos_emb(*rope_views(qkv, case.shape), cos2, sin2), dim=1), [qkv])


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


def _head_path_runner(case: Case, backend: str) -> Runner:
    """One of torch's two paths for the head and its loss, whichever the registry's ``torch`` takes at this
    shape: ``torch-chunked``, ``F.linear_cross_entropy``'s chunked path (torch 2.13 and later; the logits never
    in memory whole, as in the Triton kernel), or ``torch-logits``, the logits materialized. Their ``peak_mb``
    figures are the ones to compare."""
    from ..ops.tune.candidates import LINEAR_CROSS_ENTROPY_PATHS

    if backend == "torch-chunked" and not op_reference.has_chunked_linear_cross_entropy():
        raise NotAvailable(f"F.linear_cross_entropy is missing from this PyTorch ({torch.__version__})")
    path = LINEAR_CROSS_ENTROPY_PATHS[backend]
    x, weight, targets = case.inputs
    return Runner(lambda: path(x, weight, targets), [x, weight])


_PEERS = {"sdpa-flash": _sdpa_runner, "sdpa-cudnn": _sdpa_runner, "sdpa-mem_eff": _sdpa_runner,
          "flex": _flex_runner, "compile": _compile_runner, "liger": _liger_runner, "torch-chunked": _head_path_runner,
          "torch-logits": _head_path_runner}


def build_runner(case: Case, backend: str) -> Runner:
    if backend in REGISTRY_BACKENDS:
        try:
            return _registry_runner(case, backend)
        except op_table.KernelSelectionError as e:
            raise NotAvailable(str(e)) from None
    return _PEERS[backend](case, backend)


def runner_errors(case: Case, runner: Runner) -> dict[str, float]:
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
