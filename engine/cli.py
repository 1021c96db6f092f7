"""The ``tritonforge`` command line.

    tritonforge train RECIPE [--resume [PATH]] [--section.key=value ...]
    tritonforge plot RUN_DIR [RUN_DIR ...] [-o OUT.png] [--x steps|tokens]
    tritonforge kernels report [--arch sm_90,sm_80] [--kernel NAME] [--json PATH]
    tritonforge kernels check [--op OPS] [--dtype bf16,fp16,fp32] [--json FILE]
    tritonforge kernels tune RECIPE [--synthetic] [--json PATH] [--section.key=value ...]
    tritonforge bench ops|train ...
    tritonforge export CHECKPOINT OUT_DIR

``python -m engine.train RECIPE ...`` is the same as ``tritonforge train RECIPE ...`` (and is what
``torchrun`` launches).
"""
from __future__ import annotations

import os
import signal
import sys
import time

USAGE = """usage: tritonforge COMMAND ...

commands:
  train RECIPE [--resume [PATH]] [--section.key=value ...]   train from a TOML recipe
  plot RUN_DIR [RUN_DIR ...] [-o OUT.png] [--x steps|tokens]  draw the runs' loss curves into a PNG
  kernels report [--arch sm_90,sm_80] [--kernel NAME]         compile every Triton kernel for GPUs, report resources
  kernels check [--op OPS] [--dtype bf16,fp16,fp32]           check every kernel on this machine against a reference
  kernels tune RECIPE [--section.key=value ...]               measure the fastest correct backend per op on this GPU
  bench ops [--op OPS] [--backends NAMES] [--shapes SPECS]   check and time each op's backends side by side
  bench train RECIPE [--kernels SET] [--vs SET] [--steps N]  train a recipe's model per kernel set, compare speed
  export CHECKPOINT OUT_DIR                                   write a run's GPT as a Hugging Face GPT-2/Llama folder
"""


def _split_resume(args: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--resume``, ``--resume PATH`` or ``--resume=PATH`` out of ``args``."""
    resume, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                resume = args[i + 1]
                i += 1
            else:
                resume = "latest"
        elif a.startswith("--resume="):
            resume = a.split("=", 1)[1] or "latest"
        else:
            rest.append(a)
        i += 1
    return resume, rest


def train_main(argv: list[str], started: float | None = None) -> int:
    """``tritonforge train``; ``started``: when the command started (``time.perf_counter()``), where its time
    budget counts from (None: from the trainer's creation)."""
    from .checkpoint import CheckpointError
    from .config import RecipeError, load_recipe
    from .errors import KernelSelectionError

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tritonforge train RECIPE [--resume [PATH]] [--section.key=value ...]")
        return 0 if argv else 2
    recipe_path, rest = argv[0], argv[1:]
    resume, overrides = _split_resume(rest)
    try:
        if resume is not None:  # --resume is checkpoint.resume, settled with the other overrides
            overrides = [*overrides, f"--checkpoint.resume={resume}"]
        recipe = load_recipe(recipe_path, overrides)
        from .train.trainer import Interrupted, TrainingError, train

        train(recipe, started=started)
    except (RecipeError, KernelSelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C before training started (while tokenizing, say): nothing to save
        print("\ninterrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


KERNELS_USAGE = """usage: tritonforge kernels report [--arch sm_90,sm_80] [--kernel NAME] [--json PATH]
       tritonforge kernels check [--op OPS] [--dtype bf16,fp16,fp32] [--sizes small,odd,real] [--json FILE]
       tritonforge kernels tune RECIPE [--synthetic] [--json PATH] [--section.key=value ...]"""


def kernels_main(argv: list[str]) -> int:
    if argv and argv[0] == "report":
        import importlib

        from .kernels_package import KERNELS_PACKAGE

        return importlib.import_module(f"{KERNELS_PACKAGE}.aot").main(argv[1:])
    if argv and argv[0] == "check":
        from .bench import check  # imports no kernel module: the check may switch the interpreter on

        return check.main(argv[1:])
    if argv and argv[0] == "tune":
        from .ops.tune import command as tune_command

        return tune_command.main(argv[1:])
    print(KERNELS_USAGE, file=sys.stderr)
    return 2


def plot_main(argv: list[str]) -> int:
    from . import plot

    return plot.main(argv)


def bench_main(argv: list[str]) -> int:
    from .bench import cli as bench_cli

    return bench_cli.main(argv)


def export_main(argv: list[str]) -> int:
    usage = ("usage: tritonforge export CHECKPOINT OUT_DIR\n  CHECKPOINT: a run directory, its checkpoints folder "
             "or a checkpoint file; OUT_DIR: a new folder for config.json and model.safetensors")
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 2:
        print(usage, file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .config import RecipeError
    from .transfer import export

    try:
        export(argv[0], argv[1])
    except (RecipeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"train": train_main, "plot": plot_main, "kernels": kernels_main, "bench": bench_main,
            "export": export_main}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # before torch is imported: a time budget is the command's wall time
    try:
        return _dispatch(sys.argv[1:] if argv is None else argv, started)
    except BrokenPipeError:
        # The reader went away (``tritonforge --help | head``): stop quietly, as other command-line tools do.
        # stdout is pointed at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


def _dispatch(argv: list[str], started: float) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    return train_main(argv[1:], started) if command is train_main else command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
