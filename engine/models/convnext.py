"""ConvNeXt (Liu et al., 2022, "A ConvNet for the 2020s"), readable top to bottom.

A patchify stem, four stages of blocks with a LayerNorm and a stride-2 2x2 conv between stages, global
average pooling, a final LayerNorm and a linear head. Each block is a 7x7 depthwise conv, a LayerNorm over
channels, an MLP (C -> 4C -> C, GELU), a per-channel LayerScale and stochastic depth on the residual branch.
ConvNeXt-T is width 96 (dims 96, 192, 384, 768), depths (3, 3, 9, 3), 4x4 patches: 28.6M parameters with
1000 classes, as torchvision's ``convnext_tiny``. The CIFAR-sized variant uses 2x2 patches.

Every LayerNorm goes through the kernel registry (``ops.layer_norm``, which normalizes the last dim), so
the Triton kernel serves them. The model runs in channels_last memory format on CUDA, where an (B, C, H, W)
activation is stored as (B, H, W, C): ``x.permute(0, 2, 3, 1)`` is then a contiguous NHWC view. The blocks
normalize and run their MLP on that view (the linears act on the last dim) and permute back, and the
"channels first" norms of the stem and the downsampling layers normalize it the same way: no layout copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.select import Ops


@dataclass
class ConvNeXtConfig:
    stem: str = "cifar"  # "cifar" (2x2 patches) | "imagenet" (4x4 patches)
    depths: tuple[int, int, int, int] = (2, 2, 6, 2)
    width: int = 64  # channels of the first stage; doubled at each later stage
    num_classes: int = 10
    channels: int = 3  # input channels
    drop_path: float = 0.0  # stochastic depth of the last block; rises linearly from 0 at the first
    layer_scale: float = 1e-6  # initial LayerScale: each block starts close to the identity

    @property
    def dims(self) -> list[int]:
        return [self.width * 2 ** i for i in range(len(self.depths))]


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, served by the registry; parameters named like ``nn.LayerNorm``."""

    def __init__(self, dim: int, ops: Ops, eps: float = 1e-6):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor: normalizes its NHWC view and permutes back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def drop_path_scale(x: torch.Tensor, p: float, training: bool) -> torch.Tensor | None:
    """Stochastic depth as a factor per row of the NHWC view ``x`` (B, H, W, C): a random share ``p`` of
    the samples get 0 (their residual branch is dropped), the rest ``1 / (1 - p)``. None when inactive."""
    if p == 0.0 or not training:
        return None
    keep = torch.empty(x.shape[0], device=x.device, dtype=torch.float32).bernoulli_(1.0 - p).div_(1.0 - p)
    return keep.repeat_interleave(x.shape[1] * x.shape[2])


class Block(nn.Module):
    def __init__(self, dim: int, drop_path: float, layer_scale: float, ops: Ops):
        super().__init__()
        self.ops = ops
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, ops)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The depthwise conv goes through the registry (its parameters stay in the nn.Conv2d, whose state-dict
        # keys they keep); the Triton backend reads and writes channels_last without layout copies.
        h = self.ops.depthwise_conv2d(x, self.dwconv.weight, self.dwconv.bias, padding=self.dwconv.padding)
        h = h.permute(0, 2, 3, 1)  # (B, H, W, C): a view, contiguous in channels_last
        # fc1, GELU, fc2, LayerScale, stochastic depth and the residual add in one registry op: the Triton
        # backend adds fc1's bias and applies GELU as fc2 loads fc1's output, and the rest as fc2 stores, so
        # neither the 4C-wide GELU output nor the scaled branch is ever written to memory.
        residual = x.permute(0, 2, 3, 1)
        out = self.ops.mlp(self.norm(h), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                           self.layer_scale, residual, drop_path_scale(residual, self.drop_path, self.training))
        return out.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, cfg: ConvNeXtConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        #: The registry ops the forward calls.
        self.ops_used = ("layer_norm", "dwconv", "mlp")
        dims = cfg.dims
        patch = 4 if cfg.stem == "imagenet" else 2
        self.stem = nn.Sequential(nn.Conv2d(cfg.channels, dims[0], kernel_size=patch, stride=patch),
                                  LayerNorm2d(dims[0], ops))
        self.downsample = nn.ModuleList(
            nn.Sequential(LayerNorm2d(dims[i - 1], ops), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
            for i in range(1, len(dims)))
        total, done = sum(cfg.depths), 0
        self.stages = nn.ModuleList()
        for dim, depth in zip(dims, cfg.depths):
            rates = [cfg.drop_path * (done + j) / max(1, total - 1) for j in range(depth)]
            self.stages.append(nn.Sequential(*(Block(dim, rate, cfg.layer_scale, ops) for rate in rates)))
            done += depth
        self.norm = LayerNorm(dims[-1], ops)
        self.head = nn.Linear(dims[-1], cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> list[nn.Module]:
        """The units a sharded (FSDP) run wraps one by one: the four stages."""
        return list(self.stages)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, C, H, W)."""
        x = self.stages[0](self.stem(x))
        for down, stage in zip(self.downsample, self.stages[1:]):
            x = stage(down(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))
