"""The ``[model]`` section and the named presets that fill it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import RecipeError
from .checks import IMAGE_ARCHS, fraction, positive

Arch = Literal["gpt", "resnet", "convnext", "lstm", "gru"]


@dataclass
class ModelConfig:
    """The network. ``arch`` picks the family; the other fields configure it.

    A GPT builds its own config (``engine.models.gpt.GPTConfig``) from the fields of the same names here.
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
    #: Value embeddings: this many extra token-embedding tables, table i mixed (with two learned weights)
    #: into the attention values of block i and of its mirror, block n_layer - value_embeds + i (0: off).
    value_embeds: int = 0
    #: U-net skips: block i's output, times a learned weight (starting at 1), is added to the input of its
    #: mirror, block n_layer - 1 - i, for i < n_layer / 2.
    unet_skips: bool = False
    #: Smear: each token's embedding gains the previous token's, times a learned gate read from the token.
    smear: bool = False
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

    def validate(self) -> None:
        if self.arch == "gpt":
            self._validate_gpt()
        if self.arch in IMAGE_ARCHS:
            self._validate_image_classifier()

    def _validate_gpt(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "context"):
            positive(f"model.{key}", getattr(self, key))
        for key in ("vocab_size", "n_kv_head", "window", "d_ff", "norm_eps"):
            positive(f"model.{key}", getattr(self, key), allow_zero=True)
        fraction("model.dropout", self.dropout)
        if not 0.0 <= self.logit_softcap < float("inf"):
            raise RecipeError(f"model.logit_softcap must be a finite number >= 0 (0: off), got {self.logit_softcap}")
        # a one-block model is its own mirror: its one block takes the one table
        if not (isinstance(self.value_embeds, int) and 0 <= self.value_embeds <= max(1, self.n_layer // 2)):
            raise RecipeError(f"model.value_embeds must be an integer from 0 to n_layer / 2 "
                              f"({max(1, self.n_layer // 2)}): each table serves a block and its mirror; got "
                              f"{self.value_embeds}")
        if self.d_model % self.n_head:
            raise RecipeError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        kv_heads, head_dim = self.n_kv_head or self.n_head, self.d_model // self.n_head
        if self.n_head % kv_heads:
            raise RecipeError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({kv_heads})")
        if self.pos == "rope" and head_dim % 2:
            raise RecipeError(f"model.pos = 'rope' needs an even head dim, got {head_dim}")

    def _validate_image_classifier(self) -> None:
        for key in ("num_classes", "image_size", "width"):
            positive(f"model.{key}", getattr(self, key))
        for i, depth in enumerate(self.depths):
            positive(f"model.depths[{i}]", depth)
        if self.channels not in (1, 3):
            raise RecipeError(f"model.channels must be 1 or 3, got {self.channels}")
        fraction("model.drop_path", self.drop_path)
        # The stem and three stride-2 stages shrink the image by this factor.
        stride = {("resnet", "cifar"): 8, ("resnet", "imagenet"): 32, ("convnext", "cifar"): 16,
                  ("convnext", "imagenet"): 32}[self.arch, self.stem]
        if self.image_size % stride:
            raise RecipeError(f"model.image_size ({self.image_size}) must be a multiple of {stride} for "
                              f"model.arch = {self.arch!r} with model.stem = {self.stem!r}")



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
