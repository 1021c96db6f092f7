"""SimCLR's view augmentations on the device, one batch at a time.

The random parameters of each view (a handful of numbers per image) are drawn for the whole global
micro-batch from one ``torch.Generator`` seeded from (seed, step, micro-step, view), and each process keeps
the rows of its own images (:class:`Draw`): a resumed run redraws exactly the views it would have drawn,
and the views of an image do not depend on how many processes share the batch. The
transforms follow SimCLR (Chen et al., 2020) in its order: a random resized crop with a horizontal flip
(one ``grid_sample`` per batch, which also resizes the crop to the view size), colour jitter (brightness,
contrast, saturation, hue, each applied with probability ``jitter_p`` as a whole; torchvision shuffles the
four, here they run in that fixed order), random grayscale and a Gaussian blur with a random sigma. Pixel
values stay in [0, 1] until :func:`views` normalizes them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import SSLConfig

#: ITU-R BT.601 luma weights, as torchvision's grayscale.
LUMA = (0.299, 0.587, 0.114)
#: RGB -> YIQ (luma and two chroma axes): a hue shift is a rotation of the chroma plane.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class Draw:
    """Uniform numbers for images ``offset .. offset + count - 1`` of a global micro-batch of ``total``: each
    call draws ``total`` numbers from the generator (the same on every process) and keeps this slice."""

    def __init__(self, generator: torch.Generator, total: int, offset: int, count: int, device: torch.device):
        self.generator, self.total, self.offset, self.count, self.device = generator, total, offset, count, device

    def uniform(self, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        every = torch.rand(self.total, generator=self.generator, device=self.device)
        return low + (high - low) * every[self.offset:self.offset + self.count]

    def chance(self, p: float) -> torch.Tensor:
        """(count, 1, 1, 1) floats: 1 with probability p."""
        return (self.uniform() < p).float().view(-1, 1, 1, 1)


def resized_crop_and_flip(x: torch.Tensor, size: int, scale: tuple[float, float], draw: Draw) -> torch.Tensor:
    """Random crops of area ``scale`` (fractions of the image) and aspect ratio in [3/4, 4/3], resized to
    ``size`` (bilinear) and mirrored with probability 1/2: one affine grid per image, one ``grid_sample``.

    ``x`` (B, C, H, W) float. Where a ratio would take the crop past the image, its side is clipped to the
    image (torchvision retries instead; the area distribution differs slightly).
    """
    b = x.shape[0]
    area = draw.uniform(scale[0], scale[1])
    log_ratio = draw.uniform(math.log(3 / 4), math.log(4 / 3))
    w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop sides as fractions of the image's
    h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    cx = (1 - w) * draw.uniform(-1.0, 1.0)  # centres in [-1 + w, 1 - w]
    cy = (1 - h) * draw.uniform(-1.0, 1.0)
    flip = torch.where(draw.uniform() < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images."""
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def colour_jitter(x: torch.Tensor, cfg: SSLConfig, draw: Draw) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each factor uniform in [1 - s, 1 + s] (hue: a rotation of
    the chroma plane by up to ``cfg.hue`` of a turn); applied to a share ``cfg.jitter_p`` of the images."""
    apply = draw.chance(cfg.jitter_p)
    factor = lambda s: draw.uniform(1 - s, 1 + s).view(-1, 1, 1, 1)  # noqa: E731
    out = (x * factor(cfg.brightness)).clamp(0, 1)
    gray = _gray(out) if x.shape[1] == 3 else out
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * factor(cfg.contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(out)
        out = ((out - gray) * factor(cfg.saturation) + gray).clamp(0, 1)
        out = _hue_shift(out, draw.uniform(-cfg.hue, cfg.hue))
    return apply * out + (1 - apply) * x


def _hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image's chroma (the I and Q axes of YIQ) by ``turns`` (B,) of a full turn."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=x.device, dtype=x.dtype)
    angle = 2 * math.pi * turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rotate[:, 0, 0] = 1
    rotate[:, 1, 1], rotate[:, 1, 2], rotate[:, 2, 1], rotate[:, 2, 2] = cos, -sin, sin, cos
    mix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq  # (B, 3, 3) acting on RGB
    return torch.einsum("bij,bjhw->bihw", mix, x).clamp(0, 1)


def random_grayscale(x: torch.Tensor, p: float, draw: Draw) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    apply = draw.chance(p)
    return apply * _gray(x).expand_as(x) + (1 - apply) * x


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], draw: Draw) -> torch.Tensor:
    """Blur a share ``p`` of the images with a Gaussian of sigma uniform in ``sigma`` (pixels of the view):
    two 1-D passes, one filter per image, as grouped convolutions."""
    b, c, h, w = x.shape
    dev = x.device
    apply = draw.chance(p)
    s = draw.uniform(sigma[0], sigma[1])
    radius = min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2)
    taps = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / s[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C, taps)
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return apply * flat.view(b, c, h, w) + (1 - apply) * x


def view(images: torch.Tensor, cfg: SSLConfig, size: int, draw: Draw) -> torch.Tensor:
    """One augmented view (B, C, size, size) in [0, 1] of uint8 images (B, H, W, C)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = resized_crop_and_flip(x, size, cfg.crop_scale, draw)
    x = colour_jitter(x, cfg, draw)
    x = random_grayscale(x, cfg.gray_p, draw)
    if cfg.blur_p > 0:
        x = gaussian_blur(x, cfg.blur_p, cfg.blur_sigma, draw)
    return x


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, memory_format) -> torch.Tensor:
    """[0, 1] images (B, C, H, W) to the model's input: per-channel standardization, in ``memory_format``."""
    return ((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).contiguous(memory_format=memory_format)
