"""The generated image sources ``shapes`` and ``shapes-b``: geometric shapes drawn at random positions, sizes
and colours on noisy, shaded backgrounds, a fixed set for a given seed (no download).

:mod:`engine.data.images` stores them in its image cache like any other source.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

#: The generated "shapes" set is always drawn from this seed (like a downloaded dataset, it never changes).
SHAPES_SEED = 0

# Inside tests of the ten shapes in coordinates (u, v) centred on the shape and scaled by its radius
# (u to the right, v down); each maps arrays of u and v to a boolean mask.
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disk": lambda u, v: u * u + v * v <= 1.0,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.45),
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.8,
    "frame": lambda u, v: (np.maximum(abs(u), abs(v)) <= 0.85) & (np.maximum(abs(u), abs(v)) >= 0.5),
    "triangle": lambda u, v: (v <= 0.8) & (abs(u) <= 0.55 * (v + 0.9)),
    "diamond": lambda u, v: abs(u) + abs(v) <= 1.0,
    "plus": lambda u, v: (np.minimum(abs(u), abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 1.0),
    "cross": lambda u, v: _rotated_plus(u, v),
    "bar": lambda u, v: (abs(u) <= 1.0) & (abs(v) <= 0.3),
    "bowtie": lambda u, v: (abs(v) <= abs(u)) & (abs(u) <= 0.9),
}


def _rotated_plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    p, q = abs(u + v) * np.sqrt(0.5), abs(u - v) * np.sqrt(0.5)  # coordinates along the diagonals
    return (np.minimum(p, q) <= 0.25) & (np.maximum(p, q) <= 1.0)


# The "shapes-b" classes, in the same coordinates: none of them is one of the ten above.
SHAPES_B: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "hexagon": lambda u, v: (abs(v) <= 0.85) & (0.866 * abs(u) + 0.5 * abs(v) <= 0.85),
    "star": lambda u, v: np.hypot(u, v) <= 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u)),
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.6),
    "ellipse": lambda u, v: u * u + (v / 0.55) ** 2 <= 1.0,
    "tee": lambda u, v: ((abs(u) <= 0.9) & (abs(v + 0.65) <= 0.25)) | ((abs(u) <= 0.25) & (v >= -0.65) & (v <= 0.9)),
    "ell": lambda u, v: ((abs(u + 0.6) <= 0.3) & (abs(v) <= 0.9)) | ((abs(v - 0.6) <= 0.3) & (abs(u) <= 0.9)),
    "chevron": lambda u, v: (abs(v - abs(u) + 0.3) <= 0.3) & (abs(u) <= 0.9),
    "hourglass": lambda u, v: (abs(u) <= abs(v)) & (abs(v) <= 0.9),
}

#: The generated sources: their classes, and what their random streams are drawn from besides SHAPES_SEED.
GENERATED: dict[str, tuple[dict, tuple[int, ...]]] = {"shapes": (SHAPES, ()), "shapes-b": (SHAPES_B, (1,))}


def draw_shapes(rng: np.random.Generator, n: int, size: int, channels: int = 3,
                shapes: dict = SHAPES) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, size, size, channels) uint8 of random ``shapes``, and their labels (n,) int64."""
    labels = rng.integers(0, len(shapes), n)
    radius = size * rng.uniform(0.14, 0.34, n).astype(np.float32)
    cx = rng.uniform(radius, size - radius).astype(np.float32)
    cy = rng.uniform(radius, size - radius).astype(np.float32)
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    u = (grid[None, None, :] - cx[:, None, None]) / radius[:, None, None]  # (n, 1, size)
    v = (grid[None, :, None] - cy[:, None, None]) / radius[:, None, None]  # (n, size, 1)
    u, v = np.broadcast_arrays(u, v)
    inside = np.zeros((n, size, size), dtype=bool)
    for label, test in enumerate(shapes.values()):
        sel = labels == label
        inside[sel] = test(u[sel], v[sel])

    # Random colours, the shape brighter than its background on every channel.
    background = rng.uniform(0.0, 0.5, (n, channels)).astype(np.float32)
    colour = rng.uniform(0.5, 1.0, (n, channels)).astype(np.float32)
    # The background is shaded by a random linear gradient; everything gets pixel noise. (In place: this
    # is the bulk of the work.)
    ramp = grid / size - 0.5
    slope = rng.uniform(-0.3, 0.3, (n, 2)).astype(np.float32)
    shade = slope[:, 0, None, None] * ramp[None, None, :] + slope[:, 1, None, None] * ramp[None, :, None]
    image = background[:, None, None, :] + shade[..., None]
    np.copyto(image, colour[:, None, None, :], where=inside[..., None])
    noise = rng.random(image.shape, dtype=np.float32)
    noise -= 0.5
    noise *= 0.25
    image += noise
    np.clip(image, 0.0, 1.0, out=image)
    image *= 255.0
    image += 0.5
    return image.astype(np.uint8), labels
