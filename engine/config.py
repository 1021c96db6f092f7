"""Recipes: typed dataclasses read from TOML, overridable from the command line.

A recipe is a TOML file whose tables are the sections below. Every field has a typed default, so a
recipe names only what it changes; a ``Literal`` type lists a field's choices. Overrides use the same
names: ``--optim.lr=3e-4``. Parsing and validation happen here, before any work starts: an unknown section
or key, a value of the wrong type or out of range raises :class:`RecipeError` naming the field and what
is valid. Each section validates itself (``validate``); :func:`validate` adds the checks that span sections.
The ``[kernels]`` keys are the ops of the registry's table (:mod:`engine.registry`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from . import registry
from .errors import RecipeError

__all__ = ["RecipeError", "Recipe", "load_recipe", "dump_toml", "parse_overrides", "PRESETS", "IMAGE_ARCHS",
           "RNN_ARCHS", "SSL_TASKS"]


def _positive(where: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{where} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def parse_duration(where: str, text: str) -> float:
    """Seconds in ``"90s"``, ``"4m"``, ``"1h30m"``, ``"2.5m"`` or a bare number of seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise RecipeError(f"{where}: {text!r} is not a duration; write e.g. \"4m\", \"90s\" or \"1h30m\"")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise RecipeError(f"{where} must be > 0, got {text!r}")
    return seconds


def _fraction(where: str, value: float) -> None:
    """``value`` in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise RecipeError(f"{where} must be in [0, 1), got {value}")


Arch = Literal["gpt", "resnet", "convnext", "lstm", "gru"]
#: Fewest warmup steps a time-budgeted run times before it fixes its step count.
BUDGET_MIN_WARMUP = 5
#: Architectures trained on images by the image classification task.
IMAGE_ARCHS = ("resnet", "convnext")
#: Recurrent architectures, trained by the language-modelling and forecasting tasks.
RNN_ARCHS = ("lstm", "gru")


@dataclass
class RunConfig:
    """What this run is called, where it writes, and on what it runs."""

    name: str = "run"
    #: Run directory; empty means ``runs/<name>-<timestamp>``.
    dir: str = ""
    seed: int = 1337
    #: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    #: CPU threads for intra-op parallelism; 0 keeps torch's default.
    threads: int = 0

    def validate(self) -> None:
        _positive("run.threads", self.threads, allow_zero=True)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise RecipeError(f"run.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass
class ModelConfig:
    """The network. ``arch`` picks the family; the other fields configure it.

    A GPT (``engine.models.gpt``) takes this section itself as its config, once ``vocab_size`` is resolved.
    """

    arch: Arch = "gpt"
    #: A named preset ("gpt2-124m", "gpt-tiny", ...) whose values apply before this table's own.
    preset: str = ""
    n_layer: int = 4
    n_head: int = 4
    #: Key/value heads for grouped-query attention; 0 means n_head (plain multi-head attention).
    n_kv_head: int = 0
    d_model: int = 192
    #: Longest sequence the model supports (learned positions are allocated for this many).
    context: int = 256
    #: 0 means the tokenizer's vocabulary size, rounded up to a multiple of 64.
    vocab_size: int = 0
    pos: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    #: "gelu" is GPT-2's tanh-approximated GELU, "gelu_exact" the erf GELU (nanoGPT's, and cheaper on CPUs),
    #: "relu2" is ReLU squared.
    mlp: Literal["gelu", "gelu_exact", "swiglu", "relu2"] = "gelu"
    #: MLP hidden width; 0 means 4·d_model for GELU and ReLU², 8/3·d_model (rounded to 64) for SwiGLU.
    d_ff: int = 0
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    #: Sliding attention window in tokens (0: full causal attention).
    window: int = 0
    #: Epsilon of the GPT's norms; 0 means 1e-5 for LayerNorm and 1e-6 for RMSNorm.
    norm_eps: float = 0.0
    #: RMSNorm (with a learned gain) of each head's queries and keys before attention.
    qk_norm: bool = False
    #: Start the attention and MLP output projections at zero, so each block begins as the identity.
    zero_init_proj: bool = False
    #: Soft-cap the logits to (-c, c) as c·tanh(logits / c) (0: off).
    logit_softcap: float = 0.0
    #: Classes of an image classifier (arch "resnet" or "convnext").
    num_classes: int = 10
    #: Side of the square images an image classifier sees; batches are resized on the device if the stored
    #: images (data.image_size) differ.
    image_size: int = 32
    #: Input channels of an image classifier: 3 (RGB) or 1 (grayscale).
    channels: int = 3
    #: Channels of a CNN's first stage; each of the three later stages doubles them.
    width: int = 64
    #: Blocks in each of a CNN's four stages.
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    #: ResNet block: two 3x3 convs (ResNet-18/34) or 1x1, 3x3, 1x1 (ResNet-50 and up).
    block: Literal["basic", "bottleneck"] = "basic"
    #: CNN stem: "cifar" for small images (a 3x3 stride-1 conv for ResNet, 2x2 patches for ConvNeXt) or
    #: "imagenet" (7x7 stride-2 conv and max-pool for ResNet, 4x4 patches for ConvNeXt).
    stem: Literal["cifar", "imagenet"] = "cifar"
    #: Stochastic depth of ConvNeXt blocks: the drop probability of the last block (rising linearly from 0).
    drop_path: float = 0.0
    # Recurrent networks (arch "lstm" or "gru") also read n_layer, d_model (the embedding width), dropout
    # (between layers), vocab_size and tie_embeddings.
    #: Width of the recurrent state; 0 means d_model. Tied embeddings with hidden != d_model add a projection.
    hidden: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return (8 * self.d_model // 3 + 63) // 64 * 64
        return 4 * self.d_model

    def validate(self) -> None:
        if self.arch == "gpt":
            self._validate_gpt()
        if self.arch in IMAGE_ARCHS:
            self._validate_image_classifier()

    def _validate_gpt(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "context"):
            _positive(f"model.{key}", getattr(self, key))
        for key in ("vocab_size", "n_kv_head", "window", "d_ff", "norm_eps"):
            _positive(f"model.{key}", getattr(self, key), allow_zero=True)
        _fraction("model.dropout", self.dropout)
        if not 0.0 <= self.logit_softcap < float("inf"):
            raise RecipeError(f"model.logit_softcap must be a finite number >= 0 (0: off), got {self.logit_softcap}")
        if self.d_model % self.n_head:
            raise RecipeError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise RecipeError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})")
        if self.pos == "rope" and self.head_dim % 2:
            raise RecipeError(f"model.pos = 'rope' needs an even head dim, got {self.head_dim}")

    def _validate_image_classifier(self) -> None:
        for key in ("num_classes", "image_size", "width"):
            _positive(f"model.{key}", getattr(self, key))
        for i, depth in enumerate(self.depths):
            _positive(f"model.depths[{i}]", depth)
        if self.channels not in (1, 3):
            raise RecipeError(f"model.channels must be 1 or 3, got {self.channels}")
        _fraction("model.drop_path", self.drop_path)
        # The stem and three stride-2 stages shrink the image by this factor.
        stride = {("resnet", "cifar"): 8, ("resnet", "imagenet"): 32, ("convnext", "cifar"): 16,
                  ("convnext", "imagenet"): 32}[self.arch, self.stem]
        if self.image_size % stride:
            raise RecipeError(f"model.image_size ({self.image_size}) must be a multiple of {stride} for "
                              f"model.arch = {self.arch!r} with model.stem = {self.stem!r}")


@dataclass
class DataConfig:
    """Where tokens come from.

    ``source`` is ``"stdlib"`` (the embedded default: the Python standard library's own source, present
    wherever the engine runs), ``"hf:NAME[:CONFIG]"`` (a dataset by name through ``datasets``), or a local
    path (a ``.txt``/``.jsonl``/``.json``/``.parquet`` file or a directory of them).
    """

    source: str = "stdlib"
    #: "byte" (built in, vocabulary 256) or "gpt2" (BPE through tiktoken).
    tokenizer: Literal["byte", "gpt2"] = "byte"
    #: Column holding the text for datasets and JSON/parquet files.
    text_field: str = "text"
    #: Dataset split to read for ``hf:`` sources.
    split: str = "train"
    #: Share of documents held out for validation (chosen by a hash of the document, so it is fixed).
    val_fraction: float = 0.05
    #: Tokenized caches live here, one folder per source and tokenizer.
    cache_dir: str = ".cache/tritonforge"
    #: Columns holding the image and its class label (image datasets and parquet files).
    image_field: str = "image"
    label_field: str = "label"
    #: Split to validate on for image sources that have one (e.g. "test" for CIFAR-10); "" holds out
    #: data.val_fraction of the training split.
    val_split: str = ""
    #: Side of the square images stored in the image cache; 0 means model.image_size.
    image_size: int = 0
    #: Images the "shapes" generator draws, training and validation together.
    num_images: int = 20000
    #: Random crops and horizontal flips of training images (on the device, per batch).
    augment: bool = True
    #: Padding of the random crop, in pixels of the stored images (0: flips only).
    crop_padding: int = 4
    #: Train an image classifier on only this many labelled images of each class (0: all): the first N of
    #: each class in a fixed shuffle of the training split, the same for every run and seed.
    labels_per_class: int = 0
    # Time series (train.task = "forecast"): source "series" (built in, generated) or a .csv/.parquet file.
    #: Comma-separated columns to forecast; "" takes every numeric column.
    columns: str = ""
    #: Season length in steps, for the seasonal-naive baseline (the built-in series repeat every 24 steps).
    season: int = 24
    # Packed documents (GPT language models).
    #: "documents": every window carries the ids of the documents it spans (a new id after each document's
    #: separator), and attention stays inside a document; "none": windows are plain token runs.
    packing: Literal["none", "documents"] = "none"
    #: With packing, positions count from each document's first token (rotary and learned positions
    #: alike); false keeps each token's position in its window.
    reset_positions: bool = True
    #: With packing, the targets that are a document's closing separator count in the loss (the model
    #: learns where documents end); false leaves them out of the loss.
    separator_loss: bool = True

    def validate(self) -> None:
        _fraction("data.val_fraction", self.val_fraction)
        _positive("data.image_size", self.image_size, allow_zero=True)
        _positive("data.num_images", self.num_images)
        _positive("data.crop_padding", self.crop_padding, allow_zero=True)
        _positive("data.labels_per_class", self.labels_per_class, allow_zero=True)


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    #: Sequences per micro-batch on each process.
    batch_size: int = 16
    #: Sequence length of a training sample (at most model.context).
    seq_len: int = 128
    grad_accum: int = 1
    #: Wall time the run may take, e.g. "4m", "90s", "1h30m" ("" for none): the run measures its speed over
    #: its first steps (the warmup), then fixes ``steps`` to what fits (at most ``steps``), records it
    #: and schedules the learning rate over it. Counted from the start of the run, evaluations included.
    time_budget: str = ""
    #: "bf16" runs under autocast; "fp16" adds dynamic loss scaling.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: Clip the global gradient norm to this (0 disables).
    grad_clip: float = 1.0
    eval_every: int = 200
    #: Batches per periodic evaluation: the same windows every time, spread evenly over the validation split.
    eval_batches: int = 20
    #: The final evaluation covers the whole validation split (non-overlapping windows) when it holds at most
    #: this many tokens; larger splits, or 0, keep the periodic sample.
    final_eval_tokens: int = 1_000_000
    log_every: int = 10
    #: Wrap the model in torch.compile.
    compile: bool = False
    #: Bytes/tokens of text generated at the end of the run (0 to skip).
    sample_tokens: int = 256
    sample_prompt: str = "def "
    #: A NaN/inf loss or gradient: "skip" the step (up to max_bad_steps times in a row) or "stop".
    on_nan: Literal["skip", "stop"] = "skip"
    max_bad_steps: int = 5
    #: Label smoothing of the classification loss (image models).
    label_smoothing: float = 0.0
    #: Decay of an exponential moving average of the weights used for evaluation (image models; 0: off).
    ema_decay: float = 0.0
    #: "auto" (the architecture's own task: language modelling or image classification), "forecast"
    #: (time series: train.seq_len steps of context predict the next train.horizon steps), or
    #: self-supervised pretraining of an image backbone (see [ssl]): "simclr" (contrastive, NT-Xent) or
    #: "vicreg" (variance-invariance-covariance; no negatives, small batches).
    task: Literal["auto", "forecast", "simclr", "vicreg"] = "auto"
    #: Steps a forecast predicts.
    horizon: int = 24
    #: Truncated backpropagation through time (arch "lstm"/"gru"): each batch row reads consecutive windows
    #: and the recurrent state carries over between steps, detached.
    carry_state: bool = False
    #: Start from these weights (fresh optimizer, schedule and step 0): a run directory, its checkpoints
    #: folder, a checkpoint, or a local Hugging Face GPT-2/Llama folder. "" trains from scratch.
    init_from: str = ""
    #: With init_from: parameters present on only one side are an error (true) or left as initialised (false).
    init_strict: bool = True
    #: Glob patterns over parameter names ("blocks.0.*") whose parameters stay fixed.
    freeze: tuple[str, ...] = ()
    #: Recompute residual blocks' activations in the backward: "none", "blocks" (every block) or
    #: "every_N" (every N-th block); see engine/models/checkpointing.py.
    activation_checkpointing: str = "none"

    def budget_seconds(self) -> float | None:
        """``time_budget`` in seconds, None when unset."""
        return parse_duration("train.time_budget", self.time_budget) if self.time_budget else None

    def validate(self) -> None:
        self.budget_seconds()
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("grad_clip", "eval_every", "final_eval_tokens", "sample_tokens", "max_bad_steps"):
            _positive(f"train.{key}", getattr(self, key), allow_zero=True)
        _fraction("train.label_smoothing", self.label_smoothing)
        _fraction("train.ema_decay", self.ema_decay)
        from .models.checkpointing import parse_policy  # the model package imports this module

        parse_policy(self.activation_checkpointing)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    #: "muon": Muon for the blocks' matrices and AdamW (``betas``, ``eps``) for the rest, one ``lr`` for
    #: both (Muon's update is scaled to AdamW's RMS); under DDP or FSDP2 the ranks share the iterations.
    name: Literal["adamw", "sgd", "lion", "muon"] = "adamw"
    lr: float = 1e-3
    #: Floor of the cosine schedule.
    min_lr: float = 1e-4
    #: "cosine" (warmup then cosine decay to min_lr), "constant" (warmup then flat), "onecycle" (warmup
    #: then a linear decay to min_lr), "wsd" (warmup, flat, then a linear decay to min_lr over the last
    #: ``cooldown`` share of the steps: the trapezoid of the GPT-2 speedruns).
    schedule: Literal["cosine", "constant", "onecycle", "wsd"] = "cosine"
    warmup_steps: int = 100
    #: The share of the steps over which "wsd" decays; under a time budget the flat part does not depend
    #: on the step count, so re-timing the budget changes nothing that already ran until the decay starts.
    cooldown: float = 0.4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    #: SGD's momentum.
    momentum: float = 0.9
    #: Nesterov momentum, for SGD and Muon.
    nesterov: bool = True
    #: Muon's momentum.
    muon_momentum: float = 0.95

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        for key in ("min_lr", "warmup_steps", "weight_decay"):
            _positive(f"optim.{key}", getattr(self, key), allow_zero=True)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise RecipeError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise RecipeError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0.0 < self.cooldown <= 1.0:
            raise RecipeError(f"optim.cooldown must be in (0, 1], got {self.cooldown}")
        if self.min_lr > self.lr:
            raise RecipeError(f"optim.min_lr ({self.min_lr}) must not exceed optim.lr ({self.lr})")


def _all_auto() -> dict[str, str]:
    return {op: "auto" for op in registry.op_names()}


@dataclass
class KernelsConfig:
    """Which implementation serves each op: one key per op of the registry's table (``attention``,
    ``layer_norm``, ...), each "auto", "torch" or "triton" (see :mod:`engine.registry`), and
    ``deterministic``."""

    #: op -> backend for every op of the table; in TOML and on the command line, one key per op.
    ops: dict[str, registry.Backend] = field(default_factory=_all_auto)
    #: Bitwise reproducible gradients run to run. False lets kernels use atomics where faster (the
    #: Triton attention backward); the torch backends are unaffected.
    deterministic: bool = True
    #: What "auto" means on CUDA (see engine/tune.py): "measure" times every candidate backend of each op
    #: at the run's shapes before the first step and keeps the fastest correct one (torch unless another
    #: is faster by more than the noise), cached per card and shapes; "trust" takes the Triton kernels
    #: untimed; "off" takes torch. An op set to "torch" or "triton" is never tuned. On a CPU auto is torch.
    tune: Literal["measure", "trust", "off"] = "measure"
    #: Seconds of timed repeats per op (after each candidate's first run, which compiles; at least three
    #: repeats whatever the time), and seconds for the whole measurement: an op that would start after
    #: that keeps torch, and the next run measures it.
    tune_op_seconds: float = 10.0
    tune_seconds: float = 120.0
    #: Folder of the measured choices; "" means $XDG_CACHE_HOME/tritonforge (~/.cache/tritonforge).
    tune_cache: str = ""
    #: Measure again: ignore the cache and a resumed checkpoint's recorded choice.
    retune: bool = False

    def backends(self) -> dict[str, str]:
        """op -> backend."""
        return dict(self.ops)

    def to_dict(self) -> dict[str, Any]:
        return {**self.ops, "deterministic": self.deterministic, "tune": self.tune,
                "tune_op_seconds": self.tune_op_seconds, "tune_seconds": self.tune_seconds,
                "tune_cache": self.tune_cache, "retune": self.retune}

    def validate(self) -> None:
        for op, backend in self.ops.items():
            registry.check_backend_name(op, backend)
        _positive("kernels.tune_op_seconds", self.tune_op_seconds)
        _positive("kernels.tune_seconds", self.tune_seconds)


@dataclass
class LoggingConfig:
    """Where progress goes."""

    #: "offline" needs no network or account.
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "tritonforge"


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written."""

    #: Save every N steps (0: only at the end).
    every: int = 0
    #: How many recent checkpoints to keep.
    keep: int = 2
    #: "" (fresh run), "latest" (newest checkpoint in the run directory) or a checkpoint path.
    resume: str = ""

    def validate(self) -> None:
        _positive("checkpoint.every", self.every, allow_zero=True)
        _positive("checkpoint.keep", self.keep)


@dataclass
class ParallelConfig:
    """Multi-process training under torchrun (a plain ``python`` launch stays single-process)."""

    #: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 ``fully_shard`` per block).
    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class SSLConfig:
    """Self-supervised pretraining of an image backbone (``train.task = "simclr"`` or ``"vicreg"``): the
    views, the heads, the loss and the frozen-feature evaluation. The defaults are SimCLR's for CIFAR-10
    as solo-learn trains it (no blur at 32 pixels)."""

    #: NT-Xent's temperature (simclr).
    temperature: float = 0.2
    #: Output width of the projection head (an MLP on the backbone's pooled features).
    proj_dim: int = 128
    #: Hidden width of the projection head; 0: the backbone's feature width.
    proj_hidden: int = 0
    #: Side of the square views; 0 means model.image_size. At most the stored images' side.
    view_size: int = 0
    #: Area of the random resized crop, as fractions of the image.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    #: Share of views that get colour jitter, and its strengths (factors in [1 - s, 1 + s]; hue in turns).
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    #: Share of views turned grayscale.
    gray_p: float = 0.2
    #: Share of views blurred, and the blur's sigma range in pixels of the view (SimCLR's ImageNet setting
    #: is 0.5 and (0.1, 2.0) at 224 pixels).
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    #: More image sources whose training images join the pretraining images (their labels are not read);
    #: data.source provides images too, and the labels of the k-NN and linear-probe evaluations.
    unlabelled: tuple[str, ...] = ()
    #: k-NN evaluation: neighbours, the temperature of their similarity-weighted vote, and how many
    #: labelled training images form the memory bank (0: all).
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank: int = 0
    #: Full-batch epochs of the final linear probe (a softmax classifier on frozen features; 0: none).
    probe_epochs: int = 100

    def validate(self) -> None:
        _positive("ssl.temperature", self.temperature)
        for key in ("proj_dim", "knn_k", "knn_temperature"):
            _positive(f"ssl.{key}", getattr(self, key))
        for key in ("proj_hidden", "view_size", "knn_bank", "probe_epochs"):
            _positive(f"ssl.{key}", getattr(self, key), allow_zero=True)
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise RecipeError(f"ssl.crop_scale must be two fractions 0 < low <= high <= 1, got {list(self.crop_scale)}")
        for key in ("jitter_p", "gray_p", "blur_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise RecipeError(f"ssl.{key} is a probability in [0, 1], got {getattr(self, key)}")
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise RecipeError(f"ssl.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0.0 <= self.hue <= 0.5:
            raise RecipeError(f"ssl.hue must be in [0, 0.5] (turns), got {self.hue}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise RecipeError(f"ssl.blur_sigma must be 0 < low <= high pixels, got {list(self.blur_sigma)}")


#: The self-supervised tasks (train.task), which train an image backbone without labels.
SSL_TASKS = ("simclr", "vicreg")


@dataclass
class Recipe:
    """A whole training recipe."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every section as a flat table, as TOML holds it."""
        return {f.name: (section.to_dict() if hasattr(section, "to_dict") else dataclasses.asdict(section))
                for f in dataclasses.fields(self) for section in [getattr(self, f.name)]}


#: Named model presets: values applied before the recipe's own [model] table.
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small as in nanoGPT: 124M parameters with the vocabulary padded to 50304.
    "gpt2-124m": dict(arch="gpt", n_layer=12, n_head=12, d_model=768, context=1024, vocab_size=50304,
                      pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "gpt2-350m": dict(arch="gpt", n_layer=24, n_head=16, d_model=1024, context=1024, vocab_size=50304),
    # A byte-level model that trains to a useful loss on a laptop CPU in minutes.
    "gpt-tiny": dict(arch="gpt", n_layer=4, n_head=4, d_model=192, context=256, vocab_size=256),
    # A small modern variant: rotary positions, RMSNorm, SwiGLU, grouped-query attention.
    "llama-tiny": dict(arch="gpt", n_layer=4, n_head=4, n_kv_head=2, d_model=192, context=256,
                       vocab_size=256, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    # ResNet-18 for 32x32 images: 3x3 stem, no max-pool (11.2M parameters with 10 classes).
    "resnet18-cifar": dict(arch="resnet", block="basic", stem="cifar", width=64, depths=(2, 2, 2, 2),
                           num_classes=10, image_size=32),
    # ResNet-50 as torchvision builds it (stride in the 3x3 conv of a bottleneck): 25.6M parameters.
    "resnet50": dict(arch="resnet", block="bottleneck", stem="imagenet", width=64, depths=(3, 4, 6, 3),
                     num_classes=1000, image_size=224),
    # ConvNeXt-T (Liu et al., 2022): 28.6M parameters.
    "convnext-tiny": dict(arch="convnext", stem="imagenet", width=96, depths=(3, 3, 9, 3), drop_path=0.1,
                          num_classes=1000, image_size=224),
    # A ConvNeXt for 32x32 images: 2x2 patches, stages at 16, 8, 4 and 2 pixels.
    "convnext-cifar": dict(arch="convnext", stem="cifar", width=64, depths=(2, 2, 6, 2), drop_path=0.1,
                           num_classes=10, image_size=32),
}

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(where: str, value: Any, typ: Any, from_cli: bool) -> Any:
    """Convert ``value`` to ``typ`` or raise a RecipeError naming ``where``."""

    def bad() -> RecipeError:
        shown = value if from_cli else repr(value)
        return RecipeError(f"{where}: expected {_type_name(typ)}, got {shown}")

    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad()
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad()
    if get_origin(typ) is Literal:
        if isinstance(value, str) and value in get_args(typ):
            return value
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(get_args(typ))}")
    if typing.get_origin(typ) is tuple:
        args = typing.get_args(typ)
        items = value.split(",") if from_cli and isinstance(value, str) else value
        if len(args) == 2 and args[1] is Ellipsis:  # any length, one item type
            if not isinstance(items, (list, tuple)):
                raise bad()
            return tuple(_coerce(where, v, args[0], from_cli) for v in items if not (from_cli and v == ""))
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise bad()
        return tuple(_coerce(where, v, t, from_cli) for v, t in zip(items, args))
    raise TypeError(f"unsupported recipe field type {typ!r} at {where}")


def _type_name(typ: Any) -> str:
    if get_origin(typ) is Literal:
        return "one of " + ", ".join(get_args(typ))
    if get_origin(typ) is tuple and get_args(typ)[1:] == (Ellipsis,):
        return f"a list of {_type_name(get_args(typ)[0])}s"
    if get_origin(typ) is tuple:
        return "a list of " + ", ".join(_type_name(t) for t in typing.get_args(typ))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def _apply(recipe: Recipe, section: str, key: str, value: Any, from_cli: bool) -> None:
    sections = {f.name for f in dataclasses.fields(Recipe)}
    if section not in sections:
        raise RecipeError(f"unknown recipe section [{section}]; valid sections: {', '.join(sorted(sections))}")
    sub = getattr(recipe, section)
    types = _field_types(type(sub))
    if section == "kernels" and key in sub.ops:  # one key per op of the registry's table
        sub.ops[key] = _coerce(f"kernels.{key}", value, str, from_cli)
        registry.check_backend_name(key, sub.ops[key])
        return
    if section == "kernels":
        types = {**sub.ops, **{k: t for k, t in types.items() if k != "ops"}}
    if key not in types:
        raise RecipeError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(types)}")
    setattr(sub, key, _coerce(f"{section}.{key}", value, types[key], from_cli))


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """Turn ``--section.key=value`` (or ``--section.key value``) arguments into triples."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise RecipeError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise RecipeError(f"override --{name} needs a value (--{name}=VALUE)")
            value = args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        out.append((section, key.replace("-", "_"), value))
        i += 1
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply its preset and the command-line overrides, validate, return it."""
    table: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML: {e}") from None
    cli = parse_overrides(list(overrides))
    recipe = Recipe()
    # The preset goes first so that the recipe's own values and the overrides win over it.
    preset = next((v for s, k, v in cli if (s, k) == ("model", "preset")), None)
    if preset is None:
        preset = table.get("model", {}).get("preset", "") if isinstance(table.get("model"), dict) else ""
    if preset:
        if preset not in PRESETS:
            raise RecipeError(f"model.preset: unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            _apply(recipe, "model", key, value, from_cli=False)
    for section, values in table.items():
        if not isinstance(values, dict):
            raise RecipeError(f"top-level key {section!r} must be a [section] table")
        for key, value in values.items():
            _apply(recipe, section, key, value, from_cli=False)
    for section, key, value in cli:
        _apply(recipe, section, key, value, from_cli=True)
    validate(recipe)
    return recipe


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
    _validate_sequence_models(r)
    _validate_ssl(r)


def dump_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, readable back by :func:`load_recipe`."""
    lines = []
    for section, values in recipe.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, once DEL (allowed raw in JSON, not in TOML) is escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _validate_sequence_models(r: Recipe) -> None:
    """Recurrent networks, truncated BPTT and the forecasting task."""
    m, d, t = r.model, r.data, r.train
    if m.arch in RNN_ARCHS:
        _positive("model.n_layer", m.n_layer)
        _positive("model.d_model", m.d_model)
        _positive("model.hidden", m.hidden, allow_zero=True)
        _positive("model.vocab_size", m.vocab_size, allow_zero=True)
        _fraction("model.dropout", m.dropout)
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
    _positive("train.horizon", t.horizon)
    _positive("data.season", d.season)
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
