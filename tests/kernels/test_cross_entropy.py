"""cross_entropy and linear_cross_entropy (kernels.cross_entropy) against a float64 ``F.cross_entropy`` reference:
the loss (every reduction) and the gradients of the logits, or of x, weight and bias for the fused linear version.

On the CPU the kernels run in the Triton interpreter, which walks the vocabulary in blocks of 128 columns
(``_BLOCK_V_INTERPRET``), so V in {1, 7, 128, 129, 300, 1000} covers one partial block, one exact block and
several blocks with a ragged end. The interpreter is slow, hence the few positions per case.

The reference is ``F.cross_entropy`` in float64 on the same values the kernel reads (fp16 / bf16 logits are
upcast exactly), so the only error left is the kernel's own:

* losses: ``|actual - reference| / max(|reference|, 1)`` (largest over positions for ``reduction="none"``;
  the floor of 1 matters only for V = 1, whose loss is 0). Below 1e-5 for every logits dtype: the kernel
  reads the logits exactly and works in fp32, so only the summation order differs.
* gradients: ``max |actual - reference|`` over the reference gradient's largest magnitude, or over the largest
  upstream gradient of one position if that is larger (it bounds every entry of the position's gradient; it
  only matters for V = 1, whose gradient vanishes). fp32: 1e-5 (summation order); fp16: 2e-3 (rounded once to
  fp16); bf16: 2e-2 (rounded once to bf16, truncated rather than rounded in the interpreter). Logits near
  +-1e3 get 1e-4: exp(x - lse) with an fp32 lse there is good to an ulp of 1e3 (6e-5).
* with a soft cap c the reference caps the float64 logits; the kernel's tanh (a polynomial for small
  arguments, one exp above) is good to 2 fp32 ulps, so the tolerances above hold.
* linear_cross_entropy in fp32: loss 1e-5, gradients 1e-4 (the matmuls' summation order). Under bf16 autocast
  (the matmuls in bf16, as F.linear does) against the fp32 inputs' float64 reference: loss 2e-2, gradients
  5e-2.

The GPU tests run the compiled kernels at a GPT-2 shape (N = 4096, V = 50304, d = 768).
"""
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonforge import kernels
from tritonforge.kernels.cross_entropy import cross_entropy, linear_cross_entropy

# kernels/__init__.py re-exports the function under the module's own name, so ``kernels.cross_entropy`` is the
# function; the module is taken from sys.modules.
ce_mod = importlib.import_module("tritonforge.kernels.cross_entropy")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
LOSS_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LINEAR_LOSS_TOL, LINEAR_GRAD_TOL = 1e-5, 1e-4
AUTOCAST_LOSS_TOL, AUTOCAST_GRAD_TOL = 2e-2, 5e-2
# fp32 logits soft-capped at small |z / c|: the capped logits and the gradient to fp32 rounding (a tanh from one
# exp, 1 - 2 / (exp(2u) + 1), is off by an ulp of 1 there: up to 3e-4 relative on the capped logit).
SMALL_CAP_LOSS_TOL, SMALL_CAP_GRAD_TOL = 1e-6, 1e-6
# The kernels' tanh in fp32, relative to float64 at any magnitude: 2 ulps.
TANH_REL_TOL = 2.4e-7
# fp16 head at a realistic size: x and weight rounded to fp16 are the reference's inputs; the logits are rounded
# to fp16 (the loss), their gradient once more before the matmuls, whose fp16 output (dx) once more.
FP16_LINEAR_LOSS_TOL, FP16_LINEAR_GRAD_TOL = 1e-3, 4e-3
# Loss scales as the upstream gradient of an fp16 run's loss: one a dynamic scaler reaches after a back-off, and
# the one it starts from (2^16, which is inf in fp16).
LOSS_SCALE, INITIAL_LOSS_SCALE = 2.0 ** 15, 2.0 ** 16

needs_compiler = pytest.mark.skipif(INTERPRET, reason="needs compiled kernels (TRITON_INTERPRET=0): "
                                                      "the interpreter truncates fp32 to bf16")

V_SIZES = [1, 7, 128, 129, 300, 1000]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def make_logits(lead, v, dtype=torch.float32, *, scale=2.0, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*lead, v, generator=gen)).to(device, dtype)


def make_targets(lead, v, *, ignore=(), ignore_index=-100, dtype=torch.int64, seed=1, device=DEVICE):
    """Random classes in [0, v); the flat positions in `ignore` are set to ignore_index."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, lead, generator=gen)
    flat = t.view(-1)
    for i in ignore:
        flat[i] = ignore_index
    return t.to(device, dtype)


def assert_nothing_counted(loss, reduction, shape):
    """The loss when no position counts, as torch: "mean" nan (0 / 0), "sum" 0, "none" of ``shape``."""
    assert loss.dtype == torch.float32
    if reduction == "mean":
        assert loss.shape == () and math.isnan(loss.item())
    elif reduction == "sum":
        assert loss.shape == () and loss.item() == 0.0
    else:
        assert loss.shape == shape


def reference(logits64, targets, softcap=0.0, **kw):
    """float64 F.cross_entropy over the flattened positions (of ``softcap * tanh(logits / softcap)`` with a
    soft cap); "none" reshaped to targets' shape."""
    if softcap:
        logits64 = softcap * torch.tanh(logits64 / softcap)
    v = logits64.shape[-1]
    out = F.cross_entropy(logits64.reshape(-1, v), targets.cpu().reshape(-1).long(), **kw)
    return out.reshape(targets.shape) if kw.get("reduction") == "none" else out


def _rel_err(actual, expected, floor=1e-30):
    expected = expected.detach().cpu().double()
    if expected.numel() == 0:
        return 0.0
    scale = max(expected.abs().max().item(), floor)
    return (actual.detach().cpu().double() - expected).abs().max().item() / scale


def _loss_err(actual, expected):
    return _rel_err(actual, expected, floor=1.0)


def _n_valid(targets, ignore_index):
    return int((targets != ignore_index).sum())


def check(logits, targets, *, grad_tol=None, grad_out=None, **kw):
    """Loss and logits gradient against float64; dtypes and shapes. Returns (loss, grad, ref, ref_grad)."""
    reduction = kw.get("reduction", "mean")
    grad_tol = GRAD_TOL[logits.dtype] if grad_tol is None else grad_tol
    leaf = logits.detach().requires_grad_()  # detach() keeps the caller's strides
    loss = cross_entropy(leaf, targets, **kw)
    leaf64 = logits.detach().cpu().double().requires_grad_()
    ref = reference(leaf64, targets, **kw)

    assert loss.dtype == torch.float32 and loss.shape == ref.shape, (loss.dtype, loss.shape)
    assert loss.device == logits.device
    assert _loss_err(loss, ref) <= LOSS_TOL, ("loss", _loss_err(loss, ref), loss, ref)

    if grad_out is None:
        grad_out = torch.ones(ref.shape) if reduction != "none" else \
            torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    loss.backward(grad_out.to(loss.device, torch.float32))
    ref.backward(grad_out.double())
    # the largest upstream gradient one position receives bounds its whole row of the gradient
    g = grad_out.abs().max().item() if grad_out.numel() else 0.0
    if reduction == "mean":
        g /= max(_n_valid(targets, kw.get("ignore_index", -100)), 1)
    assert leaf.grad.dtype == logits.dtype and leaf.grad.shape == logits.shape, (leaf.grad.dtype, leaf.grad.shape)
    err = _rel_err(leaf.grad, leaf64.grad, floor=g)
    assert err <= grad_tol, ("grad", err)
    return loss, leaf.grad, ref, leaf64.grad


# ----------------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("v", V_SIZES)
def test_matches_float64_reference(v, label_smoothing):
    """Six positions, one of them ignored (the default ignore_index -100), reduction="mean"."""
    logits = make_logits((6,), v, seed=v)
    targets = make_targets((6,), v, ignore=(2,), seed=v + 1)
    check(logits, targets, label_smoothing=label_smoothing)


@pytest.mark.parametrize("v", [7, 300])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction, v):
    """"sum" and "none" (with a random per-position gradient); ignored positions lose 0 and get no gradient."""
    logits = make_logits((5,), v, seed=3)
    targets = make_targets((5,), v, ignore=(0, 3), seed=4)
    loss, grad, _, _ = check(logits, targets, reduction=reduction, label_smoothing=0.1)
    if reduction == "none":
        assert loss.shape == (5,)
        assert loss[0].item() == 0.0 and loss[3].item() == 0.0
    assert torch.all(grad[0] == 0) and torch.all(grad[3] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_logits(dtype, reduction):
    """fp16 / bf16 logits are read exactly: the loss is fp32 and as accurate as for fp32 logits; the gradient
    is rounded once to the logits' dtype."""
    logits = make_logits((5,), 129, dtype, seed=5)
    targets = make_targets((5,), 129, ignore=(1,), seed=6)
    check(logits, targets, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("lead", [(9,), (2, 3), (1,)], ids=["N", "BxT", "single-position"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leading_shapes(lead, reduction):
    logits = make_logits(lead, 130, seed=8)
    targets = make_targets(lead, 130, seed=9)
    loss, _, _, _ = check(logits, targets, reduction=reduction)
    assert loss.shape == (lead if reduction == "none" else ())


@pytest.mark.parametrize("label_smoothing, reduction", [(0.0, "mean"), (0.1, "none")])
@pytest.mark.parametrize("v", [7, 129, 300])
def test_softcap_matches_float64_reference(v, label_smoothing, reduction):
    """Logits of scale 20 under a cap of 5, so that most are capped hard (an ignored cap, or padding columns
    capped to -5 instead of left out, would be far off); the backward kernel for "none"."""
    logits = make_logits((6,), v, scale=20.0, seed=v + 70)
    targets = make_targets((6,), v, ignore=(4,), seed=v + 71)
    loss, _, _, _ = check(logits, targets, softcap=5.0, label_smoothing=label_smoothing, reduction=reduction)
    assert loss.abs().max().item() <= 2 * 5.0 + math.log(v)  # capped logits bound the loss


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_softcap_half_precision_logits(dtype):
    check(make_logits((5,), 129, dtype, scale=10.0, seed=72), make_targets((5,), 129, seed=73), softcap=3.0,
          reduction="none")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_custom_ignore_index_that_is_also_a_class(label_smoothing):
    """ignore_index=3 with targets in [0, V): the positions whose target is class 3 are ignored (loss 0, no
    gradient, not counted by "mean")."""
    v = 7
    targets = torch.tensor([3, 0, 6, 3, 2, 3, 1], device=DEVICE)
    logits = make_logits((7,), v, seed=10)
    check(logits, targets, ignore_index=3, label_smoothing=label_smoothing)
    loss, grad, _, _ = check(logits, targets, ignore_index=3, label_smoothing=label_smoothing, reduction="none")
    ignored = (targets == 3).cpu()
    assert torch.all(loss.cpu()[ignored] == 0) and torch.all(loss.cpu()[~ignored] > 0)
    assert torch.all(grad.cpu()[ignored] == 0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_positions_ignored(reduction, label_smoothing):
    """As torch: "mean" is nan (0 / 0), "sum" 0, "none" zeros; the gradient is zero everywhere (not nan)."""
    logits = make_logits((4,), 129, seed=11).requires_grad_()
    targets = torch.full((4,), -100, device=DEVICE)
    loss = cross_entropy(logits, targets, reduction=reduction, label_smoothing=label_smoothing)
    assert_nothing_counted(loss, reduction, (4,))
    if reduction == "none":
        assert torch.all(loss == 0)
    loss.backward(torch.ones_like(loss))
    assert torch.equal(logits.grad, torch.zeros_like(logits)), logits.grad


def test_label_smoothing_one():
    """label_smoothing=1.0: the target drops out, the loss is the mean negative log-probability over classes."""
    logits = make_logits((5,), 129, seed=12)
    targets = make_targets((5,), 129, ignore=(4,), seed=13)
    check(logits, targets, label_smoothing=1.0)
    check(logits, targets, label_smoothing=1.0, reduction="none")


def test_int32_targets():
    logits = make_logits((2, 3), 129, seed=14)
    targets = make_targets((2, 3), 129, ignore=(4,), dtype=torch.int32, seed=15)
    check(logits, targets, label_smoothing=0.1)
    check(logits, targets, reduction="none")


def _row_slice(lead, v, seed):  # rows with a stride of v + 37 elements
    big = make_logits(lead, v + 37, seed=seed)
    return big[..., 5:5 + v]


def _column_major(lead, v, seed):  # last dim not unit-stride
    return make_logits(lead, v, seed=seed).transpose(-1, -2).contiguous().transpose(-1, -2)


def _transposed_batch(lead, v, seed):  # (B, T) leading dims that cannot share one row stride
    t = make_logits((lead[1], lead[0]), v, seed=seed)
    return t.transpose(0, 1)


@pytest.mark.parametrize("make_view, lead", [(_row_slice, (6,)), (_column_major, (6,)), (_transposed_batch, (2, 3))],
                         ids=["row-slice", "column-major", "transposed-batch"])
def test_strided_logits(make_view, lead):
    v = 130
    logits = make_view(lead, v, seed=16)
    assert not logits.is_contiguous() and logits.shape == (*lead, v)
    targets = make_targets(lead, v, ignore=(1,), seed=17)
    check(logits, targets, label_smoothing=0.1)
    loss, _, _, _ = check(logits, targets, reduction="none")
    assert loss.shape == lead
    # the input itself is not modified
    assert torch.equal(logits, make_view(lead, v, seed=16))


def test_strided_targets():
    """targets = column 1 of an (N, 2) tensor: a 1-D view with stride 2 (reshape(-1) keeps it a view)."""
    v = 130
    logits = make_logits((6,), v, seed=26)
    pairs = torch.stack([make_targets((6,), v, seed=27), make_targets((6,), v, ignore=(2,), seed=28)], 1)
    targets = pairs[:, 1]
    assert targets.stride() == (2,)
    check(logits, targets, label_smoothing=0.1)
    check(logits, targets, reduction="none")


def test_none_with_the_expanded_gradient_of_a_sum():
    """``cross_entropy(..., reduction="none").sum().backward()``: an upstream gradient with stride 0."""
    logits = make_logits((2, 3), 129, seed=29)
    targets = make_targets((2, 3), 129, ignore=(1,), seed=30)
    check(logits, targets, reduction="none", grad_out=torch.ones(()).expand(2, 3))


# Run with warnings as errors: masked-off columns must not overflow exp either (the interpreter's numpy warns).
@pytest.mark.filterwarnings("error:overflow encountered in exp:RuntimeWarning")
def test_large_logits_do_not_overflow():
    """Logits around +-1e3 with a spread of 100 (exp overflows fp32 without the running max). The gradient is
    checked to 1e-4: exp(x - lse) with x and the fp32 lse near 1e3 is good to an ulp of 1e3 (6e-5)."""
    logits = make_logits((4,), 300, scale=100.0, seed=18) + 1000.0
    targets = make_targets((4,), 300, seed=19)
    loss, grad, _, _ = check(logits, targets, label_smoothing=0.1, grad_tol=1e-4)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    check(-logits, targets, reduction="none", grad_tol=1e-4)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_first_block_all_minus_inf(label_smoothing):
    """Masked vocabulary entries (-inf logits) filling the first 128-column block of a row: the online
    log-sum-exp starts from a block whose maximum is -inf and must not compute exp(-inf - (-inf)). Torch's loss
    is finite; so must the kernel's be, and its gradient 0 on the masked columns."""
    logits = make_logits((4,), 300, seed=80)
    logits[:2, :150] = float("-inf")  # two rows: the whole first block and part of the second
    logits[3, 128:256] = float("-inf")  # a later block alone
    targets = make_targets((4,), 300, seed=81).clamp(min=256)
    loss, grad, _, _ = check(logits, targets, reduction="none", label_smoothing=0.0)
    assert torch.all(torch.isfinite(loss)) and torch.all(grad[:2, :150] == 0)
    if label_smoothing:  # torch: eps / V of -inf logits gives an infinite loss, and so must the kernel
        loss = cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
        ref = reference(logits.double(), targets, reduction="none", label_smoothing=label_smoothing)
        assert torch.equal(torch.isinf(loss), torch.isinf(ref)) and not torch.any(torch.isnan(loss))


def test_linear_first_block_all_minus_inf():
    """The fused head with a bias of -inf on the first 150 classes (masked classes): a finite loss, as torch."""
    x, weight, b = make_linear((6,), 16, 300, seed=82)
    b[:150] = float("-inf")
    targets = make_targets((6,), 300, seed=83).clamp(min=150)
    check_linear(x, weight, b, targets, chunk_size=4, requires=("x", "weight"))


@triton.jit
def _tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Y + offs, ce_mod._tanh(tl.load(X + offs, mask=mask)), mask=mask)


def test_kernel_tanh_is_accurate_at_every_magnitude():
    """The soft cap's tanh in fp32 against float64, relative: small |u| (where 1 - 2 / (exp(2u) + 1) cancels
    to an ulp of 1), the switch between formulas, saturation, +-inf and 0."""
    u = torch.cat([torch.logspace(-30, 1.5, 2000), torch.linspace(0.85, 0.95, 1001), torch.tensor([0.0, float("inf")])])
    u = torch.cat([u, -u]).float()
    out = torch.empty_like(u)
    _tanh_kernel[(triton.cdiv(u.numel(), 1024),)](u, out, u.numel(), BLOCK=1024)
    ref = torch.tanh(u.double())
    err = ((out.double() - ref).abs() / ref.abs().clamp(min=1e-300)).max().item()
    assert err <= TANH_REL_TOL, err


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_small_logits_fp32(reduction):
    """fp32 logits |z| < 1 under a cap of 50 (|z / c| < 0.02) over V = 7 classes (softmax ~1/7, so an error
    in a capped logit shows in the gradient): the loss (it holds the capped target logit) and the gradient
    against float64 to fp32 rounding."""
    gen = torch.Generator().manual_seed(84)
    logits = (2.0 * torch.rand(64, 7, generator=gen) - 1.0).to(DEVICE)
    targets = make_targets((64,), 7, seed=85)
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf, targets, softcap=50.0, reduction=reduction)
    leaf64 = logits.double().requires_grad_()
    ref = reference(leaf64, targets, softcap=50.0, reduction=reduction)
    assert _loss_err(loss, ref) <= SMALL_CAP_LOSS_TOL, _loss_err(loss, ref)
    loss.sum().backward()
    ref.sum().backward()
    assert _rel_err(leaf.grad, leaf64.grad) <= SMALL_CAP_GRAD_TOL, _rel_err(leaf.grad, leaf64.grad)


def test_upstream_gradient_scales_the_gradient():
    logits = make_logits((5,), 129, seed=20)
    targets = make_targets((5,), 129, ignore=(2,), seed=21)
    check(logits, targets, grad_out=torch.tensor(3.0))
    check(logits, targets, reduction="sum", grad_out=torch.tensor(-0.25))


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["N=0", "3x0"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(reduction, lead):
    logits = make_logits(lead, 7, seed=22).requires_grad_()
    targets = torch.zeros(lead, dtype=torch.int64, device=DEVICE)
    loss = cross_entropy(logits, targets, reduction=reduction)
    assert_nothing_counted(loss, reduction, lead)
    loss.backward(torch.ones_like(loss))
    assert logits.grad.shape == logits.shape and logits.grad.dtype == logits.dtype


def _ce_args(**change):
    args = {"logits": make_logits((4,), 7, seed=23), "targets": make_targets((4,), 7, seed=24)}
    kwargs = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    return args, kwargs


@pytest.mark.parametrize("change, name", [
    (lambda: _ce_args(logits=torch.randint(0, 5, (4, 7), device=DEVICE)), "logits"),
    (lambda: _ce_args(targets=torch.zeros(4, device=DEVICE)), "targets"),
    (lambda: _ce_args(targets=torch.zeros(5, dtype=torch.int64, device=DEVICE)), "targets"),
    (lambda: _ce_args(targets=torch.zeros(4, 1, dtype=torch.int64, device=DEVICE)), "targets"),
    (lambda: _ce_args(logits=torch.zeros(4, 0, device=DEVICE)), "logits"),
    (lambda: _ce_args(label_smoothing=-0.1), "label_smoothing"),
    (lambda: _ce_args(label_smoothing=1.5), "label_smoothing"),
    (lambda: _ce_args(reduction="avg"), "reduction"),
    (lambda: _ce_args(softcap=-1.0), "softcap"),
    (lambda: _ce_args(softcap=float("inf")), "softcap"),
], ids=["logits-int", "targets-float", "targets-length", "targets-extra-dim", "V=0", "smoothing-negative",
        "smoothing-above-one", "reduction-unknown", "softcap-negative", "softcap-inf"])
def test_validation_errors_name_the_argument(change, name):
    args, kwargs = change()
    with pytest.raises(ValueError, match=name):
        cross_entropy(args["logits"], args["targets"], **kwargs)


@pytest.mark.parametrize("bad, ignore_index", [(7, -100), (-1, -100), (-100, 3)],
                         ids=["target=V", "target=-1", "target=-100-with-ignore_index=3"])
def test_out_of_range_target_is_an_error_on_cpu(bad, ignore_index):
    logits = make_logits((4,), 7, seed=25, device="cpu")
    targets = torch.tensor([0, 3, bad, 6])
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(logits, targets, ignore_index=ignore_index)


def test_out_of_range_target_has_a_nan_gradient_as_well_as_loss():
    """On CUDA a target outside [0, V) is not checked (a sync per step): its loss is NaN, and so is its row of
    the gradient, in the fused forward and in the backward, so that a check of the gradients for inf/NaN (a
    loss scaler's, a fused optimizer's) sees the bad row too. The kernels are run directly here: on CPU
    tensors the functions raise first."""
    logits = make_logits((3,), 300, seed=90)
    targets = torch.tensor([5, 300, -100], device=DEVICE)
    loss, lse = torch.empty(3, device=DEVICE), torch.empty(3, device=DEVICE)
    grad = logits.clone()
    ce_mod._forward_rows(grad, targets, -100, 0.0, 0.0, loss, lse, grad=grad)
    backward = torch.ops.tritonforge.cross_entropy_backward(torch.ones(3, device=DEVICE), logits, targets, lse,
                                                             -100, 0.0, 0.0)
    for g in (grad, backward):
        assert torch.all(torch.isfinite(g[0])) and torch.all(torch.isnan(g[1])) and torch.all(g[2] == 0)
    assert math.isnan(loss[1].item()) and torch.isfinite(loss[0]) and loss[2].item() == 0.0


def test_interpreter_block_and_exports():
    """The V sizes above assume 128-column blocks in the interpreter."""
    assert ce_mod._BLOCK_V_INTERPRET == 128
    assert kernels.cross_entropy is ce_mod.cross_entropy is cross_entropy
    assert kernels.linear_cross_entropy is ce_mod.linear_cross_entropy is linear_cross_entropy


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy
# ----------------------------------------------------------------------------------------------
def make_linear(lead, d, v, *, bias=True, seed=30, device=DEVICE):
    """(x, weight, bias) in fp32 with O(1) logits."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * (2.0 / d ** 0.5)
    b = 0.5 * torch.randn(v, generator=gen) if bias else None
    return x.to(device), weight.to(device), (b.to(device) if b is not None else None)


def check_linear(x, weight, bias, targets, *, requires=("x", "weight", "bias"), scale=1.0,
                 loss_tol=LINEAR_LOSS_TOL, grad_tol=LINEAR_GRAD_TOL, autocast=False, **kw):
    """Loss and the gradients of the leaves named in `requires` against float64 F.linear + F.cross_entropy;
    the other leaves get no gradient. Returns the loss and the gradients (None where not required)."""
    names = ("x", "weight", "bias")
    leaves = [t.detach().requires_grad_(n in requires) if t is not None else None
              for n, t in zip(names, (x, weight, bias))]
    if autocast:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = linear_cross_entropy(*leaves[:2], targets, leaves[2], **kw)
    else:
        loss = linear_cross_entropy(*leaves[:2], targets, leaves[2], **kw)
    leaves64 = [t.detach().cpu().double().requires_grad_(n in requires) if t is not None else None
                for n, t in zip(names, (x, weight, bias))]
    ce_kw = {k: val for k, val in kw.items() if k != "chunk_size"}
    ref = reference(F.linear(*leaves64), targets, **ce_kw)

    assert loss.dtype == torch.float32 and loss.shape == (), (loss.dtype, loss.shape)
    assert _loss_err(loss, ref) <= loss_tol, ("loss", _loss_err(loss, ref), loss, ref)
    grads = [None, None, None]
    if any(t is not None and t.requires_grad for t in leaves):
        (loss * scale).backward()
        (ref * scale).backward()
    for i, (n, leaf, leaf64) in enumerate(zip(names, leaves, leaves64)):
        if leaf is None:
            continue
        if n not in requires:
            assert leaf.grad is None, n
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, n
        err = _rel_err(leaf.grad, leaf64.grad)
        assert err <= grad_tol, (f"d{n}", err)
        grads[i] = leaf.grad
    return loss, grads


@pytest.mark.parametrize("chunk_size", [1, 3, 1000, None], ids=["chunk1", "chunk3", "chunk1000", "default"])
@pytest.mark.parametrize("reduction, label_smoothing, bias", [("mean", 0.0, True), ("sum", 0.1, False)],
                         ids=["mean-bias", "sum-smoothing-no-bias"])
def test_linear_matches_float64_reference(chunk_size, reduction, label_smoothing, bias):
    """N = 7 rows (not a multiple of 3), one ignored, V = 129, d = 16."""
    x, weight, b = make_linear((7,), 16, 129, bias=bias)
    targets = make_targets((7,), 129, ignore=(5,), seed=31)
    check_linear(x, weight, b, targets, chunk_size=chunk_size, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction, label_smoothing", [("mean", 0.0), ("sum", 0.1)])
def test_linear_softcap_matches_float64_reference(reduction, label_smoothing):
    """A cap of 1.5 on O(1) logits, chunks of 3 over N = 7 rows (V = 129): the gradients through the cap."""
    x, weight, b = make_linear((7,), 16, 129, seed=74)
    targets = make_targets((7,), 129, ignore=(2,), seed=75)
    check_linear(x, weight, b, targets, chunk_size=3, softcap=1.5, reduction=reduction,
                 label_smoothing=label_smoothing)


def test_linear_does_not_depend_on_chunk_size():
    """The chunking changes only the order of the sums: every chunk size agrees with the others to rounding."""
    x, weight, b = make_linear((2, 4), 12, 130, seed=32)
    targets = make_targets((2, 4), 130, ignore=(3,), seed=33)
    results = {c: check_linear(x, weight, b, targets, chunk_size=c, label_smoothing=0.1) for c in (1, 3, 1000, None)}
    loss1, grads1 = results[1]
    for c, (loss, grads) in results.items():
        assert _loss_err(loss, loss1) <= 1e-6, (c, "loss")
        for n, g, g1 in zip(("x", "weight", "bias"), grads, grads1):
            assert _rel_err(g, g1) <= LINEAR_GRAD_TOL, (c, n)


@pytest.mark.parametrize("requires", [("weight",), ("weight", "bias")], ids=["only-weight", "x-without-grad"])
def test_linear_gradients_only_where_required(requires):
    x, weight, b = make_linear((6,), 16, 129, seed=34)
    targets = make_targets((6,), 129, ignore=(0,), seed=35)
    check_linear(x, weight, b, targets, requires=requires, chunk_size=4)


def test_linear_upstream_gradient_scales_all_gradients():
    x, weight, b = make_linear((5,), 16, 129, seed=36)
    targets = make_targets((5,), 129, seed=37)
    _, grads3 = check_linear(x, weight, b, targets, scale=3.0, chunk_size=2)
    _, grads1 = check_linear(x, weight, b, targets, chunk_size=2)
    for n, g3, g1 in zip(("x", "weight", "bias"), grads3, grads1):
        assert _rel_err(g3, 3.0 * g1) <= 1e-6, n


def test_linear_leading_shape_int32_targets_and_custom_ignore_index():
    x, weight, b = make_linear((2, 3), 8, 40, seed=38)
    targets = make_targets((2, 3), 40, seed=39, dtype=torch.int32)
    targets[0, 1] = 3
    check_linear(x, weight, b, targets, ignore_index=3, chunk_size=4, label_smoothing=0.1)


def test_linear_row_slice_of_x():
    """x = big[:, 2:18]: rows with a stride of 24 elements."""
    big, weight, b = make_linear((5,), 24, 129, seed=40)
    x = big[:, 2:18]
    weight = weight[:, :16].contiguous()
    targets = make_targets((5,), 129, seed=41)
    check_linear(x, weight, b, targets, chunk_size=2)


def test_linear_without_grad():
    """No leaf requires grad, or grad mode is off: just the loss."""
    x, weight, b = make_linear((5,), 16, 129, seed=42)
    targets = make_targets((5,), 129, ignore=(1,), seed=43)
    check_linear(x, weight, b, targets, requires=(), chunk_size=2)
    ref = reference(F.linear(x.double(), weight.double(), b.double()), targets)
    with torch.no_grad():
        loss = linear_cross_entropy(x.requires_grad_(), weight.requires_grad_(), targets, b, chunk_size=2)
    assert not loss.requires_grad and _loss_err(loss, ref) <= LINEAR_LOSS_TOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_all_positions_ignored(reduction):
    """As torch: "mean" is nan, "sum" 0; every gradient is zero (not nan)."""
    x, weight, b = make_linear((4,), 8, 20, seed=44)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    targets = torch.full((4,), -100, device=DEVICE)
    loss = linear_cross_entropy(leaves[0], leaves[1], targets, leaves[2], reduction=reduction, chunk_size=3)
    assert math.isnan(loss.item()) if reduction == "mean" else loss.item() == 0.0
    loss.backward()
    for n, leaf in zip(("x", "weight", "bias"), leaves):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), n


def test_linear_strided_targets():
    """targets = column 0 of an (N, 2) tensor: a 1-D view with stride 2."""
    x, weight, b = make_linear((5,), 16, 129, seed=49)
    pairs = torch.stack([make_targets((5,), 129, ignore=(3,), seed=50), make_targets((5,), 129, seed=51)], 1)
    targets = pairs[:, 0]
    assert targets.stride() == (2,)
    check_linear(x, weight, b, targets, chunk_size=2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_empty_input(reduction):
    """No rows: "mean" is nan, "sum" 0 (as torch); the gradients are empty / zero."""
    x, weight, b = make_linear((0,), 8, 20, seed=52)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], torch.zeros(0, dtype=torch.int64, device=DEVICE), leaves[2],
                                reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert math.isnan(loss.item()) if reduction == "mean" else loss.item() == 0.0
    loss.backward()
    assert leaves[0].grad.shape == (0, 8)
    for n, leaf in zip(("weight", "bias"), leaves[1:]):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), n


def test_linear_under_bf16_autocast():
    """Under autocast the matmuls run in bf16, as F.linear does: loose tolerances against the float64 reference
    of the fp32 inputs; the gradients of the fp32 leaves are fp32."""
    x, weight, b = make_linear((8,), 32, 200, seed=45)
    targets = make_targets((8,), 200, ignore=(6,), seed=46)
    check_linear(x, weight, b, targets, chunk_size=3, autocast=True,
                 loss_tol=AUTOCAST_LOSS_TOL, grad_tol=AUTOCAST_GRAD_TOL)


@pytest.mark.slow  # the interpreter walks 33M logits twice: about 75 s of one CPU core
def test_linear_fp16_gradients_do_not_underflow(monkeypatch):
    """An fp16 head at a realistic size, N = 8192 counted positions and V = 4096, with the loss scale as the
    upstream gradient: the mean's 1 / N times a softmax of ~1/V is ~3e-8, below fp16's smallest subnormal
    (6e-8), so the logits' gradient must not be stored in fp16 with 1 / N applied and the loss scale not
    yet. dx and dW against float64, and no entry of dW zero (none of the reference's is). One 4096-column
    block per row, as on a GPU: fewer interpreted steps than the 128-column blocks of the other tests."""
    monkeypatch.setattr(ce_mod, "_BLOCK_V_INTERPRET", 4096)
    n, v, d = 8192, 4096, 8
    gen = torch.Generator().manual_seed(86)
    x = torch.randn(n, d, generator=gen).to(DEVICE, torch.float16)
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).to(DEVICE, torch.float16)
    targets = make_targets((n,), v, seed=87)
    _, (dx, dw, _) = check_linear(x, weight, None, targets, scale=LOSS_SCALE, requires=("x", "weight"),
                                  loss_tol=FP16_LINEAR_LOSS_TOL, grad_tol=FP16_LINEAR_GRAD_TOL)
    assert torch.all(dw != 0)


def test_linear_fp16_initial_loss_scale_is_not_inf():
    """An upstream gradient of 2^16 (a loss scaler's first step) is applied in fp32: rounded to fp16 it would be
    inf, and every gradient inf or NaN."""
    x, weight, b = make_linear((6,), 16, 129, seed=88)
    targets = make_targets((6,), 129, ignore=(2,), seed=89)
    check_linear(x.half(), weight.half(), b.half(), targets, scale=INITIAL_LOSS_SCALE, chunk_size=4,
                 loss_tol=FP16_LINEAR_LOSS_TOL, grad_tol=FP16_LINEAR_GRAD_TOL)


def _lin_args(**change):
    x, weight, b = make_linear((4,), 8, 20, seed=47)
    args = {"x": x, "weight": weight, "targets": make_targets((4,), 20, seed=48), "bias": b}
    kwargs = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    return args, kwargs


@pytest.mark.parametrize("change, name", [
    (lambda: _lin_args(weight=torch.zeros(8, device=DEVICE)), "weight"),
    (lambda: _lin_args(weight=torch.zeros(2, 20, 8, device=DEVICE)), "weight"),
    (lambda: _lin_args(weight=torch.zeros(20, 9, device=DEVICE)), "weight"),
    (lambda: _lin_args(bias=torch.zeros(21, device=DEVICE)), "bias"),
    (lambda: _lin_args(bias=torch.zeros(20, 1, device=DEVICE)), "bias"),
    (lambda: _lin_args(targets=torch.zeros(5, dtype=torch.int64, device=DEVICE)), "targets"),
    (lambda: _lin_args(targets=torch.zeros(4, device=DEVICE)), "targets"),
    (lambda: _lin_args(reduction="none"), "reduction"),
    (lambda: _lin_args(reduction="avg"), "reduction"),
    (lambda: _lin_args(label_smoothing=1.5), "label_smoothing"),
    (lambda: _lin_args(chunk_size=0), "chunk_size"),
    (lambda: _lin_args(chunk_size=-2), "chunk_size"),
    (lambda: _lin_args(softcap=True), "softcap"),
], ids=["weight-1d", "weight-3d", "weight-d-mismatch", "bias-length", "bias-2d", "targets-length",
        "targets-float", "reduction-none", "reduction-unknown", "smoothing-above-one", "chunk-0", "chunk-negative",
        "softcap-bool"])
def test_linear_validation_errors_name_the_argument(change, name):
    args, kwargs = change()
    with pytest.raises(ValueError, match=name):
        linear_cross_entropy(args["x"], args["weight"], args["targets"], args["bias"], **kwargs)


# ----------------------------------------------------------------------------------------------
# GPU (compiled kernels): GPT-2's language-model head
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    logits = make_logits((5,), 130).requires_grad_()
    targets = make_targets((5,), 130, ignore=(2,), seed=60)
    # the forward's opcheck also runs the autograd registration, hence the backward op
    torch.library.opcheck(torch.ops.tritonforge.cross_entropy_forward.default, (logits, targets, -100, 0.1, 5.0))
    _, lse = torch.ops.tritonforge.cross_entropy_forward(logits.detach(), targets, -100, 0.1, 0.0)
    torch.library.opcheck(torch.ops.tritonforge.cross_entropy_backward.default,
                          (torch.rand(5), logits.detach(), targets, lse, -100, 0.1, 0.0))
    gen = torch.Generator().manual_seed(61)
    x, weight = torch.randn(7, 8, generator=gen), torch.randn(130, 8, generator=gen)
    bias = torch.randn(130, generator=gen)
    torch.library.opcheck(torch.ops.tritonforge.linear_cross_entropy.default,
                          (x, weight, bias, targets.repeat(2)[:7], -100, 0.0, 5.0, True, 3, torch.float32,
                           True, True, True))
    # gradients not asked for come back as empty (0,) tensors
    _, dx, dw, db, _ = torch.ops.tritonforge.linear_cross_entropy(x, weight, None, targets.repeat(2)[:7], -100, 0.0,
                                                                0.0, False, 4, torch.float32, False, True, False)
    assert dx.shape == (0,) and db.shape == (0,) and dw.shape == weight.shape


def test_torch_compile_fullgraph_forward_and_backward():
    """Both ops are opaque to torch.compile: one graph, the same loss and gradients as eager, bit for bit."""
    logits0 = make_logits((2, 3), 150, seed=62)
    targets = make_targets((2, 3), 150, ignore=(4,), seed=63)
    gen = torch.Generator().manual_seed(64)
    x0, w0 = torch.randn(2, 3, 8, generator=gen), torch.randn(150, 8, generator=gen)

    def loss(logits, x, weight):
        return (cross_entropy(logits, targets, label_smoothing=0.1, reduction="sum")
                + 2 * linear_cross_entropy(x, weight, targets, chunk_size=4))

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, loss):
        leaves = [t.detach().clone().requires_grad_() for t in (logits0, x0, w0)]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [t.grad for t in leaves])
    for name, got, expected in zip(("loss", "logits", "x", "weight"), *results):
        assert torch.equal(got, expected), name


@pytest.mark.gpu
@needs_compiler
class TestGPU:
    N, V, D = 4096, 50304, 768

    def _targets(self, seed):
        t = make_targets((self.N,), self.V, seed=seed, device="cuda")
        t[::17] = -100
        return t

    def test_linear_cross_entropy_bf16_autocast_matches_fp32_torch(self):
        """Loss rel 1e-2, gradients (x, weight, bias) rel-to-max 3e-2 against fp32 F.linear + F.cross_entropy."""
        x, weight, b = make_linear((self.N,), self.D, self.V, seed=50, device="cuda")
        targets = self._targets(51)
        leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(leaves[0], leaves[1], targets, leaves[2], label_smoothing=0.1)
        loss.backward()
        ref_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
        ref = F.cross_entropy(F.linear(*ref_leaves), targets, label_smoothing=0.1)
        ref.backward()
        assert loss.dtype == torch.float32
        assert _loss_err(loss, ref) <= 1e-2, _loss_err(loss, ref)
        for n, leaf, ref_leaf in zip(("x", "weight", "bias"), leaves, ref_leaves):
            assert leaf.grad.dtype == torch.float32, n
            assert _rel_err(leaf.grad, ref_leaf.grad) <= 3e-2, (n, _rel_err(leaf.grad, ref_leaf.grad))

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_bf16_cross_entropy_matches_float64(self, reduction):
        """Loss rel 1e-5 (bf16 read exactly, fp32 math); gradient rel-to-max 1e-2 (rounded once to bf16)."""
        logits = make_logits((self.N,), self.V, torch.bfloat16, seed=52, device="cuda")
        targets = self._targets(53)
        leaf = logits.clone().requires_grad_()
        loss = cross_entropy(leaf, targets, label_smoothing=0.1, reduction=reduction)
        leaf64 = logits.double().requires_grad_()
        ref = F.cross_entropy(leaf64, targets, label_smoothing=0.1, reduction=reduction)
        assert loss.dtype == torch.float32 and loss.shape == ref.shape
        assert _loss_err(loss, ref) <= 1e-5, _loss_err(loss, ref)
        grad_out = torch.ones_like(ref) if reduction == "mean" else \
            torch.randn(ref.shape, device="cuda", dtype=torch.float64)
        loss.backward(grad_out.float())
        ref.backward(grad_out)
        assert leaf.grad.dtype == torch.bfloat16
        assert _rel_err(leaf.grad, leaf64.grad) <= 1e-2, _rel_err(leaf.grad, leaf64.grad)
