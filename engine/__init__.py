"""tritonforge's engine: models, kernel registry, trainer, data, configuration, logging and CLI.

Installed, this package is ``tritonforge.engine`` and its kernels are ``tritonforge.kernels``; in a plain
checkout run from the repository root they are the top-level ``engine`` and ``kernels``. The engine's own
imports are relative, and it reaches the kernels by :data:`KERNELS_PACKAGE`, so one source tree serves both.
"""
__version__ = "0.1.0"

#: The import name of this engine's kernels package, beside this package under the same parent:
#: ``tritonforge.kernels`` when installed, ``kernels`` in a checkout.
KERNELS_PACKAGE = __name__[: -len("engine")] + "kernels"
