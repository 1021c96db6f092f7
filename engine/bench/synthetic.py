"""What a training benchmark runs on and measures besides time: synthetic batches of the recipe's shapes,
and the memory autograd saves for the backward."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Recipe
from ..models import recompute
from ..ops.select import Ops
from ..tasks import Task
from .args import BenchError


#: Distinct synthetic micro-batches cycled through (kept on the device, so no copies are timed).
SYNTHETIC_BATCHES = 4


# ---------------------------------------------------------------------------------------------------
# The synthetic task
# ---------------------------------------------------------------------------------------------------

class SyntheticTask(Task):
    """The recipe's model on random inputs of the recipe's shapes: no dataset, tokenizer or download."""

    def __init__(self, recipe: Recipe, ops: Ops, device: torch.device):
        self.recipe, self.device, self.ops = recipe, device, ops
        m, t = recipe.model, recipe.train
        # Inputs come from their own generator so that every kernel set sees the same batches.
        gen = torch.Generator().manual_seed(recipe.run.seed)
        if m.arch == "gpt":
            from ..data.text import ByteTokenizer, GPT2Tokenizer
            from ..models.gpt import GPT
            from ..tasks.lm import gpt_config

            vocab = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}[recipe.data.tokenizer].vocab_size
            self.model = GPT(gpt_config(recipe, vocab), ops).to(device)
            self.unit, self.items_per_micro_batch = "tok", t.batch_size * t.seq_len
            tokens = [torch.randint(0, vocab, (t.batch_size, t.seq_len + 1), generator=gen)
                      for _ in range(SYNTHETIC_BATCHES)]
            self.batches = [(x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)) for x in tokens]
            self._flops = self.model.flops_per_token(t.seq_len)
        else:
            from ..config import IMAGE_ARCHS

            if m.arch not in IMAGE_ARCHS:
                raise BenchError(f"model.arch: bench train builds gpt, {', '.join(IMAGE_ARCHS)} models; "
                                 f"got {m.arch!r}")
            from ..tasks.vision import build_model, forward_flops, guard_onednn_convs

            layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
            self.model = build_model(m, ops).to(device, memory_format=layout)
            if device.type == "cpu":  # torch.compile runs CPU convolutions channels_last whatever the layout
                guard_onednn_convs(self.model)
            self.unit, self.items_per_micro_batch = "img", t.batch_size
            shape = (t.batch_size, m.channels, m.image_size, m.image_size)
            self.batches = [(torch.randn(shape, generator=gen).to(device, memory_format=layout),
                             torch.randint(0, m.num_classes, (t.batch_size,), generator=gen).to(device))
                            for _ in range(SYNTHETIC_BATCHES)]
            self._flops = 3.0 * forward_flops(m)
        recompute.apply(self.model, t.activation_checkpointing)

    def batch(self, step: int, micro: int):
        return self.batches[(step * self.recipe.train.grad_accum + micro) % len(self.batches)]

    def loss(self, model: nn.Module, inputs, targets):
        if self.unit == "tok":
            return model(inputs, targets)
        return self.ops.cross_entropy(model(inputs), targets, label_smoothing=self.recipe.train.label_smoothing)

    def flops_per_item(self) -> float:
        return self._flops

    def ops_used(self) -> tuple[str, ...]:
        return (*super().ops_used(), "cross_entropy") if self.unit == "img" else super().ops_used()


# ---------------------------------------------------------------------------------------------------
# Activation memory
# ---------------------------------------------------------------------------------------------------

class SavedActivations:
    """The most memory held at once by the tensors autograd saves for the backward, in bytes (``peak``).

    While the context is open, every tensor a forward saves for its backward passes through
    ``torch.autograd.graph.saved_tensors_hooks`` and is counted by its storage, once however many saved
    tensors view it, from when it is saved until autograd lets go of it (the backward that used it, or the
    graph freed). The model's parameters and buffers are left out: they are held whether or not a backward
    follows. A checkpointed block saves only its inputs here; the activations its backward recomputes are held
    by the checkpoint, one block at a time and briefly, and are not counted. Gradients, optimizer state and
    an op's temporaries are not activations and are not counted either. The same on every device.
    """

    def __init__(self, model: nn.Module):
        self._skip = {self._key(t) for t in (*model.parameters(), *model.buffers())}
        self._live: dict[tuple, list[int]] = {}  # storage -> [saved tensors holding it, bytes]
        self.bytes = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return t.device, t.untyped_storage().data_ptr()

    def _pack(self, t: torch.Tensor):
        try:
            key, size = self._key(t), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (a sparse tensor): not counted
            return t
        if key in self._skip or not size:
            return t
        entry = self._live.setdefault(key, [0, size])
        if not entry[0]:
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        return _Saved(self, key, t)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: tuple) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if not entry[0]:
            self.bytes -= entry[1]
            del self._live[key]

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    """One saved tensor, as autograd holds it while the counter watches: releasing it counts it out."""

    __slots__ = ("owner", "key", "tensor")

    def __init__(self, owner: SavedActivations, key: tuple, tensor: torch.Tensor):
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self):
        self.owner._release(self.key)
