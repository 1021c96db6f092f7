"""Image classification data: sources, a uint8 image cache, epoch-shuffled batches and device-side augmentation.

Sources (``data.source``):

- ``shapes``: the built-in default, generated (no download). Ten classes of geometric shapes (disk, ring,
  square, frame, triangle, diamond, plus, cross, bar, bow tie) drawn at random positions, sizes and colours
  on noisy, shaded backgrounds (:mod:`engine.data.shapes`). The same seed always draws the same images.
- ``shapes-b``: the same generator with eight other classes (hexagon, star, crescent, ellipse, tee, ell,
  chevron, hourglass): a second task for fine-tuning a model trained on ``shapes``.
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a dataset by name through ``datasets`` (``hf:uoft-cs/cifar10``),
  reading the columns ``data.image_field`` and ``data.label_field``.
- a local path: a folder of images with one sub-folder per class (optionally inside ``train/`` and
  ``test/`` folders, which become splits), or a ``.parquet`` file or a folder of them.

Images used without their labels (``load_images(..., labelled=False)``: self-supervised pretraining's
``ssl.unlabelled``) need only the image column: a parquet file without labels, a flat folder of images.

Every source is decoded once into square ``uint8`` arrays of ``data.image_size`` pixels (N, S, S, C) under
``data.cache_dir``, in a folder keyed by what the source is; it is built atomically (see
:mod:`engine.data.cache`). Images of another size are resized so their shorter side fits, then
centre-cropped. Without ``data.val_split`` a fixed random share ``data.val_fraction`` of the training split
is held out for validation.

Training batches are a pure function of (seed, step, micro-step, rank): each epoch is a permutation drawn
from (seed, epoch), so resuming needs only the step and every rank slices its part of the same global
batch. Augmentation (random crop with padding, horizontal flip) and normalisation run on the device on
whole batches of ``uint8`` images, with a generator seeded from the same four numbers.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig, RecipeError
from .cache import fsync_file, open_or_build
from .shapes import GENERATED, SHAPES_SEED, draw_shapes

CACHE_FORMAT = 1
#: A held-out validation share is drawn from this seed, so the split is fixed for a source.
HOLDOUT_SEED = 0
#: The few-label subset (data.labels_per_class) is drawn from this seed: the same images for every run.
SUBSET_SEED = 0
#: Ends the error of a labelled use of a source without labels.
LABELS_HINT = ("; a classifier, and the k-NN and probe evaluations of data.source in self-supervised pretraining, "
               "need class ids there (images without labels can join pretraining through ssl.unlabelled)")

# --- The generated "shapes" source ---------------------------------------------------------------

def _build_shapes(cfg: DataConfig, size: int, channels: int, out: Path) -> dict:
    n_val = round(cfg.num_images * cfg.val_fraction)
    counts = {"train": cfg.num_images - n_val, "val": n_val}
    _check_counts(counts)
    chunk = 4096
    shapes, stream = GENERATED[cfg.source]
    with _ArrayWriter(out, counts, size, channels) as writer:
        for i, split in enumerate(("train", "val")):
            for k, start in enumerate(range(0, counts[split], chunk)):
                rng = np.random.default_rng([SHAPES_SEED, i, k, *stream])
                images, labels = draw_shapes(rng, min(chunk, counts[split] - start), size, channels, shapes)
                writer.write(split, images, labels)
    return {"classes": list(shapes), **writer.stats}


# --- Sources read through ``datasets`` -----------------------------------------------------------

def _local_kind(path: Path) -> str:
    """"parquet" or "imagefolder" for a local source."""
    if path.is_file():
        if path.suffix != ".parquet":
            raise RecipeError(f"data.source: {path} is a file but not .parquet; image sources are a .parquet file "
                              f"or a folder of images or of .parquet files")
        return "parquet"
    return "parquet" if any(path.rglob("*.parquet")) else "imagefolder"


def _load_split(cfg: DataConfig, split: str):
    try:
        import datasets  # imported only for sources that need it
    except ImportError:
        raise RecipeError(f"data.source = {cfg.source!r} needs the datasets package: pip install datasets") from None
    if cfg.source.startswith("hf:"):
        name, _, config = cfg.source[3:].partition(":")
        return datasets.load_dataset(name, config or None, split=split)
    path = Path(cfg.source).expanduser()
    kind = _local_kind(path)
    if path.is_file():
        splits = datasets.load_dataset(kind, data_files={"train": str(path)})
    else:
        splits = datasets.load_dataset(kind, data_dir=str(path))
    if split not in splits:
        field = "data.split" if split == cfg.split else "data.val_split"
        raise RecipeError(f"{field}: {path} has no split {split!r}; it has: {', '.join(splits)}")
    return splits[split]


def _to_pixels(value, size: int, channels: int) -> np.ndarray:
    """One image (PIL image, encoded bytes, or an array) as (size, size, channels) uint8."""
    from PIL import Image  # a dependency of datasets' image support

    if isinstance(value, dict):  # parquet files hold images as {"bytes": ..., "path": ...}
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, bytes):
        value = Image.open(io.BytesIO(value))
    elif not isinstance(value, Image.Image):
        value = Image.fromarray(np.asarray(value, dtype=np.uint8))
    img = value.convert("RGB" if channels == 3 else "L")
    if img.size != (size, size):  # shorter side to ``size``, then the central square
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def _build_decoded(cfg: DataConfig, size: int, channels: int, out: Path, labelled: bool = True) -> dict:
    """Decode the source's images (and, when ``labelled``, its class labels) into the cache in ``out``.

    Unlabelled, only the column ``data.image_field`` is read, every image of ``data.split`` is a training
    image and none is held out (no validation reads them); each label is stored as -1.
    """
    train = _load_split(cfg, cfg.split)
    val = _load_split(cfg, cfg.val_split) if cfg.val_split and labelled else None
    needed = {"data.image_field": cfg.image_field, **({"data.label_field": cfg.label_field} if labelled else {})}
    for ds in (train, val):
        for where, column in needed.items():
            if ds is not None and column not in ds.column_names:
                raise RecipeError(f"{where}: column {column!r} not found in {cfg.source}; columns: "
                                  f"{', '.join(ds.column_names)}" + (LABELS_HINT if where == "data.label_field" else ""))
    if not labelled:
        parts, counts = [(train, np.zeros(len(train), dtype=bool))], {"train": len(train), "val": 0}
    elif val is None:  # hold out a fixed random share of the training split
        held_out = np.random.default_rng(HOLDOUT_SEED).random(len(train)) < cfg.val_fraction
        parts = [(train, held_out)]
        counts = {"train": int((~held_out).sum()), "val": int(held_out.sum())}
    else:
        parts = [(train, np.zeros(len(train), dtype=bool)), (val, np.ones(len(val), dtype=bool))]
        counts = {"train": len(train), "val": len(val)}
    _check_counts(counts, need_val=labelled)
    columns = [cfg.image_field, cfg.label_field] if labelled else [cfg.image_field]
    with _ArrayWriter(out, counts, size, channels) as writer:
        for ds, to_val in parts:
            for row, is_val in zip(ds.select_columns(columns), to_val):
                label = row[cfg.label_field] if labelled else -1
                if labelled and (not isinstance(label, (int, np.integer)) or label < 0):
                    raise RecipeError(f"data.label_field: column {cfg.label_field!r} must hold class ids "
                                      f"(integers >= 0), found {label!r}")
                writer.write("val" if is_val else "train", _to_pixels(row[cfg.image_field], size, channels)[None],
                             np.asarray([label]))
    if not labelled:
        return {"classes": [], **writer.stats}
    names = getattr(train.features[cfg.label_field], "names", None)
    return {"classes": list(names) if names else [str(i) for i in range(writer.max_label + 1)], **writer.stats}


# --- The image cache -----------------------------------------------------------------------------

def _check_counts(counts: dict[str, int], need_val: bool = True) -> None:
    if need_val and counts["val"] == 0:
        raise RecipeError("no validation images: raise data.val_fraction, or name a split in data.val_split")
    if counts["train"] == 0:
        raise RecipeError("no training images: lower data.val_fraction, or check data.split")


class _ArrayWriter:
    """Fills ``{split}_images.npy`` (N, S, S, C) uint8 and ``{split}_labels.npy`` (N,) int64 in order; on
    a clean exit, flushes them to disk and leaves in :attr:`stats` the counts and the per-channel mean and
    standard deviation of the training images."""

    def __init__(self, folder: Path, counts: dict[str, int], size: int, channels: int):
        self.folder, self.counts = folder, counts
        self.images = {s: np.lib.format.open_memmap(folder / f"{s}_images.npy", mode="w+", dtype=np.uint8,
                                                    shape=(n, size, size, channels)) for s, n in counts.items()}
        self.labels = {s: np.zeros(n, dtype=np.int64) for s, n in counts.items()}
        self.filled = {s: 0 for s in counts}
        self.sums = np.zeros((2, channels), dtype=np.float64)  # sum and sum of squares of training pixels
        self.max_label = -1

    def write(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        i = self.filled[split]
        self.images[split][i:i + len(images)] = images
        self.labels[split][i:i + len(images)] = labels
        self.filled[split] = i + len(images)
        self.max_label = max(self.max_label, int(labels.max()))
        if split == "train":
            pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
            self.sums += (pixels.sum(axis=0), (pixels * pixels).sum(axis=0))

    def __enter__(self) -> "_ArrayWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        assert self.filled == self.counts, (self.filled, self.counts)
        for split, array in self.images.items():
            array.flush()
            with open(self.folder / f"{split}_images.npy", "r+b") as f:
                fsync_file(f)
            with open(self.folder / f"{split}_labels.npy", "wb") as f:
                np.save(f, self.labels[split])
                fsync_file(f)
        n = self.counts["train"] * self.images["train"].shape[1] * self.images["train"].shape[2]
        mean = self.sums[0] / n
        std = np.sqrt(np.maximum(self.sums[1] / n - mean * mean, 1e-12))
        self.stats = {"train": self.counts["train"], "val": self.counts["val"], "mean": mean.tolist(),
                      "std": std.tolist(), "max_label": self.max_label}


@dataclass
class ImageData:
    train_images: np.ndarray  # (N, S, S, C) uint8, memory-mapped
    train_labels: np.ndarray  # (N,) int64
    val_images: np.ndarray
    val_labels: np.ndarray
    #: Per-channel mean and standard deviation of the training images, in [0, 1] units.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    path: Path


def _fingerprint(cfg: DataConfig, labelled: bool = True) -> dict:
    """What identifies the source's content, cheaply (for local sources: paths, sizes, modification times),
    and what is read of it: an unlabelled decode reads neither labels nor a validation split."""
    if cfg.source in GENERATED:
        return {"source": cfg.source, "seed": SHAPES_SEED, "num_images": cfg.num_images}
    fields = ({"image_field": cfg.image_field, "label_field": cfg.label_field, "split": cfg.split,
               "val_split": cfg.val_split} if labelled else {"image_field": cfg.image_field, "split": cfg.split,
                                                              "labels": False})
    if cfg.source.startswith("hf:"):
        return {"source": cfg.source, **fields}
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise RecipeError(f"data.source: path does not exist: {path}")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {"source": str(path.resolve()), **fields,
            "files": [(str(f.relative_to(path) if f != path else f.name), f.stat().st_size, f.stat().st_mtime_ns)
                      for f in files]}


def cache_folder(cfg: DataConfig, size: int, channels: int, labelled: bool = True) -> Path:
    blob = json.dumps({"format": CACHE_FORMAT, "size": size, "channels": channels, "val_fraction": cfg.val_fraction,
                       "fingerprint": _fingerprint(cfg, labelled)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    slug = "".join(c if c.isalnum() else "-" for c in cfg.source.rsplit("/", 1)[-1]).strip("-")[:40] or "images"
    return Path(cfg.cache_dir).expanduser() / f"{slug}-{size}px{channels}c-{key}"


def _open_cache(folder: Path) -> ImageData | None:
    """The cached arrays, or None if the folder is missing or incomplete."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {}
        for split in ("train", "val"):
            images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
            labels = np.load(folder / f"{split}_labels.npy")
            if len(images) != meta[split] or len(labels) != meta[split]:
                return None
            arrays[split] = images, labels
        return ImageData(*arrays["train"], *arrays["val"], mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                         classes=meta["classes"], path=folder)
    except (OSError, ValueError, KeyError):
        return None


def load_images(cfg: DataConfig, size: int, channels: int = 3, log=print, labelled: bool = True) -> ImageData:
    """Decode (or generate) the source once into the cache and return its memory-mapped arrays.

    ``labelled=False`` is for images used without their labels (self-supervised pretraining's
    ``ssl.unlabelled``): a source read through ``datasets`` then needs no ``data.label_field`` column (an
    image folder no class folders) and gives all of ``data.split`` as training images, labels -1 and no
    validation images. The generated sources are the same either way.
    """
    decoded = cfg.source not in GENERATED
    folder = cache_folder(cfg, size, channels, labelled)

    def build(tmp: Path) -> None:
        made = _build_decoded(cfg, size, channels, tmp, labelled) if decoded else _build_shapes(cfg, size, channels, tmp)
        meta = {"format": CACHE_FORMAT, "source": cfg.source, "size": size, "channels": channels, **made}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    what = ("decoding" if labelled else "decoding the images of") if decoded else "generating"
    return open_or_build(folder, _open_cache, build,
                         announce=lambda: log(f"{what} {cfg.source} images at {size}x{size} into {folder} (once)"))


# --- Sampling ------------------------------------------------------------------------------------

class ImageBatches:
    """Indices of training images, a pure function of (seed, step, micro-step, rank).

    Images are visited in epochs, each a permutation drawn from (seed, epoch). Optimizer step ``s`` takes
    the global batch of ``grad_accum · world · batch_size`` images at positions ``s·G .. (s+1)·G`` of that
    endless sequence, and micro-step ``m`` of rank ``r`` its own slice of it.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int, world: int = 1):
        self.n, self.batch_size, self.grad_accum, self.seed, self.world = n, batch_size, grad_accum, seed, world
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int, micro: int = 0, rank: int = 0) -> np.ndarray:
        global_batch = self.grad_accum * self.world * self.batch_size
        start = step * global_batch + (micro * self.world + rank) * self.batch_size
        parts, count = [], self.batch_size
        while count:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            start, count = start + take, count - take
        return np.concatenate(parts)


def labelled_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted indices of ``per_class`` training images of each class: the first of their class in a fixed
    shuffle of the split (:data:`SUBSET_SEED`), so every run and every seed trains on the same images."""
    order = np.random.default_rng(SUBSET_SEED).permutation(len(labels))
    picked = []
    for label in np.unique(labels):
        of_class = order[labels[order] == label][:per_class]
        if len(of_class) < per_class:
            raise RecipeError(f"data.labels_per_class = {per_class}: class {label} has only {len(of_class)} "
                              f"training images")
        picked.append(of_class)
    return np.sort(np.concatenate(picked))


def eval_indices(n: int, batch_size: int, batches: int, rank: int = 0, world: int = 1) -> Iterator[np.ndarray]:
    """This rank's batches of the first ``min(n, batches · world · batch_size)`` validation images.

    The count is rounded down to a multiple of ``world`` so that every rank runs the same batches (a sharded
    model's forward is a collective).
    """
    total = min(n, batches * world * batch_size) // world * world
    mine = np.arange(rank, total, world)
    for start in range(0, len(mine), batch_size):
        yield mine[start:start + batch_size]


def augmentation_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# --- Device-side transforms (whole batches) ------------------------------------------------------

def crop_and_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crops of zero-padded images and random horizontal flips, as one gather.

    ``images`` (B, H, W, C) uint8 on any device; each image is padded by ``padding`` pixels on every side,
    cropped back to H x W at a random offset, and mirrored with probability 1/2.
    """
    B, H, W, _ = images.shape
    dev = images.device
    if padding:
        images = F.pad(images, (0, 0, padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator, device=dev)
    flip = torch.randint(0, 2, (B, 1), generator=generator, device=dev).bool()
    rows = top + torch.arange(H, device=dev)  # (B, H) source row of each output row
    cols = left + torch.arange(W, device=dev)  # (B, W) source column of each output column
    cols = torch.where(flip, cols.flip(1), cols)
    return images[torch.arange(B, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int,
                   memory_format: torch.memory_format) -> torch.Tensor:
    """(B, H, W, C) uint8 -> normalized float (B, C, size, size) in ``memory_format``.

    ``mean`` and ``std`` (C,) are in [0, 1] units. The permute of NHWC images is already a channels_last
    view: nothing is copied for layout when the model runs channels_last.
    """
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 255.0 * mean.view(1, -1, 1, 1)) / (255.0 * std.view(1, -1, 1, 1))
    return x.contiguous(memory_format=memory_format)
