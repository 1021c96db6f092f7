"""The evaluations self-supervised learning is judged by, on frozen features of the backbone.

- k-NN top-1 (Wu et al., 2018, as solo-learn reports it): the labelled training images are the memory
  bank, each validation image votes among its ``k`` most cosine-similar bank images, each vote weighted by
  ``exp(similarity / T)``. No training, so it can run at every periodic evaluation.
- Linear probe top-1: a softmax classifier on the standardized features of the bank images, fitted
  full-batch with L-BFGS from zero weights (a convex problem: the same answer on every run), scored on
  the validation images.

Features are the backbone's pooled output (the projection head is not used), computed in eval mode
(BatchNorm running statistics) on unaugmented images.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Validation images scored against the bank at once (a chunk x bank similarity block).
KNN_CHUNK = 1024
#: L2 penalty of the linear probe's weights: keeps the optimum finite when the features separate the classes.
PROBE_WEIGHT_DECAY = 1e-4


@torch.no_grad()
def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int, temperature: float, num_classes: int) -> float:
    """Share of ``queries`` (n, C) whose similarity-weighted vote among their ``k`` nearest ``bank`` rows
    (cosine) names their label."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), KNN_CHUNK):
        q = F.normalize(queries[start:start + KNN_CHUNK].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == query_labels[start:start + KNN_CHUNK]).sum())
    return correct / len(queries)


def linear_probe_top1(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
                      num_classes: int, iterations: int) -> float:
    """Top-1 on ``val`` of a softmax classifier fitted to standardized ``train`` features (L-BFGS)."""
    mean, std = train.mean(dim=0), train.std(dim=0) + 1e-6
    x, x_val = (train.float() - mean) / std, (val.float() - mean) / std
    probe = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), train_labels) + PROBE_WEIGHT_DECAY * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((probe(x_val).argmax(dim=1) == val_labels).float().mean())
