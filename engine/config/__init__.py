"""Recipes: typed dataclasses read from TOML, overridable from the command line.

A recipe is a TOML file whose tables are the sections (:mod:`.model` holds ``[model]`` and its presets,
:mod:`.sections` the others and :class:`Recipe`). Every field has a typed default, so a recipe names only
what it changes; a ``Literal`` type lists a field's choices. Overrides use the same names:
``--optim.lr=3e-4`` (:mod:`.load`). Parsing and validation happen here, before any work starts: an unknown
section or key, a value of the wrong type or out of range raises :class:`RecipeError` naming the field and
what is valid. Each section validates itself (``validate``); :func:`validate` (:mod:`.validate`) adds the
checks that span sections. The ``[kernels]`` keys are the ops of the op table (:mod:`engine.ops.table`).
"""
from .checks import BUDGET_MIN_WARMUP, IMAGE_ARCHS, RNN_ARCHS, SSL_TASKS, RecipeError, parse_duration, parse_policy
from .load import dump_toml, load_recipe, parse_overrides
from .model import PRESETS, ModelConfig
from .sections import (CheckpointConfig, DataConfig, KernelsConfig, LoggingConfig, OptimConfig, ParallelConfig,
                       Recipe, RunConfig, SSLConfig, TrainConfig)
from .validate import validate

__all__ = ["RecipeError", "Recipe", "load_recipe", "dump_toml", "parse_overrides", "PRESETS", "IMAGE_ARCHS",
           "RNN_ARCHS", "SSL_TASKS"]
