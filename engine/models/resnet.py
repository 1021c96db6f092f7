"""ResNet (He et al., 2015), readable top to bottom.

Two shapes from one definition:

- CIFAR-style (``stem="cifar"``): a 3x3 stride-1 stem and no max-pool, so 32x32 images keep their
  resolution into the first stage (stages at 32, 16, 8 and 4 pixels). ResNet-18 is basic blocks, depths
  (2, 2, 2, 2), width 64: 11.2M parameters with 10 classes.
- ImageNet-style (``stem="imagenet"``): a 7x7 stride-2 stem and a 3x3 stride-2 max-pool (stages at 56,
  28, 14 and 7 pixels for 224x224 images). ResNet-50 is bottleneck blocks, depths (3, 4, 6, 3), width 64:
  25.6M parameters with 1000 classes, as torchvision's ``resnet50`` (the stride sits in the bottleneck's
  3x3 conv, "ResNet v1.5").

Convolutions have no bias (a BatchNorm follows each). Shortcuts that change shape are a strided 1x1 conv
and a BatchNorm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ResNetConfig:
    block: str = "basic"  # "basic" | "bottleneck"
    stem: str = "cifar"  # "cifar" | "imagenet"
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    width: int = 64  # channels of the first stage; doubled at each later stage
    num_classes: int = 10
    channels: int = 3  # input channels


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs on the residual branch."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = conv_bn(c_in, width, 3, stride)
        self.conv2 = conv_bn(width, c_out, 3)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x), inplace=True)
        return F.relu(self.conv2(h) + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    """1x1 down to ``width``, 3x3 (carrying the stride), 1x1 up to 4·width."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = conv_bn(c_in, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride)
        self.conv3 = conv_bn(width, c_out, 1)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x), inplace=True)
        h = F.relu(self.conv2(h), inplace=True)
        return F.relu(self.conv3(h) + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg.block]
        if cfg.stem == "cifar":
            self.stem = nn.Sequential(conv_bn(cfg.channels, cfg.width, 3), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(conv_bn(cfg.channels, cfg.width, 7, stride=2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        stages, c_in = [], cfg.width
        for i, depth in enumerate(cfg.depths):
            width = cfg.width * 2 ** i
            blocks = []
            for j in range(depth):
                blocks.append(block(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def blocks(self) -> list[nn.Module]:
        """The units a sharded (FSDP) run wraps one by one: the four stages."""
        return list(self.stages)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, C, H, W)."""
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
