"""A decoder-only transformer (GPT), readable top to bottom.

Every normalization and attention call goes through the kernel registry's :class:`~engine.ops.select.Ops`,
so the same model runs on PyTorch's kernels or the project's Triton kernels, chosen per op. The pre-norm
residual stream uses the fused "add + norm" form: each block hands its branch output to the next norm,
which adds it to the residual stream and normalizes in one call (one pass over memory with the Triton
backend; an add followed by a norm with the torch backend — the same math).

Options cover both GPT-2 and the newer Llama-style block: learned or rotary positions, LayerNorm or
RMSNorm, GELU, SwiGLU or ReLU² MLP, grouped-query attention, tied embeddings, a sliding attention window;
and what the GPT-2 speedruns found to pay: QK-norm, zero-initialised output projections, logit soft-capping,
value embeddings, U-net skip connections and the smear of the previous token's embedding.
Every option's default is GPT-2's. With ``input_dim > 0`` the model reads continuous vectors
(B, T, input_dim) through a linear projection instead of token ids, and its head is untied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops.select import Ops


@dataclass
class GPTConfig:
    """A GPT's shape and options: the recipe's ``[model]`` fields of the same names (see
    :class:`engine.config.ModelConfig` for each one's meaning), ``vocab_size`` resolved to the tokenizer's."""

    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    d_model: int = 192
    context: int = 256
    vocab_size: int = 0
    pos: str = "learned"  # "learned" | "rope"
    rope_base: float = 10000.0
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    mlp: str = "gelu"  # "gelu" | "gelu_exact" | "swiglu" | "relu2"
    d_ff: int = 0
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    window: int = 0
    norm_eps: float = 0.0
    qk_norm: bool = False
    zero_init_proj: bool = False
    logit_softcap: float = 0.0
    value_embeds: int = 0
    unet_skips: bool = False
    smear: bool = False

    @classmethod
    def from_section(cls, section, **changes) -> "GPTConfig":
        """The fields of the same names from ``section`` (the recipe's ``[model]``), then ``changes``."""
        return cls(**{**{f.name: getattr(section, f.name) for f in fields(cls)}, **changes})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return (8 * self.d_model // 3 + 63) // 64 * 64
        return 4 * self.d_model


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim, served by the registry.

    Parameters are named like ``nn.LayerNorm``/``nn.RMSNorm`` (``weight``, ``bias``) so checkpoints
    do not depend on the backend.
    """

    def __init__(self, d: int, kind: str, bias: bool, ops: Ops, eps: float = 0.0):
        super().__init__()
        self.kind = kind
        self.ops = ops
        self.eps = eps or (1e-5 if kind == "layernorm" else 1e-6)
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias and kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return self.ops.layer_norm(x, self.weight, self.bias, self.eps)
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(residual + x), residual + x)."""
        if self.kind == "layernorm":
            return self.ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def rotary_tables(head_dim: int, context: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (context, head_dim/2) for rotary position embeddings."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class KVCache:
    """The keys and values every block computed for the tokens so far, for generation: a new token's
    attention reads them instead of recomputing the whole prefix (O(T) work per token, not O(T^2)).

    One (B, Hkv, context, D) buffer pair per block, filled left to right; ``length`` tokens are held.
    """

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        #: The last held token's embedding (B, 1, d), for the smear of the next one (``smear``).
        self.last_embedding: torch.Tensor | None = None

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (B, Hkv, t, D) after the held tokens; return every held key and value."""
        if self.keys[layer] is None:
            shape = (*k.shape[:2], context, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def attend_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of the t newest queries q (B, H, t, D) to all T held keys and values (B, Hkv, T, D):
    query i sits at position T - t + i; with ``window`` it sees only the ``window`` most recent keys."""
    t, T = q.shape[2], k.shape[2]
    pos_q = torch.arange(T - t, T, device=q.device)[:, None]
    pos_k = torch.arange(T, device=q.device)[None, :]
    visible = (pos_k <= pos_q) & ((pos_k > pos_q - window) if window else True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, ops: Ops, value_embed: bool = False):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        # One projection for q, k and v: the kernels read q, k and v as strided views of its output.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # QK-norm bounds the attention logits whatever the weights grow to, which lets a higher learning
        # rate train stably (Dehghani et al., 2023; the GPT-2 speedruns).
        self.q_norm = Norm(cfg.head_dim, "rmsnorm", False, ops) if cfg.qk_norm else None
        self.k_norm = Norm(cfg.head_dim, "rmsnorm", False, ops) if cfg.qk_norm else None
        #: With a value embedding: the weights of the values and of the token's value embedding in their mix.
        self.value_mix = nn.Parameter(torch.tensor([1.0, 0.5])) if value_embed else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: tuple[KVCache, int] | None = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        """``cache``: (the generation's cache, this block's index): keys and values are stored there,
        and the new tokens (positions from ``cache.length`` on) attend to every held one. ``ve``: the
        tokens' value embeddings (B, T, Hkv·D), mixed into the values."""
        H, Hkv, D = self.cfg.n_head, self.cfg.kv_heads, self.cfg.head_dim
        qkv = rearrange(self.qkv(x), "b t (heads d) -> b heads t d", d=D)  # a strided view, no copy
        q, k, v = qkv.split((H, Hkv, Hkv), dim=1)
        if ve is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * rearrange(ve, "b t (h d) -> b h t d", d=D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotate pairs (x[i], x[i + D/2]) of q and k by the angle of position t
            q, k = self.ops.rope(q, k, *rope, *(() if position_ids is None else (position_ids,)))
        if cache is not None:
            kv_cache, layer = cache
            k, v = kv_cache.extend(layer, k, v, self.cfg.context)
        if k.shape[2] == q.shape[2]:  # a whole sequence: training, evaluation, the prompt of a generation
            packed = {} if segment_ids is None else {"segment_ids": segment_ids}  # unpacked: the ops' plain signature
            y = self.ops.attention(q, k, v, causal=True, window=self.cfg.window or None, **packed)
        else:  # generated tokens after held ones: the few new queries against the cache, in torch
            y = attend_to_cache(q, k, v, self.cfg.window)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, ops: Ops):
        super().__init__()
        self.ops = ops
        self.kind = cfg.mlp
        self.swiglu = cfg.mlp == "swiglu"
        width = 2 * cfg.ff_dim if self.swiglu else cfg.ff_dim
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            return self.proj(self.ops.swiglu(h))  # silu(gate) * up, gate and up the halves of h
        if self.kind == "relu2":
            return self.proj(F.relu(h).square())
        return self.proj(F.gelu(h, approximate="none" if self.kind == "gelu_exact" else "tanh"))


class Block(nn.Module):
    """Pre-norm transformer block on a residual stream.

    ``forward(x, delta)`` takes the residual stream ``x`` and the previous block's pending branch output
    ``delta`` (None for the first block), and returns the updated stream and this block's pending output.
    """

    def __init__(self, cfg: GPTConfig, ops: Ops, value_embed: bool = False):
        super().__init__()
        self.ln1 = Norm(cfg.d_model, cfg.norm, cfg.bias, ops, cfg.norm_eps)
        self.attn = Attention(cfg, ops, value_embed)
        self.ln2 = Norm(cfg.d_model, cfg.norm, cfg.bias, ops, cfg.norm_eps)
        self.mlp = MLP(cfg, ops)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, delta, rope, segment_ids=None, position_ids=None, cache=None, ve=None):
        h, x = (self.ln1(x), x) if delta is None else self.ln1.add(delta, x)
        h, x = self.ln2.add(self.drop(self.attn(h, rope, segment_ids, position_ids, cache, ve)), x)
        return x, self.drop(self.mlp(h))


class Smear(nn.Module):
    """Adds to each token's embedding the previous token's, through a learned gate that reads the token's
    first 12 channels (the smear of the GPT-2 speedruns): a bigram in the input, before any attention."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(min(12, d)))
        self.scale = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None,
                previous: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, T, d); ``previous`` (B, 1, d): the embedding of the token before ``x[:, 0]`` (generation
        after held tokens), else the first token has none. Packed documents do not smear across a boundary."""
        before = F.pad(x[:, :-1], (0, 0, 1, 0)) if previous is None else torch.cat((previous, x[:, :-1]), 1)
        gate = self.scale * torch.sigmoid(x[..., :self.weight.numel()] @ self.weight)
        if segment_ids is not None:
            gate = gate * F.pad((segment_ids[:, 1:] == segment_ids[:, :-1]).to(gate.dtype), (1, 0))
        return x + gate.unsqueeze(-1) * before


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, ops: Ops, input_dim: int = 0):
        super().__init__()
        if cfg.value_embeds and input_dim:
            raise ValueError("model.value_embeds needs token ids; a model of continuous inputs has none")
        self.cfg = cfg
        self.ops = ops
        self.wte = nn.Linear(input_dim, cfg.d_model) if input_dim else nn.Embedding(cfg.vocab_size, cfg.d_model)
        # U-net skips: block i's output, times skip_weights[i], joins the input of its mirror n_layer - 1 - i.
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet_skips else None
        self.smear = Smear(cfg.d_model) if cfg.smear else None
        self.wpe = nn.Embedding(cfg.context, cfg.d_model) if cfg.pos == "learned" else None
        if cfg.pos == "rope":
            cos, sin = rotary_tables(cfg.head_dim, cfg.context, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, ops, self.value_embed_of(i) is not None) for i in range(cfg.n_layer))
        self.ln_f = Norm(cfg.d_model, cfg.norm, cfg.bias, ops, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings and not input_dim:
            # The input embedding and the output projection share one matrix (GPT-2; saves V·d params).
            self.lm_head.weight = self.wte.weight
        #: The registry ops the forward calls.
        self.ops_used = ("attention", "layer_norm" if cfg.norm == "layernorm" else "rms_norm", "cross_entropy",
                         *(("rope",) if cfg.pos == "rope" else ()), *(("swiglu",) if cfg.mlp == "swiglu" else ()),
                         *(("rms_norm",) if cfg.qk_norm and cfg.norm != "rmsnorm" else ()))
        self.apply(self._init_weights)
        # Residual branches end in a projection added to the stream: scale their init by 1/sqrt(2·L)
        # so the stream's variance does not grow with depth (GPT-2 paper, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                if cfg.zero_init_proj:  # every block starts as the identity; the gradient still reaches it
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if input_dim:  # unit-variance inputs, unit-variance features: the series outweighs the positions at init
            nn.init.normal_(self.wte.weight, mean=0.0, std=1.0 / math.sqrt(input_dim))
        # Value embeddings (the GPT-2 speedruns): table i is mixed into the values of block i and of its
        # mirror, block n_layer - value_embeds + i, with learned weights (Attention.value_mix). Drawn last and
        # on a fork of the generator, so the other weights of a seed are those of the model without them.
        with torch.random.fork_rng(devices=[]):
            self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.kv_heads * cfg.head_dim)
                                              for _ in range(cfg.value_embeds))
            for table in self.value_embeds:
                nn.init.normal_(table.weight, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def value_embed_of(self, layer: int) -> int | None:
        """The value-embedding table block ``layer`` mixes into its values, or None."""
        k, L = self.cfg.value_embeds, self.cfg.n_layer
        return layer if layer < k else layer - (L - k) if layer >= L - k else None

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The blocks' 2-D weights (attention and MLP projections), which Muon orthogonalizes; the
        embeddings and the head are not hidden layers and stay with AdamW."""
        return [p for p in self.blocks.parameters() if p.dim() == 2]

    def embedding_tables(self) -> list[nn.Parameter]:
        """The token, position and value embedding tables (the token table is also the head when tied)."""
        tables = [self.wte.weight] if isinstance(self.wte, nn.Embedding) else []
        tables += [self.wpe.weight] if self.wpe is not None else []
        return tables + [t.weight for t in self.value_embeds]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position and value embeddings (they cost no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.value_embeds.parameters())
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N for the matmuls plus causal attention (6·L·T·d)."""
        return 6 * self.num_params() + 6 * self.cfg.n_layer * seq_len * self.cfg.d_model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, per_sequence: bool = False,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for ``idx`` (B, T); with ``targets``, the mean cross-entropy loss instead (over
        the targets that are not -100), or with ``per_sequence`` each sequence's mean loss (B,) (for an
        evaluation's standard error).

        Packed documents: ``segment_ids`` (B, T) integers keep each token's attention inside its own
        document; ``position_ids`` (B, T) replace the positions 0 .. T-1 (rotary or learned).
        Generation: with ``cache``, ``idx`` continues the ``cache.length`` tokens held there (positions
        from ``cache.length`` on), whose keys and values are not recomputed; the new ones are added.
        """
        B, T = idx.shape[:2]
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context:
            raise ValueError(f"sequence of length {start + T} is longer than the model's context {self.cfg.context}")
        if start:
            position_ids = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x = self.wte(idx)
        if self.smear is not None:
            embedded, x = x, self.smear(x, segment_ids, cache.last_embedding if cache is not None else None)
            if cache is not None:
                cache.last_embedding = embedded[:, -1:]
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device) if position_ids is None else position_ids)
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin) if self.cfg.pos == "rope" else None
        delta, L, skips = None, self.cfg.n_layer, []
        ves = [table(idx) for table in self.value_embeds]
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= L - L // 2:
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            ve = None if not ves or self.value_embed_of(i) is None else ves[self.value_embed_of(i)]
            x, delta = block(x, delta, rope, segment_ids, position_ids, None if cache is None else (cache, i), ve)
            if self.skip_weights is not None and i < L // 2:
                skips.append(x if delta is None else x + delta)
        if cache is not None:
            cache.length += T
        h, _ = self.ln_f.add(delta, x)
        cap = self.cfg.logit_softcap
        if targets is None:
            logits = self.lm_head(h)
            return cap * torch.tanh(logits / cap) if cap else logits
        # The head and the loss in one registry op: the Triton backend never holds all the (B, T, V) logits.
        w, b = self.lm_head.weight, self.lm_head.bias
        if per_sequence:
            return torch.stack([self.ops.linear_cross_entropy(h[i], w, targets[i], b, softcap=cap)
                                for i in range(B)])
        return self.ops.linear_cross_entropy(h, w, targets, b, softcap=cap)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T).

        While the sequence fits the context, a KV cache holds every block's keys and values: the prompt
        runs once, then each step runs the model on the one new token. Past the context the window of
        the last ``context`` tokens slides, every position changes, and each step recomputes it.
        """
        cache = KVCache(self.cfg.n_layer)
        for _ in range(max_new_tokens):
            if idx.shape[1] <= self.cfg.context:
                logits = self(idx[:, cache.length:], cache=cache)
            else:
                logits = self(idx[:, -self.cfg.context:])
            logits = logits[:, -1, :].float() / max(temperature, 1e-5)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx
