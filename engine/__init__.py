"""tritonforge's engine: models, kernel registry, trainer, data, configuration, logging and CLI.

Installed, this package is ``tritonforge.engine`` and its kernels are ``tritonforge.kernels``; in a plain
checkout run from the repository root they are the top-level ``engine`` and ``kernels``. The engine's own
imports are relative, and it reaches the kernels by :data:`KERNELS_PACKAGE` (:mod:`.kernels_package`), so
one source tree serves both.
"""
from .kernels_package import KERNELS_PACKAGE

__version__ = "0.1.0"
__all__ = ["KERNELS_PACKAGE"]
