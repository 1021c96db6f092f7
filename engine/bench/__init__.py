"""Benchmarks: swap kernels and compare them side by side, per op and end to end.

    tritonforge bench ops   [--op OPS] [--backends NAMES] [--dtype bf16] [--shapes SPECS] [--json PATH] ...
    tritonforge bench train RECIPE [--kernels triton] [--vs torch] [--checkpointing none,blocks] [--steps N] ...
    tritonforge kernels check [--op OPS] [--dtype bf16,fp16,fp32] [--sizes small,odd,real] [--json FILE]

The data flow: :mod:`.catalogue` (which ops and backends), :mod:`.shapes` and :mod:`.cases` (an op's inputs
and upcast reference at one shape), :mod:`.peers` (the backends that run a case), :mod:`.optimizer` (the
float64 optimizer harness), then the commands: :mod:`.ops` (``bench ops``), :mod:`.check` with
:mod:`.checkrows` and :mod:`.checkgpu` (``kernels check``), :mod:`.train` with :mod:`.kernelsets` and
:mod:`.synthetic` (``bench train``). :mod:`.command` parses the command line, :mod:`.timing` times,
:mod:`.tables` and :mod:`.plot` write the results. The GPU suite that runs them all is ``tools/gpu.py``.
"""
