"""rope (kernels.rope) against a float64 rotation of the same values: forward, backward, position ids.

In the interpreter a tile is 64 elements, so D = 16 (8 pairs) gives BLOCK_T = 8 and T = 13 crosses a
position block with a ragged end; D = 10 has 5 pairs in a block of 8 (masked columns). At the
interpreter's stand-in SM count of 4 the kernel wants 16 programs, so a short sequence splits its heads
over programs: B = 1, T = 3, H = 11, Hkv = 9 gives 10 programs of 2 heads, one with a q and a k head.
q and k are views of a fused (B, T, H + 2 Hkv, D) projection output, as the GPT makes them.

Tolerances (elementwise ``atol + rtol * |reference|``): fp32 1e-6 (fp32 products of exact inputs);
fp16 1e-3 (one rounding to fp16, 2^-11); bf16 1e-2 (one rounding to bf16, truncated in the interpreter).
"""
import importlib

import pytest
import torch

from tritonforge.kernels.rope import rope

rope_mod = importlib.import_module("tritonforge.kernels.rope")

TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
DTYPES = list(TOL)
P = 40  # rows of the tables


def tables(d, positions=P, base=10000.0):
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def fused_qk(B, H, Hkv, T, D, dtype=torch.float32, seed=0, requires_grad=False):
    """(qkv leaf (B, T, (H + 2 Hkv) D), q, k): q and k strided views of it, as in the GPT."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=gen).to(dtype).requires_grad_(requires_grad)
    heads = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)
    q, k, _ = heads.split((H, Hkv, Hkv), dim=1)
    return qkv, q, k


def reference(x, cos, sin, position_ids=None, inverse=False):
    """Float64 rotation of pairs (x[i], x[i + D/2]) by the angle of each position."""
    T = x.shape[2]
    c, s = cos.double(), sin.double()
    c, s = (c[position_ids][:, None], s[position_ids][:, None]) if position_ids is not None else (c[:T], s[:T])
    if inverse:
        s = -s
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


SHAPES = [  # B, H, Hkv, T, D
    (1, 1, 1, 1, 2),  # one position, one pair
    (2, 4, 2, 13, 16),  # GQA, past one position block
    (1, 11, 9, 3, 8),  # 20 heads over 10 programs, one holding the last q and the first k head
    (2, 2, 1, 7, 10),  # MQA, 5 pairs in a block of 8
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_from_fused_qkv(shape, dtype):
    B, H, Hkv, T, D = shape
    _, q, k = fused_qk(B, H, Hkv, T, D, dtype)
    cos, sin = tables(D)
    qo, ko = rope(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.is_contiguous() and ko.is_contiguous()
    assert_close(qo, reference(q, cos, sin), dtype)
    assert_close(ko, reference(k, cos, sin), dtype)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_position_ids_restart_per_document(index_dtype):
    B, H, Hkv, T, D = 2, 2, 1, 13, 16
    _, q, k = fused_qk(B, H, Hkv, T, D, seed=1)
    cos, sin = tables(D)
    # Packed documents: positions restart at every document start; the second row ends at the table's end.
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4],
                        [5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8, P - 2, P - 1]], dtype=index_dtype)
    qo, ko = rope(q, k, cos, sin, position_ids=pos)
    assert_close(qo, reference(q, cos, sin, pos.long()), torch.float32)
    assert_close(ko, reference(k, cos, sin, pos.long()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_the_inverse_rotation(dtype):
    B, H, Hkv, T, D = 2, 4, 2, 13, 16
    qkv, q, k = fused_qk(B, H, Hkv, T, D, dtype, requires_grad=True)
    cos, sin = tables(D)
    pos = torch.randint(0, P, (B, T), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(2)
    dq, dk = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
    qo, ko = rope(q, k, cos, sin, position_ids=pos)
    torch.autograd.backward((qo, ko), (dq, dk))

    ref_qkv = qkv.detach().double().requires_grad_(True)
    heads = ref_qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)
    rq, rk, _ = heads.split((H, Hkv, Hkv), dim=1)
    torch.autograd.backward((reference(rq, cos, sin, pos), reference(rk, cos, sin, pos)), (dq.double(), dk.double()))
    assert_close(qkv.grad, ref_qkv.grad, dtype)
    assert ref_qkv.grad.view(B, T, H + 2 * Hkv, D)[:, :, H + Hkv:].abs().max() == 0  # v gets no gradient


def test_matches_the_torch_reference_convention():
    """Same pairs and tables as the registry's torch ``rope`` (the GPT's): interchangeable in fp32."""
    from tritonforge.engine.models.gpt import rotary_tables
    from tritonforge.engine.ops.reference import torch_rope

    B, H, Hkv, T, D = 2, 2, 2, 9, 16
    _, q, k = fused_qk(B, H, Hkv, T, D, seed=4)
    cos, sin = rotary_tables(D, P, 10000.0)
    pos = torch.randint(0, P, (B, T), generator=torch.Generator().manual_seed(5))
    for position_ids in (None, pos):
        for ours, theirs in zip(rope(q, k, cos, sin, position_ids), torch_rope(q, k, cos, sin, position_ids)):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_unit_stride_is_not_required_along_d():
    base = torch.randn(1, 2, 5, 16, 2)
    q, k = base[..., 0], base[..., 1]  # stride 2 along D: copied once
    cos, sin = tables(16)
    qo, ko = rope(q, k, cos, sin)
    assert_close(qo, reference(q, cos, sin), torch.float32)
    assert_close(ko, reference(k, cos, sin), torch.float32)


@pytest.mark.parametrize("shape", [(0, 2, 1, 5, 8), (2, 2, 1, 0, 8), (1, 0, 2, 5, 8)], ids=["B=0", "T=0", "H=0"])
def test_empty(shape):
    qkv, q, k = fused_qk(*shape, requires_grad=True)
    cos, sin = tables(shape[-1])
    qo, ko = rope(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape
    (qo.sum() + ko.sum()).backward()
    assert qkv.grad.shape == qkv.shape


def test_positions_outside_the_table_give_nan_rows_in_the_kernel():
    """The bounds check runs on CPU; the kernel itself (as on CUDA, unchecked) writes NaN there."""
    _, q, k = fused_qk(1, 1, 1, 3, 8)
    cos, sin = tables(8)
    pos = torch.tensor([[1, P, -1]])
    qo, ko = rope_mod._rope_op(q, k, cos, sin, pos, False)
    assert_close(qo[:, :, :1], reference(q[:, :, :1], cos, sin, pos[:, :1]), torch.float32)
    assert qo[:, :, 1:].isnan().all() and ko[:, :, 1:].isnan().all()


def test_torch_fallback_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(rope_mod, "use_triton", lambda t: False)
    qkv, q, k = fused_qk(2, 2, 1, 6, 8, torch.bfloat16, requires_grad=True)
    cos, sin = tables(8)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 7, 8]])
    qo, ko = rope(q, k, cos, sin, pos)
    assert_close(qo, reference(q, cos, sin, pos), torch.bfloat16)
    assert_close(ko, reference(k, cos, sin, pos), torch.bfloat16)
    (qo.float().sum() + ko.float().sum()).backward()
    expected = reference(torch.ones(q.shape), cos, sin, pos, inverse=True)
    grad_q = qkv.grad.view(2, 6, 4, 8).transpose(1, 2)[:, :2]
    assert_close(grad_q, expected, torch.bfloat16)


def test_opcheck():
    # Position ids present (the more general schema); the autograd check also runs the inverse rotation.
    qkv, q, k = fused_qk(1, 2, 1, 5, 8, requires_grad=True)
    cos, sin = tables(8)
    torch.library.opcheck(rope_mod._rope_op, (q, k, cos, sin, torch.tensor([[0, 1, 0, 1, 2]]), False))


def test_bad_inputs_name_the_argument():
    _, q, k = fused_qk(1, 2, 1, 5, 8)
    cos, sin = tables(8)
    cases = [
        ((q, k[:, :, :4], cos, sin), ValueError, r"k \(1, 1, 4, 8\) must match q .* in B, T and D"),
        ((q.double(), k.double(), cos, sin), TypeError, "q must be float32"),
        ((q, k.half(), cos, sin), TypeError, "k has dtype"),
        ((q[0], k[0], cos, sin), ValueError, r"q and k must be \(B, heads, T, D\)"),
        ((q, k, cos[:, :3], sin[:, :3]), ValueError, "cos and sin must both be"),
        ((q, k, cos[:4], sin[:4]), ValueError, "T = 5 positions but the tables hold 4"),
        ((q, k, cos, "sin"), TypeError, "sin must be a tensor"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            rope(*args)
    odd = torch.randn(1, 1, 2, 7)
    with pytest.raises(ValueError, match="D = 7 must be even"):
        rope(odd, odd, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="cos and sin are constant tables"):
        rope(q, k, cos.requires_grad_(True), sin)
    cos.requires_grad_(False)
    for pos, error, match in [(torch.zeros(1, 5), TypeError, "integer tensor"),
                              (torch.zeros(1, 4, dtype=torch.long), ValueError, r"must be \(B, T\)"),
                              (torch.tensor([[0, 1, 2, 3, P]]), ValueError, "outside the tables"),
                              (torch.tensor([[0, 1, -1, 3, 4]]), ValueError, "outside the tables")]:
        with pytest.raises(error, match=match):
            rope(q, k, cos, sin, position_ids=pos)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_llama_shape(dtype):
    B, H, Hkv, T, D = 4, 32, 8, 1024, 128
    qkv, q, k = fused_qk(B, H, Hkv, T, D, dtype, requires_grad=True)
    qkv = qkv.detach().cuda().requires_grad_(True)
    heads = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)
    q, k, _ = heads.split((H, Hkv, Hkv), dim=1)
    cos, sin = (t.cuda() for t in tables(D, 2048))
    pos = torch.randint(0, 2048, (B, T), device="cuda")
    qo, ko = rope(q, k, cos, sin, pos)
    assert_close(qo, reference(q, cos, sin, pos), dtype)
    assert_close(ko, reference(k, cos, sin, pos), dtype)
    (qo.float().sum() + ko.float().sum()).backward()
    grad_q = qkv.grad.view(B, T, H + 2 * Hkv, D).transpose(1, 2)[:, :H]
    assert_close(grad_q, reference(torch.ones(q.shape, device="cuda"), cos, sin, pos, inverse=True), dtype)


# A head stride of 2^30 elements puts head 2 at 2^31: ``head * stride`` formed in 32 bits wraps there.
# q is a view of a (virtual, mostly untouched) buffer; only the rows the kernel reads are backed.
WIDE_HEAD_STRIDE = 2**30
WIDE_HEAD_CASE = """
    import torch
    from tritonforge.kernels.rope import rope
    H, T, D, stride = 3, 2, 16, {stride}
    store = torch.empty(stride * (H - 1) + T * D, dtype=torch.float16)
    q = store.as_strided((1, H, T, D), (H * stride, stride, D, 1))
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(0)))
    k = torch.randn(1, 1, T, D, dtype=torch.float16)
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    qo, _ = rope(q, k, cos.float(), sin.float())
    x1, x2 = q.double().chunk(2, dim=-1)
    ref = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    err = (qo.double() - ref).abs().max().item()
    assert err < {tol}, err
    print("ok")
"""


def test_heads_past_2_to_the_31_elements_are_addressed_in_64_bits():
    """A head at element offset >= 2^31 of q's storage is read in place. In a subprocess: a wrapped
    offset points outside the buffer and may crash."""
    from support import run_isolated
    done = run_isolated(WIDE_HEAD_CASE.format(stride=WIDE_HEAD_STRIDE, tol=sum(TOL[torch.float16])))
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])
