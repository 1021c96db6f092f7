"""swiglu (kernels.swiglu) against float64 ``silu(gate) * up`` and its autograd gradient.

In the interpreter a program covers up to 32 output columns and 128 elements, so F in {1, 7, 33} covers
a single column, a ragged block and two column blocks; 9 rows of F = 32 are three row blocks of 4.
h comes as the GPT makes it (a contiguous (..., 2F) projection output) and as strided views: a slice of
a wider row (row stride > 2F) and a transposed batch (leading dims that cannot share one row stride).

Tolerances (elementwise ``atol + rtol * |reference|``): fp32 1e-6 (fp32 exp and products); fp16 1e-3
(one rounding to fp16); bf16 1e-2 (one rounding to bf16, truncated in the interpreter).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from tritonforge.kernels.swiglu import swiglu

swiglu_mod = importlib.import_module("tritonforge.kernels.swiglu")

TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
DTYPES = list(TOL)


def make(shape, dtype=torch.float32, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(dtype)


def reference(h):
    gate, up = h.double().chunk(2, dim=-1)
    return F.silu(gate) * up


def reference_grad(h, dout):
    h64 = h.detach().double().requires_grad_(True)
    reference(h64).backward(dout.double())
    return h64.grad


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 14), (3, 2, 66), (9, 64)], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward(shape, dtype):
    h = make(shape, dtype).requires_grad_(True)
    out = swiglu(h)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.is_contiguous()
    assert_close(out, reference(h), dtype)
    dout = make(out.shape, dtype, seed=1)
    out.backward(dout)
    assert_close(h.grad, reference_grad(h, dout), dtype)


def test_strided_rows_are_read_in_place():
    wide = make((6, 50))
    h = wide[:, 3:3 + 2 * 21].requires_grad_(False)  # row stride 50, 2F = 42
    assert swiglu_mod._as_rows(h).data_ptr() == h.data_ptr()
    assert_close(swiglu(h), reference(h), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_batch_and_strided_gradient(dtype):
    base = make((7, 3, 2 * 33), dtype).requires_grad_(True)
    h = base.transpose(0, 1)  # (3, 7, 66): the leading dims share no row stride
    out = swiglu(h)
    assert_close(out, reference(h), dtype)
    dout = make((7, 3, 33), dtype, seed=2).transpose(0, 1)  # a non-contiguous upstream gradient
    out.backward(dout)
    assert_close(base.grad, reference_grad(base, dout.transpose(0, 1)), dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's exp(1e4) in the interpreter: inf
def test_saturated_gates_stay_finite():
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3.0]])
    h = torch.cat((gate, torch.full_like(gate, 0.5)), dim=-1).requires_grad_(True)
    out = swiglu(h)
    assert_close(out, reference(h), torch.float32)
    out.backward(torch.ones_like(out))
    assert h.grad.isfinite().all()
    assert_close(h.grad, reference_grad(h, torch.ones_like(out)), torch.float32)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 4)], ids=["M=0", "F=0", "inner 0"])
def test_empty(shape):
    h = make(shape).requires_grad_(True)
    out = swiglu(h)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    out.sum().backward()
    assert h.grad.shape == h.shape


def test_torch_fallback_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(swiglu_mod, "use_triton", lambda t: False)
    h = make((4, 3, 18), torch.bfloat16).requires_grad_(True)
    out = swiglu(h)
    assert_close(out, reference(h), torch.bfloat16)
    dout = make(out.shape, torch.bfloat16, seed=3)
    out.backward(dout)
    assert_close(h.grad, reference_grad(h, dout), torch.bfloat16)


def test_opcheck():
    # The forward's autograd check runs the backward op too; a sliced h exercises the row stride.
    h = make((5, 40))[:, :2 * 9].requires_grad_(True)
    torch.library.opcheck(swiglu_mod._swiglu_fwd_op, (h,))


def test_bad_inputs_name_the_argument():
    for h, error, match in [(torch.zeros(3, 5), ValueError, r"even last dimension .* \(3, 5\)"),
                            (torch.zeros(()), ValueError, "even last dimension"),
                            (torch.zeros(3, 4, dtype=torch.float64), TypeError, "h must be float32"),
                            (torch.zeros(3, 4, dtype=torch.int32), TypeError, "h must be float32"),
                            ([1.0, 2.0], TypeError, "h must be a tensor")]:
        with pytest.raises(error, match=match):
            swiglu(h)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_llama_shape(dtype):
    h = make((4096, 2 * 11008), dtype).cuda().requires_grad_(True)
    out = swiglu(h)
    assert_close(out, reference(h), dtype)
    dout = make(out.shape, dtype, seed=1).cuda()
    out.backward(dout)
    assert_close(h.grad, reference_grad(h, dout), dtype)
