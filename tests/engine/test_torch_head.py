"""The torch backend of the head and its loss (``linear_cross_entropy``): ``F.linear_cross_entropy``'s chunked
path where the head is wide, the logits materialized elsewhere, both against float64."""
import pytest
import torch

from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.ops import reference as R, select as op_select
from tritonforge.engine.ops.tune import LINEAR_CROSS_ENTROPY_PATHS, torch_candidates

pytestmark = pytest.mark.skipif(not R.has_chunked_linear_cross_entropy(),
                                reason="this PyTorch has no F.linear_cross_entropy")

#: Relative error of the loss and each gradient against float64, by dtype (16-bit: one rounding of the
#: operands and of the returned loss, fp32 accumulation inside).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
PATHS = [R.torch_chunked_linear_cross_entropy, R.torch_logits_linear_cross_entropy]


def _head(shape, d, v, dtype, seed, ignore=0.0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(v, d, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, shape, generator=g)
    if ignore:
        t[torch.rand(shape, generator=g) < ignore] = -100
    return x, w, b, t


def _run(fn, x, w, b, t, dtype):
    leaves = [a.to(dtype).clone().requires_grad_() for a in (x, w, b) if a is not None]
    loss = fn(leaves[0], leaves[1], t, leaves[2] if b is not None else None)
    loss.backward()
    return loss, [leaf.grad for leaf in leaves]


def _err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__.split("_")[1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,d,v,ignore", [((1,), 8, 40, 0.0), ((3, 7), 16, 129, 0.2), ((2, 65), 24, 1000, 0.5)])
def test_each_path_matches_float64(path, dtype, shape, d, v, ignore):
    x, w, b, t = _head(shape, d, v, dtype, seed=d + v, ignore=ignore)
    ref_loss, ref_grads = _run(R.torch_logits_linear_cross_entropy, x, w, b, t, torch.float64)
    loss, grads = _run(path, x, w, b, t, dtype)
    assert loss.dtype == torch.float32  # the loss is fp32 whatever the operands
    assert _err(loss, ref_loss) <= TOL[dtype]
    for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype and _err(g, r) <= TOL[dtype], name


def test_the_head_takes_the_chunked_path_when_wide(monkeypatch):
    calls = []
    chunked = R.torch_chunked_linear_cross_entropy
    monkeypatch.setattr(R, "torch_chunked_linear_cross_entropy", lambda *a: calls.append("chunked") or chunked(*a))
    x, w, b, t = _head((5,), 8, 4 * 8, torch.float32, seed=1)
    R.torch_linear_cross_entropy(x, w, t, b)
    assert calls == ["chunked"]
    narrow = _head((5,), 8, 4 * 8 - 1, torch.float32, seed=1)
    R.torch_linear_cross_entropy(narrow[0], narrow[1], narrow[3], narrow[2])
    assert calls == ["chunked"]  # fewer than 4 classes per feature: the logits


@pytest.mark.parametrize("options", [{"softcap": 5.0}, {"label_smoothing": 0.1}])
def test_what_the_chunked_path_cannot_do_takes_the_logits(options):
    x, w, b, t = _head((2, 9), 8, 64, torch.float64, seed=2, ignore=0.2)
    got = R.torch_linear_cross_entropy(x, w, t, b, **options)
    assert torch.equal(got, R.torch_logits_linear_cross_entropy(x, w, t, b, **options))
    with pytest.raises(NotImplementedError, match="soft-cap or label smoothing"):
        R.torch_chunked_linear_cross_entropy(x, w, t, b, **options)


@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__.split("_")[1])
@pytest.mark.parametrize("rows", [0, 3])
def test_every_target_ignored_gives_a_nan_loss_and_zero_gradients(path, rows):
    x, w, b, _ = _head((rows,), 8, 64, torch.float32, seed=3)
    loss, grads = _run(path, x, w, b, torch.full((rows,), -100), torch.float32)
    assert torch.isnan(loss)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_strided_input_and_targets():
    x, w, b, t = _head((6,), 16, 96, torch.float64, seed=4)
    wide = torch.cat([x, x], dim=1)[:, ::2]  # (6, 16) with stride 32 along rows, 2 along features
    pairs = torch.stack([t, t.flip(0)], 1)[:, 0]
    got = R.torch_chunked_linear_cross_entropy(wide, w, pairs, b)
    assert torch.allclose(got, R.torch_logits_linear_cross_entropy(wide.contiguous(), w, t, b).float(),
                          rtol=1e-6)


def test_autocast_casts_the_operands_as_for_a_linear():
    """Under autocast the chunked path runs on autocast's dtype (as ``F.linear`` would), not fp32; its
    gradients come back to the fp32 leaves, the loss in fp32."""
    x, w, b, t = _head((4, 33), 16, 200, torch.float32, seed=5, ignore=0.1)
    ref_loss, ref_grads = _run(R.torch_logits_linear_cross_entropy, x, w, b, t, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _run(R.torch_chunked_linear_cross_entropy, x, w, b, t, torch.float32)
    exact, _ = _run(R.torch_chunked_linear_cross_entropy, x, w, b, t, torch.float32)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert _err(loss, ref_loss) <= TOL[torch.bfloat16]
    assert all(_err(g, r) <= TOL[torch.bfloat16] for g, r in zip(grads, ref_grads))
    assert _err(loss, ref_loss) > 10 * _err(exact, ref_loss)  # it did run in bf16


def test_the_registry_and_the_gpt_use_it():
    assert op_select.functions_for("cross_entropy", "torch")["linear_cross_entropy"] is R.torch_linear_cross_entropy
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab_size=256),
                op_select.resolve({"cross_entropy": "torch"}))
    idx = torch.randint(0, 256, (2, 8))
    loss = model(idx, idx)
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).double(), idx.reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-5


def test_the_tuner_measures_both_torch_paths_on_cuda():
    names = [c.name for c in torch_candidates("cross_entropy", torch.device("cuda"))]
    assert names == ["torch", *LINEAR_CROSS_ENTROPY_PATHS]
    assert [c.name for c in torch_candidates("cross_entropy", torch.device("cpu"))] == ["torch"]
