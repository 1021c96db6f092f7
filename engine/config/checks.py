"""The checks every recipe section shares, and the names of the architecture and task families."""
from __future__ import annotations

import re

from ..errors import RecipeError

def positive(where: str, value: float, allow_zero: bool = False) -> None:
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


def fraction(where: str, value: float) -> None:
    """``value`` in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise RecipeError(f"{where} must be in [0, 1), got {value}")


#: Fewest warmup steps a time-budgeted run times before it fixes its step count.
BUDGET_MIN_WARMUP = 5
#: Architectures trained on images by the image classification task.
IMAGE_ARCHS = ("resnet", "convnext")
#: Recurrent architectures, trained by the language-modelling and forecasting tasks.
RNN_ARCHS = ("lstm", "gru")
#: The self-supervised tasks (train.task), which train an image backbone without labels.
SSL_TASKS = ("simclr", "vicreg")

#: The recipe field that selects activation checkpointing (:mod:`engine.models.recompute` applies it).
CHECKPOINTING_FIELD = "train.activation_checkpointing"


def parse_policy(policy: str) -> int:
    """The stride of checkpointed blocks: 0 for "none", 1 for "blocks", N for "every_N"."""
    if policy == "none":
        return 0
    if policy == "blocks":
        return 1
    m = re.fullmatch(r"every_(\d+)", policy)
    if not m or int(m[1]) < 1:
        raise RecipeError(f"{CHECKPOINTING_FIELD}: {policy!r} is not one of \"none\", \"blocks\", \"every_N\" (N >= 1)")
    return int(m[1])
