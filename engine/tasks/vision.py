"""Image classification: a ResNet or ConvNeXt trained on labelled images.

Images come from the uint8 cache of :mod:`engine.data.images` and are augmented and normalized on the
device in whole batches. The model and its inputs are channels_last, on CUDA and on CPU (a sharded run
keeps NCHW: FSDP shards only contiguous parameters). On CPU, the few convolutions whose channels_last backward
oneDNN gets wrong run another way: see :func:`guard_onednn_convs`. The loss is the registry's cross-entropy
with optional label smoothing; evaluation reports top-1 accuracy, with an exponential moving average of
the weights when ``train.ema_decay`` is set.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..ops import select as op_select, table as op_table
from ..config import ModelConfig, Recipe, RecipeError
from ..data.images import (ImageBatches, augmentation_seed, crop_and_flip, eval_indices, labelled_subset,
                           load_images, to_model_input)
from ..models.convnext import Block as ConvNeXtBlock, ConvNeXt, ConvNeXtConfig
from ..models.resnet import ResNet, ResNetConfig
from ..precision import autocast
from ..ops.select import Ops
from ..models import recompute
from .base import Task, register


def build_model(m: ModelConfig, ops: Ops) -> nn.Module:
    common = dict(depths=tuple(m.depths), width=m.width, num_classes=m.num_classes, channels=m.channels, stem=m.stem)
    if m.arch == "resnet":
        return ResNet(ResNetConfig(block=m.block, **common))
    if m.arch == "convnext":
        return ConvNeXt(ConvNeXtConfig(drop_path=m.drop_path, **common), ops)
    raise RecipeError(f"model.arch: {m.arch!r} is not an image classifier")


#: Input channels per block of oneDNN's x86 1x1 convolutions: 8 with AVX2, 16 with AVX-512 (the larger
#: is used everywhere, so that one rule is safe on both).
ONEDNN_IC_BLOCK = 16


def onednn_unsafe(module: nn.Module) -> bool:
    """Whether oneDNN's channels_last weight gradient of ``module`` writes past its buffer on an x86 CPU.

    An unpadded strided 1x1 convolution first gathers the pixels it reads into a workspace; for an NHWC
    input with fewer channels (per group) than a block, the weight-gradient kernel indexes that workspace by
    whole blocks and writes past it: heap corruption with one thread, wrong weight gradients with more.
    Stride 1 needs no workspace, so the convolutions this flags run at stride 1 on CPU (see
    :func:`guard_onednn_convs`).
    """
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.padding == (0, 0) and module.in_channels // module.groups < ONEDNN_IC_BLOCK)


class SubsampledConv2d(nn.Conv2d):
    """A strided 1x1 convolution computed as the stride-1 convolution of the pixels it reads: the same
    arithmetic, on a path that oneDNN gets right in channels_last (see :func:`onednn_unsafe`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias, groups=self.groups)


def guard_onednn_convs(model: nn.Module, log=print) -> None:
    """Make the convolutions of a CPU model that :func:`onednn_unsafe` flags :class:`SubsampledConv2d`.

    A model without one (the default widths) is untouched. The layout stays channels_last: running the
    flagged convolutions in NCHW would not survive torch.compile, whose CPU convolutions are channels_last
    whatever the eager layout. Swapping the class keeps parameter names, checkpoints, a weight EMA's copy
    and the module tree that DDP and torch.compile see.
    """
    convs = [m for m in model.modules() if onednn_unsafe(m)]
    for conv in convs:
        conv.__class__ = SubsampledConv2d
    if convs:
        log(f"cpu: {len(convs)} strided 1x1 convolution(s) with fewer than {ONEDNN_IC_BLOCK} input channels run at "
            f"stride 1 on their subsampled input (oneDNN's channels_last weight gradient of a strided one writes "
            f"out of bounds: uxlfoundation/oneDNN issue 6035)")


@torch.no_grad()
def forward_flops(m: ModelConfig) -> float:
    """Forward FLOPs for one image: 2 per multiply-accumulate of every conv and linear layer.

    Counted with forward hooks on one pass of the model built on the meta device (shapes only: no memory,
    no arithmetic), with the torch backend of every op. A ConvNeXt block's depthwise conv and its MLP run as
    registry ops (``depthwise_conv2d``, ``mlp``) rather than as module calls, so the block's own hook counts
    them.
    """
    macs = 0

    def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, ConvNeXtBlock):  # output (B, C, H, W), the dwconv's too: B * H * W rows
            rows = output.numel() // module.fc2.out_features
            macs += output.numel() * math.prod(module.dwconv.kernel_size)  # one filter per channel
            for fc in (module.fc1, module.fc2):
                macs += rows * fc.in_features * fc.out_features
        else:
            macs += output.numel() * module.in_features

    with torch.device("meta"):
        model = build_model(m, op_select.resolve({op: "torch" for op in op_table.op_names()})).eval()
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, ConvNeXtBlock)):
                module.register_forward_hook(count)
        model(torch.zeros((1, m.channels, m.image_size, m.image_size)))
    return 2.0 * macs


class ImageClassificationTask(Task):
    unit = "img"

    def __init__(self, recipe: Recipe, ops: Ops, device: torch.device, rank: int, world: int, log=print):
        self.recipe, self.ops, self.device, self.rank, self.world = recipe, ops, device, rank, world
        m, d, t = recipe.model, recipe.data, recipe.train
        size = d.image_size or m.image_size
        self.data = distributed.main_first(lambda: load_images(d, size, m.channels, log=log), rank, world)
        if len(self.data.classes) > m.num_classes:
            raise RecipeError(f"model.num_classes ({m.num_classes}) is smaller than the number of classes in "
                              f"{d.source} ({len(self.data.classes)})")
        sharded = world > 1 and recipe.parallel.strategy == "fsdp"
        self.memory_format = torch.contiguous_format if sharded else torch.channels_last
        self.model = build_model(m, ops).to(device, memory_format=self.memory_format)
        if device.type == "cpu":
            guard_onednn_convs(self.model, log)
        recompute.apply(self.model, recipe.train.activation_checkpointing, log)
        self.ema = None
        if t.ema_decay:
            if sharded:
                raise RecipeError("train.ema_decay: a weight EMA is not supported with parallel.strategy = 'fsdp' "
                                  "(the average would need sharding like the model); use 'ddp' or set it to 0")
            self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.mean = torch.tensor(self.data.mean, device=device, dtype=torch.float32)
        self.std = torch.tensor(self.data.std, device=device, dtype=torch.float32)
        # data.labels_per_class: the training images are a fixed few of each class (None: all of them).
        self.subset = labelled_subset(self.data.train_labels, d.labels_per_class) if d.labels_per_class else None
        n_train = len(self.subset) if self.subset is not None else len(self.data.train_labels)
        self.train_batches = ImageBatches(n_train, t.batch_size, t.grad_accum, recipe.run.seed, world)
        self.items_per_micro_batch = t.batch_size
        self._flops: float | None = None
        labelled = f" ({d.labels_per_class} labelled per class: {n_train:,})" if self.subset is not None else ""
        log(f"data: {len(self.data.train_labels):,} train{labelled} / {len(self.data.val_labels):,} val images of "
            f"{size}x{size}, {len(self.data.classes)} classes ({d.source}); model: "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters")

    def _to_device(self, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.train_batches.indices(step, micro, self.rank)
        if self.subset is not None:
            idx = self.subset[idx]
        images, labels = self._to_device(self.data.train_images[idx], self.data.train_labels[idx])
        d = self.recipe.data
        if d.augment:
            g = torch.Generator(device=self.device)
            g.manual_seed(augmentation_seed(self.recipe.run.seed, step, micro, self.rank))
            images = crop_and_flip(images, d.crop_padding, g)
        return self._input(images), labels

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, self.mean, self.std, self.recipe.model.image_size, self.memory_format)

    def ops_used(self) -> tuple[str, ...]:
        return (*super().ops_used(), "cross_entropy")

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        return self.ops.cross_entropy(logits, targets, label_smoothing=self.recipe.train.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """Loss and top-1 accuracy on the validation images (of the weight EMA when there is one)."""
        model = self.ema if self.ema is not None else model
        was_training = model.training
        model.eval()
        t = self.recipe.train
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss, correct, count
        for idx in eval_indices(len(self.data.val_labels), t.batch_size, t.eval_batches, self.rank, self.world):
            images, labels = self._to_device(self.data.val_images[idx], self.data.val_labels[idx])
            with autocast(t.precision, self.device):
                logits = model(self._input(images)).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits.argmax(dim=1) == labels).sum()
            sums[2] += len(idx)
        model.train(was_training)
        loss, correct, count = distributed.mean(sums).tolist()  # the means' ratios are the global ratios
        return {"val_loss": loss / count, "val_acc": correct / count}

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        if self.ema is None:
            return
        # The decay ramps up over the first steps, so that the average is not dominated by the initial weights.
        decay = min(self.recipe.train.ema_decay, (1 + step) / (10 + step))
        ema = [*self.ema.parameters(), *self.ema.buffers()]
        live = [*self.model.parameters(), *self.model.buffers()]
        floats = [(e, p) for e, p in zip(ema, live) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - decay)
        for e, p in zip(ema, live):
            if not e.is_floating_point():
                e.copy_(p)  # e.g. BatchNorm's batch counter

    def state_dict(self) -> dict:
        """State beyond the model's own: the weight EMA, for an exact resume."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def flops_per_item(self) -> float:
        """Training FLOPs per image: 3 x forward (the backward costs about twice the forward)."""
        if self._flops is None:
            self._flops = 3.0 * forward_flops(self.recipe.model)
        return self._flops


@register("resnet")
def build_resnet(recipe, ops, device, rank, world, log) -> Task:
    return ImageClassificationTask(recipe, ops, device, rank, world, log)


@register("convnext")
def build_convnext(recipe, ops, device, rank, world, log) -> Task:
    return ImageClassificationTask(recipe, ops, device, rank, world, log)
