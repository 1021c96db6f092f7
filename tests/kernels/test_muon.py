"""kernels.Muon against the float64 reference engine.optim.muon.TorchMuon, and both against torch.

Runs through the Triton interpreter on CPU (the iterations in fp32 there). The parameter set mixes
what breaks naive code: two matrices of one shape (one batched stack), a wide and a tall one
(the Gram matrix on the short side), 1xN and Nx1 rows and columns whose 68-byte slots in the stack
are not 16-byte aligned (the unaligned bucket), and a vector and a bias in AdamW groups.
"""
import copy
import os

import pytest
import torch

from tritonforge import kernels
from tritonforge.engine.optim.muon import TorchMuon

FP32_RTOL = 1e-5  # fp32 kernels + fp32 iterations vs float64, after a few steps
BF16_ITER_RTOL = 3e-2  # torch.optim.Muon iterates in bf16: its update vs a float64 one
BF16_PARAM_RTOL = 1e-2  # bf16 parameters with fp32 master weights vs the fp32-run reference
STEPS = 3
SHAPES = [(24, 40), (24, 40), (40, 24), (1, 17), (17, 1), (33,), (7,)]


def make_params(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(*s, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def mixed_groups(params, **muon):
    """Matrices in a Muon group; the vector decayed and the bias undecayed in AdamW groups."""
    matrices = [p for p in params if p.ndim == 2]
    return [dict(params=matrices, use_muon=True, **muon),
            dict(params=[params[-2]], use_muon=False),
            dict(params=[params[-1]], use_muon=False, weight_decay=0.0)]


def gradients(step, params, scale=1.0):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) * scale for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)


def assert_close(ours, ref, rtol):
    for a, b in zip(ours, ref):
        a, b = a.detach().double(), b.detach().double()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-30))


@pytest.mark.parametrize("options", [
    dict(),
    dict(nesterov=False, momentum=0.8, adjust_lr_fn="original", ns_steps=3, weight_decay=0.0),
], ids=["defaults", "plain-original-3steps"])
def test_matches_float64_reference_with_schedule(options):
    ours, ref = make_params(), make_params(torch.float64)
    opt = kernels.Muon(mixed_groups(ours, **options), lr=0.02)
    opt_ref = TorchMuon(mixed_groups(ref, **options), lr=0.02)
    for step in range(STEPS):
        for o in (opt, opt_ref):
            for group in o.param_groups:
                group["lr"] = 0.02 * (1 - step / STEPS)
        grads = gradients(step, ours)
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        opt_ref.step()
        assert opt.found_inf.item() == 0.0 and opt.grad_norm is None
    assert_close(ours, ref, FP32_RTOL)
    for p, q in zip(ours, ref):
        for key, value in opt_ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key].double(), value.double(), rtol=FP32_RTOL, atol=1e-6)


def test_reference_matches_torch_muon_and_adamw():
    """TorchMuon's Muon part is torch.optim.Muon's (up to its bf16 iterations), its AdamW part AdamW's."""
    ours, ref = make_params(torch.float64), make_params(torch.float64)
    matrices = [p for p in ours if p.ndim == 2]
    opt = TorchMuon([dict(params=matrices, adjust_lr_fn=None),
                     dict(params=ours[-2:], use_muon=False, betas=(0.8, 0.9))], lr=0.01)
    muon = torch.optim.Muon([p for p in ref if p.ndim == 2], lr=0.01)
    adamw = torch.optim.AdamW(ref[-2:], lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)
    start = [p.detach().clone() for p in ref]
    for step in range(2):
        grads = gradients(step, ours)
        set_grads(ours, grads)
        set_grads(ref, grads)
        for o in (opt, muon, adamw):
            o.step()
    assert_close(ours[-2:], ref[-2:], 1e-12)
    deltas = [p.detach() - p0 for p, p0 in zip(ours, start)]
    ref_deltas = [p.detach() - p0 for p, p0 in zip(ref, start)]
    assert_close(deltas[:-2], ref_deltas[:-2], BF16_ITER_RTOL)


def make_transposed_params(dtype=torch.float64, seed=0):
    """Dense non-contiguous matrices, as a transposed weight is (``W.t()`` held as the parameter): a (24, 40)
    one beside a contiguous matrix of its shape, and a tall (40, 24) one."""
    torch.manual_seed(seed)
    transposed = [torch.randn(40, 24, dtype=torch.float64).t(), torch.randn(24, 40, dtype=torch.float64).t()]
    contiguous = torch.randn(24, 40, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (transposed[0], contiguous, transposed[1])]


def set_grads_like(params, grads):
    """Gradients with their parameters' strides, as autograd accumulates them for a dense parameter."""
    for p, g in zip(params, grads):
        p.grad = torch.empty_like(p).copy_(g)


def test_transposed_parameters_are_orthogonalized_as_matrices():
    """A parameter with strides (1, m): the update orthogonalizes the matrix, not its storage read as
    another matrix of the same shape. The fused optimizer against the float64 reference, which against
    torch.optim.Muon."""
    ours, ref, theirs = make_transposed_params(torch.float32), make_transposed_params(), make_transposed_params()
    assert not ours[0].is_contiguous() and not ours[2].is_contiguous()
    opt = kernels.Muon([dict(params=ours)], lr=0.02)
    opt_ref = TorchMuon([dict(params=ref)], lr=0.02)
    opt_torch = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw", weight_decay=0.1)
    start = [p.detach().clone() for p in ref]
    for step in range(STEPS):
        grads = gradients(step, ours)
        for params in (ours, ref, theirs):
            set_grads_like(params, grads)
        for o in (opt, opt_ref, opt_torch):
            o.step()
    assert_close(ours, ref, FP32_RTOL)
    deltas = [p.detach() - p0 for p, p0 in zip(ref, start)]
    torch_deltas = [p.detach() - p0 for p, p0 in zip(theirs, start)]
    assert_close(deltas, torch_deltas, BF16_ITER_RTOL)


def test_state_dicts_load_into_torch_muon_and_back():
    ours = make_params()[:5]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = kernels.Muon(ours, lr=0.01, adjust_lr_fn=None)
    torch_opt = torch.optim.Muon(theirs, lr=0.01)
    for step in range(2):
        set_grads(ours, gradients(step, ours))
        opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0].keys() - {"use_muon"} == torch_opt.state_dict()["param_groups"][0].keys()
    torch_opt.load_state_dict(copy.deepcopy(saved))  # torch would share our buffers otherwise
    for p, q in zip(ours, theirs):
        assert set(torch_opt.state[q]) == {"momentum_buffer"}
        q.data.copy_(p.detach())

    back = [p.detach().clone().requires_grad_() for p in ours]
    fresh = kernels.Muon(back, lr=0.5)
    fresh.load_state_dict(torch_opt.state_dict())  # no use_muon key: ours is kept
    assert fresh.param_groups[0]["use_muon"] and fresh.param_groups[0]["lr"] == 0.01
    before = [p.detach().clone() for p in ours]
    grads = gradients(5, ours)
    for params, o in ((ours, opt), (theirs, torch_opt), (back, fresh)):
        set_grads(params, grads)
        o.step()
    assert_close(back, ours, 0.0)
    assert_close([p.detach() - b for p, b in zip(theirs, before)],
                 [p.detach() - b for p, b in zip(ours, before)], BF16_ITER_RTOL)


def test_resume_from_state_dict_is_exact():
    ours, resumed = make_params(), make_params()
    opt = kernels.Muon(mixed_groups(ours), lr=0.01)
    for step in range(2):
        set_grads(ours, gradients(step, ours))
        opt.step()
    for p, q in zip(resumed, ours):
        p.data.copy_(q.detach())
    opt2 = kernels.Muon(mixed_groups(resumed), lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    assert [g["use_muon"] for g in opt2.param_groups] == [True, False, False]
    grads = gradients(2, ours)
    for params, o in ((ours, opt), (resumed, opt2)):
        set_grads(params, grads)
        o.step()
    assert_close(resumed, ours, 0.0)


def test_loss_scale_and_clipping_match_clipped_reference():
    scale, max_norm = 1024.0, 0.5
    ours, ref = make_params(), make_params(torch.float64)
    opt = kernels.Muon(mixed_groups(ours), lr=0.02, max_grad_norm=max_norm)
    opt.grad_scale = torch.tensor([scale])
    opt_ref = TorchMuon(mixed_groups(ref), lr=0.02)
    for step in range(2):
        grads = gradients(step, ours)
        set_grads(ours, [g * scale for g in grads])
        set_grads(ref, grads)
        norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step()
        opt_ref.step()
        torch.testing.assert_close(opt.grad_norm.double(), norm, rtol=1e-5, atol=0)
        assert norm > max_norm  # the clip is live
    assert_close(ours, ref, FP32_RTOL)


def test_overflow_skips_the_whole_step():
    """inf in a Muon gradient at step 1, NaN in an AdamW gradient at step 2: nothing moves."""
    ours, ref = make_params(), make_params(torch.float64)
    opt = kernels.Muon(mixed_groups(ours), lr=0.02)
    opt_ref = TorchMuon(mixed_groups(ref), lr=0.02)
    opt.grad_scale = torch.tensor([2.0])
    for step in range(4):
        grads = gradients(step, ours)
        if step in (1, 2):
            bad = 0 if step == 1 else 5
            grads[bad] = grads[bad].clone()
            grads[bad].view(-1)[3] = float("inf") if step == 1 else float("nan")
        set_grads(ours, [g * 2.0 for g in grads])
        opt.step()
        assert opt.found_inf.item() == float(step in (1, 2))
        if step not in (1, 2):
            set_grads(ref, grads)
            opt_ref.step()
    assert_close(ours, ref, FP32_RTOL)
    assert opt.state[ours[-1]]["step"].item() == 2.0


def test_skip_flag_skips_the_whole_step():
    """``opt.skip`` (a non-finite loss with finite gradients) at step 1: nothing moves, Muon or AdamW part."""
    ours, ref = make_params(), make_params(torch.float64)
    opt = kernels.Muon(mixed_groups(ours), lr=0.02)
    opt_ref = TorchMuon(mixed_groups(ref), lr=0.02)
    for step in range(3):
        grads = gradients(step, ours)
        set_grads(ours, grads)
        opt.skip = torch.tensor(step == 1)
        opt.step()
        assert opt.found_inf.item() == 0.0
        if step != 1:
            set_grads(ref, grads)
            opt_ref.step()
    assert_close(ours, ref, FP32_RTOL)
    assert opt.state[ours[-1]]["step"].item() == 2.0


def test_bf16_params_with_master_weights_track_fp32_run():
    ours, ref = make_params(torch.bfloat16), make_params(torch.bfloat16)
    ref = [p.detach().float().requires_grad_() for p in ref]
    opt = kernels.Muon(mixed_groups(ours), lr=0.02, master_weights=True)
    opt_ref = kernels.Muon(mixed_groups(ref), lr=0.02)
    for step in range(2):
        grads = gradients(step, ours)
        set_grads(ours, grads)
        set_grads(ref, [g.to(torch.bfloat16) for g in grads])
        opt.step()
        opt_ref.step()
    assert_close([opt.state[p]["master_param"] for p in ours], ref, FP32_RTOL)
    assert_close(ours, [p.to(torch.bfloat16) for p in ref], BF16_PARAM_RTOL)


@pytest.mark.parametrize("make,words", [
    (lambda ps: kernels.Muon(ps[:1], lr=-0.1), "lr"),
    (lambda ps: kernels.Muon(ps[:1], ns_steps=0), "ns_steps"),
    (lambda ps: kernels.Muon(ps[:1], momentum=1.0), "momentum"),
    (lambda ps: kernels.Muon(ps[:1], adjust_lr_fn="spectral"), "adjust_lr_fn"),
    (lambda ps: kernels.Muon(ps[:1], ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
    (lambda ps: kernels.Muon(ps[-1:]), "shape (7,)"),
    (lambda ps: kernels.Muon([torch.zeros(4, 3, 3, 3)]), "conv kernels"),
    (lambda ps: kernels.Muon([dict(params=ps[-1:], use_muon=False, betas=(0.9, 1.0))]), "beta"),
    (lambda ps: kernels.Muon(ps[:1], max_grad_norm=0.0), "max_grad_norm"),
    (lambda ps: TorchMuon(ps[:1], ns_steps=0), "ns_steps"),
    (lambda ps: TorchMuon(ps[:1], lr=-1.0), "lr"),
    (lambda ps: TorchMuon([torch.zeros(4, 3, 3, 3)]), "use_muon=False"),
])
def test_bad_arguments_name_the_argument(make, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make(make_params())


needs_gpu = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
                               reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_iterations_track_the_float64_reference():
    """Compiled kernels, bf16 iterations on the GPT-like shapes, clipping: the update vs float64."""
    torch.manual_seed(0)
    shapes = [(768, 256), (256, 256), (1024, 256), (256, 1024), (256, 1024), (1, 256), (256,), (7,)]
    ours = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
    ref = [p.detach().double().requires_grad_() for p in ours]
    start = [p.detach().double() for p in ours]
    opt = kernels.Muon(mixed_groups(ours), lr=0.01, max_grad_norm=1.0)
    opt_ref = TorchMuon(mixed_groups(ref), lr=0.01)
    for step in range(5):
        grads = [torch.randn_like(p) for p in ref]
        set_grads(ours, grads)
        set_grads(ref, grads)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        opt_ref.step()
    assert opt._plan.ns_dtype == torch.bfloat16
    assert_close([p.detach() - s for p, s in zip(ours, start)], [p.detach() - s for p, s in zip(ref, start)],
                 BF16_ITER_RTOL)


@pytest.mark.gpu
@needs_gpu
def test_gpu_step_never_waits_for_the_device():
    """Table building, a changing lr, loss scaling, clipping and the iterations: no synchronizing call."""
    params = [torch.randn(s, device="cuda").requires_grad_() for s in SHAPES]
    opt = kernels.Muon(mixed_groups(params), lr=1e-3, max_grad_norm=1.0)
    opt.grad_scale = torch.tensor(1024.0, device="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (step + 1)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.found_inf.item() == 0.0
