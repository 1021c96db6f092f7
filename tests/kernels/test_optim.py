"""Fused optimizers against torch.optim (AdamW, SGD) and a float64 reference (Lion).

Runs through the Triton interpreter on CPU: the address tables hold CPU addresses that the
interpreted kernels dereference directly. Each test trains a small model (odd sizes, a layer past
one block, a 1-element bias) for up to 20 steps. Both optimizers of a pair are fed the same
gradients (computed on our model), so differences are the update's rounding, not the divergence
of two training runs.
"""
import copy
import os

import pytest
import torch

from tritonforge import kernels
import tritonforge.kernels._fused as fused
import tritonforge.kernels.optim as ko
from tritonforge.kernels import aot

FP32_RTOL = 1e-6  # params after 20 steps vs torch / the float64 reference
NORM_RTOL = 1e-5  # global grad norm vs torch's (different summation order)
BF16_RTOL = 1e-2  # bf16 params vs the fp32 master reference rounded to bf16
FP16_RTOL = 1e-3
STEPS = 20

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def make_model(seed=0, dtype=torch.float32):
    """Linear 37->45 (1665-element weight: one full block of 1024 and a tail), then 45->1 (a
    1-element bias)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(37, 45), torch.nn.Tanh(), torch.nn.Linear(45, 1))
    return model.to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 37, generator=g).to(dtype)
    y = torch.randn(16, 1, generator=g).to(dtype)
    return x, y


def backward(model, step, scale=1.0):
    x, y = batch(step, next(model.parameters()).dtype)
    loss = (model(x) - y).square().mean().float()
    (loss * scale).backward()


def groups(model, **decayed):
    """Two groups: weights with weight decay (and the given options), biases without."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1], **decayed},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]


def assert_params_close(ours, ref, rtol=FP32_RTOL):
    for a, b in zip(ours, ref):
        a, b = a.detach().double(), b.detach().double()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def share_grads(ours, ref):
    for p, q in zip(ours.parameters(), ref.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()


def train_pair(ours, ref, opt_ours, opt_ref, steps=STEPS, clip=None, schedule=None):
    """Train two identical models side by side; returns (our grad norms, torch's)."""
    norms, ref_norms = [], []
    for step in range(steps):
        if schedule is not None:
            for opt in (opt_ours, opt_ref):
                for group in opt.param_groups:
                    group["lr"] = schedule(step, group)
        opt_ours.zero_grad()
        backward(ours, step)
        share_grads(ours, ref)
        if clip is not None:
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
        opt_ours.step()
        opt_ref.step()
        norms.append(opt_ours.grad_norm)
    return norms, ref_norms


def decaying(step, group):
    return group["lr"] * 0.9


# ----------------------------------------------------------------------------------------------
# Against torch
# ----------------------------------------------------------------------------------------------
def adamw_groups(model):
    """Weights: decay 0.1. Biases: no decay, their own lr, betas, eps, and maximize."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0, "lr": 3e-3,
             "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}]


def test_adamw_matches_torch_with_groups_and_schedule():
    ours, ref = make_model(), make_model()
    opt = kernels.AdamW(adamw_groups(ours), lr=1e-2)
    opt_ref = torch.optim.AdamW(adamw_groups(ref), lr=1e-2, foreach=False)
    train_pair(ours, ref, opt, opt_ref, schedule=decaying)
    assert_params_close(ours.parameters(), ref.parameters())
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert opt.state[p]["step"].item() == opt_ref.state[q]["step"].item() == STEPS
        assert_params_close([opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]],
                            [opt_ref.state[q]["exp_avg"], opt_ref.state[q]["exp_avg_sq"]])
    assert opt.grad_norm is None and opt.found_inf.item() == 0.0


def sgd_groups(model):
    """Weights: Nesterov momentum with decay. Biases: dampened momentum, maximize, no decay."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "momentum": 0.9, "nesterov": True,
             "weight_decay": 0.01},
            {"params": [p for p in params if p.ndim == 1], "momentum": 0.5, "dampening": 0.3,
             "maximize": True, "lr": 0.02}]


def test_sgd_matches_torch():
    ours, ref = make_model(), make_model()
    opt = kernels.SGD(sgd_groups(ours), lr=0.05)
    opt_ref = torch.optim.SGD(sgd_groups(ref), lr=0.05, foreach=False)
    train_pair(ours, ref, opt, opt_ref, schedule=decaying)
    assert_params_close(ours.parameters(), ref.parameters())
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert opt.state[p].keys() == opt_ref.state[q].keys()


def test_sgd_groups_with_and_without_momentum_share_a_step():
    """Groups with momentum 0 and != 0 land in two update launches of the same step."""
    ours, ref = make_model(), make_model()
    spec = [[{"params": list(m.parameters())[:2], "momentum": 0.9, "dampening": 0.2},
             {"params": list(m.parameters())[2:], "weight_decay": 0.01}] for m in (ours, ref)]
    opt = kernels.SGD(spec[0], lr=0.05)
    opt_ref = torch.optim.SGD(spec[1], lr=0.05, foreach=False)
    train_pair(ours, ref, opt, opt_ref, steps=10)
    assert_params_close(ours.parameters(), ref.parameters())
    assert sorted(b.momentum for b in opt._plan.buckets) == [False, True]


class Lion64:
    """Float64 Lion: c = b1*m + (1-b1)*g; p = p*(1-lr*wd) - lr*sign(c); m = b2*m + (1-b2)*g."""

    def __init__(self, params, lr, betas, weight_decay):
        self.params = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.lr, self.betas, self.wd = lr, betas, weight_decay

    def step(self, grads):
        b1, b2 = self.betas
        for p, m, g in zip(self.params, self.m, grads):
            g = g.double()
            p.mul_(1 - self.lr * self.wd)
            p.sub_(self.lr * torch.sign(b1 * m + (1 - b1) * g))
            m.mul_(b2).add_((1 - b2) * g)


def test_lion_matches_float64_reference():
    model = make_model()
    opt = kernels.Lion(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                       max_grad_norm=0.5)
    ref = Lion64(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        backward(model, step)
        clip = min(1.0, 0.5 / (torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) + 1e-6))
        ref.step([p.grad.double() * clip for p in model.parameters()])
        opt.step()
    assert_params_close(model.parameters(), ref.params)
    assert_params_close([opt.state[p]["exp_avg"] for p in model.parameters()], ref.m)


# ----------------------------------------------------------------------------------------------
# Clipping and loss scaling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,max_norm", [("adamw", 0.05), ("sgd", 0.05), ("sgd", 1e3)],
                         ids=["adamw-clips", "sgd-clips", "sgd-does-not-clip"])
def test_clipping_matches_clip_grad_norm(kind, max_norm):
    ours, ref = make_model(), make_model()
    if kind == "adamw":
        opt = kernels.AdamW(ours.parameters(), lr=1e-2, eps=1e-3, max_grad_norm=max_norm)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-3, foreach=False)
    else:
        opt = kernels.SGD(ours.parameters(), lr=0.1, momentum=0.9, max_grad_norm=max_norm)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    norms, ref_norms = train_pair(ours, ref, opt, opt_ref, steps=8, clip=max_norm)
    # 8 momentum steps accumulate the last-bit differences of a different (fused) order of operations: on the
    # 1-element output bias this reaches a few 1e-6 relative
    assert_params_close(ours.parameters(), ref.parameters(), rtol=FP32_RTOL if kind == "adamw" else 1e-5)
    torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms), rtol=NORM_RTOL, atol=0)
    clipped = torch.stack(ref_norms) > max_norm
    assert clipped.all() if max_norm < 1 else not clipped.any()
    assert opt.grad_norm.dtype == torch.float32 and opt.grad_norm.dim() == 0


def test_grad_norm_matches_get_total_norm_with_loss_scale():
    model = make_model()
    opt = kernels.AdamW(model.parameters())
    opt.grad_scale = torch.tensor(256.0)
    backward(model, 0, scale=256.0)
    expected = torch.nn.utils.get_total_norm([p.grad / 256.0 for p in model.parameters()])
    opt.step()
    torch.testing.assert_close(opt.grad_norm, expected, rtol=NORM_RTOL, atol=0)
    assert opt.found_inf.item() == 0.0


def test_overflow_steps_are_skipped_then_training_proceeds():
    scale, bad_steps = 1024.0, {2: float("inf"), 4: float("nan")}
    ours, ref = make_model(), make_model()
    opt = kernels.AdamW(ours.parameters(), lr=1e-2, max_grad_norm=1.0)
    opt.grad_scale = torch.tensor(scale)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for step in range(6):
        opt.zero_grad()
        backward(ours, step, scale=scale)
        if step in bad_steps:
            list(ours.parameters())[2].grad[0, 4] = bad_steps[step]
            before = copy.deepcopy((list(ours.parameters()), opt.state_dict()["state"]))
            opt.step()
            assert opt.found_inf.item() == 1.0
            assert not torch.isfinite(opt.grad_norm)
            after = (list(ours.parameters()), opt.state_dict()["state"])
            torch.testing.assert_close(after, before, rtol=0, atol=0)
            continue
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad * (1.0 / scale)
        opt.step()
        assert opt.found_inf.item() == 0.0
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()
    assert_params_close(ours.parameters(), ref.parameters())
    assert opt.state[next(ours.parameters())]["step"].item() == 4


@pytest.mark.parametrize("make", [
    lambda ps: kernels.AdamW(ps, lr=1e-2, max_grad_norm=1.0),
    lambda ps: kernels.SGD(ps, lr=1e-2, momentum=0.9),
    lambda ps: kernels.Lion(ps, lr=1e-3),
], ids=["adamw-clipped", "sgd-momentum", "lion"])
def test_skip_flag_skips_a_step_with_finite_gradients(make):
    """``opt.skip`` set on the device (the trainer's flag for a non-finite loss, whose gradients may be
    finite) at step 1: nothing is written, step counts included, and found_inf still reports the gradients
    (finite); cleared at step 2, the run is the one without step 1, bit for bit."""
    ours, ref = make_model(), make_model()
    opt, opt_ref = make(ours.parameters()), make(ref.parameters())
    for step in range(3):
        opt.zero_grad()
        backward(ours, step)
        opt.skip = torch.tensor(step == 1)
        before = copy.deepcopy((list(ours.parameters()), opt.state_dict()["state"]))
        opt.step()
        assert opt.found_inf.item() == 0.0
        if step == 1:
            after = (list(ours.parameters()), opt.state_dict()["state"])
            torch.testing.assert_close(after, before, rtol=0, atol=0)
            continue
        opt_ref.zero_grad()
        backward(ref, step)
        opt_ref.step()
    assert_params_close(ours.parameters(), ref.parameters(), rtol=0)


# ----------------------------------------------------------------------------------------------
# Master weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, BF16_RTOL), (torch.float16, FP16_RTOL)])
def test_master_weights_track_fp32_reference(dtype, rtol):
    """Low-precision params: the fp32 master follows torch AdamW run on fp32 copies fed the same
    (unscaled) gradients, and the params are the master rounded to ``dtype``."""
    scale = 64.0
    model = make_model(dtype=dtype)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    opt = kernels.AdamW(groups(model, weight_decay=0.1), lr=1e-2, master_weights=True)
    opt.grad_scale = torch.tensor(scale)
    opt_ref = torch.optim.AdamW([{"params": [m for m in masters if m.ndim > 1], "weight_decay": 0.1},
                                 {"params": [m for m in masters if m.ndim == 1], "weight_decay": 0.0}],
                                lr=1e-2, foreach=False)
    for step in range(6):
        opt.zero_grad()
        backward(model, step, scale=scale)
        for m, p in zip(masters, model.parameters()):
            m.grad = p.grad.float() * (1.0 / scale)
        opt.step()
        opt_ref.step()
    params = list(model.parameters())
    assert all(p.dtype == dtype for p in params)
    assert_params_close([opt.state[p]["master_param"] for p in params], masters)
    assert_params_close([opt.state[p]["exp_avg_sq"] for p in params],
                        [opt_ref.state[m]["exp_avg_sq"] for m in masters])
    for p in params:
        assert torch.equal(p, opt.state[p]["master_param"].to(dtype))
    assert_params_close(params, masters, rtol=rtol)


def test_low_precision_params_need_master_weights():
    with pytest.raises(ValueError, match="master_weights"):
        kernels.AdamW(make_model(dtype=torch.bfloat16).parameters())


# ----------------------------------------------------------------------------------------------
# Parameters without gradients, layout, state dicts
# ----------------------------------------------------------------------------------------------
def test_params_without_grad_are_skipped_like_torch():
    ours, ref = make_model(), make_model()
    opt = kernels.AdamW(ours.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for step in range(8):
        opt.zero_grad()
        backward(ours, step)
        ours[2].bias.grad = None  # never has a gradient
        if step % 2:
            ours[0].weight.grad = None  # the set of tensors changes every step
        share_grads(ours, ref)
        opt.step()
        opt_ref.step()
    assert_params_close(ours.parameters(), ref.parameters())
    assert ours[2].bias not in opt.state
    assert opt.state[ours[0].weight]["step"].item() == opt_ref.state[ref[0].weight]["step"].item() == 4


def test_unaligned_params_take_the_unaligned_bucket():
    """A parameter viewing a flat buffer at a 4-byte offset cannot use 16-byte accesses."""
    def params():
        torch.manual_seed(3)
        flat = torch.randn(1 + 45 * 37 + 45)
        return [torch.nn.Parameter(flat[1:1 + 45 * 37].view(45, 37)),
                torch.nn.Parameter(torch.randn(45))]

    ours, ref = params(), params()
    assert ours[0].data_ptr() % 16 != 0
    opt = kernels.AdamW(ours, lr=1e-2)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(5):
        x, _ = batch(step)
        opt.zero_grad()
        torch.tanh(x @ ours[0].t() + ours[1]).sum().backward()
        for p, q in zip(ours, ref):
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    assert_params_close(ours, ref)
    assert sorted(b.aligned for b in opt._plan.buckets) == [False, True]


def test_channels_last_param_and_grad():
    def params():
        torch.manual_seed(4)
        return [torch.nn.Parameter(torch.randn(6, 5, 3, 3).to(memory_format=torch.channels_last))]

    ours, ref = params(), params()
    opt, opt_ref = kernels.SGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for step in range(3):
        for (w,), opt_ in ((ours, opt), (ref, opt_ref)):
            opt_.zero_grad()
            w.grad = (torch.arange(w.numel(), dtype=torch.float32).view(6, 5, 3, 3) * 1e-3 + step).to(
                memory_format=torch.channels_last)
            opt_.step()
    assert_params_close(ours, ref)
    assert opt.state[ours[0]]["momentum_buffer"].stride() == ours[0].stride()


def make_pair(kind, model, torch_side):
    if kind == "adamw":
        return (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
                if torch_side else kernels.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    options = dict(lr=0.05, momentum=0.9, dampening=0.3)
    return (torch.optim.SGD(model.parameters(), foreach=False, **options) if torch_side
            else kernels.SGD(model.parameters(), **options))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("first", ["ours", "torch"])
def test_state_dict_round_trip_with_torch(kind, first):
    """10 steps with one optimizer, load its state into the other, 10 more == 20 steps of torch."""
    model, ref = make_model(), make_model()
    opt_a = make_pair(kind, model, torch_side=first == "torch")
    opt_ref = make_pair(kind, ref, torch_side=True)
    for step in range(STEPS):
        if step == STEPS // 2:
            opt_b = make_pair(kind, model, torch_side=first != "torch")
            state = opt_a.state_dict()
            ref_keys = {k: set(v) for k, v in opt_ref.state_dict()["state"].items()}
            assert {k: set(v) for k, v in state["state"].items()} == ref_keys
            opt_b.load_state_dict(state)
            opt_a = opt_b
        opt_a.zero_grad()
        backward(model, step)
        share_grads(model, ref)
        opt_a.step()
        opt_ref.step()
    assert_params_close(model.parameters(), ref.parameters())


def test_lion_state_dict_round_trip():
    model, twin = make_model(), make_model()
    opt = kernels.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt_twin = kernels.Lion(twin.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(6):
        if step == 3:
            state = opt.state_dict()
            assert set(state["state"][0]) == {"exp_avg"}
            opt = kernels.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
            opt.load_state_dict(state)
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            backward(m, step)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------
# Launch structure
# ----------------------------------------------------------------------------------------------
def count_launches(monkeypatch):
    launched = []
    real = fused.launch

    def counting(kernel, grid, *args, **meta):
        launched.append(kernel.fn.__name__)
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(fused, "launch", counting)
    return launched


@pytest.mark.parametrize("n_tensors", [2, 24])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_launches_do_not_grow_with_tensor_count(monkeypatch, n_tensors, clip):
    launched = count_launches(monkeypatch)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7 + i)) for i in range(n_tensors)]
    opt = kernels.AdamW(params, max_grad_norm=clip)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    expected = ["_finalize_kernel", "_adamw_update_kernel"]
    assert launched == (["_grad_sumsq_kernel"] if clip else []) + expected


def test_small_chunks_span_many_programs(monkeypatch):
    """Shrunk chunks and blocks: tensors spread over many programs, full blocks plus tails, and
    the finalize kernel loops over partials and tensors."""
    for name, value in dict(CHUNK=256, UPDATE_BLOCK=64, NORM_BLOCK=128, FINALIZE_BLOCK_C=4,
                            FINALIZE_BLOCK_T=2).items():
        monkeypatch.setattr(fused, name, value)
    ours, ref = make_model(), make_model()
    opt = kernels.AdamW(ours.parameters(), lr=1e-2, max_grad_norm=0.1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    norms, ref_norms = train_pair(ours, ref, opt, opt_ref, steps=3, clip=0.1)
    assert_params_close(ours.parameters(), ref.parameters())
    torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms), rtol=NORM_RTOL, atol=0)
    assert opt._plan.n_chunks == 7 + 1 + 1 + 1


def test_step_runs_closure_and_empty_grads():
    model = make_model()
    empty = torch.nn.Parameter(torch.zeros(0))
    opt = kernels.AdamW([*model.parameters(), empty], max_grad_norm=1.0)
    empty.grad = torch.zeros(0)

    def closure():
        opt.zero_grad(set_to_none=False)
        backward(model, 0)
        empty.grad = torch.zeros(0)
        return 1.5

    assert opt.step(closure) == 1.5
    assert opt.state[empty]["step"].item() == 1
    opt.zero_grad()
    opt.step()  # no gradients at all: nothing to do, nothing found
    assert opt.found_inf.item() == 0.0 and opt.grad_norm.item() == 0.0


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory,arg", [
    (lambda ps: kernels.AdamW(ps, amsgrad=True), "amsgrad"),
    (lambda ps: kernels.AdamW(ps, differentiable=True), "differentiable"),
    (lambda ps: kernels.SGD(ps, differentiable=True), "differentiable"),
    (lambda ps: kernels.SGD(ps, nesterov=True), "Nesterov"),
    (lambda ps: kernels.AdamW(ps, betas=(1.0, 0.9)), "beta"),
    (lambda ps: kernels.Lion(ps, max_grad_norm=-1.0), "max_grad_norm"),
])
def test_unsupported_arguments_raise(factory, arg):
    with pytest.raises(ValueError, match=arg):
        factory(make_model().parameters())


def test_torch_arguments_are_accepted():
    ps = list(make_model().parameters())
    kernels.AdamW(ps, 1e-3, (0.9, 0.95), 1e-8, 0.1, False, maximize=False, foreach=True,
                  capturable=True, differentiable=False, fused=True)
    kernels.SGD(ps, 1e-2, 0.9, 0, 1e-4, True, maximize=False, foreach=None, differentiable=False,
                fused=None)


def test_aot_variants_cover_every_kernel():
    variants = ko.aot_variants()
    reached = aot.covered_functions(variants)
    jit = aot.module_jit_functions(ko)
    assert jit and all(id(fn.fn) in reached for fn in jit.values())
    names = {v.name for v in variants if v.kernel is ko._adamw_update_kernel}
    assert {"fp32 aligned BLOCK=1024", "bf16 aligned BLOCK=1024", "fp16 unaligned BLOCK=1024"} <= names


# ----------------------------------------------------------------------------------------------
# GPU (the compiled kernels; the address tables need real device pointers, not the interpreter)
# ----------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                               reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")


def gpu_params(dtype):
    """Odd sizes, a 1-element tensor, one spanning several chunks, one not 16-byte aligned."""
    torch.manual_seed(0)
    flat = torch.randn(1 + 999, device="cuda").to(dtype)
    params = [torch.randn(s, device="cuda").to(dtype) for s in [(1000, 77), (77,), (3, 129, 5), (1,), (40000,)]]
    return [torch.nn.Parameter(t) for t in params + [flat[1:]]]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("master", [False, True])
def test_gpu_matches_torch_fused_with_clipping(master):
    dtype = torch.bfloat16 if master else torch.float32
    ours = gpu_params(dtype)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = kernels.AdamW(ours, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0, master_weights=master)
    opt_ref = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, fused=True)
    for _ in range(10):
        for p, q in zip(ours, ref):
            p.grad = (torch.randn_like(q) * 0.1).to(dtype)
            q.grad = p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        opt_ref.step()
        torch.testing.assert_close(opt.grad_norm, norm, rtol=NORM_RTOL, atol=0)
    assert sorted(b.aligned for b in opt._plan.buckets) == [False, True]
    masters = [opt.state[p]["master_param"] for p in ours] if master else ours
    for a, b in zip(masters, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    for p, m in zip(ours, masters):
        assert torch.equal(p.detach(), m.detach().to(dtype))


@pytest.mark.gpu
@needs_gpu
def test_gpu_step_never_waits_for_the_device():
    """Table building, a changing float lr, loss scaling and clipping: no synchronizing call."""
    params = gpu_params(torch.float32)
    opt = kernels.AdamW(params, lr=1e-3, max_grad_norm=1.0)
    opt.grad_scale = torch.tensor(1024.0, device="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            opt.param_groups[0]["lr"] = 1e-3 * (step + 1)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.found_inf.item() == 0.0


@pytest.mark.gpu
@needs_gpu
def test_gpu_step_captured_in_cuda_graph():
    """A captured step replays with the lr held in a CUDA tensor (powers of two: exact in fp32)."""
    torch.manual_seed(0)
    shapes = [(513, 65), (65,), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    lr = torch.tensor(2.0 ** -7, device="cuda")
    opt = kernels.AdamW(params, lr=lr, max_grad_norm=0.5)
    opt_twin = kernels.AdamW(twin, lr=2.0 ** -7, max_grad_norm=0.5)
    for p, q, g in zip(params, twin, grads):
        p.grad, q.grad = g, g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # builds the tables and the state outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    opt_twin.step()
    for step in range(4):
        lr.fill_(2.0 ** -(8 + step))
        opt_twin.param_groups[0]["lr"] = 2.0 ** -(8 + step)
        graph.replay()
        opt_twin.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt.state[params[0]]["step"].item() == 5
