"""Fused attention (kernels.attention) against a float64 reference: output and dq, dk, dv.

On the CPU the kernels run in the Triton interpreter, where fp16 dots and fp32 dots are exact IEEE
products with fp32 accumulation, so fp32 is held to a tight tolerance. bf16 dots are wrong in the
interpreter, so bf16 (and fp32, which a GPU runs as tf32) are checked by the GPU tests only.

Gradients are checked for both backwards: ``deterministic=True`` (dK/dV and dQ kernels, no atomics)
and ``deterministic=False`` (one fused kernel that sums dQ with atomics), to the same tolerances.
"""
import contextlib
import importlib
import itertools
import inspect
import math
import os

import pytest
import torch

from tritonforge import kernels
from support import visible_pairs
from tritonforge.kernels.attention import SUPPORTED_HEAD_DIMS, aot_variants, attention, attention_varlen

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

# Max error allowed, as atol = rtol, for the output and the gradients (values are O(1)).
TOL_FP32_INTERPRETER = 2e-5  # exact fp32 dots; only accumulation order differs from float64
TOL_FP16 = 5e-3  # P and dS rounded to fp16 before their dots, as in FlashAttention
TOL_BF16 = 3e-2  # 8 mantissa bits instead of 11
TOL_TF32 = 1e-2  # fp32 inputs on a GPU: tf32 dots (10 mantissa bits)
REL_ERR_BF16 = 1e-2  # norm of the error over norm of the reference, bf16 at a large shape
TOLERANCES = {torch.float32: TOL_FP32_INTERPRETER if DEVICE == "cpu" else TOL_TF32,
              torch.float16: TOL_FP16, torch.bfloat16: TOL_BF16}

needs_compiler = pytest.mark.skipif(INTERPRET, reason="needs compiled kernels (TRITON_INTERPRET=0): "
                                                      "bf16 dots are wrong in the interpreter")


def reference(q, k, v, causal=False, scale=None, window=None, segment_ids=None):
    """float64 attention with the mask written out pair by pair."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    visible = visible_pairs(q.shape[2], causal, window, segment_ids, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def make_inputs(batch, heads, kv_heads, seqlen, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seqlen, head_dim, generator=gen)
    do = torch.randn(batch, heads, seqlen, head_dim, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def check_against_reference(q, k, v, do, tol, deterministic=True, **kwargs):
    """Run attention forward and backward on leaf copies of q, k, v; compare with float64."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, deterministic=deterministic, **kwargs)
    out.backward(do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_leaves, **kwargs)
    ref.backward(do.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, msg="out")
    for name, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=tol, rtol=tol, msg=name)


# (batch, heads, kv_heads, seqlen, head_dim, dtype, kwargs). The interpreter runs 32 x 16 forward
# tiles, so S = 77 and 130 cross several query and key blocks, diagonals and ragged ends.
CASES = [
    (1, 1, 1, 1, 16, torch.float32, {}),
    (1, 1, 1, 1, 128, torch.float16, {"causal": True}),
    (1, 2, 2, 17, 16, torch.float16, {"causal": True}),
    (2, 2, 2, 77, 64, torch.float16, {}),
    (1, 2, 2, 77, 64, torch.float32, {"causal": True}),
    (1, 2, 2, 130, 80, torch.float16, {"causal": True}),
    (1, 1, 1, 130, 128, torch.float16, {}),
    (1, 1, 1, 33, 96, torch.float32, {"causal": True}),
    (1, 1, 1, 40, 256, torch.float16, {}),
    (1, 4, 2, 77, 32, torch.float16, {"causal": True}),
    (1, 4, 1, 130, 16, torch.float32, {}),
    (1, 4, 2, 130, 64, torch.float32, {"causal": True, "window": 5}),
    (1, 2, 1, 130, 16, torch.float16, {"causal": True, "window": 40}),
    (1, 2, 2, 130, 64, torch.float32, {"window": 20}),
    (1, 2, 2, 50, 64, torch.float32, {"causal": True, "scale": 0.3}),
]
# Both backwards: no atomics (the default), and dQ summed with atomics in the fused dK/dV/dQ kernel.
BACKWARDS = pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic-dq"])


@BACKWARDS
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen,head_dim,dtype,kwargs", CASES,
                         ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_matches_float64_reference(batch, heads, kv_heads, seqlen, head_dim, dtype, kwargs, deterministic):
    q, k, v, do = make_inputs(batch, heads, kv_heads, seqlen, head_dim, dtype)
    check_against_reference(q, k, v, do, TOLERANCES[dtype], deterministic=deterministic, **kwargs)


@BACKWARDS
def test_fused_qkv_views_and_strided_grad(deterministic):
    """q, k, v as views of one (B, S, 3 * H * D) projection; dO non-contiguous as a model passes it."""
    batch, heads, seqlen, head_dim = 2, 2, 45, 32
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(batch, seqlen, 3 * heads * head_dim, generator=gen).to(DEVICE, torch.float16)
    qkv.requires_grad_()
    q, k, v = qkv.view(batch, seqlen, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = attention(q, k, v, causal=True, deterministic=deterministic)
    dy = torch.randn(batch, seqlen, heads * head_dim, generator=gen).to(DEVICE, torch.float16)
    out.transpose(1, 2).reshape(batch, seqlen, heads * head_dim).backward(dy)

    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.view(batch, seqlen, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    ref = reference(rq, rk, rv, causal=True)
    ref.transpose(1, 2).reshape(batch, seqlen, heads * head_dim).backward(dy.double())
    torch.testing.assert_close(out.double(), ref, atol=TOL_FP16, rtol=TOL_FP16)
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, atol=TOL_FP16, rtol=TOL_FP16)


@BACKWARDS
def test_gqa_views_of_one_projection(deterministic):
    """Grouped-query heads split from one (B, S, (H + 2 Hkv) * D) projection and transposed."""
    batch, heads, kv_heads, seqlen, head_dim = 1, 4, 2, 40, 16
    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(batch, seqlen, heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE)
    q, k, v = (t.transpose(1, 2) for t in proj.split([heads, kv_heads, kv_heads], dim=2))
    do = torch.randn(batch, heads, seqlen, head_dim, generator=gen).to(DEVICE)
    check_against_reference(q, k, v, do, TOLERANCES[torch.float32], deterministic, causal=True, window=9)


def test_non_unit_last_strides_and_broadcast_grad():
    """A last dim with stride 2, and the stride-0 gradient that ``out.sum().backward()`` produces."""
    q, k, v, _ = make_inputs(1, 2, 2, 21, 16, torch.float32, seed=11)
    q_pairs = torch.stack([q, torch.zeros_like(q)], dim=-1).requires_grad_()
    k_leaf, v_leaf = k.clone().requires_grad_(), v.clone().requires_grad_()
    q_strided = q_pairs[..., 0]
    assert q_strided.stride(-1) == 2
    attention(q_strided, k_leaf, v_leaf, causal=True).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference(*ref_leaves, causal=True).sum().backward()
    tol = TOLERANCES[torch.float32]
    for grad, ref_leaf in zip((q_pairs.grad[..., 0], k_leaf.grad, v_leaf.grad), ref_leaves):
        torch.testing.assert_close(grad.double(), ref_leaf.grad, atol=tol, rtol=tol)
    assert torch.count_nonzero(q_pairs.grad[..., 1]) == 0


def test_gradients_are_bitwise_reproducible():
    q, k, v, do = make_inputs(1, 4, 2, 77, 16, torch.float16, seed=3)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, causal=True, window=30, deterministic=True).backward(do)
        return [leaf.grad for leaf in leaves]

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the two dK/dV launches may tune to different "
                                            "tiles, which changes the summation order")
def test_atomic_dq_backward_computes_dk_dv_as_the_deterministic_one():
    """The fused kernel is the dK/dV kernel plus the dQ atomics: with the same tiles (the interpreter
    runs one config for both) dk and dv are bitwise those of the deterministic backward. dq is summed
    in another order (by key block rather than per query block), so it only agrees to rounding."""
    module = importlib.import_module("tritonforge.kernels.attention")
    assert module._INTERPRETER_CONFIGS["dkdv"] == module._INTERPRETER_CONFIGS["dkdvdq"]
    q, k, v, do = make_inputs(1, 4, 2, 77, 80, torch.float16, seed=12)

    def grads(deterministic):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, causal=True, window=40, deterministic=deterministic).backward(do)
        return [leaf.grad for leaf in leaves]

    (dq, dk, dv), (dq_atomic, dk_atomic, dv_atomic) = grads(True), grads(False)
    assert torch.equal(dk, dk_atomic) and torch.equal(dv, dv_atomic)
    torch.testing.assert_close(dq_atomic, dq, atol=TOL_FP16, rtol=TOL_FP16)


def test_window_of_one_returns_values_and_large_window_is_no_window():
    q, k, v, _ = make_inputs(1, 2, 1, 37, 16, torch.float32, seed=4)
    # each query sees only its own key: softmax weight 1 on it
    torch.testing.assert_close(attention(q, k, v, causal=True, window=1), v.expand_as(q), atol=0, rtol=0)
    assert torch.equal(attention(q, k, v, causal=True, window=37 + 5), attention(q, k, v, causal=True))


@BACKWARDS
@pytest.mark.parametrize("shape", [(0, 2, 8, 16), (1, 2, 0, 16)], ids=["batch0", "seq0"])
def test_empty_inputs(shape, deterministic):
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, causal=True, deterministic=deterministic)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape and k.grad.shape == shape


def _qkv(q_shape=(1, 2, 8, 16), kv_shape=None, dtype=torch.float16):
    kv_shape = q_shape if kv_shape is None else kv_shape
    return torch.zeros(q_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)


@pytest.mark.parametrize("args,kwargs,error,match", [
    (_qkv((2, 8, 16)), {}, ValueError, "q must have 4 dimensions"),
    ((*_qkv()[:2], torch.zeros(1, 2, 8)), {}, ValueError, "v must have 4 dimensions"),
    (_qkv(dtype=torch.float64), {}, TypeError, "q has dtype torch.float64"),
    ((*_qkv()[:2], torch.zeros(1, 2, 8, 16, dtype=torch.float32)), {}, TypeError, "v has dtype"),
    (_qkv((1, 2, 8, 48)), {}, ValueError, "head dim D=48"),
    (_qkv((1, 3, 8, 16), (1, 2, 8, 16)), {}, ValueError, "H=3 must be a multiple of k/v heads Hkv=2"),
    (_qkv((1, 2, 8, 16), (1, 2, 9, 16)), {}, ValueError, "k/v shape"),
    ((*_qkv()[:2], torch.zeros(1, 1, 8, 16, dtype=torch.float16)), {}, ValueError, "k and v must have the same shape"),
    ((torch.zeros(1, 2, 8, 16).tolist(), *_qkv()[1:]), {}, TypeError, "q must be a torch.Tensor"),
    (_qkv(), {"window": 0}, ValueError, "window must be >= 1"),
    (_qkv(), {"window": 2.0}, TypeError, "window must be an int"),
    (_qkv(), {"window": True}, TypeError, "window must be an int"),
    (_qkv(), {"scale": -1.0}, ValueError, "scale must be a positive finite number"),
    (_qkv(), {"scale": float("nan")}, ValueError, "scale must be a positive finite number"),
    (_qkv(), {"causal": 1}, TypeError, "causal must be a bool"),
    (_qkv(), {"deterministic": 0}, TypeError, "deterministic must be a bool, got int"),
    (_qkv(), {"deterministic": None}, TypeError, "deterministic must be a bool, got NoneType"),
])
def test_invalid_inputs_raise_naming_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*args, **kwargs)


@BACKWARDS
def test_custom_ops_pass_opcheck(deterministic):
    q, k, v, do = make_inputs(1, 2, 1, 17, 16, torch.float32, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # the forward's opcheck also runs the autograd registration, hence the backward the flag selects
    torch.library.opcheck(torch.ops.tritonforge.attention_forward.default,
                          (q, k, v, True, 0.25, 0, deterministic))
    with torch.no_grad():
        out, lse = torch.ops.tritonforge.attention_forward(q, k, v, True, 0.25, 0, deterministic)
    torch.library.opcheck(torch.ops.tritonforge.attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25, 0, deterministic))


@BACKWARDS
def test_torch_compile_fullgraph_forward_and_backward(deterministic):
    q, k, v, do = make_inputs(1, 2, 2, 24, 16, torch.float32, seed=6)

    def loss(q, k, v):
        return (attention(q, k, v, causal=True, window=7, deterministic=deterministic) * do).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).backward()
    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    loss(*eager_leaves).backward()
    for name, leaf, eager in zip(("dq", "dk", "dv"), leaves, eager_leaves):
        if deterministic or name != "dq":
            assert torch.equal(leaf.grad, eager.grad), name
        else:  # dq's atomic sum may run in another order
            tol = TOLERANCES[torch.float32]
            torch.testing.assert_close(leaf.grad, eager.grad, atol=tol, rtol=tol)


@BACKWARDS
@pytest.mark.skipif(DEVICE != "cpu", reason="the torch path serves CPU tensors only")
def test_cpu_torch_path_matches_kernels(monkeypatch, deterministic):
    """Outside the interpreter, CPU tensors take a torch path: same out, lse and gradients. The torch
    path's backward is exact, whichever backward ``deterministic`` asks the kernels for."""
    module = importlib.import_module("tritonforge.kernels.attention")
    q, k, v, do = make_inputs(1, 4, 2, 40, 16, torch.float32, seed=10)
    args = (q, k, v, True, 0.25, 9, deterministic)
    kernel_out, kernel_lse = torch.ops.tritonforge.attention_forward(*args)
    kernel_grads = torch.ops.tritonforge.attention_backward(do, q, k, v, kernel_out, kernel_lse, *args[3:])
    monkeypatch.setattr(module, "use_triton", lambda t: t.is_cuda)  # the interpreter off
    torch_out, torch_lse = torch.ops.tritonforge.attention_forward(*args)
    torch_grads = torch.ops.tritonforge.attention_backward(do, q, k, v, torch_out, torch_lse, *args[3:])
    tol = TOL_FP32_INTERPRETER
    torch.testing.assert_close(torch_out, kernel_out, atol=tol, rtol=tol)
    torch.testing.assert_close(torch_lse, kernel_lse, atol=tol, rtol=tol)
    for torch_grad, kernel_grad in zip(torch_grads, kernel_grads):
        torch.testing.assert_close(torch_grad, kernel_grad, atol=tol, rtol=tol)


def test_public_api_and_aot_variants_match_the_kernels():
    assert kernels.attention is attention
    assert list(inspect.signature(attention).parameters) == [
        "q", "k", "v", "causal", "scale", "window", "deterministic", "segment_ids"]
    assert kernels.attention_varlen is attention_varlen
    variants = aot_variants()
    names = {v.kernel.fn.__name__ if hasattr(v.kernel, "fn") else v.kernel.__name__ for v in variants}
    assert names == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    # the dK/dV kernel is listed with and without the dQ atomics, for every tile width and dtype
    dkdv = [v for v in variants if v.kernel.fn.__name__ == "_attn_bwd_dkdv"]
    assert {(v.signature["Q"], v.constexprs["BLOCK_D"], v.constexprs["ATOMIC_DQ"]) for v in dkdv} == {
        (f"*{ty}", 1 << (d - 1).bit_length(), atomic)
        for ty in ("fp16", "bf16", "fp32") for d in SUPPORTED_HEAD_DIMS for atomic in (False, True)}
    # every dot kernel's config is listed with and without the segment mask, everything else alike
    dot = [v for v in variants if "SEGMENTS" in v.constexprs]
    assert {v.kernel.fn.__name__ for v in dot} == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}

    def launch(v):  # what a launch fixes besides the tiles
        return (v.kernel.fn.__name__, tuple(v.signature.items()),
                tuple((k, c) for k, c in v.constexprs.items() if k not in ("SEGMENTS", "BLOCK_M", "BLOCK_N")))
    assert ({launch(v) for v in dot if not v.constexprs["SEGMENTS"]}
            == {launch(v) for v in dot if v.constexprs["SEGMENTS"]})
    for variant in variants:
        params = list(inspect.signature(variant.kernel.fn).parameters)
        assert list(variant.signature) + list(variant.constexprs) == params, variant.name
        assert set(variant.aligned) <= set(variant.signature), variant.name
    for head_dim in SUPPORTED_HEAD_DIMS:
        block_d = 1 << (head_dim - 1).bit_length()
        assert any(v.constexprs.get("BLOCK_D") == block_d for v in variants), head_dim


# ----------------------------------------------------------------------------------------------------
# Segment-masked attention (packed documents) and the varlen entry point
# ----------------------------------------------------------------------------------------------------


def segments(*lengths_per_row):
    """(B, S) int64 ids: row b is documents of the given lengths, numbered from 0."""
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            for lengths in lengths_per_row]
    return torch.stack(rows).to(DEVICE)


# (batch, heads, kv_heads, head_dim, dtype, kwargs, document lengths per batch row). Interpreter tiles
# are 32 x 16 (forward, dQ) and 32 keys x 16 queries (dK/dV), so these documents start and end inside
# blocks, span several blocks, and sit beside one-token documents.
SEGMENT_CASES = [
    (1, 2, 2, 16, torch.float16, {"causal": True}, [[5, 3, 20, 1, 30, 18]]),
    (1, 2, 1, 32, torch.float32, {}, [[37, 29, 30]]),
    (2, 2, 1, 16, torch.float32, {"causal": True, "window": 12}, [[10, 47, 1], [33, 25]]),
    (1, 2, 2, 16, torch.float16, {"window": 9}, [[1, 40, 24]]),
]


@BACKWARDS
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,dtype,kwargs,lengths", SEGMENT_CASES,
                         ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_segments_match_float64_reference(batch, heads, kv_heads, head_dim, dtype, kwargs, lengths,
                                          deterministic):
    ids = segments(*lengths)
    q, k, v, do = make_inputs(batch, heads, kv_heads, ids.shape[1], head_dim, dtype, seed=13)
    check_against_reference(q, k, v, do, TOLERANCES[dtype], deterministic, segment_ids=ids, **kwargs)


@BACKWARDS
def test_one_segment_is_bitwise_the_unsegmented_result(deterministic):
    q, k, v, do = make_inputs(1, 2, 1, 50, 16, torch.float16, seed=14)

    def run(segment_ids):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, causal=True, window=30, deterministic=deterministic,
                        segment_ids=segment_ids)
        out.backward(do)
        return [out] + [leaf.grad for leaf in leaves]

    for name, plain, segmented in zip(("out", "dq", "dk", "dv"), run(None),
                                      run(torch.full((1, 50), 7, device=DEVICE))):
        assert torch.equal(plain, segmented), name


def test_recurring_ids_are_masked_exactly():
    """An id that comes back after another document (not produced by packing) still sees all of its
    positions, in both runs; int32 ids beyond any block count are renumbered, not truncated."""
    ids = torch.tensor([[3] * 10 + [2**40] * 25 + [3] * 15 + [-1] * 20 + [2**40] * 13], device=DEVICE)
    q, k, v, do = make_inputs(1, 2, 1, ids.shape[1], 16, torch.float32, seed=15)
    check_against_reference(q, k, v, do, TOLERANCES[torch.float32], segment_ids=ids)


@BACKWARDS
def test_key_blocks_of_other_documents_are_never_read(deterministic):
    """NaN in every tensor for the tokens 96-127 of the last document. Tokens 0-63 hold two documents
    (40 and 24 tokens, the boundary inside a block) whose query and key blocks (32 rows in the
    interpreter) see only keys and queries below 64: their outputs and gradients stay finite and
    exact only if the blocks of the last document are skipped, not loaded and masked."""
    ids = segments([40, 24, 64])
    q, k, v, do = make_inputs(1, 2, 2, 128, 16, torch.float32, seed=16)
    for t in (q, k, v, do):
        t[:, :, 96:] = float("nan")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, segment_ids=ids, deterministic=deterministic)
    out.backward(do)
    ref_leaves = [t[:, :, :64].detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_leaves, segment_ids=ids[:, :64])
    ref.backward(do[:, :, :64].double())
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out[:, :, :64].double(), ref, atol=tol, rtol=tol)
    for name, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad[:, :, :64].double(), ref_leaf.grad, atol=tol, rtol=tol, msg=name)


def test_varlen_matches_each_sequence_alone():
    """(T, H, D) tokens of three sequences, one of a single token; GQA; against the reference run on
    each sequence on its own. q, k, v are views of one fused (T, H + 2 Hkv, D) projection."""
    cu_seqlens = torch.tensor([0, 23, 24, 70], device=DEVICE, dtype=torch.int32)
    heads, kv_heads, head_dim = 4, 2, 16
    gen = torch.Generator().manual_seed(17)
    proj = torch.randn(70, heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE, torch.float16)
    proj.requires_grad_()
    q, k, v = proj.split([heads, kv_heads, kv_heads], dim=1)
    do = torch.randn(70, heads, head_dim, generator=gen).to(DEVICE, torch.float16)
    out = attention_varlen(q, k, v, cu_seqlens, max_seqlen=46, causal=True)
    assert out.shape == (70, heads, head_dim) and out.dtype == torch.float16
    out.backward(do)
    ref_proj = proj.detach().double().requires_grad_()
    rq, rk, rv = (t.transpose(0, 1)[None] for t in ref_proj.split([heads, kv_heads, kv_heads], dim=1))
    bounds = cu_seqlens.tolist()
    ref = torch.cat([reference(rq[:, :, a:b], rk[:, :, a:b], rv[:, :, a:b], causal=True)
                     for a, b in zip(bounds, bounds[1:])], dim=2)[0].transpose(0, 1)
    ref.backward(do.double())
    torch.testing.assert_close(out.double(), ref, atol=TOL_FP16, rtol=TOL_FP16)
    torch.testing.assert_close(proj.grad.double(), ref_proj.grad, atol=TOL_FP16, rtol=TOL_FP16)


@pytest.mark.parametrize("segment_ids,error,match", [
    (torch.zeros(1, 7, dtype=torch.int64), ValueError, r"segment_ids must have shape \(B, S\) = \(1, 8\)"),
    (torch.zeros(8, dtype=torch.int64), ValueError, "segment_ids must have shape"),
    (torch.zeros(1, 8), TypeError, "segment_ids must have an integer dtype, got torch.float32"),
    (torch.zeros(1, 8, dtype=torch.bool), TypeError, "segment_ids must have an integer dtype"),
    ([[0] * 8], TypeError, "segment_ids must be a torch.Tensor or None, got list"),
])
def test_invalid_segment_ids_raise(segment_ids, error, match):
    with pytest.raises(error, match=match):
        attention(*_qkv(), segment_ids=segment_ids)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((*_qkv((8, 2, 16))[:2], torch.zeros(1, 8, 2, 16), torch.tensor([0, 8])), {}, ValueError,
     "v must have 3 dimensions"),
    ((*_qkv((8, 2, 16)), [0, 8]), {}, TypeError, "cu_seqlens must be a torch.Tensor"),
    ((*_qkv((8, 2, 16)), torch.tensor([8])), {}, ValueError, "cu_seqlens must have shape"),
    ((*_qkv((8, 2, 16)), torch.tensor([0.0, 8.0])), {}, TypeError, "cu_seqlens must have an integer dtype"),
    ((*_qkv((8, 2, 16)), torch.tensor([0, 8])), {"max_seqlen": 0}, ValueError, "max_seqlen must be"),
    ((*_qkv((8, 2, 16), (8, 3, 16)), torch.tensor([0, 8])), {}, ValueError, "H=2 must be a multiple"),
])
def test_invalid_varlen_inputs_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention_varlen(*args, **kwargs)


def test_segment_custom_ops_pass_opcheck_and_match_the_torch_path(monkeypatch):
    """opcheck with segment ids; outside the interpreter CPU tensors take the torch path (SDPA-style
    boolean mask), which must agree with the kernels."""
    module = importlib.import_module("tritonforge.kernels.attention")
    q, k, v, do = make_inputs(1, 2, 1, 21, 16, torch.float32, seed=18)
    ids = segments([11, 1, 9])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, True, 0.25, 0, True, ids)
    torch.library.opcheck(torch.ops.tritonforge.attention_forward.default, args)
    with torch.no_grad():
        out, lse = torch.ops.tritonforge.attention_forward(*args)
        grads = torch.ops.tritonforge.attention_backward(do, q, k, v, out, lse, *args[3:])
    if DEVICE != "cpu":
        return
    monkeypatch.setattr(module, "use_triton", lambda t: t.is_cuda)  # the interpreter off
    with torch.no_grad():
        torch_out, torch_lse = torch.ops.tritonforge.attention_forward(*args)
        torch_grads = torch.ops.tritonforge.attention_backward(do, q, k, v, torch_out, torch_lse, *args[3:])
    tol = TOL_FP32_INTERPRETER
    for actual, expected in zip((torch_out, torch_lse, *torch_grads), (out, lse, *grads)):
        torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------------
# GPU: bf16 (tensor cores), tf32 for fp32 inputs, shapes past the GPU tile sizes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_compiler
@BACKWARDS
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"causal": True, "window": 100}, {"window": 64}],
                         ids=["full", "causal", "causal-window", "window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_matches_float64_reference(head_dim, kwargs, dtype, deterministic):
    q, k, v, do = make_inputs(2, 4, 2, 333, head_dim, dtype, seed=7)
    check_against_reference(q, k, v, do, TOLERANCES[dtype], deterministic, **kwargs)


@pytest.mark.gpu
@needs_compiler
def test_gpu_gradients_are_bitwise_reproducible():
    q, k, v, do = make_inputs(2, 8, 2, 1000, 128, torch.bfloat16, seed=8)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, causal=True, deterministic=True).backward(do)
        return [leaf.grad for leaf in leaves]

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


@pytest.mark.gpu
@needs_compiler
@BACKWARDS
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_benchmark_shape_matches_sdpa(causal, deterministic):
    """bf16 at a benchmark shape (D = 128, S = 4096) against SDPA in fp32."""
    q, k, v, do = make_inputs(1, 4, 4, 4096, 128, torch.bfloat16, seed=9)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=causal, deterministic=deterministic)
    out.backward(do)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, is_causal=causal)
    ref.backward(do.float())
    for name, actual, expected in [("out", out, ref)] + [
            (name, leaf.grad, ref_leaf.grad) for name, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves)]:
        relative_error = (actual.float() - expected).norm() / expected.norm()
        assert relative_error < REL_ERR_BF16, (name, relative_error.item())


# A row stride of 2^29 elements puts row 4 at 2^31: an index times a stride formed in 32 bits wraps
# there. q, k, v and dO are views of one (virtual, mostly untouched) buffer, as of a fused projection
# whose rows are that wide; only the rows the kernels read are ever backed by memory.
WIDE_ROW_STRIDE = 2**29
WIDE_ROWS = 5
WIDE_CASE = """
    import math, torch
    from tritonforge.kernels.attention import attention, attention_varlen
    S, D, stride = {rows}, 16, {stride}
    store = torch.empty(stride * (S - 1) + 4 * D, dtype=torch.float16)
    views = [store.as_strided((1, 1, S, D), (4 * D, D, stride, 1), i * D) for i in range(4)]
    gen = torch.Generator().manual_seed(0)
    for t in views:
        t.copy_(torch.randn(t.shape, generator=gen))
    q, k, v, do = views
    gathered = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    scores = gathered[0] @ gathered[1].transpose(-1, -2) / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    ref = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ gathered[2]
    ref.backward(do.double())
    for leaf in (q, k, v):
        leaf.requires_grad_()
    if {varlen}:  # (T, H, D) tokens: the same rows, one sequence
        out = attention_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), torch.tensor([0, S]),
                               causal=True).transpose(0, 1)[None]
    else:
        out = attention(q, k, v, causal=True, deterministic={deterministic})
    out.backward(do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                               (ref, *(t.grad for t in gathered))):
        err = (got.double() - want).abs().max().item()
        assert err < {tol}, (name, err)
    print("ok")
"""


@pytest.mark.parametrize("variant", ["deterministic", "atomic dq", "varlen"])
def test_rows_past_2_to_the_31_elements_are_addressed_in_64_bits(variant):
    """Forward, dK/dV and dQ (both backwards, and the varlen layout) read rows at element offsets
    >= 2^31 in place. In a subprocess: a wrapped offset points outside the buffer and may crash."""
    from support import run_isolated
    script = WIDE_CASE.format(rows=WIDE_ROWS, stride=WIDE_ROW_STRIDE, tol=TOL_FP16,
                              deterministic=variant != "atomic dq", varlen=variant == "varlen")
    done = run_isolated(script)
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])


@contextlib.contextmanager
def allowing_tf32(allow: bool):
    """torch's own switch for TF32 in fp32 matmuls, set within."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def tuner_calls(monkeypatch):
    """The autotune key of every launch through an autotuner, which may benchmark (here: at random)."""
    from triton.runtime.autotuner import Autotuner
    calls, run = [], Autotuner.run

    def record(self, *args, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        calls.append((self.base_fn.__name__, tuple(named.get(name) for name in self.keys)))
        return run(self, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(Autotuner, "run", record)
    monkeypatch.setattr(Autotuner, "_bench", lambda self, *a, **k: [torch.rand(1, generator=gen).item()] * 3)
    return calls


@pytest.fixture
def launched(monkeypatch):
    """(kernel name, meta-parameters) of every attention launch, run as usual."""
    common = importlib.import_module("tritonforge.kernels._common")
    records, launch_on = [], common._launch_on

    def record(device, kernel, grid, args, meta):
        records.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, meta))
        launch_on(device, kernel, grid, args, meta)

    monkeypatch.setattr(common, "_launch_on", record)
    return records


def _forward_backward(seqlen, dtype=torch.float16, deterministic=True, **kwargs):
    q, k, v, do = make_inputs(1, 2, 1, seqlen, 16, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    attention(*leaves, deterministic=deterministic, **kwargs).backward(do)


def test_deterministic_launches_never_consult_the_autotuner(tuner_calls, launched):
    """With deterministic=True the tiles are chosen by rule, not by timing: no autotuner runs (its
    benchmark returns random times here), and each kernel runs the rule's config."""
    attn = importlib.import_module("tritonforge.kernels.attention")
    for seqlen in (9, 40):
        _forward_backward(seqlen, causal=True)
        _forward_backward(seqlen, segment_ids=torch.tensor([[0] * 5 + [1] * (seqlen - 5)]))
    assert tuner_calls == []
    for name, meta in launched:
        kernel = {"_attn_fwd": "fwd", "_attn_bwd_dkdv": "dkdv", "_attn_bwd_dq": "dq"}.get(name)
        if kernel is not None:
            config = attn._rule_config(kernel, 16, torch.float16, meta["SEGMENTS"])
            assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]) == config


def test_the_deterministic_rule_is_the_first_listed_gpu_config(monkeypatch):
    attn = importlib.import_module("tritonforge.kernels.attention")
    monkeypatch.setattr(attn, "INTERPRET", False)
    for kernel in ("fwd", "dkdv", "dq"):
        for block_d, dtype, segments in itertools.product((16, 64, 128, 256), attn._SUPPORTED_DTYPES,
                                                           (False, True)):
            rule = attn._rule_config(kernel, block_d, dtype, segments)
            assert rule == attn._configs_for(kernel, block_d, dtype, segments)[0]


def test_autotune_keys_bucket_sequence_lengths(tuner_calls):
    """The non-deterministic path autotunes, keyed on the next power of two of the sequence length
    (total tokens for varlen) and the band's kind, so growing lengths re-tune once per octave."""
    def keys(seqlen, **kwargs):
        tuner_calls.clear()
        _forward_backward(seqlen, deterministic=False, **kwargs)
        return sorted(tuner_calls)

    assert keys(33, causal=True) == keys(47, causal=True) == keys(64, causal=True) != keys(65, causal=True)
    assert keys(40, causal=True, window=8) == keys(50, causal=True, window=7) != keys(50, causal=True)
    assert keys(40) != keys(40, causal=True)

    def varlen_keys(cu_seqlens):
        tuner_calls.clear()
        q, k, v, _ = (t[0].transpose(0, 1) for t in make_inputs(1, 2, 1, cu_seqlens[-1], 16, torch.float16))
        attention_varlen(q, k, v, torch.tensor(cu_seqlens), causal=True, deterministic=False)
        return sorted(tuner_calls)

    assert varlen_keys([0, 20, 45]) == varlen_keys([0, 7, 30, 60])


class DictStore:
    """A configuration store in a dict, counting what it is asked."""

    def __init__(self):
        self.entries, self.gets, self.puts = {}, [], []

    def get(self, kernel, key):
        self.gets.append(kernel)
        return self.entries.get((kernel, tuple(sorted(key.items()))))

    def put(self, kernel, key, config):
        self.puts.append(kernel)
        self.entries[(kernel, tuple(sorted(key.items())))] = config


@pytest.fixture
def store():
    common = importlib.import_module("tritonforge.kernels._common")
    kept = DictStore()
    previous = common.set_config_store(kept)
    yield kept
    common.set_config_store(previous)


def test_a_kept_configuration_is_launched_without_the_autotuner(store, tuner_calls, launched):
    """deterministic=False: the first process autotunes and gives the store its choice; a process that finds
    it there launches it straight away, the same tiles, the same bits."""
    torch.manual_seed(0)
    q, k, v, do = make_inputs(1, 2, 1, 40, 16, torch.float16)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, causal=True, deterministic=False)
        out.backward(do)
        return [out] + [t.grad for t in leaves]

    first = grads()
    assert len(tuner_calls) == 2, tuner_calls  # the forward and the fused backward
    assert sorted(store.puts) == ["attention.dkdvdq", "attention.fwd"]
    (fwd_key, fwd_config), = [(key, c) for (kernel, key), c in store.entries.items() if kernel == "attention.fwd"]
    assert dict(fwd_key) == {"tune_seqlen": 64, "tune_band": 1, "block_d": 16, "segments": False,
                             "dot_precision": "tf32", "dtype": "fp16"}
    assert set(fwd_config) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    tuner_calls.clear(), launched.clear()
    again = grads()
    assert tuner_calls == [] and len(store.puts) == 2
    fwd_launch = next(meta for name, meta in launched if name == "_attn_fwd")
    assert {name: fwd_launch[name] for name in fwd_config} == fwd_config
    assert all(torch.equal(a, b) for a, b in zip(first[:1], again[:1]))  # the forward: same tiles, same bits


def test_a_kept_configuration_this_launch_may_not_use_is_tuned_again(store, tuner_calls):
    _forward_backward(20, deterministic=False)
    for key in list(store.entries):
        store.entries[key] = {"BLOCK_M": 7, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}  # not a listed tile
    tuner_calls.clear()
    _forward_backward(20, deterministic=False)
    assert len(tuner_calls) == 2 and len(store.puts) == 4
    assert all(c["BLOCK_M"] != 7 for c in store.entries.values())  # overwritten by the autotuner's choice


def test_a_failing_store_warns_and_the_launch_autotunes(tuner_calls):
    common = importlib.import_module("tritonforge.kernels._common")

    class Broken:
        def get(self, kernel, key):
            raise OSError("disk gone")

        def put(self, kernel, key, config):
            raise OSError("disk gone")

    previous = common.set_config_store(Broken())
    try:
        with pytest.warns(RuntimeWarning, match="attention.fwd: the configuration store failed.*disk gone"):
            _forward_backward(20, deterministic=False)
    finally:
        common.set_config_store(previous)
    assert len(tuner_calls) == 2


def test_deterministic_launches_never_consult_the_store(store):
    _forward_backward(20, deterministic=True)
    assert store.gets == [] and store.puts == []


@pytest.mark.parametrize("dtype, allow_tf32, expected", [(torch.float32, False, "ieee"),
                                                         (torch.float32, True, "tf32"),
                                                         (torch.float16, False, "tf32")])
@pytest.mark.parametrize("deterministic", [True, False])
def test_fp32_dots_follow_torchs_tf32_setting(launched, dtype, allow_tf32, expected, deterministic):
    """fp32 dots are IEEE unless torch's matmuls may use TF32; 16-bit dots keep Triton's default."""
    with allowing_tf32(allow_tf32):
        _forward_backward(20, dtype=dtype, deterministic=deterministic)
    dot_launches = [meta for name, meta in launched if name != "_attn_bwd_preprocess"]
    assert len(dot_launches) >= 2 and {meta["DOT_PRECISION"] for meta in dot_launches} == {expected}


def test_row_offsets_are_64_bit_only_where_they_may_pass_2_to_the_31(launched):
    """The 64-bit row offsets cost registers: ordinary shapes launch the 32-bit form; a fused QKV view
    of (H + 2 Hkv) D = 12,288 columns switches from S = 174,763 on (rows * 12,288 >= 2^31)."""
    attn = importlib.import_module("tritonforge.kernels.attention")
    _forward_backward(20)
    assert launched and not any(meta["WIDE_ROWS"] for _, meta in launched)
    fused = torch.empty(2, 12288).as_strided((1, 1, 2, 16), (0, 0, 12288, 1))
    assert attn._wide_rows(174_763, fused) and not attn._wide_rows(170_000, fused)


@pytest.mark.parametrize("deterministic", [True, False])
def test_heads_folded_onto_grid_axis_0_give_the_same_bits(monkeypatch, launched, deterministic):
    """Past CUDA's 65,535 programs on axis 1, B * H joins the blocks on axis 0: forced here at 1."""
    attn = importlib.import_module("tritonforge.kernels.attention")
    q, k, v, do = make_inputs(2, 2, 1, 40, 16, torch.float16)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, causal=True, deterministic=deterministic)
        out.backward(do)
        return [out, *(t.grad for t in leaves)]

    plain = grads()
    assert not any(meta["FOLD_HEADS"] for _, meta in launched)
    monkeypatch.setattr(attn, "_MAX_GRID_HEADS", 1)
    folded = grads()
    assert all(meta["FOLD_HEADS"] for _, meta in launched[len(launched) // 2:])
    for a, b in zip(plain, folded):
        assert torch.equal(a, b)
