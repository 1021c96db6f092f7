"""Transfer learning: start a run from other weights, keep some of them fixed, export a GPT.

``train.init_from`` names a run directory, its checkpoints folder, a checkpoint, or a local Hugging Face
GPT-2/Llama folder (:mod:`engine.hf`; its ``config.json`` then sets the ``[model]`` architecture). The
weights are loaded into the freshly built model before the optimizer exists, so the optimizer, the
schedule and the step start fresh. A tensor whose shape differs (a new ``num_classes``, a new vocabulary)
keeps its fresh initialisation and is listed in the log; a tensor present on one side only is an error
unless ``train.init_strict = false``. ``train.freeze`` glob patterns (``fnmatch`` over the names of
``model.named_parameters()``, tied names included) switch ``requires_grad`` off, which keeps those
parameters out of the optimizer; a pattern that matches nothing is an error. Freezing fixes parameters,
not BatchNorm running statistics (those follow the data in training mode). A self-supervised pretraining
run (``train.task = "simclr"``/``"vicreg"``) gives its backbone: its projection head is dropped and the
classifier's head starts fresh, both listed in the log.
"""
from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, hf
from .checkpoint import CheckpointError
from .config import SSL_TASKS, Recipe, RecipeError, validate
from .models.gpt import GPTConfig
from .tasks.ssl import BACKBONE_PREFIX, CLASSIFIER_HEADS


def find_checkpoint(path: str | Path, where: str) -> Path:
    """The checkpoint in ``path`` (a checkpoint file, a run directory or its checkpoints folder)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise RecipeError(f"{where}: no such run directory, checkpoint or Hugging Face folder: {path}")
    found = checkpoint.find(path)
    if found is None:
        raise RecipeError(f"{where}: {path} holds no complete checkpoint and is not a Hugging Face model folder "
                          f"(no config.json)")
    return found


def adopt_hf_config(recipe: Recipe, log=print) -> Recipe:
    """The recipe a run trains: ``recipe`` itself, or, when ``train.init_from`` is a Hugging Face folder, a
    validated copy whose ``[model]`` architecture is the folder's config (``recipe`` is left as it is)."""
    src = recipe.train.init_from
    if not src or not hf.is_hf_folder(src):
        return recipe
    if recipe.model.arch != "gpt":
        raise RecipeError(f"train.init_from: {src} is a Hugging Face language model; model.arch must be 'gpt', "
                          f"not {recipe.model.arch!r}")
    try:
        fields = hf.model_fields(hf.read_config(src))
    except hf.HFError as e:
        raise RecipeError(f"train.init_from: {src}: {e}") from None
    changed = {k: v for k, v in fields.items() if getattr(recipe.model, k) != v}
    adopted = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, preset="", **fields))
    validate(adopted)
    if changed:
        log("model from " + str(Path(src) / "config.json") + ": " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    return adopted


def source_state(src: str, log=print) -> dict[str, torch.Tensor]:
    """The model state dict that ``train.init_from`` names, under the engine's parameter names. A
    self-supervised pretraining run gives its backbone (:func:`pretrained_backbone`)."""
    path = Path(src)
    if hf.is_hf_folder(path):
        try:
            return hf.to_engine(hf.load_weights(path), hf.read_config(path))
        except hf.HFError as e:
            raise RecipeError(f"train.init_from: {path}: {e}") from None
    ckpt = find_checkpoint(path, "train.init_from")
    try:
        state = checkpoint.consolidate(ckpt)["model"]
        task = checkpoint.load(ckpt)["recipe"]["train"].get("task")
    except CheckpointError as e:
        raise RecipeError(f"train.init_from: {e}") from None
    return pretrained_backbone(state, task, log) if task in SSL_TASKS else state


def pretrained_backbone(state: dict[str, torch.Tensor], task: str, log=print) -> dict[str, torch.Tensor]:
    """A pretraining checkpoint's backbone under the classifier's own names; its projection head is dropped
    and listed. The classifier's head is not in it: it keeps its initialisation."""
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    heads = sorted(k for k in state if not k.startswith(BACKBONE_PREFIX))
    log(f"init_from: the backbone of a train.task = {task!r} run; its projection head is dropped: {_few(heads)}")
    return backbone


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], src: str, strict: bool, log=print,
                  fresh: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``model`` where names and shapes agree; log (or refuse) the rest. Tensors under
    the module names ``fresh`` may be missing from ``state`` even when ``strict``: they keep their
    initialisation (and are listed)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    expected = [k for k in missing if k.split(".")[0] in fresh]
    unexpected = sorted(set(state) - set(own))
    if strict and (len(missing) > len(expected) or unexpected):
        parts = ([f"not in {src}: {_few(missing)}"] if missing else []) + \
                ([f"not in this model: {_few(unexpected)}"] if unexpected else [])
        raise RecipeError(f"train.init_from: {src} and this model hold different parameters ({'; '.join(parts)}); "
                          f"set train.init_strict = false to load the ones they share")
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    with torch.no_grad():
        for key, tensor in own.items():
            if key in state and key not in reshaped:
                tensor.copy_(state[key])
    loaded = len(own) - len(missing) - len(reshaped)
    log(f"init_from: {loaded} of {len(own)} tensors loaded from {src}")
    if reshaped:
        log("init_from: re-initialised (shape differs): " + ", ".join(
            f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped))
    if missing:
        log(f"init_from: left as initialised (not in the source): {_few(missing)}")
    if unexpected:
        log(f"init_from: ignored (not in this model): {_few(unexpected)}")


def freeze(model: nn.Module, patterns: tuple[str, ...], log=print) -> None:
    """Switch ``requires_grad`` off for every parameter whose name matches one of ``patterns``."""
    named = dict(model.named_parameters(remove_duplicate=False))
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in named):
            raise RecipeError(f"train.freeze: pattern {pattern!r} matches no parameter; names look like "
                              f"{', '.join(list(named)[:4])}")
    frozen = [name for name in named if any(fnmatchcase(name, p) for p in patterns)]
    for name in frozen:
        named[name].requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trained == 0:
        raise RecipeError(f"train.freeze: {list(patterns)} freezes every parameter; nothing would train")
    log(f"freeze: {len(frozen)} tensors fixed; training {trained:,} of {total:,} parameters")


def apply(recipe: Recipe, task, log=print, load: bool = True) -> None:
    """Load ``train.init_from`` into the task's model (when ``load``) and apply ``train.freeze``.

    Called once the task is built and before the optimizer is: a resumed run freezes again but loads
    nothing (its checkpoint holds the weights).
    """
    t = recipe.train
    if t.init_from and load:
        state = source_state(t.init_from, log)
        # A pretrained backbone has no classifier head: this model's starts fresh.
        fresh = CLASSIFIER_HEADS if not any(k.split(".")[0] in CLASSIFIER_HEADS for k in state) else ()
        load_matching(task.model, state, t.init_from, t.init_strict, log, fresh=fresh)
        if getattr(task, "ema", None) is not None:  # a weight average starts from the loaded weights
            task.ema.load_state_dict(task.model.state_dict())
    if t.freeze:
        freeze(task.model, t.freeze, log)


def export(src: str | Path, out_dir: str | Path, log=print) -> Path:
    """Write a run's GPT as a Hugging Face folder (GPT-2 or Llama layout, chosen by its options)."""
    ckpt = find_checkpoint(src, "CHECKPOINT")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"OUT_DIR: {out} exists and is not empty")
    saved = checkpoint.load(ckpt)["recipe"]["model"]
    if saved.get("arch") != "gpt":
        raise RecipeError(f"CHECKPOINT: {ckpt} holds a model.arch = {saved.get('arch')!r} model; only GPTs have "
                          f"a Hugging Face causal-LM layout")
    state = checkpoint.consolidate(ckpt)["model"]
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    cfg = GPTConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in names})
    cfg.vocab_size = state["wte.weight"].shape[0]  # the recipe may say 0 (the tokenizer's, rounded)
    try:
        hf.save_folder(out, state, cfg)
    except hf.HFError as e:
        raise RecipeError(f"CHECKPOINT: {ckpt}: {e}") from None
    log(f"exported {ckpt} as a {hf.layout_of(cfg)} model to {out}")
    return out


def _few(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
