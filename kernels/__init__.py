"""tritonforge kernels: fused Triton kernels with their launchers and autograd functions.

This package does not import ``engine``; it can be used on its own. Each module holds one kernel
family (its ``@triton.jit`` kernels, the Python launchers, the ``torch.autograd.Function``) and lists
the configurations it may launch with in ``aot_variants()`` so that ``kernels.aot`` can compile them
ahead of time for GPUs this machine does not have.
"""

from kernels.norm import LayerNorm, RMSNorm, add_layer_norm, add_rms_norm, layer_norm, rms_norm  # noqa: E402,F401
from kernels.optim import SGD, AdamW, Lion  # noqa: E402,F401
from kernels.attention import attention, attention_varlen  # noqa: E402,F401
from kernels.mlp import gelu_linear_residual  # noqa: E402,F401
from kernels.dwconv import depthwise_conv2d  # noqa: E402,F401
from kernels.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402,F401
