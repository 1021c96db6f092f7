"""The launch helper every kernel launcher goes through (kernels._common.launch): it launches on the
tensors' device, checks each grid axis against CUDA's limits, and every kernel module uses it.

On the CPU the launches are recorded at the helper (kernel, device, grid) and, for the extreme
shapes, not run at all: only the grids the launchers ask for are checked.
"""
import contextlib
import importlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from tritonforge import kernels

common = importlib.import_module("tritonforge.kernels._common")
attention_mod = importlib.import_module("tritonforge.kernels.attention")

CUDA_AXIS_LIMITS = (2**31 - 1, 65535, 65535)


def evaluated_grids(record):
    """The grid(s) of a recorded launch: the tuple, or the function at every config it may run with."""
    kernel, grid, meta = record["kernel"], record["grid"], record["meta"]
    if not callable(grid):
        return [grid]
    configs = getattr(kernel, "configs", None) or [None]
    return [grid({**meta, **(c.all_kwargs() if c is not None else {})}) for c in configs]


@pytest.fixture
def launches(monkeypatch):
    """Records every launch the helper makes; ``launches.run = False`` records without running."""

    class Recorder(list):
        run = True
        raw = 0

    records = Recorder()
    launch_on = common._launch_on

    def record(device, kernel, grid, args, meta):
        records.append(dict(kernel=kernel, device=device, grid=grid, args=args, meta=meta))
        if records.run:
            launch_on(device, kernel, grid, args, meta)

    interpreted_run = InterpretedFunction.run

    def count_raw(self, *args, **kwargs):  # every launch the interpreter runs, helper or not
        records.raw += 1
        return interpreted_run(self, *args, **kwargs)

    monkeypatch.setattr(common, "_launch_on", record)
    monkeypatch.setattr(InterpretedFunction, "run", count_raw)
    return records


def _attention():
    q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    kernels.attention(q, k, v, causal=True).backward(torch.randn(1, 2, 20, 16, dtype=torch.float16))
    kernels.attention(q, k, v, deterministic=False).sum().backward()


def _rope():
    q, k = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(2))
    cos, sin = torch.rand(5, 4), torch.rand(5, 4)
    sum(t.sum() for t in kernels.rope(q, k, cos, sin)).backward()


def _norms():
    x = torch.randn(6, 32, requires_grad=True)
    w, b = torch.ones(32, requires_grad=True), torch.zeros(32, requires_grad=True)
    kernels.layer_norm(x, w, b).sum().backward()
    kernels.add_rms_norm(x, x.detach(), w)[0].sum().backward()


def _mlp():
    h = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    kernels.gelu_linear_residual(h, w, torch.zeros(16, requires_grad=True), None, torch.randn(8, 16)).sum().backward()


def _dwconv():
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    kernels.depthwise_conv2d(x, w, torch.zeros(4, requires_grad=True), padding=1).sum().backward()


def _swiglu():
    kernels.swiglu(torch.randn(4, 16, requires_grad=True)).sum().backward()


def _cross_entropy():
    logits = torch.randn(4, 10, requires_grad=True)
    kernels.cross_entropy(logits, torch.tensor([1, 2, 3, -100])).backward()
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    kernels.linear_cross_entropy(x, w, torch.tensor([1, 2, 3, 4])).backward()


def _optimizers():
    for make in (kernels.AdamW, kernels.SGD, kernels.Lion):
        p = torch.nn.Parameter(torch.randn(5, 3))
        p.grad = torch.randn(5, 3)
        make([p], lr=0.1).step()
    m, v = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
    m.grad, v.grad = torch.randn(8, 4), torch.randn(4)
    kernels.Muon([dict(params=[m], use_muon=True), dict(params=[v], use_muon=False)], lr=0.02).step()


MODULE_CALLS = {"attention": _attention, "rope": _rope, "norm": _norms, "mlp": _mlp, "dwconv": _dwconv,
                "swiglu": _swiglu, "cross_entropy": _cross_entropy, "optim and muon": _optimizers}


@pytest.mark.parametrize("call", MODULE_CALLS.values(), ids=MODULE_CALLS.keys())
def test_every_kernel_launch_goes_through_the_helper(launches, call):
    """Each module's launches are made by the helper, on the inputs' device: no launch bypasses it
    (the interpreter ran exactly as many kernels as the helper launched)."""
    call()
    assert launches, "no kernel was launched"
    assert launches.raw == len(launches)
    assert {r["device"] for r in launches} == {torch.device("cpu")}


def test_the_launch_enters_the_device_of_the_first_tensor_argument(monkeypatch):
    entered, launched = [], []

    class Kernel:
        __name__ = "kernel"

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(grid)

    def guard(device):
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(common, "device_guard", guard)
    common.launch(Kernel(), (3, 2), 7, torch.empty(1, device="meta"), torch.empty(1), BLOCK=4)
    assert entered == [torch.device("meta")] and launched == [(3, 2)]


def test_the_device_guard_makes_a_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the guard must enter the tensors' one."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    with common.device_guard(torch.device("cuda", 1)):
        pass
    with common.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("grid", [(1, 65536), (1, 1, 65536), (2**31, 1)])
def test_grids_past_cuda_limits_are_refused_before_launching(grid):
    class Kernel:
        __name__ = "kernel"

        def __getitem__(self, grid):
            raise AssertionError("launched")

    with pytest.raises(ValueError, match="grid axis"):
        common.launch(Kernel(), grid, torch.empty(1))
    with pytest.raises(ValueError, match="grid axis"):  # an autotuned kernel's grid, once evaluated
        common.launch(type("Tuned", (), {"__getitem__": lambda self, g: lambda *a, **k: g({})})(),
                      lambda meta: grid, torch.empty(1))


def _extreme_attention(batch, heads, kv_heads, deterministic):
    q = torch.randn(batch, heads, 1, 64, dtype=torch.float16)
    k = torch.randn(batch, kv_heads, 1, 64, dtype=torch.float16)
    out, lse = attention_mod.attention_forward(q, k, k, True, 0.125, 0, deterministic)
    attention_mod.attention_backward(q, q, k, k, out, lse, True, 0.125, 0, deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_grids_fit_cuda_limits_at_extreme_batch_and_head_counts(launches, deterministic):
    """B * H = 65,536 query heads (dK/dV: B * Hkv kv heads) and a 70,000-row rope batch: on axis 1 each
    would be past CUDA's 65,535. The launches are recorded, not run."""
    launches.run = False
    _extreme_attention(4096, 16, 16, deterministic)
    _extreme_attention(2048, 64, 32, deterministic)
    q = torch.randn(70_000, 1, 1, 2)
    kernels.rope(q, q, torch.ones(1, 1), torch.zeros(1, 1))
    for record in launches:
        for grid in evaluated_grids(record):
            assert all(size <= cap for size, cap in zip(grid, CUDA_AXIS_LIMITS)), (record["kernel"], grid)
    # per attention call: forward, preprocess and dK/dV + dQ (or the fused kernel); then rope
    assert len(launches) == 2 * (4 if deterministic else 3) + 1


@pytest.mark.parametrize("allow_tf32, expected", [(False, "ieee"), (True, "tf32")])
def test_fp32_gemms_follow_torchs_tf32_setting(launches, allow_tf32, expected):
    """The ConvNeXt MLP's fp32 GEMMs: IEEE products unless torch's own matmuls may use TF32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        _mlp()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    precisions = [r["meta"]["DOT_PRECISION"] for r in launches if "DOT_PRECISION" in r["meta"]]
    assert len(precisions) == 3 and set(precisions) == {expected}  # forward, input and weight gradients
