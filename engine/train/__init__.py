"""Training a recipe: the trainer and its loop (:mod:`.trainer`), the optimizer step (:mod:`.step`), the
time-budget clock (:mod:`.budget`), run directories and resuming (:mod:`.resume`) and batch prefetching
(:mod:`.prefetch`). ``python -m engine.train RECIPE`` (what torchrun launches) is ``tritonforge train``."""
