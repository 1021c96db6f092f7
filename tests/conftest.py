"""Test-wide setup.

The Triton interpreter must be switched on before any ``@triton.jit`` function is created, i.e.
before ``kernels`` is imported, so that kernels run on CPU tensors. On a machine with CUDA the suite
is run with ``TRITON_INTERPRET=0`` to exercise the real compiler instead.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # for the shared helpers in tests/support.py

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
