"""``python -m kernels.aot``: the compile report (``tritonforge kernels report``)."""
import sys

from .cli import main

sys.exit(main())
