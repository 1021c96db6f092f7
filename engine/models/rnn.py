"""Recurrent language models: an embedding, a stack of LSTM or GRU layers, and a head.

The recurrence is PyTorch's ``nn.LSTM``/``nn.GRU`` (cuDNN on a GPU); the head and its loss go through
the kernel registry's ``linear_cross_entropy``, as in the GPT. ``forward`` takes and returns the
recurrent state, so a caller can carry it across consecutive windows (truncated backpropagation through
time). With ``input_dim > 0`` the model reads continuous vectors through a linear projection instead of
token ids, and the head has ``vocab_size`` outputs (a forecaster's, see :mod:`engine.tasks.forecast`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.select import Ops

#: The recurrent state: (h, c) for an LSTM, (h,) for a GRU; each (n_layer, batch, hidden).
State = tuple[torch.Tensor, ...]


@dataclass
class RNNConfig:
    cell: str = "lstm"  # "lstm" | "gru"
    n_layer: int = 2
    d_model: int = 256  # embedding width
    hidden: int = 0  # 0: d_model
    vocab_size: int = 256
    dropout: float = 0.0  # between recurrent layers and before the head
    tie_embeddings: bool = True
    input_dim: int = 0  # > 0: continuous inputs of this width instead of token ids

    @property
    def state_dim(self) -> int:
        return self.hidden or self.d_model

    @property
    def tied(self) -> bool:
        return self.tie_embeddings and not self.input_dim


class RNN(nn.Module):
    def __init__(self, cfg: RNNConfig, ops: Ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        #: The registry ops the forward calls (a forecaster's head is a plain linear layer).
        self.ops_used = () if cfg.input_dim else ("cross_entropy",)
        d, h = cfg.d_model, cfg.state_dim
        self.wte = nn.Linear(cfg.input_dim, d) if cfg.input_dim else nn.Embedding(cfg.vocab_size, d)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
        self.rnn = rnn(d, h, cfg.n_layer, batch_first=True, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        # A tied head reads d_model-wide vectors: a state of another width is projected to it first.
        self.proj = nn.Linear(h, d, bias=False) if cfg.tied and h != d else None
        self.lm_head = nn.Linear(d if cfg.tied else h, cfg.vocab_size, bias=not cfg.tied)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight
        if cfg.tied:  # the embedding is also the head: small, so that the first logits are near uniform
            nn.init.normal_(self.wte.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight used in a matmul (an untied embedding is a lookup)."""
        n = self.num_params()
        if not self.cfg.tied and isinstance(self.wte, nn.Embedding):
            n -= self.wte.weight.numel()
        return 6.0 * n

    def zero_state(self, batch: int, device: torch.device) -> State:
        z = torch.zeros(self.cfg.n_layer, batch, self.cfg.state_dim, device=device)
        return (z, z.clone()) if self.cfg.cell == "lstm" else (z,)

    def features(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The last layer's outputs (B, T, hidden or d_model) for ``x`` and the state after the last step."""
        emb = self.drop(self.wte(x))
        if state is not None:  # a carried state is kept in fp32; the recurrence wants its input's dtype
            state = tuple(s.to(emb.dtype) for s in state)
            state = state if self.cfg.cell == "lstm" else state[0]
        out, new = self.rnn(emb, state)
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)
        return out, (new if self.cfg.cell == "lstm" else (new,))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                state: State | None = None, per_sequence: bool = False) -> tuple[torch.Tensor, State]:
        """(logits (B, T, V), state) for ``idx`` (B, T); with ``targets``, (the mean cross-entropy, state), or
        with ``per_sequence`` (each sequence's mean loss (B,), state)."""
        h, state = self.features(idx, state)
        if targets is None:
            return self.lm_head(h), state
        if per_sequence:
            return torch.stack([self.ops.linear_cross_entropy(h[i], self.lm_head.weight, targets[i], self.lm_head.bias)
                                for i in range(h.shape[0])]), state
        return self.ops.linear_cross_entropy(h, self.lm_head.weight, targets, self.lm_head.bias), state

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T), one step at a time on the carried state."""
        logits, state = self(idx)
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :].float() / max(temperature, 1e-5)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            logits, state = self(nxt, state=state)
        return idx
