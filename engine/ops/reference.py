"""The torch reference implementations of the op table's functions: PyTorch's own way to compute each op,
the ``torch`` backend, and what every other backend is checked against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import flex

def _window_mask(s_q: int, s_k: int, window: int, causal: bool, device: torch.device) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: within the last ``window`` keys, and causal or
    within the next ``window - 1`` (the kernels' band, i - window < j <= i + right)."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    return (j > i - window) & (j <= i if causal else j < i + window)


def torch_attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None,
                    segment_ids: torch.Tensor | None = None):
    """SDPA. With ``segment_ids`` (B, S) (packed documents: key j visible from query i only if both carry
    the same id): FlexAttention with a block mask on CUDA (:mod:`engine.ops.flex`: blocks of other documents
    are skipped), SDPA with a dense boolean mask elsewhere (:func:`dense_attention`)."""
    if segment_ids is not None and flex.usable(q, k, v):
        return flex.attention(q, k, v, causal, window, scale, segment_ids, fallback=dense_attention)
    return dense_attention(q, k, v, causal, window, scale, segment_ids)


def dense_attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None,
                    segment_ids: torch.Tensor | None = None):
    """SDPA with the band and the documents as one dense boolean mask, (S, S) or (B, 1, S, S): the
    reference on every device."""
    mask = _window_mask(q.shape[-2], k.shape[-2], window, causal, q.device) if window else None
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        if mask is None and causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = same if mask is None else mask & same
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])


def torch_layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5):
    residual = (residual + x).to(residual.dtype)  # the stream keeps its dtype, as in the fused kernel
    return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps), residual


def torch_rms_norm(x, weight=None, eps: float = 1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def torch_add_rms_norm(x, residual, weight=None, eps: float = 1e-6):
    residual = (residual + x).to(residual.dtype)
    return F.rms_norm(residual, (x.shape[-1],), weight, eps), residual


def _rotate_pairs(x, cos, sin):
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, T, D) by the angles whose cos/sin broadcast over it."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def torch_rope(q, k, cos, sin, position_ids=None):
    """Rotary position embedding of q (B, H, T, D) and k (B, Hkv, T, D): ``(q_rot, k_rot)``.

    ``cos``/``sin`` are (positions, D/2) tables; position ``t`` (or ``position_ids[b, t]``, a (B, T) integer
    tensor) picks a row. The math runs in the inputs' dtype, the tables cast to it.
    """
    if position_ids is None:
        cos, sin = cos[:q.shape[2]], sin[:q.shape[2]]
    else:
        cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]
    return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)


def torch_swiglu(h):
    """``silu(gate) * up`` with ``gate, up = h.chunk(2, dim=-1)``: a SwiGLU MLP's activation of its fused
    gate/up projection output h (..., 2F)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_gelu_linear_residual(h, weight, bias=None, layer_scale=None, residual=None, row_scale=None):
    """``residual + row_scale * layer_scale * (gelu(h) @ weight.T + bias)``: the second half of an MLP block.

    ``h`` (..., K) is the first linear's output; ``weight`` (N, K); ``residual`` (..., N); ``row_scale`` a
    (rows,) factor per flattened row (stochastic depth's per-sample keep, spread over the sample's rows) or
    None. LayerScale multiplies in the branch's dtype (under autocast the branch stays bf16).
    """
    branch = F.linear(F.gelu(h), weight, bias)
    if layer_scale is not None:
        branch = branch * layer_scale.to(branch.dtype)
    if row_scale is not None:
        branch = (branch.reshape(-1, branch.shape[-1]) * row_scale.to(branch.dtype)[:, None]).view(branch.shape)
    return branch if residual is None else residual + branch


def torch_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale=None, residual=None, row_scale=None):
    """``residual + row_scale * layer_scale * fc2(gelu(fc1(x)))``: a whole MLP block (ConvNeXt's, from its
    LayerNorm's output on); ``fc*_weight``/``fc*_bias`` are ``nn.Linear``'s."""
    return torch_gelu_linear_residual(F.linear(x, fc1_weight, fc1_bias), fc2_weight, fc2_bias, layer_scale,
                                      residual, row_scale)


def torch_depthwise_conv2d(x, weight, bias=None, padding=0):
    """Depthwise 2D convolution (one ``(KH, KW)`` filter per channel, stride 1): ``F.conv2d`` with
    ``groups`` = the channels of ``x`` (N, C, H, W); ``weight`` is ``nn.Conv2d``'s (C, 1, KH, KW)."""
    return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])


def torch_cross_entropy(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0,
                        softcap: float = 0.0):
    """Mean cross-entropy over all positions, computed in fp32 whatever the logits' dtype; a nonzero
    ``softcap`` c takes the loss of ``c * tanh(logits / c)``."""
    logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


#: ``F.linear_cross_entropy``'s chunked path serves a head with at least this many classes per input feature.
#: There the (positions, classes) logits, with their fp32 copy and gradient, would take many times the memory
#: of the head's input (GPT-2: 50,304 classes over 768 features, about 8 GB of logits at 16 windows of 1,024
#: tokens); below it the materialized path was faster on a CPU (1.9x at 256 classes over 192 features, the
#: main job's byte vocabulary) and its memory is small. ``kernels.tune`` measures both paths on a GPU.
CHUNKED_CLASSES_PER_FEATURE = 4


def has_chunked_linear_cross_entropy() -> bool:
    """This PyTorch has ``F.linear_cross_entropy`` with its chunked path (2.13 and later)."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def torch_linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, softcap: float = 0.0):
    """A classifier head and its mean loss, ``torch_cross_entropy(F.linear(x, weight, bias), targets)``, the
    loss in fp32: ``F.linear_cross_entropy``'s chunked path (:func:`torch_chunked_linear_cross_entropy`, the
    logits never whole) where this PyTorch has it, the call is one it serves (no soft-cap, no label
    smoothing) and the head has at least :data:`CHUNKED_CLASSES_PER_FEATURE` classes per feature; else the
    logits materialized (:func:`torch_logits_linear_cross_entropy`)."""
    chunked = (has_chunked_linear_cross_entropy() and not softcap and not label_smoothing
               and weight.shape[0] >= CHUNKED_CLASSES_PER_FEATURE * weight.shape[1])
    path = torch_chunked_linear_cross_entropy if chunked else torch_logits_linear_cross_entropy
    return path(x, weight, targets, bias, ignore_index, label_smoothing, softcap)


def torch_logits_linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                                      label_smoothing: float = 0.0, softcap: float = 0.0):
    """:func:`torch_linear_cross_entropy` with the (positions, classes) logits materialized, and copied to
    fp32."""
    return torch_cross_entropy(F.linear(x, weight, bias), targets, ignore_index, label_smoothing, softcap)


def torch_chunked_linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                                       label_smoothing: float = 0.0, softcap: float = 0.0):
    """:func:`torch_linear_cross_entropy` by ``F.linear_cross_entropy``'s chunked path: a chunk of positions
    at a time, so the (positions, classes) logits are never whole; 16-bit operands accumulate in fp32 where
    the hardware has mixed-precision matmuls (torch's choice: CPUs, CUDA from sm_80 for bf16).

    Under autocast the operands are cast to autocast's dtype first, as ``F.linear`` would be (the op itself
    is not on autocast's lists: it would run in fp32). The loss comes back in the operands' dtype and is
    returned as fp32 (a 16-bit loss keeps its 16-bit rounding). What the chunked path does not do raises
    ``NotImplementedError``: a logit soft-cap, and label smoothing (which torch would serve unchunked, with a
    warning per call); so does a PyTorch without it.
    """
    if not has_chunked_linear_cross_entropy():
        raise NotImplementedError(f"F.linear_cross_entropy is missing from this PyTorch ({torch.__version__})")
    if softcap or label_smoothing:
        raise NotImplementedError("F.linear_cross_entropy's chunked path has no logit soft-cap or label smoothing")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    options = torch.nn.LinearCrossEntropyOptions(allow_retain_graph=torch.compiler.is_compiling())
    targets = targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        total = F.linear_cross_entropy(x.reshape(-1, x.shape[-1]), weight, targets, linear_bias=bias,
                                       reduction="sum", ignore_index=ignore_index, options=options)
    # The mean as the logits path has it, without a host sync: NaN when every target is ignored (or there
    # are none), with zero gradients there (the chunked path's own mean would give NaN gradients).
    counted = (targets != ignore_index).sum()
    return (total.float() / counted.clamp(min=1)).masked_fill(counted == 0, float("nan"))


def torch_nt_xent(z, temperature: float, row_start: int = 0, num_rows: int | None = None):
    """SimCLR's NT-Xent over views ``z`` (N, D) laid out in pairs (rows 2k and 2k+1 are the two views of
    image k): the mean over the query rows ``row_start .. row_start + num_rows - 1`` (all by default) of
    ``-log softmax`` of the positive's cosine similarity / temperature among every other row. Materializes
    the (num_rows, N) similarities, in fp32 for 16-bit ``z``."""
    num_rows = z.shape[0] - row_start if num_rows is None else num_rows
    u = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1, eps=1e-12)
    rows = torch.arange(row_start, row_start + num_rows, device=z.device)
    sim = u[rows] @ u.T / temperature
    sim = sim.masked_fill(rows[:, None] == torch.arange(z.shape[0], device=z.device)[None, :], float("-inf"))
    return F.cross_entropy(sim, rows ^ 1)
