"""tritonforge kernels: fused Triton kernels with their launchers and autograd.

This package does not import ``engine``; it can be used on its own. Each module holds one kernel
family: its ``@triton.jit`` kernels, the Python launchers, and the autograd as ``torch.library``
custom ops (``custom_op`` + ``register_autograd``, with a CPU implementation that calls the torch
reference, so ``torch.compile`` traces them without a graph break). Each lists the configurations it
may launch with in ``aot_variants()`` (``kernels.variant``) so that the ``kernels.aot`` tool can compile
them ahead of time for GPUs this machine does not have; no kernel module imports that tool.
``kernels._common`` holds what several modules share, ``kernels._fused`` the fused optimizer core that
``optim`` and ``muon`` share.
"""

from .norm import LayerNorm, RMSNorm, add_layer_norm, add_rms_norm, layer_norm, rms_norm  # noqa: E402,F401
from .optim import SGD, AdamW, Lion  # noqa: E402,F401
from .muon import Muon  # noqa: E402,F401
from .attention import attention, attention_varlen  # noqa: E402,F401
from .mlp import gelu_linear_residual  # noqa: E402,F401
from .dwconv import depthwise_conv2d  # noqa: E402,F401
from .cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402,F401
from .rope import rope  # noqa: E402,F401
from .swiglu import swiglu  # noqa: E402,F401
from .ntxent import nt_xent  # noqa: E402,F401
from ._common import ConfigStore, set_config_store  # noqa: E402,F401
