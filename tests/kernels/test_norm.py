"""LayerNorm / RMSNorm kernels against a float64 reference, in the Triton interpreter on CPU.

Every case checks the forward output and all gradients (dx, dresidual, dweight, dbias). The looped
kernels (rows wider than one block) are reached at small N through ``max_block_n``, the test-only cap
on the in-register row width of ``kernels.norm._norm``.
"""
import os

import pytest
import torch

from tritonforge import kernels
import tritonforge.kernels._common as kernels_common
from tritonforge.kernels import _compat
from tritonforge.kernels import norm as norm_mod
from tritonforge.kernels import LayerNorm, RMSNorm, add_layer_norm, add_rms_norm, layer_norm, rms_norm

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Forward tolerances: a few units of the output dtype's rounding (fp32 statistics throughout).
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# Gradient tolerances (atol, rtol): dx loses a little to the cancellation in g - xhat*c1 - c2 before
# rounding; dw/db are fp32 sums over the rows rounded once to the parameter dtype.
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}
# The new residual is x + residual rounded once: exact, except that the Triton interpreter truncates
# fp32 -> bf16 instead of rounding to nearest even (one bf16 ulp); compiled kernels round exactly.
NEW_RES_RTOL = {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 2.0**-7 if INTERPRET else 0.0}
LOOPED_BLOCK = 32  # max_block_n for the looped-kernel cases

OPS = ["layer", "rms", "add_layer", "add_rms"]


def _inputs(shape, dtype, op, *, param_dtype=None, residual_dtype=None, weight=True, bias=True, seed=0,
            device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    rand = lambda *s, dt=dtype: (torch.randn(*s, generator=g) * 1.5 + 0.3).to(dt)  # noqa: E731
    x = rand(*shape)
    residual = rand(*shape, dt=residual_dtype or dtype) if op.startswith("add") else None
    pdt = param_dtype or dtype
    w = (1.0 + 0.5 * torch.randn(n, generator=g)).to(pdt) if weight else None
    b = (0.5 * torch.randn(n, generator=g)).to(pdt) if bias and "layer" in op else None
    dy = rand(*shape)
    dres = rand(*shape, dt=residual_dtype or dtype) if residual is not None else None
    return tuple(t.to(device) if t is not None else None for t in (x, residual, w, b, dy, dres))


def _reference(x, residual, w, b, dy, dres, eps, rms, new_residual=None):
    """float64 outputs and gradients. The add variants normalize the new residual as rounded to
    residual's dtype (`new_residual`, the stored one when given); the rounding is identity for the
    gradient."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, residual, w, b)]
    x64, r64, w64, b64 = leaves
    if r64 is not None:
        s = x64 + r64
        if new_residual is None:
            new_residual = (x.float() + residual.float()).to(residual.dtype)
        s = s + (new_residual.double() - s).detach()
    else:
        s = x64
    if rms:
        y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)
    else:
        xc = s - s.mean(-1, keepdim=True)
        y = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    if w64 is not None:
        y = y * w64
    if b64 is not None:
        y = y + b64
    loss = (y * dy.double()).sum()
    if r64 is not None:
        loss = loss + (s * dres.double()).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    it = iter(grads)
    return y.detach(), s.detach(), [next(it) if t is not None else None for t in leaves]


def _run(op, x, residual, w, b, dy, dres, eps, max_block_n=norm_mod.MAX_BLOCK_N):
    # detach() keeps the caller's strides (clone() would make strided views contiguous).
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, residual, w, b)]
    xl, rl, wl, bl = leaves
    y, new_res, _, _ = norm_mod._norm(xl, rl, wl, bl, eps, rms="rms" in op, max_block_n=max_block_n)
    outs, grads_in = [y], [dy]
    if rl is not None:
        outs.append(new_res)
        grads_in.append(dres)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, present, grads_in)
    it = iter(grads)
    return y, (new_res if rl is not None else None), [next(it) if t is not None else None for t in leaves]


def _close(actual, expected, tol, what):
    atol, rtol = tol
    assert actual is not None, what
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_case(op, shape, dtype, max_block_n=norm_mod.MAX_BLOCK_N, **kw):
    """Forward and every gradient of `op` against the float64 reference."""
    eps = 1e-5
    x, residual, w, b, dy, dres = _inputs(shape, dtype, op, **kw)
    y, new_res, grads = _run(op, x, residual, w, b, dy, dres, eps, max_block_n)
    if residual is not None:
        assert new_res.dtype == residual.dtype and new_res.shape == x.shape
        expected = (x.float() + residual.float()).to(residual.dtype)
        torch.testing.assert_close(new_res, expected, atol=0, rtol=NEW_RES_RTOL[residual.dtype])
    y_ref, _, grads_ref = _reference(x, residual, w, b, dy, dres, eps, rms="rms" in op, new_residual=new_res)
    assert y.dtype == x.dtype and y.shape == x.shape
    _close(y, y_ref, FWD_TOL[dtype], "y")
    for name, t, g, g_ref in zip(("dx", "dresidual", "dweight", "dbias"), (x, residual, w, b), grads, grads_ref):
        if t is None:
            continue
        assert g.dtype == t.dtype, name
        # dx of the add variants is d(new residual), computed in the new residual's dtype.
        tol_dtype = _coarser(t.dtype, residual.dtype) if name == "dx" and residual is not None else t.dtype
        _close(g, g_ref, GRAD_TOL[tol_dtype], name)


def _coarser(a, b):
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


# Shapes that break naive code: N = 1, odd N, N not a power of two with several tiles per program,
# 3-D leading dims, M = 1, M = 0.
SHAPES = [(3, 1), (5, 7), (24, 1000), (2, 3, 48), (1, 256), (0, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward_backward(op, shape, dtype):
    _check_case(op, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_looped_kernels(op, dtype):
    """N = 100 with a 32-wide block: 4 chunks, the last one partial."""
    _check_case(op, (6, 100), dtype, max_block_n=LOOPED_BLOCK)


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("op", ["layer", "add_rms"])
def test_many_rows_per_program(op, looped, monkeypatch):
    """One SM's worth of backward programs, so each program loops over many rows and row tiles."""
    monkeypatch.setattr(kernels_common, "INTERPRETER_SMS", 1)
    if looped:
        _check_case(op, (40, 70), torch.float32, max_block_n=LOOPED_BLOCK)
    else:
        _check_case(op, (300, 100), torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes(op):
    """bf16 activations with fp32 parameters and an fp32 residual stream (autocast training)."""
    _check_case(op, (9, 96), torch.bfloat16, param_dtype=torch.float32, residual_dtype=torch.float32)


def test_residual_narrower_than_x():
    """fp32 x with a bf16 residual: the new residual is rounded to bf16 and normalized as stored."""
    _check_case("add_layer", (9, 96), torch.float32, residual_dtype=torch.bfloat16)


@pytest.mark.parametrize("weight,bias", [(False, False), (False, True), (True, False)])
def test_layer_norm_without_affine(weight, bias):
    _check_case("layer", (7, 40), torch.float32, weight=weight, bias=bias)
    _check_case("add_layer", (7, 40), torch.float32, weight=weight, bias=bias, max_block_n=16)


def test_rms_norm_without_weight():
    _check_case("rms", (7, 40), torch.float16, weight=False)


def _strided_case(op, make_view):
    """Run op on views produced by make_view (applied to x, residual and dy) and compare with the
    same op on contiguous copies."""
    x, residual, w, b, dy, dres = _inputs((6, 4, 40), torch.float32, op, seed=3)
    views = [make_view(t) if t is not None else None for t in (x, residual, dy, dres)]
    xv, rv, dyv, dresv = views
    assert not xv.is_contiguous()
    y, new_res, grads = _run(op, xv, rv, w, b, dyv, dresv, 1e-5)
    y_c, new_res_c, grads_c = _run(op, *(v.contiguous() if v is not None else None for v in (xv, rv)), w, b,
                                   dyv.contiguous(), dresv.contiguous() if dresv is not None else None, 1e-5)
    torch.testing.assert_close(y, y_c, atol=0, rtol=0)
    if rv is not None:
        torch.testing.assert_close(new_res, new_res_c, atol=0, rtol=0)
    for g, g_c in zip(grads, grads_c):
        if g is not None:
            torch.testing.assert_close(g, g_c, atol=1e-6, rtol=1e-6)


def _row_slice(t):  # rows with a stride of 53 elements (not a multiple of 16)
    big = torch.zeros(*t.shape[:-1], t.shape[-1] + 13, dtype=t.dtype)
    big[..., 5:5 + t.shape[-1]] = t
    return big[..., 5:5 + t.shape[-1]]


def _transposed_batch(t):  # leading dims that cannot share one row stride: one copy in the launcher
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _column_major(t):  # last dim not unit-stride: one copy in the launcher
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("make_view", [_row_slice, _transposed_batch, _column_major])
@pytest.mark.parametrize("op", ["layer", "add_layer", "add_rms"])
def test_strided_inputs(op, make_view):
    _strided_case(op, make_view)


def test_strided_rows_need_no_copy():
    """A row-strided view is passed to the kernel as is: its storage is read in place."""
    x = torch.randn(8, 40)
    xv = _row_slice(x)
    rows = norm_mod._as_rows(xv)
    assert rows.data_ptr() == xv.data_ptr() and rows.stride() == (53, 1)


def test_strided_parameters():
    x, _, w, b, dy, _ = _inputs((5, 24), torch.float32, "layer")
    w2, b2 = torch.stack([w, w], 1), torch.stack([b, b], 1)  # [N, 2]: a column has stride 2
    strided = [t.requires_grad_() for t in (x.clone(), w2, b2)]
    assert strided[1][:, 0].stride() == (2,)
    y = layer_norm(strided[0], strided[1][:, 0], strided[2][:, 1])
    y_ref, _, grads_ref = _reference(x, None, w, b, dy, None, 1e-5, rms=False)
    _close(y, y_ref, FWD_TOL[torch.float32], "y")
    gx, gw, gb = torch.autograd.grad(y, strided, dy)
    _close(gx, grads_ref[0], GRAD_TOL[torch.float32], "dx")
    _close(gw[:, 0], grads_ref[2], GRAD_TOL[torch.float32], "dweight")
    _close(gb[:, 1], grads_ref[3], GRAD_TOL[torch.float32], "dbias")


def test_expanded_grad():
    """dy with a row stride of 0 (the gradient of a sum over rows)."""
    x, _, w, b, _, _ = _inputs((5, 24), torch.float32, "layer")
    xl = x.clone().requires_grad_()
    dy_row = torch.randn(24)
    (gx,) = torch.autograd.grad(layer_norm(xl, w, b), xl, dy_row.expand(5, 24))
    _, _, grads_ref = _reference(x, None, w, b, dy_row.expand(5, 24), None, 1e-5, rms=False)
    _close(gx, grads_ref[0], GRAD_TOL[torch.float32], "dx")


def test_dw_db_deterministic():
    """Bitwise-identical gradients on a repeated backward (per-program partials, fixed-order sum)."""
    x, residual, w, b, dy, dres = _inputs((24, 1000), torch.float32, "add_layer")
    first = _run("add_layer", x, residual, w, b, dy, dres, 1e-5)[2]
    second = _run("add_layer", x, residual, w, b, dy, dres, 1e-5)[2]
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


def test_public_functions_match_internal_entry():
    x, residual, w, b, _, _ = _inputs((4, 3, 32), torch.float32, "add_layer")
    y, new_res = add_layer_norm(x, residual, w, b)
    y2, new_res2, _, _ = norm_mod._norm(x, residual, w, b, 1e-5, rms=False)
    assert torch.equal(y, y2) and torch.equal(new_res, new_res2)
    y, new_res = add_rms_norm(x, residual, w, eps=1e-3)
    assert torch.equal(y, norm_mod._norm(x, residual, w, None, 1e-3, rms=True)[0])
    assert torch.equal(layer_norm(x, w, b, eps=1e-3), norm_mod._norm(x, None, w, b, 1e-3, rms=False)[0])
    assert torch.equal(rms_norm(x, w), norm_mod._norm(x, None, w, None, 1e-6, rms=True)[0])


def test_exports():
    for name in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "LayerNorm", "RMSNorm"):
        assert getattr(kernels, name) is getattr(norm_mod, name)


def test_input_validation():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        rms_norm(x.to(torch.float64))
    with pytest.raises(ValueError, match="residual shape"):
        add_layer_norm(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="single last dimension"):
        LayerNorm((4, 8))
    with pytest.raises(ValueError, match="single last dimension"):
        RMSNorm([2, 8])
    with pytest.raises(ValueError, match="last dimension 8"):
        LayerNorm(8)(torch.randn(4, 7))


def test_torch_reference_path_matches_kernels():
    """The fp32 torch implementation used for CPU tensors outside the interpreter agrees with the kernels."""
    x, residual, w, b, dy, dres = _inputs((6, 50), torch.bfloat16, "add_layer")
    for rms in (False, True):
        bias = None if rms else b
        ref = norm_mod._norm_fwd_reference(x, residual, w, bias, 1e-5, rms)
        out = norm_mod._norm_fwd_triton(x, residual, w, bias, 1e-5, rms, norm_mod.MAX_BLOCK_N)
        for r, o in zip(ref, out):
            torch.testing.assert_close(o, r, atol=1.6e-2, rtol=1.6e-2)
        _, res_out, mean, rstd = out
        ref_b = norm_mod._norm_bwd_reference(dy, dres, res_out, w, bias, mean, rstd, rms)
        out_b = norm_mod._norm_bwd_triton(dy, dres, res_out, w, bias, mean, rstd, rms, norm_mod.MAX_BLOCK_N)
        for r, o in zip(ref_b, out_b):
            torch.testing.assert_close(o, r, atol=3e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-3}])
def test_layer_norm_module_state_dict_round_trip(kwargs):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(24, **kwargs)
    for p in ref.parameters():
        p.data.normal_()
    ours = LayerNorm(24, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    back = torch.nn.LayerNorm(24, **kwargs)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3}, {"elementwise_affine": False}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_module_state_dict_round_trip(kwargs, dtype):
    """eps=None is torch's default: finfo(float32).eps for fp32, fp16 and bf16 inputs."""
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm((24,), **kwargs, dtype=dtype)
    for p in ref.parameters():
        p.data.normal_()
    ours = RMSNorm(24, **kwargs, dtype=dtype)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(7, 24) * 1e-3).to(dtype)  # small inputs make eps visible
    tol = FWD_TOL[dtype]
    torch.testing.assert_close(ours(x), ref(x), atol=tol[0], rtol=tol[1])
    back = torch.nn.RMSNorm(24, **kwargs, dtype=dtype)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_module_gradients_reach_parameters():
    ln = LayerNorm(16)
    x = torch.randn(4, 16, requires_grad=True)
    ln(x).square().sum().backward()
    assert ln.weight.grad is not None and ln.bias.grad is not None and x.grad is not None


def test_autocast_keeps_bf16():
    """Under autocast a bf16 input stays bf16 (no fp32 upcast); fp32 parameters get fp32 gradients."""
    ln = LayerNorm(32)
    rms = RMSNorm(32)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
        z = rms(x)
        y2, new_res = add_layer_norm(x, x.float())
    assert y.dtype == z.dtype == y2.dtype == torch.bfloat16
    assert new_res.dtype == torch.float32
    (y.float().sum() + z.float().sum()).backward()
    assert ln.weight.grad.dtype == torch.float32 and rms.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# torch.library plumbing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["layer", "add_rms"])
def test_opcheck(op):
    x, residual, w, b, dy, dres = _inputs((5, 24), torch.float32, op)
    rms = "rms" in op
    args = (x.requires_grad_(), residual.requires_grad_() if residual is not None else None, w.requires_grad_(),
            b.requires_grad_() if b is not None else None, 1e-5, rms, 16)
    torch.library.opcheck(torch.ops.tritonforge.norm_fwd.default, args)
    y, res_out, mean, rstd = torch.ops.tritonforge.norm_fwd(*[a.detach() if torch.is_tensor(a) else a for a in args])
    xin = res_out if residual is not None else x.detach()
    torch.library.opcheck(torch.ops.tritonforge.norm_bwd.default,
                          (dy, dres, xin, w.detach(), b.detach() if b is not None else None, mean, rstd, rms, 16))


def test_torch_compile_fullgraph():
    x, residual, w, b, dy, _ = _inputs((3, 5, 40), torch.float32, "add_layer")

    def step(x, residual, w, b):
        h, new_res = add_layer_norm(x, residual, w, b)
        return rms_norm(h, w) + layer_norm(new_res, w, b)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, residual, w, b)]
        out = fn(*leaves)
        return [out] + list(torch.autograd.grad(out, leaves, dy))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, e in zip(grads(compiled), grads(step)):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6)


def test_aot_variants_cover_every_kernel():
    variants = norm_mod.aot_variants()
    kernels_listed = {v.kernel for v in variants}
    jitted = {obj for obj in vars(norm_mod).values() if isinstance(obj, _compat.jit_types())
              and getattr(obj, "fn", obj).__module__ == norm_mod.__name__}  # not the shared kernels it imports
    assert jitted and jitted <= kernels_listed
    for v in variants:
        names = v.kernel.arg_names
        assert set(v.signature) | set(v.constexprs) == set(names), v.name
        assert [a for a in names if a in v.signature] == list(v.signature), v.name
        assert set(v.aligned) <= set(v.signature), v.name


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
BENCH_SHAPES = [(32768, 768), (32768, 1024), (16384, 4096), (8192, 8192)]


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("m,n", BENCH_SHAPES)
def test_gpu_benchmark_widths_bf16(op, m, n):
    """The compiled kernels at the benchmark widths (an eighth of the rows) against float64."""
    _check_case(op, (m // 8, n), torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer", "add_rms"])
def test_gpu_looped_and_mixed(op):
    _check_case(op, (64, 20000), torch.bfloat16, device="cuda")
    _check_case(op, (256, 768), torch.bfloat16, param_dtype=torch.float32, residual_dtype=torch.float32,
                device="cuda")


@pytest.mark.gpu
def test_gpu_speed_sanity():
    """Loose floors (about half the design targets), to catch a kernel that fell off the fast path."""
    from triton.testing import do_bench

    m, n = 16384, 4096
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    fwd_ms = do_bench(lambda: layer_norm(x, w, b), return_mode="median")
    both_ms = do_bench(lambda: layer_norm(x, w, b).backward(dy), return_mode="median", grad_to_none=[x, w, b])
    assert 4 * m * n / fwd_ms * 1e-6 > 1300
    assert 10 * m * n / both_ms * 1e-6 > 1200
