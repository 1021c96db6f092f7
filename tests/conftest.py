"""Test-wide setup.

The Triton interpreter must be switched on before any ``@triton.jit`` function is created, i.e.
before the kernels are imported, so that kernels run on CPU tensors. On a machine with CUDA the suite
is run with ``TRITON_INTERPRET=0`` to exercise the real compiler instead.

The suite imports the project as it is installed, ``tritonforge.engine`` and ``tritonforge.kernels``, and
always tests the tree it lives in: ``tritonforge`` is bound here to this checkout, whether or not (and
wherever) the project is installed. The checkout's root is taken off ``sys.path`` (``python -m pytest``
puts it there), so its ``engine/`` and ``kernels/`` folders never shadow installed packages of those
names, such as Hugging Face's ``kernels`` that ``transformers`` imports.
"""
import os
import sys
import types

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
sys.path.insert(0, os.path.dirname(__file__))  # for the shared helpers in tests/support.py
_package = types.ModuleType("tritonforge", "This checkout's engine and kernels, as the suite imports them.")
_package.__path__ = [ROOT]
sys.modules["tritonforge"] = _package

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
