"""Activation checkpointing: a model's residual blocks keep only their inputs during the forward.

``train.activation_checkpointing`` is ``"none"``, ``"blocks"`` (every residual block: the GPT's
transformer blocks, ConvNeXt's blocks, ResNet's basic/bottleneck blocks) or ``"every_N"`` (every N-th
block, the first of them included, N >= 1). A checkpointed block runs its forward under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: its activations are freed and recomputed
in the backward, the RNG state is replayed (dropout and drop-path draw the same masks), and custom ops
(the Triton kernels) recompute like any other op. A chosen block's class becomes a subclass whose forward
runs the original under the checkpoint, so parameter names and checkpoints stay the same, copies (a
weight EMA) stay checkpointed with their own weights, and DDP, FSDP2 and torch.compile see an unchanged
module tree (FSDP2's ``fully_shard`` of a block subclasses the swapped class once more; the checkpoint
stays inside the all-gather and reshard hooks, and the backward's recomputation runs while the block's
parameters are gathered for its gradients).

Every task applies it to the model it trains: the GPT (language modelling and forecasting), ConvNeXt and
ResNet; a recurrent network (``model.arch = "lstm"`` or ``"gru"``) has no residual blocks and a policy
other than ``"none"`` is refused.
"""

from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config.checks import CHECKPOINTING_FIELD as FIELD, parse_policy
from ..errors import RecipeError


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's residual blocks in forward order."""
    from . import convnext, gpt, resnet

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


def apply(model: nn.Module, policy: str, log=None) -> int:
    """Checkpoint the blocks ``policy`` selects; returns how many (and says so through ``log``, if given).

    A model without residual blocks (a recurrent network) is refused: the policy would change nothing.
    """
    stride = parse_policy(policy)
    if not stride:
        return 0
    blocks = residual_blocks(model)
    if not blocks:
        raise RecipeError(f"{FIELD} = {policy!r}: {type(model).__name__} has no residual blocks to checkpoint "
                          f"(the GPT, ConvNeXt and ResNet have); set it to \"none\"")
    chosen = blocks[::stride]
    for block in chosen:
        if type(block) not in _CHECKPOINTED.values():
            block.__class__ = _checkpointed(type(block))
    if log is not None:
        log(f"activation checkpointing: {len(chosen)} of {len(blocks)} residual blocks recompute their "
            f"activations in the backward ({FIELD} = {policy!r})")
    return len(chosen)


def checkpointed_blocks(model: nn.Module) -> int:
    """How many of ``model``'s modules run under a checkpoint (also once wrapped: FSDP2 subclasses them again)."""
    kinds = tuple(_CHECKPOINTED.values())
    return sum(isinstance(m, kinds) for m in model.modules()) if kinds else 0
