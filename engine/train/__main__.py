"""``python -m engine.train RECIPE [--section.key=value ...]``: the same as ``tritonforge train``."""
import sys

from ..cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
