"""``tritonforge bench SUBCOMMAND ...``: dispatch to ``bench ops`` or ``bench train``."""
from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: tritonforge bench SUBCOMMAND ...

subcommands:
  ops    [--op OPS] [--backends NAMES] [--dtype bf16] [--shapes SPECS] [--json PATH] [--csv PATH] [--plot PATH]
         check each op's backends against a reference, then time fwd, bwd and fwd+bwd
  train  RECIPE [--kernels SET] [--vs SET] [--checkpointing POLICIES] [--steps N] [--warmup N] [--compile]
         [--json PATH] [--csv PATH] [--section.key=value ...]
         train the recipe's model on synthetic inputs once per kernel set (and activation-checkpointing
         policy) and compare throughput and memory

`tritonforge bench ops --help` and `tritonforge bench train --help` describe the options.
"""


def main(argv: Sequence[str]) -> int:
    """``tritonforge bench ...``: dispatch to the subcommand."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub == "ops":
        from . import ops

        return ops.main(rest)
    if sub == "train":
        from . import train

        return train.main(rest)
    print(f"error: unknown bench subcommand {sub!r}\n{USAGE}", file=sys.stderr)
    return 2
