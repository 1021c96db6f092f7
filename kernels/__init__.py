"""tritonforge kernels: fused Triton kernels with their launchers and autograd functions.

This package does not import ``engine``; it can be used on its own. Each module holds one kernel
family (its ``@triton.jit`` kernels, the Python launchers, the ``torch.autograd.Function``) and lists
the configurations it may launch with in ``aot_variants()`` so that ``kernels.aot`` can compile them
ahead of time for GPUs this machine does not have.
"""
