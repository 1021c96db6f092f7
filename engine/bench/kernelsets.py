"""The kernel sets, activation-checkpointing policies and Muon sharing modes ``bench train`` compares."""
from __future__ import annotations

import dataclasses
import os

import torch

from .. import distributed
from ..config import Recipe, RecipeError
from ..errors import KernelSelectionError
from ..models import recompute
from ..ops import select as op_select, table as op_table, tune
from ..ops.select import Ops
from .args import BenchError


# ---------------------------------------------------------------------------------------------------
# Kernel sets
# ---------------------------------------------------------------------------------------------------

NAMED_SETS = ("torch", "triton", "auto", "recipe", "tuned")


def parse_kernel_set(text: str, option: str) -> str | dict[str, str]:
    """A named set, or ``{op: backend}`` for the ``OP=BACKEND,...`` form (checked against the registry)."""
    text = text.strip()
    if text in NAMED_SETS:
        return text
    choices: dict[str, str] = {}
    for item in text.split(","):
        op, eq, backend = (s.strip() for s in item.partition("="))
        if not eq:
            raise BenchError(f"{option}: {item.strip()!r} is neither a kernel set ({', '.join(NAMED_SETS)}) nor "
                             f"OP=BACKEND (e.g. attention=triton,layer_norm=torch)")
        try:
            op_table.check_backend_name(op, backend)
        except KernelSelectionError as e:
            raise BenchError(f"{option}: {e}") from None
        choices[op] = backend
    return choices


def kernel_set_label(kernel_set: str | dict[str, str]) -> str:
    if kernel_set == "tuned":
        return "auto (tuned)"
    if isinstance(kernel_set, str):
        return kernel_set
    return ",".join(f"{op}={b}" for op, b in kernel_set.items())


def resolve_set(kernel_set: str | dict[str, str], recipe: Recipe, device: torch.device) -> Ops:
    """The registry's ops for a kernel set (see the module docstring for what each set means)."""
    if kernel_set == "triton":
        choices = {}
        for op in op_table.op_names():
            try:
                op_select.resolve({op: "triton"}, device)
                choices[op] = "triton"
            except KernelSelectionError:
                choices[op] = "torch"
    elif kernel_set in ("torch", "auto"):
        choices = {op: kernel_set for op in op_table.op_names()}
    elif kernel_set == "tuned":  # torch on CUDA until run_one's measurement decides
        choices = tune.starting_choices({op: "auto" for op in op_table.op_names()}, "measure", device)
    elif kernel_set == "recipe":
        choices = recipe.kernels.backends()
    else:
        choices = {op: "torch" for op in op_table.op_names()} | dict(kernel_set)
    return op_select.resolve(choices, device, recipe.kernels.deterministic)


def with_policy(recipe: Recipe, policy: str) -> Recipe:
    """``recipe`` with ``train.activation_checkpointing = policy``."""
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, activation_checkpointing=policy))


def parse_muon_sharing(text: str, recipe: Recipe) -> list[str]:
    """``--muon-sharing``'s modes in order; "off" exists only where the ranks hold whole matrices (DDP)."""
    modes = [m.strip() for m in text.split(",")]
    if any(m not in ("on", "off") for m in modes) or len(set(modes)) < len(modes):
        raise BenchError(f"--muon-sharing: expected on, off or on,off; got {text!r}")
    several = distributed.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
    if modes != ["on"] and not (several and recipe.optim.name == "muon"):
        raise BenchError("--muon-sharing: compares Muon's iterations shared or not over the ranks: it needs "
                         "optim.name = 'muon' and several processes under torchrun")
    if "off" in modes and recipe.parallel.strategy != "ddp":
        raise BenchError("--muon-sharing=off: FSDP2 shards the matrices, so only a shared step can "
                         "orthogonalize them whole; use parallel.strategy = 'ddp'")
    return modes


def parse_policies(text: str | None, recipe: Recipe) -> list[str]:
    """``--checkpointing``'s policies in order (checked as the recipe field is); the recipe's own without it."""
    if text is None:
        return [recipe.train.activation_checkpointing]
    policies = [p.strip() for p in text.split(",")]
    for policy in policies:
        try:
            recompute.parse_policy(policy)
        except RecipeError:
            raise BenchError(f"--checkpointing: {policy!r} is not one of none, blocks, every_N (N >= 1)") from None
    if len(set(policies)) < len(policies):
        raise BenchError(f"--checkpointing: {text!r} names a policy twice")
    return policies
