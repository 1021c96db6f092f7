"""Fetching a step's micro-batches one optimizer step ahead (see :class:`Prefetcher`)."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from ..tasks import Task


class Prefetcher:
    """Micro-batches one optimizer step ahead: while step N computes, step N + 1's batches are already on
    their way to the device (the task pins them and copies with ``non_blocking=True``; on CUDA the copies
    are queued on a side stream, so they overlap step N's kernels). On a CPU there is nothing to copy: the
    batches are built when asked for. Batches are a pure function of the step, so prefetching changes
    nothing a run computes."""

    def __init__(self, task: Task, grad_accum: int, device: torch.device):
        self.task, self.grad_accum = task, grad_accum
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[int, list] | None = None

    def _fetch(self, step: int) -> list:
        return [self.task.batch(step, micro) for micro in range(self.grad_accum)]

    def batches(self, step: int) -> list:
        if self.stream is None:
            return self._fetch(step)
        current = torch.cuda.current_stream(self.stream.device)
        if self._ahead is not None and self._ahead[0] == step:
            current.wait_stream(self.stream)
            batches = self._ahead[1]
            for t in tree_leaves(batches):  # the side stream's memory is now also the compute stream's
                if isinstance(t, torch.Tensor):
                    t.record_stream(current)
        else:
            batches = self._fetch(step)
        with torch.cuda.stream(self.stream):
            self._ahead = (step + 1, self._fetch(step + 1))
        return batches

