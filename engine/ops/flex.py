"""FlexAttention for the torch backend's attention over packed documents on CUDA.

SDPA takes a document mask only as a dense (B, 1, S, S) boolean tensor, B·S² bytes built and read, and
computes every score: its cost is S² however short the documents are. FlexAttention takes a
*block mask* instead: for each block of 128 queries, the key blocks to visit, split into *full* blocks
(every pair visible: no mask computed) and *partial* ones (the mask function decides per pair). Blocks of
other documents, and with a window blocks outside it, are never visited.

:func:`block_mask` builds that block mask from the segment ids' per-block minimum and maximum, in
O(B · (S/128)²) work, rather than by evaluating the mask at all S² pairs as ``create_block_mask`` does.
Two blocks can share a document only if their id ranges overlap, so the ranges decide which blocks are
skipped for any ids, recurring ones included; a block is full when both blocks hold one and the same id
and the causal/window bounds hold for all of their positions (a ragged last block always takes the
mask, as in ``create_block_mask``). For packing's ids (non-decreasing, one apart) and no window, the
tables are exactly those of the pairs: a block is skipped iff nothing in it is visible, and full iff all
of it is (tests/engine/test_flex.py).

:func:`attention` is what :func:`engine.ops.reference.torch_attention` calls on CUDA (see :func:`usable`); the
compiled FlexAttention kernel needs ``torch.compile`` (Triton), which a CUDA machine with this project
installed has. Within one step every layer passes the same ids, so the last block mask is kept and reused
while the ids are the same tensor, unmodified.

If FlexAttention cannot compile for a configuration (an old GPU's shared memory, say), the call warns
once, naming the reason, and that configuration uses the dense mask from then on.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch

#: FlexAttention's block size (its default): the granularity at which blocks are skipped.
BLOCK = 128
#: Where the torch backend takes FlexAttention: its CPU kernel has no backward.
DEVICES = ("cuda",)
#: The smallest head dimension FlexAttention's CUDA kernel takes (``tl.dot`` needs 16).
MIN_HEAD_DIM = 16


def _flex_module():
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # an older PyTorch
        return None
    return flex_attention


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` serves these inputs: CUDA, self-attention, not empty, head dims of 16 or
    more, and a configuration that has not failed to compile before."""
    return (q.device.type in DEVICES and _flex_module() is not None and q.numel() > 0
            and q.shape[-2] == k.shape[-2] and min(q.shape[-1], v.shape[-1]) >= MIN_HEAD_DIM
            and _config(q, k, v) not in _FAILED)


def mask_mod(segment_ids: torch.Tensor | None, causal: bool, window: int | None) -> Callable:
    """The per-pair rule, in FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` form: the kernels' band
    (``q_idx - window < kv_idx <= q_idx`` causal, ``< q_idx + window`` otherwise) and the same id."""
    def visible(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx if causal else torch.ones_like(q_idx, dtype=torch.bool)
        if window is not None:
            keep = keep & (kv_idx > q_idx - window)
            if not causal:
                keep = keep & (kv_idx < q_idx + window)
        if segment_ids is not None:
            keep = keep & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])
        return keep
    return visible


def block_tables(segment_ids: torch.Tensor | None, seqlen: int, causal: bool, window: int | None,
                 block: int = BLOCK, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)``, each (B, 1, nq, nk) booleans over query blocks x key blocks: the blocks that
    may hold a visible pair but need the mask, and the blocks whose every pair is visible. A block in
    neither is skipped. ``segment_ids`` (B, S), or None for the causal/window band alone (B = 1, which
    FlexAttention broadcasts over the batch)."""
    device = segment_ids.device if segment_ids is not None else device
    n = -(-seqlen // block)
    first = torch.arange(n, device=device) * block  # each block's first and last position
    last = torch.clamp(first + block - 1, max=seqlen - 1)
    q0, q1 = first[:, None], last[:, None]  # (nq, 1): query blocks down, key blocks across
    k0, k1 = first[None, :], last[None, :]
    some = torch.ones(n, n, dtype=torch.bool, device=device)
    every = some.clone()
    if causal:
        some, every = some & (k0 <= q1), every & (k1 <= q0)
    if window is not None:
        some, every = some & (k1 > q0 - window), every & (k0 > q1 - window)
        if not causal:
            some, every = some & (k0 < q1 + window), every & (k1 < q0 + window)
    whole = (last - first + 1) == block  # a ragged last block is never full, as in create_block_mask
    every = every & whole[:, None] & whole[None, :]
    some, every = some[None], every[None]
    if segment_ids is not None:
        pad = n * block - seqlen  # the last block padded with its own last id: ranges of real positions
        ids = torch.cat([segment_ids, segment_ids[:, -1:].expand(-1, pad)], dim=1).view(len(segment_ids), n, block)
        lo, hi = ids.amin(dim=-1), ids.amax(dim=-1)  # (B, n)
        some = some & (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
        one = lo == hi
        every = every & one[:, :, None] & one[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    return (some & ~every)[:, None], every[:, None]


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, 1, nq, nk) boolean table as FlexAttention's (count, indices): per query block, how many key
    blocks are set and their indices first, in increasing order."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def block_mask(segment_ids: torch.Tensor | None, seqlen: int, causal: bool, window: int | None,
               device: torch.device | None = None, block: int = BLOCK):
    """FlexAttention's ``BlockMask`` for this causal/window band and these documents (see the module)."""
    flex = _flex_module()
    partial, full = block_tables(segment_ids, seqlen, causal, window, block, device)
    counts, indices = _ordered(partial)
    full_counts, full_indices = _ordered(full)
    return flex.BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=block,
                                         mask_mod=mask_mod(segment_ids, causal, window),
                                         seq_lengths=(seqlen, seqlen))


class _LastMask:
    """The last block mask built outside ``torch.compile`` and what it was built for: every layer of a
    step passes the same ids tensor, so one build serves them all."""

    def __init__(self):
        self.ids: weakref.ref | None = None
        self.key: tuple | None = None
        self.mask = None

    def get(self, segment_ids, seqlen, causal, window, device):
        if torch.compiler.is_compiling():  # traced into the graph: no Python-side state
            return block_mask(segment_ids, seqlen, causal, window, device)
        key = (seqlen, causal, window, str(device),
               None if segment_ids is None else (segment_ids._version, segment_ids.data_ptr()))
        if key == self.key and (segment_ids is None or (self.ids is not None and self.ids() is segment_ids)):
            return self.mask
        self.mask = block_mask(segment_ids, seqlen, causal, window, device)
        self.key, self.ids = key, None if segment_ids is None else weakref.ref(segment_ids)
        return self.mask


_LAST = _LastMask()
_COMPILED: list = []
_FAILED: set = set()


def _config(q, k, v) -> tuple:
    return (q.device.index, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] != k.shape[1])


def _compiled_flex():
    if not _COMPILED:
        # automatic dynamic shapes: a second batch size or length (evaluation's) recompiles once with
        # symbolic sizes, rather than once per shape until the recompile limit turns it eager
        _COMPILED.append(torch.compile(_flex_module().flex_attention))
    return _COMPILED[0]


def attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None,
              segment_ids: torch.Tensor | None = None, fallback: Callable | None = None):
    """Attention of q (B, H, S, D) over k, v (B, Hkv, S, D) through FlexAttention with the block mask of
    the band and the documents. ``fallback`` (the same arguments) serves a configuration that fails to
    compile; without it the failure is raised."""
    config = _config(q, k, v)  # as :func:`usable` sees the inputs, before autocast's cast
    if torch.is_autocast_enabled(q.device.type):  # as autocast casts SDPA's inputs (qk-norm's are fp32)
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = _LAST.get(segment_ids, q.shape[-2], causal, window, q.device)
    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():  # inside the model's own compiled graph: traced, not nested
        return _flex_module().flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    try:
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - inductor and Triton raise many kinds; each is reported
        if fallback is None:
            raise
        _FAILED.add(config)
        warnings.warn(f"FlexAttention failed for {q.dtype} head dim {q.shape[-1]} on {q.device} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the torch backend "
                      "uses SDPA with a dense mask for this configuration from now on", stacklevel=2)
        return fallback(q, k, v, causal=causal, window=window, scale=scale, segment_ids=segment_ids)
