"""Self-supervised pretraining of an image backbone (``train.task = "simclr"`` or ``"vicreg"``).

The backbone is the engine's ResNet or ConvNeXt (any preset) without its classifier; a projection head (an
MLP on the pooled features) maps each view to the space the loss compares. Each step takes a batch of
images from the unlabelled pool (the training split of ``data.source`` and of every ``ssl.unlabelled``
source), draws two augmented views of each on the device (:mod:`engine.ssl.augment`) and lays them out in
pairs: rows 2k and 2k+1 are the views of image k.

- ``simclr`` (Chen et al., 2020): NT-Xent, the registry op ``nt_xent``, over the 2B views of the *global*
  batch. Under DDP every process gathers every process's projections (gradients flow back to their owners,
  :class:`_GatherViews`) and scores its own rows against all of them, so a run on W processes computes the
  loss and the gradients of one process holding the whole batch. The negatives are the other images of the
  batch: it wants large batches.
- ``vicreg`` (Bardes et al., 2022): no negatives, so no large batch: the two views' projections are
  pulled together while every projection dimension keeps a unit standard deviation over the batch and the
  dimensions stay decorrelated, which is what prevents collapse. On the built-in shapes it learned faster
  than SimSiam (a predictor against a stop-gradient target) at the same small budget, which is why it is
  the non-contrastive choice (docs/models.md has the figures).

Evaluation (:mod:`engine.ssl.evaluation`) is on frozen backbone features: k-NN top-1 at every periodic
evaluation, and the k-NN and a linear probe at the end. The checkpoint's model holds ``backbone.*`` (the
classifier's own parameter names behind the prefix) and the projection head, so ``train.init_from`` of a
classifier takes the backbone and drops the head (:func:`engine.transfer.source_state`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..config import Recipe, RecipeError, SSLConfig
from ..data.images import ImageBatches, eval_indices, load_images, to_model_input
from ..models import recompute
from ..precision import autocast
from ..ops.select import Ops
from ..ssl import augment, evaluation
from ..ssl.augment import Draw
from .base import Task
from .vision import build_model, forward_flops

#: The state-dict prefix of the backbone in a pretraining checkpoint; everything else there is a head.
BACKBONE_PREFIX = "backbone."
#: The classifier's final linear layer: the ResNet's and the ConvNeXt's.
CLASSIFIER_HEADS = ("fc", "head")


def strip_head(model: nn.Module) -> int:
    """Replace an image classifier's final linear layer by the identity (the model then returns its pooled
    features); returns the feature width."""
    name = next(n for n in CLASSIFIER_HEADS if hasattr(model, n))
    width = getattr(model, name).in_features
    setattr(model, name, nn.Identity())
    return width


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with BatchNorm and ReLU between them (the hidden layers' biases
    are left out: BatchNorm follows them)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Linear(a, b, bias=last))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class PretrainingModel(nn.Module):
    """A backbone and its projection head: ``forward`` returns the projections."""

    def __init__(self, backbone: nn.Module, width: int, task: str, cfg: SSLConfig):
        super().__init__()
        self.backbone = backbone
        hidden = cfg.proj_hidden or width
        # SimCLR's two-layer head, VICReg's three-layer expander
        widths = [width, hidden, cfg.proj_dim] if task == "simclr" else [width, hidden, hidden, cfg.proj_dim]
        self.projector = _mlp(widths)
        self.ops_used = getattr(backbone, "ops_used", ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class _GatherViews(torch.autograd.Function):
    """Every process's rows, concatenated in rank order. The backward sums the gradients that every
    process's loss sends to this process's rows (an all-reduce, then this process's slice)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_views(z: torch.Tensor) -> torch.Tensor:
    return _GatherViews.apply(z) if distributed.world() > 1 else z


def vicreg_loss(z: torch.Tensor) -> torch.Tensor:
    """VICReg (Bardes et al., 2022) with its weights 25 / 25 / 1: invariance (the views' mean squared
    distance), variance (a hinge keeping every dimension's standard deviation at 1) and covariance (the
    off-diagonal covariances squared), the last two per view; views in pairs."""
    z = z.float()
    a, b = z[0::2], z[1::2]
    invariance = F.mse_loss(a, b)
    variance = covariance = 0.0
    for x in (a, b):
        x = x - x.mean(dim=0)
        std = torch.sqrt(x.var(dim=0) + 1e-4)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = (x.T @ x) / (len(x) - 1)
        covariance = covariance + (cov.square().sum() - cov.diagonal().square().sum()) / x.shape[1]
    return 25 * invariance + 25 * variance + covariance


class ImagePool:
    """The pretraining images: the training splits of several sources, indexed as one."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), *self.arrays[0].shape[1:]), dtype=np.uint8)
        for source in np.unique(which):
            sel = which == source
            out[sel] = self.arrays[source][idx[sel] - self.starts[source]]
        return out


class PretrainingTask(Task):
    unit = "img"

    def __init__(self, recipe: Recipe, ops: Ops, device: torch.device, rank: int, world: int, log=print):
        self.recipe, self.ops, self.device, self.rank, self.world = recipe, ops, device, rank, world
        m, d, t, s = recipe.model, recipe.data, recipe.train, recipe.ssl
        self.stored = d.image_size or m.image_size
        self.view_size = s.view_size or m.image_size
        self.data = distributed.main_first(lambda: load_images(d, self.stored, m.channels, log=log), rank, world)
        # Only the images of the ssl.unlabelled sources are read: they need no labels, nor a validation split.
        extra = [distributed.main_first(lambda: load_images(_source(d, src), self.stored, m.channels, log=log,
                                                            labelled=False), rank, world) for src in s.unlabelled]
        self.pool = ImagePool([self.data.train_images, *(e.train_images for e in extra)])
        self.num_classes = len(self.data.classes)
        self.memory_format = torch.channels_last
        backbone = build_model(m, ops)
        width = strip_head(backbone)
        self.model = PretrainingModel(backbone, width, t.task, s).to(device, memory_format=self.memory_format)
        recompute.apply(self.model.backbone, t.activation_checkpointing, log)
        self.mean = torch.tensor(self.data.mean, device=device, dtype=torch.float32)
        self.std = torch.tensor(self.data.std, device=device, dtype=torch.float32)
        self.train_batches = ImageBatches(len(self.pool), t.batch_size, t.grad_accum, recipe.run.seed, world)
        self.items_per_micro_batch = t.batch_size
        self._flops: float | None = None
        sources = ", ".join([d.source, *s.unlabelled])
        log(f"data: {len(self.pool):,} pretraining images ({sources}), two {self.view_size}x{self.view_size} views "
            f"each; k-NN on {self._bank_size():,} labelled {d.source} train images, {len(self.data.val_labels):,} val "
            f"images, {self.num_classes} classes; model: {sum(p.numel() for p in self.model.parameters()):,} "
            f"parameters ({sum(p.numel() for p in backbone.parameters()):,} in the backbone)")

    # ------------------------------------------------------------------ training
    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of this process's images, in pairs (2B, C, S, S); no targets."""
        t = self.recipe.train
        images = torch.from_numpy(self.pool[self.train_batches.indices(step, micro, self.rank)])
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        views = []
        for v in range(2):
            g = torch.Generator(device=self.device)
            g.manual_seed(view_seed(self.recipe.run.seed, step, micro, v))
            draw = Draw(g, t.batch_size * self.world, t.batch_size * self.rank, t.batch_size, self.device)
            views.append(augment.view(images, self.recipe.ssl, self.view_size, draw))
        pairs = torch.stack(views, dim=1).flatten(0, 1)
        return augment.normalize(pairs, self.mean, self.std, self.memory_format), torch.empty(0, device=self.device)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.recipe.train.task == "vicreg":
            return vicreg_loss(model(inputs))
        z = model(inputs)
        rows = z.shape[0]
        return self.ops.nt_xent(gather_views(z), self.recipe.ssl.temperature, self.rank * rows, rows)

    def ops_used(self) -> tuple[str, ...]:
        return (*super().ops_used(), "nt_xent") if self.recipe.train.task == "simclr" else super().ops_used()

    def muon_params(self) -> list[nn.Parameter]:
        raise RecipeError('optim.name = "muon" updates a GPT\'s hidden matrices; pretrain with adamw, sgd or lion')

    # ------------------------------------------------------------------ evaluation
    def _bank_size(self) -> int:
        bank = self.recipe.ssl.knn_bank
        return min(bank, len(self.data.train_labels)) if bank else len(self.data.train_labels)

    def eval_batches(self, final: bool) -> int:
        """Forward batches of one evaluation: the bank's and the queries'."""
        t = self.recipe.train
        queries = len(self.data.val_labels) if final else min(len(self.data.val_labels), t.eval_batches * t.batch_size)
        return -(-(self._bank_size() + queries) // (t.batch_size * self.world))

    @torch.no_grad()
    def _features(self, images: np.ndarray, labels: np.ndarray, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features and labels of the first ``count`` images, every process's share gathered."""
        t = self.recipe.train
        backbone = self.model.backbone
        feats, labs = [], []
        for idx in eval_indices(len(labels), t.batch_size, -(-count // (t.batch_size * self.world)), self.rank,
                                self.world):
            x = torch.from_numpy(images[idx]).to(self.device)
            x = to_model_input(x, self.mean, self.std, self.view_size, self.memory_format)
            with autocast(t.precision, self.device):
                feats.append(backbone(x).float())
            labs.append(torch.from_numpy(labels[idx]).to(self.device))
        return _gather_rows(torch.cat(feats)), _gather_rows(torch.cat(labs))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """k-NN top-1 of the frozen backbone (the periodic sample of validation images, or all of them at
        the end), and at the end the linear probe's top-1. The backbone runs unwrapped (``model`` may be the
        DDP wrapper, whose forward would need every process): each process embeds its share of the images and
        the features are gathered."""
        was_training = self.model.training
        self.model.eval()
        t, s = self.recipe.train, self.recipe.ssl
        bank, bank_labels = self._features(self.data.train_images, self.data.train_labels, self._bank_size())
        n_val = len(self.data.val_labels) if final else t.eval_batches * t.batch_size
        queries, query_labels = self._features(self.data.val_images, self.data.val_labels, n_val)
        self.model.train(was_training)
        metrics = {"knn_top1": evaluation.knn_top1(bank, bank_labels, queries, query_labels, s.knn_k,
                                                   s.knn_temperature, self.num_classes)}
        if final and s.probe_epochs:
            metrics["probe_top1"] = evaluation.linear_probe_top1(bank, bank_labels, queries, query_labels,
                                                                 self.num_classes, s.probe_epochs)
        return metrics

    def flops_per_item(self) -> float:
        """Training FLOPs per image: two views, 3 x the backbone's forward each (the heads are negligible)."""
        if self._flops is None:
            self._flops = 6.0 * forward_flops(self.recipe.model)
        return self._flops


def view_seed(seed: int, step: int, micro: int, view: int) -> int:
    """The generator seed of one view of a global micro-batch: the same on every process."""
    return int(np.random.SeedSequence([seed, step, micro, view, 0x55]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _source(d, source: str):
    """``data`` with another source (its other fields, the cache folder included, unchanged)."""
    return dataclasses.replace(d, source=source)


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``t`` (equal counts), in rank order."""
    if distributed.world() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(distributed.world())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def build(recipe: Recipe, ops: Ops, device: torch.device, rank: int, world: int, log=print) -> Task:
    return PretrainingTask(recipe, ops, device, rank, world, log)
