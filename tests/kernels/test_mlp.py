"""gelu_linear_residual (kernels.mlp) against a float64 reference: the output and every gradient.

On the CPU the kernels run in the Triton interpreter with one 32 x 32 x 32 tile config, where fp16
and fp32 dots are exact products with fp32 accumulation, so the shapes below cross tile boundaries
in M, N and K and end in ragged tiles. bf16 dots are wrong in the interpreter: bf16 (and fp32 as
tf32) are checked by the GPU tests only.

Errors are measured relative to the reference's largest magnitude (``_rel_err``): fp32 in the
interpreter differs from float64 only by summation order; fp16 rounds gelu(h), the scaled gradient
and the weight to fp16 before each dot and rounds every output once.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from tritonforge import kernels
from tritonforge.kernels import aot, mlp
from tritonforge.kernels.mlp import gelu_linear_residual

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
# Largest |actual - reference| / max |reference| allowed, output and gradients alike.
TOL = {torch.float32: 2e-6 if DEVICE == "cpu" else 5e-3,  # exact dots / tf32 on a GPU
       torch.float16: 4e-3, torch.bfloat16: 3e-2}

needs_compiler = pytest.mark.skipif(INTERPRET, reason="needs compiled kernels (TRITON_INTERPRET=0): "
                                                      "bf16 dots are wrong in the interpreter")


def reference(h, weight, bias, layer_scale, residual, row_scale, h_bias=None):
    """float64 of the formula, on leaves that require grad."""
    y = F.gelu(h if h_bias is None else h + h_bias) @ weight.T
    if bias is not None:
        y = y + bias
    if layer_scale is not None:
        y = y * layer_scale
    if row_scale is not None:
        y = y * row_scale.reshape(*h.shape[:-1], 1)
    return residual + y


def make_inputs(lead, n, k, dtype, *, bias=True, layer_scale=True, row_scale=True, param_dtype=None,
                residual_dtype=None, seed=0):
    """(h, weight, bias, layer_scale, residual, row_scale, grad_out) on DEVICE, O(1) values."""
    gen = torch.Generator().manual_seed(seed)
    m = 1
    for d in lead:
        m *= d
    pdt = param_dtype or dtype
    rdt = residual_dtype or dtype
    h = torch.randn(*lead, k, generator=gen) * 1.5
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    b = 0.5 * torch.randn(n, generator=gen) if bias else None
    gamma = 0.5 + torch.rand(n, generator=gen) if layer_scale else None
    residual = torch.randn(*lead, n, generator=gen)
    # drop-path: whole rows dropped (0) or kept and scaled by 1 / (1 - p).
    rs = (torch.rand(m, generator=gen) > 0.25).float() / 0.75 if row_scale else None
    grad = torch.randn(*lead, n, generator=gen)
    out_dtype = torch.promote_types(rdt, dtype)
    cast = lambda t, dt: t.to(DEVICE, dt) if t is not None else None  # noqa: E731
    return (cast(h, dtype), cast(weight, pdt), cast(b, pdt), cast(gamma, pdt), cast(residual, rdt),
            cast(rs, torch.float32), cast(grad, out_dtype))


def _rel_err(actual, expected):
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected).abs().max() / scale).item()


def check(h, weight, bias, layer_scale, residual, row_scale, grad, tol, h_bias=None):
    """Forward and the gradient of every tensor argument (but row_scale) against float64."""
    inputs = [h, weight, bias, layer_scale, residual, h_bias]
    # detach() keeps the caller's strides (clone() would make strided views contiguous).
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = gelu_linear_residual(*leaves[:5], row_scale, h_bias=leaves[5])
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref = reference(*ref_leaves[:5], row_scale.double() if row_scale is not None else None, ref_leaves[5])
    ref.backward(grad.double())

    assert out.shape == residual.shape
    assert out.dtype == torch.promote_types(residual.dtype, h.dtype)
    assert _rel_err(out, ref) <= tol, ("out", _rel_err(out, ref))
    for name, leaf, ref_leaf in zip(("h", "weight", "bias", "layer_scale", "residual", "h_bias"), leaves,
                                    ref_leaves):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        err = _rel_err(leaf.grad, ref_leaf.grad)
        assert err <= tol, (f"d{name}", err)
    return out, leaves


# (leading dims, N, K, dtype, options). Interpreter tiles are 32 x 32 x 32: M = 300 is ten row blocks
# (and several wgrad splits), N = 40 and K = 160 two and five ragged column blocks, K = 36 odd.
CASES = [
    ((1,), 8, 32, torch.float32, {}),
    ((17,), 24, 96, torch.float16, {}),
    ((300,), 8, 32, torch.float16, {}),
    ((3, 11), 40, 160, torch.float32, {"bias": False, "layer_scale": False}),
    ((17,), 40, 36, torch.float16, {"layer_scale": False, "row_scale": False}),
    ((2, 3, 5), 24, 36, torch.float32, {"bias": False, "row_scale": False}),
    ((65,), 40, 96, torch.float16, {"bias": False}),
    ((300,), 40, 160, torch.float16, {}),
]


@pytest.mark.parametrize("lead,n,k,dtype,opts", CASES, ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_matches_float64_reference(lead, n, k, dtype, opts):
    check(*make_inputs(lead, n, k, dtype, **opts), TOL[dtype])


def test_strided_rows_and_channels_last_views():
    """h and residual as row-strided views (no copy), the residual an NHWC view of a channels_last
    tensor, and a non-contiguous incoming gradient."""
    b, hh, ww, n, k = 2, 3, 5, 24, 96
    h, weight, bias, gamma, _, rs, _ = make_inputs((b, hh, ww), n, k, torch.float16, seed=3)
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(b, hh, ww, k + 8, generator=gen).to(DEVICE, torch.float16)
    h = wide[..., 4:4 + k]
    residual = torch.randn(b, n, hh, ww, generator=gen).to(DEVICE, torch.float16)
    residual = residual.to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    grad = torch.randn(b, n, hh, ww, generator=gen).to(DEVICE, torch.float16).permute(0, 2, 3, 1)
    assert not h.is_contiguous() and not grad.is_contiguous()
    assert mlp._as_rows(h, k).data_ptr() == h.data_ptr()  # a view with row stride K + 8
    assert mlp._as_rows(residual, n).data_ptr() == residual.data_ptr()
    check(h, weight, bias, gamma, residual, rs, grad, TOL[torch.float16])


def test_fp32_residual_with_fp16_h_gives_fp32_output():
    out, leaves = check(*make_inputs((33,), 24, 96, torch.float16, residual_dtype=torch.float32, seed=5),
                        TOL[torch.float16])
    assert out.dtype == torch.float32 and leaves[4].grad.dtype == torch.float32


def test_fp32_parameters_with_fp16_activations():
    """Autocast training: fp32 master weights, converted in the kernels; grads in fp32."""
    out, leaves = check(*make_inputs((40,), 24, 96, torch.float16, param_dtype=torch.float32, seed=6),
                        TOL[torch.float16])
    assert out.dtype == torch.float16
    assert [t.grad.dtype for t in leaves[1:4]] == [torch.float32] * 3


def test_broadcast_gradient_of_a_sum():
    """``out.sum().backward()`` passes a stride-0 gradient: copied once, then the usual kernels."""
    h, weight, bias, gamma, residual, rs, _ = make_inputs((19,), 24, 64, torch.float32, seed=11)
    check(h, weight, bias, gamma, residual, rs, torch.ones(()).to(h).expand(19, 24), TOL[torch.float32])


def test_row_scale_with_the_leading_shape():
    h, weight, bias, gamma, residual, rs, grad = make_inputs((3, 7), 8, 32, torch.float32, seed=7)
    check(h, weight, bias, gamma, residual, rs.view(3, 7), grad, TOL[torch.float32])


def test_only_some_inputs_require_grad():
    """Frozen parameters: the kernels for gradients nobody asked for do not run, and y is not kept."""
    h, weight, bias, gamma, residual, rs, grad = make_inputs((20,), 24, 64, torch.float32, seed=8)
    h_leaf = h.clone().requires_grad_()
    out = gelu_linear_residual(h_leaf, weight, bias, gamma, residual, rs)
    assert out.grad_fn.saved_tensors[-1].numel() == 0  # y: only the layer scale's gradient needs it
    out.backward(grad)
    ref_h = h.double().requires_grad_()
    reference(ref_h, weight.double(), bias.double(), gamma.double(), residual.double(), rs.double()).backward(
        grad.double())
    assert _rel_err(h_leaf.grad, ref_h.grad) <= TOL[torch.float32]


def test_empty_rows():
    h, weight, bias, gamma, residual, rs, grad = make_inputs((0,), 24, 64, torch.float16)
    leaves = [t.detach().requires_grad_() for t in (h, weight, bias, gamma, residual)]
    out = gelu_linear_residual(*leaves, rs)
    assert out.shape == (0, 24) and out.dtype == torch.float16
    out.backward(grad)
    assert leaves[0].grad.shape == (0, 64)
    for t in leaves[1:4]:
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_weight_gradient_is_deterministic_and_independent_of_the_split():
    """Two runs give bitwise equal gradients; the split count of the wgrad changes only the order of
    the fp32 sum."""
    h, weight, bias, gamma, residual, rs, grad = make_inputs((300,), 8, 32, torch.float16, seed=9)

    def grads():
        leaves = [t.detach().requires_grad_() for t in (h, weight, bias, gamma)]
        gelu_linear_residual(*leaves, residual, rs).backward(grad)
        return [t.grad for t in leaves]

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    h2, g2 = mlp._as_rows(h, 32), mlp._as_rows(grad, 8)
    per_split = [mlp._wgrad(g2, gamma, rs, h2, weight, splits=s).double() for s in (1, 3, 10)]
    assert mlp._wgrad_splits(300, 8, 32, mlp._config("wgrad", h.dtype), h.device) > 1  # the default splits
    for dw in per_split[1:]:
        assert _rel_err(dw, per_split[0]) <= TOL[torch.float16]


def test_cpu_path_without_the_interpreter_is_the_same_math(monkeypatch):
    """Plain CPU tensors outside the interpreter take the torch composition; same results."""
    inputs = make_inputs((30,), 24, 64, torch.float32, seed=10)
    monkeypatch.setattr(mlp, "INTERPRET", False)
    if inputs[0].is_cuda:
        inputs = tuple(t.cpu() if t is not None else None for t in inputs)
    check(*inputs, tol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "weight": a["weight"][:, :-1]}, r"weight has shape \(8, 31\) but must be \(N, K\) .*K = 32"),
    (lambda a: {**a, "bias": a["bias"][:-1]}, r"bias has shape \(7,\) but must be \(8,\)"),
    (lambda a: {**a, "layer_scale": a["weight"]}, r"layer_scale has shape \(8, 32\) but must be \(8,\)"),
    (lambda a: {**a, "residual": a["residual"][:-1]}, r"residual has shape \(4, 8\) but must be \(5, 8\)"),
    (lambda a: {**a, "row_scale": a["row_scale"][:-1]}, r"row_scale has shape \(4,\) but must be \(5,\)"),
    (lambda a: {**a, "row_scale": a["row_scale"].clone().requires_grad_()}, "row_scale receives no gradient"),
    (lambda a: {**a, "h": a["h"].double()}, "h has dtype torch.float64"),
    (lambda a: {**a, "weight": a["weight"].to(torch.int32)}, "weight has dtype torch.int32"),
    (lambda a: {**a, "h": a["h"][:, :0]}, "non-empty last dim"),
    (lambda a: {**a, "residual": None}, "residual must be a tensor"),
    (lambda a: {**a, "bias": [0.0] * 8}, "bias must be a tensor, got list"),
])
def test_validation_errors_name_the_argument(change, message):
    h, weight, bias, gamma, residual, rs, _ = make_inputs((5,), 8, 32, torch.float32)
    args = change({"h": h, "weight": weight, "bias": bias, "layer_scale": gamma, "residual": residual,
                   "row_scale": rs})
    with pytest.raises((ValueError, TypeError), match=message):
        gelu_linear_residual(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices: CPU and CUDA")
def test_device_mismatch_is_an_error():
    h, weight, bias, gamma, residual, rs, _ = make_inputs((5,), 8, 32, torch.float32)
    with pytest.raises(ValueError, match="weight is on cpu but h is on cuda"):
        gelu_linear_residual(h.cuda(), weight.cpu(), None, None, residual.cuda())


def test_exported_from_the_package():
    assert kernels.gelu_linear_residual is gelu_linear_residual


def test_aot_variants_cover_every_kernel():
    names = {aot.kernel_name(v.kernel) for v in mlp.aot_variants()}
    assert names == {f"mlp.{n}" for n in ("_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel", "_colsum_kernel")} | {
        "_common.sum_partials_kernel"}  # the shared reduction, at the wgrad's tile


# ----------------------------------------------------------------------------------------------
# GPU (compiled kernels): bf16, tf32, the autocast case, ConvNeXt shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_compiler
@pytest.mark.parametrize("dtype, param_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("lead, n", [((2, 56, 56), 96), ((3, 7, 7), 768), ((5, 13), 40)])
def test_gpu_matches_float64_reference(dtype, param_dtype, lead, n):
    """With the first Linear's bias, as ConvNeXt's blocks call it."""
    check(*make_inputs(lead, n, 4 * n, dtype, param_dtype=param_dtype), TOL[dtype],
          h_bias=_h_bias(4 * n, param_dtype, 30))


@pytest.mark.gpu
@needs_compiler
def test_gpu_gradients_are_bitwise_reproducible():
    h, weight, bias, gamma, residual, rs, grad = make_inputs((8, 28, 28), 192, 768, torch.bfloat16,
                                                             param_dtype=torch.float32)

    def grads():
        leaves = [t.detach().requires_grad_() for t in (h, weight, bias, gamma, residual)]
        gelu_linear_residual(*leaves, rs).backward(grad)
        return [t.grad for t in leaves]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("store_y, with_h_bias", [(True, True), (False, False)])
def test_custom_ops_pass_opcheck(store_y, with_h_bias):
    h, weight, bias, gamma, residual, rs, grad = make_inputs((2, 5), 8, 32, torch.float32, seed=11)
    h_bias = (0.5 * torch.randn(32, generator=torch.Generator().manual_seed(12))).to(h) if with_h_bias else None
    h, weight, bias, gamma, residual = (t.requires_grad_() for t in (h, weight, bias, gamma, residual))
    if h_bias is not None:
        h_bias.requires_grad_()
    args = (h, h_bias, weight, bias, gamma, residual, rs, store_y)
    # the forward's opcheck also runs the autograd registration, hence the backward op
    torch.library.opcheck(torch.ops.tritonforge.gelu_linear_residual_forward.default, args)
    with torch.no_grad():
        _, y, act = torch.ops.tritonforge.gelu_linear_residual_forward(*args)
    detached = [t.detach() if t is not None else None for t in (h, h_bias, weight, gamma)]
    torch.library.opcheck(torch.ops.tritonforge.gelu_linear_residual_backward.default,
                          (grad, *detached, rs, y, act, True, True, torch.float32 if with_h_bias else None,
                           torch.float32, torch.float32 if store_y else None))


def test_torch_compile_fullgraph_forward_and_backward():
    """The op is opaque to torch.compile: one graph, the same gradients as eager, bit for bit."""
    inputs = make_inputs((3, 7), 8, 32, torch.float32, seed=12)
    grad = inputs[-1]

    h_bias = 0.5 * torch.randn(32, generator=torch.Generator().manual_seed(13)).to(inputs[0])

    def loss(h, weight, bias, gamma, residual, h_bias, rs):
        return (gelu_linear_residual(h, weight, bias, gamma, residual, rs, h_bias=h_bias) * grad).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, loss):
        leaves = [t.detach().clone().requires_grad_() for t in (*inputs[:5], h_bias)]
        fn(*leaves, inputs[5]).backward()
        results.append([t.grad for t in leaves])
    for name, got, expected in zip(("h", "weight", "bias", "layer_scale", "residual", "h_bias"), *results):
        assert torch.equal(got, expected), name


def test_wide_outputs_read_a_materialized_gelu():
    """Past two column tiles the GEMMs read gelu(h) computed once instead of re-evaluating it per
    tile: same results, and the activation is kept for the weight gradient."""
    n = 3 * mlp._config("fwd", torch.float32)[1] - 5  # three column tiles, the last one ragged
    assert mlp._gelu_on_load(24, torch.float32) and not mlp._gelu_on_load(n, torch.float32)
    inputs = make_inputs((3, 7), n, 40, torch.float32, seed=13)
    leaves = [t.detach().requires_grad_() for t in inputs[:5]]
    out = gelu_linear_residual(*leaves, inputs[5])
    assert out.grad_fn.saved_tensors[-1].shape == (21, 40)  # gelu(h), kept for dW
    out.backward(inputs[6])
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs[:5]]
    expected = reference(*ref_leaves, inputs[5].double())
    expected.backward(inputs[6].double())
    assert _rel_err(out, expected) <= TOL[torch.float32]
    for got, ref in zip(leaves, ref_leaves):
        assert _rel_err(got.grad, ref.grad) <= TOL[torch.float32]


# ----------------------------------------------------------------------------------------------
# The first Linear's bias, taken by the op (h_bias): added on load, its gradient from the dgrad
# ----------------------------------------------------------------------------------------------
def _h_bias(k, dtype, seed):
    return (0.5 * torch.randn(k, generator=torch.Generator().manual_seed(seed))).to(DEVICE, dtype)


# M = 300 is ten interpreter row blocks: ten partial sums of d_h_bias, added in a fixed order.
@pytest.mark.parametrize("lead,n,k,dtype,param_dtype", [
    ((17,), 24, 96, torch.float32, None),
    ((300,), 40, 36, torch.float16, torch.float32),
    ((2, 3, 5), 8, 32, torch.float16, None),
], ids=["fp32", "fp16-fp32-params-ragged-k", "fp16-leading-dims"])
def test_first_linear_bias_matches_float64_reference(lead, n, k, dtype, param_dtype):
    inputs = make_inputs(lead, n, k, dtype, param_dtype=param_dtype, seed=20)
    check(*inputs, TOL[dtype], h_bias=_h_bias(k, param_dtype or dtype, 21))


def test_first_linear_bias_with_a_materialized_gelu():
    """Wide N: gelu(h + h_bias) is computed once by torch and read by both GEMMs; the dgrad still adds
    h_bias for gelu' and sums d_h's columns."""
    n = 3 * mlp._config("fwd", torch.float32)[1] - 5
    assert not mlp._gelu_on_load(n, torch.float32)
    check(*make_inputs((3, 7), n, 40, torch.float32, seed=22), TOL[torch.float32],
          h_bias=_h_bias(40, torch.float32, 23))


def test_first_linear_bias_gradient_alone():
    """Only h_bias requires a gradient: the dgrad runs for its column sums, d_h is not kept."""
    h, weight, bias, gamma, residual, rs, grad = make_inputs((70,), 24, 64, torch.float32, seed=24)
    hb = _h_bias(64, torch.float32, 25).requires_grad_()
    gelu_linear_residual(h, weight, bias, gamma, residual, rs, h_bias=hb).backward(grad)
    ref_hb = hb.detach().double().requires_grad_()
    reference(h.double(), weight.double(), bias.double(), gamma.double(), residual.double(), rs.double(),
              ref_hb).backward(grad.double())
    assert hb.grad.dtype == torch.float32 and _rel_err(hb.grad, ref_hb.grad) <= TOL[torch.float32]


def test_first_linear_bias_gradient_is_bitwise_reproducible():
    h, weight, bias, gamma, residual, rs, grad = make_inputs((300,), 8, 32, torch.float16, seed=26)
    hb = _h_bias(32, torch.float16, 27)

    def grad_hb():
        leaf = hb.detach().requires_grad_()
        gelu_linear_residual(h, weight, bias, gamma, residual, rs, h_bias=leaf).backward(grad)
        return leaf.grad

    assert torch.equal(grad_hb(), grad_hb())


def test_first_linear_bias_shape_is_checked():
    h, weight, bias, gamma, residual, rs, _ = make_inputs((5,), 8, 32, torch.float32)
    with pytest.raises(ValueError, match=r"h_bias has shape \(8,\) but must be \(32,\), h's last dim"):
        gelu_linear_residual(h, weight, bias, gamma, residual, rs, h_bias=torch.zeros(8))
