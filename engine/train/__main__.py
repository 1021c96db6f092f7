"""``python -m engine.train RECIPE [--section.key=value ...]``: the same as ``tritonforge train``."""
import sys
import time

STARTED = time.perf_counter()  # the command's start: its time budget counts from here

from ..cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:], STARTED))
