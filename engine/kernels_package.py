"""Where the engine finds its kernels: the import name of the kernels package beside the engine's own."""

#: ``tritonforge.kernels`` when installed (the engine is ``tritonforge.engine``), ``kernels`` in a plain
#: checkout run from the repository root (the engine is ``engine``).
KERNELS_PACKAGE = __name__.rpartition(".")[0][: -len("engine")] + "kernels"
