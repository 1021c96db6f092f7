"""Activation checkpointing: a model's residual blocks keep only their inputs during the forward.

``train.activation_checkpointing`` is ``"none"``, ``"blocks"`` (every residual block: the GPT's
transformer blocks, ConvNeXt's blocks, ResNet's basic/bottleneck blocks) or ``"every_N"`` (every N-th
block, the first of them included, N >= 1). A checkpointed block runs its forward under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: its activations are freed and recomputed
in the backward, the RNG state is replayed (dropout and drop-path draw the same masks), and custom ops
(the Triton kernels) recompute like any other op. A chosen block's class becomes a subclass whose forward
runs the original under the checkpoint, so parameter names and checkpoints stay the same, copies (a
weight EMA) stay checkpointed with their own weights, and DDP, FSDP2 and torch.compile see an unchanged
module tree.
"""

from __future__ import annotations

import re

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from engine.errors import RecipeError

FIELD = "train.activation_checkpointing"


def parse_policy(policy: str) -> int:
    """The stride of checkpointed blocks: 0 for "none", 1 for "blocks", N for "every_N"."""
    if policy == "none":
        return 0
    if policy == "blocks":
        return 1
    m = re.fullmatch(r"every_(\d+)", policy)
    if not m or int(m[1]) < 1:
        raise RecipeError(f"{FIELD}: {policy!r} is not one of \"none\", \"blocks\", \"every_N\" (N >= 1)")
    return int(m[1])


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's residual blocks in forward order."""
    from engine.models import convnext, gpt, resnet

    kinds = (gpt.Block, convnext.Block, resnet.BasicBlock, resnet.Bottleneck)
    return [m for m in model.modules() if isinstance(m, kinds)]


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    """``cls`` with its forward run under a non-reentrant activation checkpoint."""
    if cls not in _CHECKPOINTED:
        def forward(self, *args, **kwargs):
            return checkpoint(super(sub, self).forward, *args, use_reentrant=False, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
        _CHECKPOINTED[cls] = sub
    return _CHECKPOINTED[cls]


def apply(model: nn.Module, policy: str) -> int:
    """Checkpoint the blocks ``policy`` selects; returns how many."""
    stride = parse_policy(policy)
    if not stride:
        return 0
    chosen = residual_blocks(model)[::stride]
    for block in chosen:
        if type(block) not in _CHECKPOINTED.values():
            block.__class__ = _checkpointed(type(block))
    return len(chosen)
