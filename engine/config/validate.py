"""The checks that span sections, run after each section's own (:func:`validate`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import RecipeError
from .checks import BUDGET_MIN_WARMUP, IMAGE_ARCHS, RNN_ARCHS, SSL_TASKS, fraction, positive
from .sections import Recipe


def validate(r: Recipe) -> None:
    """Check values that types alone cannot, so a bad recipe stops before any work: each section's own
    ranges, then what spans sections."""
    for f in dataclasses.fields(r):
        section = getattr(r, f.name)
        if hasattr(section, "validate"):
            section.validate()
    if r.model.arch == "gpt" and r.train.seq_len > r.model.context:
        raise RecipeError(f"train.seq_len ({r.train.seq_len}) is longer than the model supports "
                          f"(model.context = {r.model.context})")
    if r.train.time_budget and r.optim.schedule != "constant" and r.optim.warmup_steps < BUDGET_MIN_WARMUP:
        raise RecipeError(
            f"train.time_budget: the step count is fixed after timing the warmup steps, whose learning rate does "
            f"not depend on it; with optim.schedule = {r.optim.schedule!r}, optim.warmup_steps must be >= "
            f"{BUDGET_MIN_WARMUP} (got {r.optim.warmup_steps})")
    if r.model.arch in IMAGE_ARCHS and r.data.source == "stdlib":
        raise RecipeError("data.source: 'stdlib' is text; image models read 'shapes' (generated, no download), "
                          "'hf:NAME[:CONFIG]' or a local image folder or parquet file")
    if r.data.packing != "none" and (r.model.arch != "gpt" or r.train.task != "auto"):
        raise RecipeError(f"data.packing = {r.data.packing!r} packs documents for a GPT language model "
                          f"(model.arch = 'gpt', train.task = 'auto'), got model.arch = {r.model.arch!r}, "
                          f"train.task = {r.train.task!r}")
    if r.parallel.sync_bn and r.model.arch not in IMAGE_ARCHS:
        raise RecipeError(f"parallel.sync_bn synchronizes BatchNorm layers; model.arch = {r.model.arch!r} has none")
    _validate_sequence_models(r)
    _validate_ssl(r)


def _validate_sequence_models(r: Recipe) -> None:
    """Recurrent networks, truncated BPTT and the forecasting task."""
    m, d, t = r.model, r.data, r.train
    if m.arch in RNN_ARCHS:
        positive("model.n_layer", m.n_layer)
        positive("model.d_model", m.d_model)
        positive("model.hidden", m.hidden, allow_zero=True)
        positive("model.vocab_size", m.vocab_size, allow_zero=True)
        fraction("model.dropout", m.dropout)
        if r.parallel.strategy == "fsdp":
            raise RecipeError(f"parallel.strategy = 'fsdp' does not shard model.arch = {m.arch!r} (nn.{m.arch.upper()} "
                              f"keeps its weights in one flat cuDNN buffer); use 'ddp'")
        if t.activation_checkpointing != "none":
            raise RecipeError(f"train.activation_checkpointing = {t.activation_checkpointing!r}: model.arch = "
                              f"{m.arch!r} has no residual blocks to checkpoint (the GPT, ConvNeXt and ResNet have); "
                              f"set it to \"none\"")
    if t.carry_state and (m.arch not in RNN_ARCHS or t.task != "auto"):
        raise RecipeError(f"train.carry_state needs a recurrent language model (model.arch = 'lstm' or 'gru', "
                          f"train.task = 'auto'), got model.arch = {m.arch!r}, train.task = {t.task!r}")
    if t.task != "forecast":
        return
    if m.arch not in ("gpt", *RNN_ARCHS):
        raise RecipeError(f"train.task = 'forecast' trains model.arch = 'gpt', 'lstm' or 'gru', not {m.arch!r}")
    positive("train.horizon", t.horizon)
    positive("data.season", d.season)
    if d.season > t.seq_len:
        raise RecipeError(f"data.season ({d.season}) is longer than the context (train.seq_len = {t.seq_len}); "
                          f"the seasonal-naive forecast repeats the context's last season")
    if d.source != "series":
        path = Path(d.source).expanduser()
        if path.suffix not in (".csv", ".parquet"):
            raise RecipeError(f"data.source: a forecast reads 'series' (built in) or a .csv/.parquet file, "
                              f"got {d.source!r}")
        if not path.is_file():
            raise RecipeError(f"data.source: no such file: {path}")


def _validate_ssl(r: Recipe) -> None:
    """Self-supervised pretraining: an image backbone, at least two images per process, views that fit."""
    t, m, d = r.train, r.model, r.data
    if t.task not in SSL_TASKS:
        return
    if m.arch not in IMAGE_ARCHS:
        raise RecipeError(f"train.task = {t.task!r} pretrains an image backbone (model.arch = 'resnet' or "
                          f"'convnext'), not model.arch = {m.arch!r}")
    if t.batch_size < 2:
        raise RecipeError(f"train.batch_size must be >= 2 for train.task = {t.task!r}: each image's views need "
                          f"other images in the batch (negatives, batch statistics), got {t.batch_size}")
    stored = d.image_size or m.image_size
    if r.ssl.view_size > stored:
        raise RecipeError(f"ssl.view_size ({r.ssl.view_size}) is larger than the images (data.image_size = {stored}); "
                          f"a view is a crop of an image resized to view_size, at most the image's side")
    if r.parallel.strategy == "fsdp":
        raise RecipeError(f"train.task = {t.task!r} runs in one process or under parallel.strategy = 'ddp'")
    if d.labels_per_class:
        raise RecipeError("data.labels_per_class selects labelled images for a classifier; self-supervised "
                          "pretraining reads no labels (the k-NN evaluation uses the whole training split)")
