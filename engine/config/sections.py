"""The recipe's sections other than ``[model]``: one dataclass each, which validates its own ranges, and
:class:`Recipe`, which holds them all."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import RecipeError
from ..ops import table
from .checks import fraction, parse_duration, parse_policy, positive
from .model import ModelConfig


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
    #: CPU runs: "keep" has glibc's malloc keep the memory a step frees for the next step (no page faults
    #: per step; the process keeps its peak memory, see ``engine.device.keep_freed_memory``); "release"
    #: leaves glibc's defaults. Nothing changes on CUDA or without glibc.
    cpu_memory: Literal["keep", "release"] = "keep"

    def validate(self) -> None:
        positive("run.threads", self.threads, allow_zero=True)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise RecipeError(f"run.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")



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
        fraction("data.val_fraction", self.val_fraction)
        positive("data.image_size", self.image_size, allow_zero=True)
        positive("data.num_images", self.num_images)
        positive("data.crop_padding", self.crop_padding, allow_zero=True)
        positive("data.labels_per_class", self.labels_per_class, allow_zero=True)


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
    #: "every_N" (every N-th block); see engine/models/recompute.py.
    activation_checkpointing: str = "none"

    def budget_seconds(self) -> float | None:
        """``time_budget`` in seconds, None when unset."""
        return parse_duration("train.time_budget", self.time_budget) if self.time_budget else None

    def validate(self) -> None:
        self.budget_seconds()
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            positive(f"train.{key}", getattr(self, key))
        for key in ("grad_clip", "eval_every", "final_eval_tokens", "sample_tokens", "max_bad_steps"):
            positive(f"train.{key}", getattr(self, key), allow_zero=True)
        fraction("train.label_smoothing", self.label_smoothing)
        fraction("train.ema_decay", self.ema_decay)
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
    #: Muon's Newton-Schulz iterations per step (both backends).
    ns_steps: int = 5
    #: The embedding tables' learning rate as a multiple of ``lr`` (token, position and value embeddings; a
    #: tied head with them), for models that name their tables (the GPT).
    embed_lr_scale: float = 1.0

    def validate(self) -> None:
        positive("optim.lr", self.lr)
        positive("optim.eps", self.eps)
        positive("optim.embed_lr_scale", self.embed_lr_scale)
        for key in ("min_lr", "warmup_steps", "weight_decay"):
            positive(f"optim.{key}", getattr(self, key), allow_zero=True)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise RecipeError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise RecipeError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not (isinstance(self.ns_steps, int) and 1 <= self.ns_steps < 100):
            raise RecipeError(f"optim.ns_steps must be an integer in [1, 100), got {self.ns_steps}")
        if not 0.0 < self.cooldown <= 1.0:
            raise RecipeError(f"optim.cooldown must be in (0, 1], got {self.cooldown}")
        if self.min_lr > self.lr:
            raise RecipeError(f"optim.min_lr ({self.min_lr}) must not exceed optim.lr ({self.lr})")


def _all_auto() -> dict[str, str]:
    return {op: "auto" for op in table.op_names()}


@dataclass
class KernelsConfig:
    """Which implementation serves each op: one key per op of the op table (``attention``,
    ``layer_norm``, ...), each "auto", "torch" or "triton" (see :mod:`engine.ops.table`), and
    ``deterministic``."""

    #: op -> backend for every op of the table; in TOML and on the command line, one key per op.
    ops: dict[str, table.Backend] = field(default_factory=_all_auto)
    #: Bitwise reproducible gradients run to run. False lets kernels use atomics where faster (the
    #: Triton attention backward); the torch backends are unaffected.
    deterministic: bool = True
    #: What "auto" means on CUDA (see engine/ops/tune/): "measure" times every candidate backend of each op
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
            table.check_backend_name(op, backend)
        positive("kernels.tune_op_seconds", self.tune_op_seconds)
        positive("kernels.tune_seconds", self.tune_seconds)


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
        positive("checkpoint.every", self.every, allow_zero=True)
        positive("checkpoint.keep", self.keep)


@dataclass
class ParallelConfig:
    """Multi-process training under torchrun (a plain ``python`` launch stays single-process)."""

    #: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 ``fully_shard`` per block).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    #: BatchNorm statistics over the global batch (every process's rows) instead of each process's own:
    #: the model's BatchNorm layers become torch's SyncBatchNorm (CUDA only; the state-dict keys stay).
    sync_bn: bool = False


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
    #: More image sources whose images join the pretraining images: only their images are read (no label
    #: column or class folders needed), all of data.split; data.source provides images too, and the labels
    #: of the k-NN and linear-probe evaluations.
    unlabelled: tuple[str, ...] = ()
    #: k-NN evaluation: neighbours, the temperature of their similarity-weighted vote, and how many
    #: labelled training images form the memory bank (0: all).
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank: int = 0
    #: Full-batch epochs of the final linear probe (a softmax classifier on frozen features; 0: none).
    probe_epochs: int = 100

    def validate(self) -> None:
        positive("ssl.temperature", self.temperature)
        for key in ("proj_dim", "knn_k", "knn_temperature"):
            positive(f"ssl.{key}", getattr(self, key))
        for key in ("proj_hidden", "view_size", "knn_bank", "probe_epochs"):
            positive(f"ssl.{key}", getattr(self, key), allow_zero=True)
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
