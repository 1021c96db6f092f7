"""Self-supervised pretraining for images: device-side view augmentation (:mod:`.augment`), the frozen
feature evaluations (:mod:`.evaluation`: k-NN and a linear probe) and the ``nt_xent`` op's benchmark case
(:mod:`.opbench`). The tasks themselves live in :mod:`engine.tasks.ssl`."""
