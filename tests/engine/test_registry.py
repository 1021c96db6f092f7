"""The kernel registry: selection, its errors, and the torch reference ops."""
import math
import warnings

import pytest
import torch

from tritonforge.engine.ops import reference as op_reference, table as op_table

from tritonforge.engine.optim import lion
from tritonforge.engine.errors import KernelSelectionError
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.optim.build import build_optimizer


def test_auto_is_torch_on_cpu():
    ops = resolve({}, "cpu")
    assert set(ops.backends) == set(op_table.op_names())
    assert all(b == "torch" for b in ops.backends.values())
    assert "attention=torch" in ops.describe()


def test_unknown_op_and_backend_list_valid_names():
    valid = "valid ops: attention, layer_norm, rms_norm, mlp, dwconv, cross_entropy, rope, swiglu, nt_xent, optimizer"
    with pytest.raises(KernelSelectionError, match=valid):
        resolve({"softmax": "torch"})
    with pytest.raises(KernelSelectionError, match="valid backends: auto, torch, triton"):
        resolve({"attention": "flash"})


def test_triton_without_a_kernel_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(op_table, "kernels_module", lambda: None)  # e.g. no triton on this platform
    with pytest.raises(KernelSelectionError, match="kernels.layer_norm = 'triton': the kernels package cannot be"):
        resolve({"layer_norm": "triton"}, "cpu")
    assert resolve({"layer_norm": "auto"}, "cpu").backends["layer_norm"] == "torch"


def test_auto_on_cuda_warns_naming_the_import_error_when_the_kernels_cannot_be_imported(monkeypatch, tmp_path):
    broken = tmp_path / "broken_kernels"  # e.g. another distribution's files written over these kernels
    broken.mkdir()
    (broken / "__init__.py").write_text("from triton import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(op_table, "KERNELS_PACKAGE", "broken_kernels")
    with pytest.warns(RuntimeWarning, match=r"serves attention, layer_norm.* with torch, not the Triton kernels: "
                                            r"broken_kernels cannot be imported \(ImportError: cannot import name "
                                            r"'no_such_name'"):
        ops = resolve({"optimizer": "torch"}, "cuda")
    assert set(ops.backends.values()) == {"torch"}
    with pytest.raises(KernelSelectionError, match="kernels.rope = 'triton': broken_kernels cannot be imported"):
        resolve({"rope": "triton"}, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve({op: "torch" for op in op_table.op_names()}, "cuda")  # torch chosen on purpose: no warning
        resolve({}, "cpu")  # auto is torch on CPU by design


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(op_table, "triton_available", lambda op: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelSelectionError, match="needs a CUDA device"):
        resolve({"attention": "triton"}, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve({"attention": "triton"}, "cpu").backends["attention"] == "triton"


def _reference_attention(q, k, v, causal, window, segment_ids=None):
    B, H, S, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = torch.ones(S, S, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window:  # the kernels' band: the last `window` keys, and the next `window - 1` when not causal
        allowed &= j > i - window
        if not causal:
            allowed &= j < i + window
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("causal, window, hkv", [(True, None, 4), (False, None, 4), (True, 3, 4), (False, 3, 4),
                                                 (True, None, 2),
                                                 (True, 2, 1)])
def test_torch_attention_matches_reference(causal, window, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = op_reference.torch_attention(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(out, _reference_attention(q, k, v, causal, window))


@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 3)])
def test_torch_attention_with_segment_ids_matches_reference(causal, window):
    """Packed documents: per batch row its own split, a one-token document among them."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2], [4, 4, 4, 4, 4, 4, 7, 7, 7]])
    out = op_reference.torch_attention(q, k, v, causal=causal, window=window, segment_ids=ids)
    torch.testing.assert_close(out, _reference_attention(q, k, v, causal, window, ids))


def test_fused_add_norm_references():
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    y, new_r = op_reference.torch_add_layer_norm(x, r, w, b)
    torch.testing.assert_close(new_r, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (16,), w, b))
    y, new_r = op_reference.torch_add_rms_norm(x, r, w)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (16,), w, 1e-6))


def test_optimizers_from_the_torch_backend():
    ops = resolve({"optimizer": "torch"}, "cpu")
    p = torch.nn.Parameter(torch.ones(3))
    for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lion", lion.TorchLion)):
        opt, clips = build_optimizer(ops, name, [p], lr=0.1, momentum=0.9)
        assert isinstance(opt, cls) and clips is False


def test_torch_lion_matches_its_formula():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = lion.TorchLion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    g = torch.tensor([0.5, -1.0, 0.0])
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    m = torch.zeros(3)
    expected = torch.tensor([1.0, -2.0, 3.0])
    for _ in range(2):
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), expected)


def test_gelu_linear_residual_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)
    w, b, gamma = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, dtype=torch.float64), \
        torch.rand(4, dtype=torch.float64)
    res = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    rows = torch.tensor([0.0, 2.0]).repeat_interleave(15).double()  # the first sample's branch dropped
    gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    expect = res + rows.view(2, 3, 5, 1) * gamma * (gelu @ w.T + b)
    out = op_reference.torch_gelu_linear_residual(h, w, b, gamma, res, rows)
    torch.testing.assert_close(out, expect)
    assert torch.equal(out[0], res[0])
    torch.testing.assert_close(op_reference.torch_gelu_linear_residual(h, w), gelu @ w.T)


def test_deterministic_reaches_the_triton_attention(monkeypatch):
    seen = {}

    class FakeKernels:
        @staticmethod
        def attention(q, k, v, **kw):
            seen.update(kw)
            return q

    monkeypatch.setattr(op_table, "kernels_module", lambda: FakeKernels)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 1, 2, 16)
    resolve({"attention": "triton"}, "cpu").attention(q, q, q)
    assert seen["deterministic"] is True
    resolve({"attention": "triton"}, "cpu", deterministic=False).attention(q, q, q, causal=False, window=2)
    assert seen == {"causal": False, "scale": None, "window": 2, "deterministic": False, "segment_ids": None}
    ids = torch.zeros(1, 2, dtype=torch.int64)
    resolve({"attention": "triton"}, "cpu").attention(q, q, q, segment_ids=ids)
    assert seen["segment_ids"] is ids
    assert "deterministic=false" in resolve({}, "cpu", deterministic=False).describe()
    assert "deterministic" not in resolve({}, "cpu").describe()
