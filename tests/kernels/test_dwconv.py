"""depthwise_conv2d (kernels.dwconv) against a float64 ``F.conv2d(..., groups=C)`` reference: the output
and the gradients of x, weight and bias.

On the CPU the kernels run in the Triton interpreter with a small tile (``ROWS = 2`` output rows,
``BLOCK_W = 8`` columns, ``BLOCK_C = min(16, next_pow2(C))`` channels), so the shapes below cross
tile edges in every dimension (H > 2, W > 8, C > 16) and end in ragged tiles; the interpreter is
slow, hence the small shapes and mostly 3x3 / 1x1 / 3x5 filters (one small 7x7 case).

Errors are measured relative to the reference's largest magnitude (``_rel_err``). Products and sums
are fp32 in the kernels: fp32 in the interpreter differs from float64 only by summation order (about
1e-7); fp16 rounds each output (and dx, and dw/db for fp16 parameters) once to fp16 (2^-11 relative).
bf16 is checked on the GPU only (and loosely under autocast): the interpreter truncates fp32 to bf16
instead of rounding. The GPU tests run ConvNeXt's shapes with the compiled kernels.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from tritonforge import kernels
from tritonforge.kernels import dwconv
from tritonforge.kernels.dwconv import depthwise_conv2d

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
# Largest |actual - reference| / max |reference| allowed, output and gradients alike.
TOL = {torch.float32: 2e-6 if DEVICE == "cpu" else 1e-5,
       torch.float16: 2e-3 if DEVICE == "cpu" else 4e-3,
       torch.bfloat16: 3e-2}

needs_compiler = pytest.mark.skipif(INTERPRET, reason="needs compiled kernels (TRITON_INTERPRET=0): "
                                                      "the interpreter truncates fp32 to bf16")


def reference(x, weight, bias, padding):
    """float64 F.conv2d on CPU copies of leaves that require grad."""
    return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])


def _pad2(padding):
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


def _out_shape(shape, kernel, padding):
    n, c, h, w = shape
    ph, pw = _pad2(padding)
    return n, c, h + 2 * ph - kernel[0] + 1, w + 2 * pw - kernel[1] + 1


def make_inputs(shape, kernel, padding, dtype, *, param_dtype=None, bias=True, channels_last=True, seed=0):
    """(x, weight, bias, grad_out) on DEVICE, O(1) values; x (and grad_out) channels_last if asked."""
    gen = torch.Generator().manual_seed(seed)
    pdt = param_dtype or dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c = shape[1]
    x = torch.randn(*shape, generator=gen).to(DEVICE, dtype).to(memory_format=fmt)
    weight = (torch.randn(c, 1, *kernel, generator=gen) / (kernel[0] * kernel[1]) ** 0.5).to(DEVICE, pdt)
    b = (0.5 * torch.randn(c, generator=gen)).to(DEVICE, pdt) if bias else None
    grad = torch.randn(*_out_shape(shape, kernel, padding), generator=gen).to(DEVICE, dtype)
    return x, weight, b, grad.to(memory_format=fmt)


def _rel_err(actual, expected):
    expected = expected.detach().cpu().double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.detach().cpu().double() - expected).abs().max() / scale).item()


def _expected_format(x):
    """torch's rule: channels_last when the channels are the innermost dim (and there are several)."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def check(x, weight, bias, padding, grad, tol):
    """Forward and the gradients of x, weight and bias against float64; dtypes, shapes, memory formats."""
    # detach() keeps the caller's strides (clone() would make strided views contiguous).
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = depthwise_conv2d(*leaves, padding=padding)
    out.backward(grad)
    ref_leaves = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    ref = reference(*ref_leaves, _pad2(padding))
    ref.backward(grad.cpu().double())

    fmt = _expected_format(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=fmt), ("out", out.stride())
    assert _rel_err(out, ref) <= tol, ("out", _rel_err(out, ref))
    for name, leaf, ref_leaf in zip(("x", "weight", "bias"), leaves, ref_leaves):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        err = _rel_err(leaf.grad, ref_leaf.grad)
        assert err <= tol, (f"d{name}", err)
    if x.is_contiguous(memory_format=fmt):  # autograd makes the .grad of a non-dense leaf (a slice) contiguous
        assert leaves[0].grad.is_contiguous(memory_format=fmt), ("dx", leaves[0].grad.stride())
    return out, leaves


# (shape, kernel, padding, dtype, options). Interpreter tiles: 2 rows x 8 columns x min(16, C) channels.
CASES = [
    pytest.param((1, 4, 3, 9), (7, 7), 3, torch.float32, {}, id="convnext-7x7-pad3-channels_last"),
    pytest.param((2, 1, 5, 6), (3, 3), 1, torch.float32, {}, id="3x3-pad1-one-channel"),
    pytest.param((1, 17, 3, 5), (3, 3), 1, torch.float32, {}, id="3x3-C17-ragged-channel-block"),
    pytest.param((1, 3, 3, 19), (3, 5), (1, 2), torch.float32, {}, id="3x5-pad(1,2)-W19-ragged-columns"),
    pytest.param((1, 3, 5, 11), (3, 3), 0, torch.float32, {}, id="3x3-pad0-valid-smaller-output"),
    pytest.param((1, 2, 3, 4), (3, 3), (3, 2), torch.float32, {}, id="3x3-pad(3,2)-output-bigger-than-input"),
    pytest.param((1, 3, 2, 3), (5, 5), 2, torch.float32, {}, id="5x5-pad2-input-smaller-than-filter"),
    pytest.param((2, 5, 3, 9), (1, 1), 0, torch.float32, {}, id="1x1"),
    pytest.param((1, 3, 4, 9), (2, 4), (1, 0), torch.float32, {}, id="2x4-even-filter-pad(1,0)"),
    pytest.param((1, 3, 2, 12), (1, 11), (0, 5), torch.float32, {}, id="1x11-two-wgrad-column-groups"),
    pytest.param((1, 17, 3, 10), (3, 3), 1, torch.float16, {"param_dtype": torch.float32},
                 id="fp16-x-fp32-weight-and-bias"),
    pytest.param((2, 3, 3, 9), (3, 3), 1, torch.float32, {"channels_last": False}, id="nchw-contiguous"),
    pytest.param((1, 4, 3, 9), (3, 3), 1, torch.float16, {"bias": False}, id="fp16-no-bias"),
]


@pytest.mark.parametrize("shape, kernel, padding, dtype, opts", CASES)
def test_matches_float64_reference(shape, kernel, padding, dtype, opts):
    x, weight, bias, grad = make_inputs(shape, kernel, padding, dtype, **opts)
    check(x, weight, bias, padding, grad, TOL[dtype])


def test_channel_slice_of_a_channels_last_tensor():
    """x[:, 2:9] of a channels_last tensor: channel stride 1, pixel stride 12 (not C = 7)."""
    x_full, _, _, _ = make_inputs((1, 12, 3, 9), (3, 3), 1, torch.float32, seed=1)
    x = x_full[:, 2:9]
    _, weight, bias, grad = make_inputs((1, 7, 3, 9), (3, 3), 1, torch.float32, seed=2)
    assert x.stride() == (324, 1, 108, 12)
    out, _ = check(x, weight, bias, 1, grad, TOL[torch.float32])
    assert out.is_contiguous(memory_format=torch.channels_last)
    # autograd hands the slice leaf a contiguous .grad; the op itself returns dx channels_last
    dx, _, _ = torch.ops.tritonforge.depthwise_conv2d_backward(grad, x, weight, 1, 1, True, False, None)
    assert dx.shape == x.shape and dx.is_contiguous(memory_format=torch.channels_last), dx.stride()


def test_spatially_strided_view_and_broadcast_gradient():
    """x[:, :, ::2, 1:] of an NCHW tensor (row stride 2 W, offset columns) and the stride-0 gradient of
    ``out.sum()``."""
    x_full, _, _, _ = make_inputs((1, 3, 7, 12), (3, 5), (1, 2), torch.float32, channels_last=False, seed=3)
    x = x_full[:, :, ::2, 1:]
    _, weight, bias, _ = make_inputs((1, 3, 4, 11), (3, 5), (1, 2), torch.float32, seed=4)
    assert x.shape == (1, 3, 4, 11) and x.stride() == (252, 84, 24, 1)
    grad = torch.ones((), device=DEVICE).expand(1, 3, 4, 11)
    check(x, weight, bias, (1, 2), grad, TOL[torch.float32])


def test_strided_bias_view():
    x, weight, _, grad = make_inputs((1, 4, 3, 5), (3, 3), 1, torch.float32, seed=5)
    bias = (0.5 * torch.randn(8, generator=torch.Generator().manual_seed(6))).to(DEVICE)[::2]
    assert bias.stride() == (2,)
    check(x, weight, bias, 1, grad, TOL[torch.float32])


def test_empty_batch():
    x, weight, bias, grad = make_inputs((0, 4, 5, 6), (3, 3), 1, torch.float16, seed=7)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    out = depthwise_conv2d(*leaves, padding=1)
    assert out.shape == (0, 4, 5, 6) and out.dtype == torch.float16
    out.backward(grad)
    assert leaves[0].grad.shape == (0, 4, 5, 6) and leaves[0].grad.dtype == torch.float16
    for t in leaves[1:]:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_output_and_input_gradient_follow_the_input_memory_format(fmt):
    x, weight, bias, grad = make_inputs((2, 3, 3, 4), (1, 1), 0, torch.float32, seed=8)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    other = torch.contiguous_format if fmt == torch.channels_last else torch.channels_last
    out = depthwise_conv2d(x, weight, bias)
    out.backward(grad.contiguous(memory_format=other))  # the gradient's layout must not matter
    for t in (out, x.grad):
        assert t.is_contiguous(memory_format=fmt) and not t.is_contiguous(memory_format=other), t.stride()


def test_weight_gradient_is_deterministic_and_independent_of_the_split():
    """The N * HO = 10 output rows over 1, 2 or 5 splits: only the order of the fp32 sum changes. Two
    runs give bitwise equal results."""
    x, weight, bias, dy = make_inputs((2, 5, 5, 10), (3, 3), 1, torch.float32, seed=9)
    ref_dw = torch.nn.grad.conv2d_weight(x.cpu().double(), weight.shape, dy.cpu().double(), padding=1, groups=5)
    ref_db = dy.cpu().double().sum((0, 2, 3))
    results = {s: dwconv._wgrad(x, dy, 3, 3, 1, 1, torch.float32, torch.float32, splits=s) for s in (1, 2, 5, None)}
    for s, (dw, db) in results.items():
        assert dw.shape == (5, 1, 3, 3) and db.shape == (5,)
        assert _rel_err(dw, ref_dw) <= TOL[torch.float32], (s, _rel_err(dw, ref_dw))
        assert _rel_err(db, ref_db) <= TOL[torch.float32], (s, _rel_err(db, ref_db))
        assert _rel_err(dw, results[1][0].double()) <= 1e-6 and _rel_err(db, results[1][1].double()) <= 1e-6
    for s in (2, None):
        again = dwconv._wgrad(x, dy, 3, 3, 1, 1, torch.float32, torch.float32, splits=s)
        assert torch.equal(again[0], results[s][0]) and torch.equal(again[1], results[s][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-x-fp32-params"])
def test_cpu_path_without_the_interpreter_is_the_same_math(monkeypatch, dtype):
    """Plain CPU tensors outside the interpreter take F.conv2d in fp32; same results and layouts."""
    x, weight, bias, grad = make_inputs((2, 5, 4, 9), (3, 3), 1, dtype, param_dtype=torch.float32, seed=10)
    monkeypatch.setattr(dwconv, "INTERPRET", False)
    x, weight, bias, grad = (t.cpu() for t in (x, weight, bias, grad))
    check(x, weight, bias, 1, grad, 2e-6 if dtype == torch.float32 else 2e-3)


def _f32(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(11)).to(DEVICE)


BAD_PADDING = "padding must be an int, a pair of ints, 'same' or 'valid', got"


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "weight": _f32(5, 1, 3, 3)},
     r"weight has shape \(5, 1, 3, 3\) but must be \(C, 1, KH, KW\) with C = 4"),
    (lambda a: {**a, "weight": _f32(4, 2, 3, 3)}, r"weight has shape \(4, 2, 3, 3\) but must be \(C, 1, KH, KW\)"),
    (lambda a: {**a, "weight": _f32(4, 3, 3)}, r"weight has shape \(4, 3, 3\) but must be \(C, 1, KH, KW\)"),
    (lambda a: {**a, "bias": _f32(3)}, r"bias has shape \(3,\) but must be \(4,\)"),
    (lambda a: {**a, "x": a["x"][0]}, r"x must be \(N, C, H, W\), got shape \(4, 5, 6\)"),
    (lambda a: {**a, "x": a["x"][:, :0], "weight": _f32(0, 1, 3, 3), "bias": None}, "x has no channels"),
    (lambda a: {**a, "x": a["x"].double()}, "x has dtype torch.float64"),
    (lambda a: {**a, "weight": a["weight"].to(torch.int32)}, "weight has dtype torch.int32"),
    (lambda a: {**a, "padding": -1}, "padding must be >= 0, got -1"),
    (lambda a: {**a, "padding": (1, -1)}, r"padding must be >= 0, got \(1, -1\)"),
    (lambda a: {**a, "padding": (1, 1, 1)}, BAD_PADDING + r" \(1, 1, 1\)"),
    (lambda a: {**a, "padding": 1.0}, BAD_PADDING + " 1.0"),
    (lambda a: {**a, "padding": (1.0, 1)}, BAD_PADDING + r" \(1.0, 1\)"),
    (lambda a: {**a, "padding": True}, BAD_PADDING + " True"),
    (lambda a: {**a, "padding": "full"}, BAD_PADDING + " 'full'"),
    (lambda a: {**a, "weight": _f32(4, 1, 2, 3), "padding": "same"}, "padding='same' with the even filter 2x3"),
    (lambda a: {**a, "weight": _f32(4, 1, 17, 17), "padding": 8},
     r"filters of 17x17.*1 to 15.*torch\.nn\.functional\.conv2d"),
    (lambda a: {**a, "weight": _f32(4, 1, 7, 3), "padding": 0},
     r"7x3 filter with padding \(0, 0\) does not fit the 5x6 input \(output would be -1x4\)"),
    (lambda a: {**a, "x": None}, "x must be a tensor, got None"),
    (lambda a: {**a, "weight": None}, "weight must be a tensor, got None"),
    (lambda a: {**a, "bias": [0.0] * 4}, "bias must be a tensor, got list"),
], ids=["weight-C", "weight-dim1", "weight-3d", "bias-shape", "x-3d", "x-no-channels", "x-float64",
        "weight-int32", "padding-negative", "padding-pair-negative", "padding-3-tuple", "padding-float",
        "padding-float-pair", "padding-bool", "padding-full", "padding-same-even", "filter-17x17", "filter-does-not-fit", "x-None", "weight-None",
        "bias-list"])
def test_validation_errors_name_the_argument(change, message):
    x, weight, bias, _ = make_inputs((1, 4, 5, 6), (3, 3), 1, torch.float32)
    args = change({"x": x, "weight": weight, "bias": bias, "padding": 1})
    with pytest.raises((ValueError, TypeError), match=message):
        depthwise_conv2d(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices: CPU and CUDA")
def test_device_mismatch_is_an_error():
    x, weight, bias, _ = make_inputs((1, 4, 5, 6), (3, 3), 1, torch.float32)
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        depthwise_conv2d(x.cuda(), weight.cpu(), bias.cuda(), 1)


def test_autocast_casts_an_fp32_input():
    """Under autocast an fp32 x is cast to bf16 (F.conv2d's rule); the fp32 weights are read as they are
    and every gradient comes back in fp32. Loose tolerance: bf16 (and truncated in the interpreter)."""
    x, weight, bias, grad = make_inputs((1, 3, 3, 4), (3, 3), 1, torch.float32, seed=12)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = depthwise_conv2d(*leaves, padding=1)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 3, 4)
    out.backward(grad.to(torch.bfloat16))
    ref_leaves = [x.cpu().bfloat16().double().requires_grad_(), weight.cpu().double().requires_grad_(),
                  bias.cpu().double().requires_grad_()]
    ref = reference(*ref_leaves, 1)
    ref.backward(grad.cpu().bfloat16().double())
    assert _rel_err(out, ref) <= TOL[torch.bfloat16], _rel_err(out, ref)
    for name, leaf, ref_leaf in zip(("x", "weight", "bias"), leaves, ref_leaves):
        assert leaf.grad.dtype == torch.float32 and leaf.grad.shape == leaf.shape, name
        assert _rel_err(leaf.grad, ref_leaf.grad) <= TOL[torch.bfloat16], (name, _rel_err(leaf.grad, ref_leaf.grad))


def test_exported_from_the_package():
    assert kernels.depthwise_conv2d is depthwise_conv2d


def test_custom_ops_pass_opcheck():
    x, weight, bias, grad = make_inputs((1, 3, 3, 4), (3, 3), 1, torch.float32, seed=13)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    # the forward's opcheck also runs the autograd registration, hence the backward op
    torch.library.opcheck(torch.ops.tritonforge.depthwise_conv2d_forward.default, (*leaves, 1, 1))
    torch.library.opcheck(torch.ops.tritonforge.depthwise_conv2d_backward.default,
                          (grad, x, weight, 1, 1, True, True, torch.float32))
    # gradients not asked for come back as empty (0,) tensors
    dx, dw, db = torch.ops.tritonforge.depthwise_conv2d_backward(grad, x, weight, 1, 1, False, True, None)
    assert dx.shape == (0,) and db.shape == (0,) and dw.shape == weight.shape


def test_torch_compile_fullgraph_forward_and_backward():
    """The op is opaque to torch.compile: one graph, the same output and gradients as eager, bit for bit."""
    x, weight, bias, grad = make_inputs((1, 3, 3, 9), (3, 3), 1, torch.float32, seed=14)

    def loss(x, weight, bias):
        return (depthwise_conv2d(x, weight, bias, padding=1) * grad).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, loss):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [t.grad for t in leaves])
    for name, got, expected in zip(("loss", "x", "weight", "bias"), *results):
        assert torch.equal(got, expected), name


# ----------------------------------------------------------------------------------------------
# GPU (compiled kernels): ConvNeXt's 7x7 token mixer at its three tile shapes, bf16 with fp32 weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_compiler
@pytest.mark.parametrize("dtype, param_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                                (torch.float32, torch.float32)],
                         ids=["bf16-fp32-params", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(2, 96, 56, 56), (2, 384, 14, 14), (2, 768, 7, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_convnext_shapes_match_float64_reference(dtype, param_dtype, shape):
    x, weight, bias, grad = make_inputs(shape, (7, 7), 3, dtype, param_dtype=param_dtype, seed=15)
    out, leaves = check(x, weight, bias, 3, grad, TOL[dtype])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert [t.grad.dtype for t in leaves] == [dtype, param_dtype, param_dtype]


@pytest.mark.gpu
@needs_compiler
def test_gpu_gradients_are_bitwise_reproducible():
    x, weight, bias, grad = make_inputs((8, 96, 56, 56), (7, 7), 3, torch.bfloat16, param_dtype=torch.float32,
                                        seed=16)

    def run():
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        out = depthwise_conv2d(*leaves, padding=3)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in leaves]

    for name, a, b in zip(("out", "x", "weight", "bias"), run(), run()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_strings_as_f_conv2d_takes_them(padding):
    x, weight, bias, _ = make_inputs((1, 3, 5, 7), (3, 5), 0, torch.float32, seed=40)
    out = depthwise_conv2d(x, weight, bias, padding)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=padding, groups=3)
    assert out.shape == expected.shape and _rel_err(out, expected) <= TOL[torch.float32]


def test_offsets_within_an_image_past_2_to_the_31_are_refused():
    """Channel and column offsets within an image are 32-bit in the kernels: an NCHW image whose channel
    stride puts a channel at element 2^31 is refused before any launch (a view over virtual memory; in
    a subprocess, as a kernel reading a wrapped offset may crash)."""
    from support import run_isolated
    done = run_isolated("""
        import torch
        from tritonforge.kernels.dwconv import depthwise_conv2d
        store = torch.empty(2**31 + 16, dtype=torch.float16)
        x = store.as_strided((1, 2, 2, 2), (2**31 + 8, 2**31, 2, 1))
        try:
            depthwise_conv2d(x, torch.ones(2, 1, 1, 1, dtype=torch.float16))
        except ValueError as e:
            print("refused" if "channels_last" in str(e) else e)
    """)
    assert done.returncode == 0 and "refused" in done.stdout, (done.returncode, done.stderr[-2000:])
