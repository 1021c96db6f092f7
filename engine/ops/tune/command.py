"""``tritonforge kernels tune RECIPE``: measure a recipe's ops on this GPU, store and print the choices."""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from .. import select
from .run import NO_CUDA, record, starting_choices, tune_run

# ---------------------------------------------------------------------------------------------------
# ``tritonforge kernels tune RECIPE``
# ---------------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    from ...bench.args import ArgumentParser
    from ...config import RecipeError, load_recipe
    from ...errors import KernelSelectionError

    p = ArgumentParser(prog="tritonforge kernels tune", allow_abbrev=False, description=(
        "Measure, on this GPU and at RECIPE's shapes, which backend serves each op left on auto (what a training "
        "run does before its first step, measuring again whatever the cache holds), store the choices in the "
        "cache that runs read, and print the table; any --section.key=value overrides the recipe."))
    p.add_argument("recipe", metavar="RECIPE", help="a TOML recipe")
    p.add_argument("--synthetic", action="store_true", help="random inputs of the recipe's shapes instead of its "
                   "data (no dataset, tokenizer or download; packed documents are not represented)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the decisions, their figures and the versions")
    try:
        a, overrides = p.parse_known_args(list(argv))
        return _tune_command(load_recipe(a.recipe, overrides), a.synthetic, a.json)
    except (RecipeError, KernelSelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _tune_command(recipe, synthetic: bool, json_path: str | None) -> int:
    from ...runlog import environment
    from ...tasks import build_task
    from ...device import resolve_device

    device = resolve_device(recipe.run.device)
    if device.type != "cuda":  # before building the task: its data would be read for nothing
        print(NO_CUDA)
        return 0
    recipe.kernels.tune, recipe.kernels.retune = "measure", True
    torch.manual_seed(recipe.run.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer sets them
    ops = select.resolve(starting_choices(recipe.kernels.backends(), "measure", device), device,
                           recipe.kernels.deterministic)
    if synthetic:
        from ...bench.synthetic import SyntheticTask

        task = SyntheticTask(recipe, ops, device)
    else:
        task = build_task(recipe, ops, device, log=print)
    decisions = tune_run(recipe, ops, task, device)
    if json_path:
        from ...bench.tables import write_json

        write_json(json_path, {"env": environment(device, dict(ops.backends)), "recipe": recipe.to_dict(),
                               "synthetic": synthetic, "tuning": record(decisions)})
        print(f"wrote {json_path}")
    return 0
