"""The torch backend's FlexAttention path (engine/ops/flex.py): block masks built from segment ids.

The block tables are checked pair by pair against an independent dense mask, against PyTorch's own
``create_block_mask``, and end to end through FlexAttention's compiled CPU kernel, which skips the blocks
the mask leaves out (so a block wrongly skipped changes the output). The CUDA kernel and its backward
run on a GPU only: the ``gpu`` test at the end, and ``kernels check``'s packed-documents rows.
"""
import shutil
import warnings

import pytest
import torch

from tritonforge.engine.ops import flex
from tritonforge.engine.ops import reference as op_reference
from support import visible_pairs

pytestmark = pytest.mark.skipif(flex._flex_module() is None, reason="this PyTorch has no FlexAttention")


def documents(*lengths_per_row):
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)) for lengths in lengths_per_row]
    return torch.stack(rows)


def dense_reference(ids, seqlen, causal, window):
    """(B, 1, S, S) booleans, written out independently of the module."""
    visible = visible_pairs(seqlen, causal, window, ids)
    return visible if ids is not None else visible[None, None]


def expand(partial, full, ids, seqlen, causal, window, block):
    """Pair by pair: visible where the pair's block is full, or partial and the mask function says so."""
    pos = torch.arange(seqlen)
    blocks = pos // block
    b = torch.arange(partial.shape[0])[:, None, None]
    qi, ki = pos[None, :, None], pos[None, None, :]
    rule = flex.mask_mod(ids, causal, window)(b, 0, qi, ki)
    tile = lambda t: t[:, 0][:, blocks][:, :, blocks]  # noqa: E731 - (B, S, S) from (B, 1, nq, nk)
    return (tile(full) | (tile(partial) & rule))[:, None]


CASES = [  # (document lengths per row, causal, window); block 16 throughout
    ([[5, 3, 20, 1, 30, 18, 23]], True, None),   # documents inside, across and ending on block bounds
    ([[37, 29, 30], [96]], False, None),          # one row is one document
    ([[10, 47, 1, 42], [33, 25, 42]], True, 12),  # window and documents
    ([[1, 40, 24, 35]], False, 9),                # non-causal window
    ([[100]], True, None),                        # ragged last block (100 = 6 x 16 + 4)
    (None, True, 20),                             # the band alone
    (None, False, 33),
]


@pytest.mark.parametrize("lengths,causal,window", CASES, ids=str)
def test_block_tables_give_the_dense_mask_pair_by_pair(lengths, causal, window):
    ids = None if lengths is None else documents(*lengths)
    seqlen = 100 if ids is None else ids.shape[1]
    partial, full = flex.block_tables(ids, seqlen, causal, window, block=16)
    assert not (partial & full).any()
    assert torch.equal(expand(partial, full, ids, seqlen, causal, window, 16),
                       dense_reference(ids, seqlen, causal, window).expand(partial.shape[0], -1, -1, -1))


def _per_block(dense, block):
    """(B, 1, nq, nk): any pair visible, every pair visible (never in a ragged block: its padding is not)."""
    b, _, s, _ = dense.shape
    n = -(-s // block)
    some = torch.zeros(b, 1, n, n, dtype=torch.bool)
    every = torch.zeros_like(some)
    for qb in range(n):
        for kb in range(n):
            tile = dense[:, :, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
            some[:, :, qb, kb] = tile.flatten(2).any(-1)
            every[:, :, qb, kb] = tile.flatten(2).all(-1) & (tile.shape[-2] == tile.shape[-1] == block)
    return some, every


@pytest.mark.parametrize("lengths,causal", [(CASES[0][0], True), (CASES[1][0], False), (CASES[4][0], True),
                                            ([[16, 16, 32, 1, 15, 16]], True)], ids=str)
def test_packed_documents_skip_exactly_the_blocks_with_nothing_visible(lengths, causal):
    """Packing's ids (non-decreasing, one apart): a block is visited iff it holds a visible pair, and
    needs no mask iff every pair is visible."""
    ids = documents(*lengths)
    partial, full = flex.block_tables(ids, ids.shape[1], causal, None, block=16)
    some, every = _per_block(dense_reference(ids, ids.shape[1], causal, None), 16)
    assert torch.equal(partial | full, some)
    assert torch.equal(full, every)


def test_recurring_ids_are_never_skipped_where_visible():
    """Ids that come back after another document (not produced by packing): ranges overlap, so the
    blocks are visited; the mask function keeps the result exact."""
    ids = torch.tensor([[3] * 10 + [2**40] * 25 + [3] * 15 + [-1] * 20 + [2**40] * 13])
    partial, full = flex.block_tables(ids, ids.shape[1], True, None, block=16)
    assert torch.equal(expand(partial, full, ids, ids.shape[1], True, None, 16),
                       dense_reference(ids, ids.shape[1], True, None))


@pytest.mark.parametrize("packed,causal,window", [(True, True, None), (True, False, None), (False, True, 100),
                                                   (False, False, 70)])
def test_block_mask_matches_pytorchs_own_construction(packed, causal, window):
    from torch.nn.attention.flex_attention import create_block_mask

    ids = documents([5, 3, 200, 1, 30, 18, 23], [280]) if packed else None
    s, b = 280, 2 if packed else 1
    ours = flex.block_mask(ids, s, causal, window, block=64)
    theirs = create_block_mask(flex.mask_mod(ids, causal, window), b, None, s, s, device="cpu", BLOCK_SIZE=64)
    assert ours.shape == theirs.shape == (b, 1, s, s)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name).to(torch.int32)), name


def _compiles_on_cpu() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _compiles_on_cpu(), reason="inductor's CPU FlexAttention needs a C++ compiler")
def test_compiled_flex_kernel_with_the_block_mask_matches_dense_sdpa():
    """FlexAttention's compiled CPU kernel (forward: CPU has no FlexAttention backward) skips what the
    block mask leaves out. The same mask less one needed block gives another output: the check bites."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    torch.manual_seed(0)
    ids = documents([30, 90, 50, 30], [200])
    q, k, v = (torch.randn(2, 4, 200, 16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query attention: two kv heads
    want = op_reference.dense_attention(q, k, v, True, 40, None, ids)
    bm = flex.block_mask(ids, 200, True, 40, block=64)
    run = torch.compile(flex_attention, dynamic=False)
    got = run(q, k, v, block_mask=bm, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    partial, full = flex.block_tables(ids, 200, True, 40, block=64)
    assert partial[0, 0, 1, 0]  # document 1 (30-119) crosses from block 0 into block 1
    partial[0, 0, 1, 0] = False
    counts, indices = flex._ordered(partial)
    full_counts, full_indices = flex._ordered(full)
    broken = BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=64,
                                      mask_mod=flex.mask_mod(ids, True, 40), seq_lengths=(200, 200))
    wrong = run(q, k, v, block_mask=broken, enable_gqa=True)
    assert not torch.allclose(wrong[0], want[0], atol=1e-3)
    torch.testing.assert_close(wrong[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _compiles_on_cpu(), reason="inductor's CPU FlexAttention needs a C++ compiler")
def test_new_batch_sizes_recompile_once_not_per_shape(monkeypatch):
    """The torch backend's own compiled FlexAttention (forced onto the CPU, forward): four batch sizes,
    as training and evaluation bring, cost two compiles, each result the dense mask's."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(flex, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(flex, "_COMPILED", [])
    torch._dynamo.reset()
    counters.clear()
    for batch in (1, 2, 3, 5):
        ids = documents(*[[60, 1, 139]] * batch)
        q = torch.randn(batch, 2, 200, 16)
        torch.testing.assert_close(op_reference.torch_attention(q, q, q, True, None, None, ids),
                                   op_reference.dense_attention(q, q, q, True, None, None, ids), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2


def test_torch_backend_traces_whole_into_a_compiled_model(monkeypatch):
    """The registry's torch attention on the Flex path inside ``torch.compile(fullgraph=True)``: the
    device test, the block mask and FlexAttention all trace (forward; CPU has no Flex backward)."""
    monkeypatch.setattr(flex, "DEVICES", ("cuda", "cpu"))
    ids = documents([30, 90, 50, 30], [200])
    q = torch.randn(2, 4, 200, 16)
    k, v = torch.randn(2, 2, 200, 16), torch.randn(2, 2, 200, 16)

    def layers(q, k, v, ids):
        out = op_reference.torch_attention(q, k, v, True, 40, None, ids)
        return op_reference.torch_attention(out, k, v, True, 40, None, ids)

    got = torch.compile(layers, fullgraph=True, backend="eager")(q, k, v, ids)
    want = op_reference.dense_attention(op_reference.dense_attention(q, k, v, True, 40, None, ids), k, v, True, 40, None, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_under_autocast_flex_gets_the_autocast_dtype_as_sdpa_would(monkeypatch):
    """QK-norm's outputs are fp32 under autocast while v is bf16; SDPA casts all three, and so must the
    Flex path (FlexAttention refuses mixed dtypes)."""
    monkeypatch.setattr(flex, "DEVICES", ("cuda", "cpu"))
    seen = []

    def recorder(q, k, v, block_mask, scale, enable_gqa):
        seen.append((q.dtype, k.dtype, v.dtype))
        return op_reference.dense_attention(q, k, v, True, None, scale, ids)

    monkeypatch.setattr(flex, "_compiled_flex", lambda: recorder)
    ids = documents([7, 13])
    q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    v = torch.randn(1, 2, 20, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op_reference.torch_attention(q, k, v, True, None, None, ids)
        want = op_reference.dense_attention(q, k, v, True, None, None, ids)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_one_block_mask_serves_every_layer_until_the_ids_change():
    cache = flex._LastMask()
    ids = documents([30, 70])
    first = cache.get(ids, 100, True, None, ids.device)
    assert cache.get(ids, 100, True, None, ids.device) is first
    assert cache.get(ids.clone(), 100, True, None, ids.device) is not first  # another tensor
    again = cache.get(ids, 100, True, None, ids.device)
    ids[0, 50:] = 2  # modified in place: rebuilt
    assert cache.get(ids, 100, True, None, ids.device) is not again
    assert cache.get(None, 100, True, 8, ids.device) is not cache.get(None, 100, False, 8, ids.device)


def test_torch_backend_uses_the_dense_mask_off_cuda():
    q = torch.randn(1, 2, 20, 16)
    assert not flex.usable(q, q, q)
    ids = documents([7, 13])
    torch.testing.assert_close(op_reference.torch_attention(q, q, q, True, None, None, ids),
                               op_reference.dense_attention(q, q, q, True, None, None, ids), atol=0, rtol=0)


def test_what_flexattention_cannot_take_keeps_the_dense_mask(monkeypatch):
    monkeypatch.setattr(flex, "DEVICES", ("cuda", "cpu"))
    assert flex.usable(*(torch.randn(1, 2, 20, 16),) * 3)
    assert not flex.usable(*(torch.randn(1, 2, 20, 8),) * 3)  # head dim under 16
    assert not flex.usable(*(torch.randn(1, 2, 0, 16),) * 3)  # empty
    assert not flex.usable(*(torch.randn(0, 2, 20, 16),) * 3)
    assert not flex.usable(torch.randn(1, 2, 20, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16))
    q = torch.randn(1, 2, 0, 16)
    out = op_reference.torch_attention(q, q, q, True, None, None, torch.zeros(1, 0, dtype=torch.int64))
    assert out.shape == (1, 2, 0, 16)


def test_a_configuration_that_fails_warns_once_and_falls_back_to_the_dense_mask(monkeypatch):
    """Forced onto the CPU, where FlexAttention has no backward: the failure is reported once, that
    configuration falls back to SDPA with the dense mask, and gradients are right."""
    monkeypatch.setattr(flex, "_FAILED", set())
    monkeypatch.setattr(flex, "DEVICES", ("cuda", "cpu"))
    ids = documents([7, 13])
    q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert flex.usable(q, k, v)
    with pytest.warns(UserWarning, match=r"FlexAttention failed for torch.float64 head dim 16.*dense mask"):
        out = op_reference.torch_attention(q, k, v, True, None, None, ids)
    assert not flex.usable(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = op_reference.torch_attention(q, k, v, True, None, None, ids)
    monkeypatch.undo()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = op_reference.dense_attention(*ref, True, None, None, ids)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(again, want, atol=0, rtol=0)
    out.sum().backward()
    want.sum().backward()
    for name, leaf, r in zip("qkv", (q, k, v), ref):
        torch.testing.assert_close(leaf.grad, r.grad, atol=1e-12, rtol=0, msg=name)


def test_a_failure_under_autocast_is_remembered_for_the_inputs_as_given(monkeypatch):
    """fp32 inputs cast to bf16 by autocast: the failed configuration is the one :func:`flex.usable` is
    asked about, so the next call takes the dense mask at once instead of compiling and failing again."""
    monkeypatch.setattr(flex, "_FAILED", set())
    monkeypatch.setattr(flex, "DEVICES", ("cuda", "cpu"))
    ids = documents([7, 13])
    q = torch.randn(1, 2, 20, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="FlexAttention failed for torch.bfloat16"):
            out = op_reference.torch_attention(q, q, q, True, None, None, ids)
        assert not flex.usable(q, q, q)
        torch.testing.assert_close(out, op_reference.dense_attention(q, q, q, True, None, None, ids), atol=0, rtol=0)


def test_without_a_fallback_the_failure_is_raised(monkeypatch):
    monkeypatch.setattr(flex, "_FAILED", set())
    q = torch.randn(1, 2, 20, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex.attention(q, q, q, True, None, None, documents([7, 13]))
    assert not flex._FAILED


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)])
def test_cuda_torch_backend_runs_flexattention_forward_and_backward(dtype, autocast):
    """On a GPU the torch backend's packed documents go through FlexAttention itself (no fallback, no
    warning), forward and backward, against the dense-mask SDPA in float32: ragged S, GQA, a window; fp32
    inputs under bf16 autocast too."""
    torch.manual_seed(0)
    ids = documents([300, 1, 250, 449], [1000]).cuda()
    q = torch.randn(2, 4, 1000, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 1000, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    assert flex.usable(q, k, v)
    with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        warnings.simplefilter("error")
        out = op_reference.torch_attention(q, k, v, True, 200, None, ids)
        out.backward(do.to(out.dtype))
    assert not flex._FAILED and flex._COMPILED
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = op_reference.dense_attention(*ref, True, 200, None, ids)
    want.backward(do.float())
    tol = 2e-2 if dtype == torch.bfloat16 or autocast else 2e-3
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                              (want, *(t.grad for t in ref))):
        err = (got.float() - exp).norm() / exp.norm()
        assert err < tol, f"{name}: relative error {err:.2e}"
