"""``auto`` that measures: on this card, at this run's shapes, each op gets its fastest correct backend.

With ``kernels.tune = "measure"`` (the default) a run on CUDA decides every op left on ``auto`` before its
first step, in five parts (:mod:`.record`, :mod:`.candidates`, :mod:`.measure` for 3 and 4, :mod:`.cache`;
:mod:`.run` puts them together for a run, :mod:`.command` is ``tritonforge kernels tune``):

1. **The run's calls** (:func:`record_calls`). One forward and backward of the real model on the real first
   batch, with the :class:`~engine.ops.select.Ops` functions wrapped, records every call each op receives:
   argument shapes, strides, dtypes, flags (causal, window, softcap, ...), autocast. Calls that agree on all
   of that are one :class:`Call`, counted. The optimizer is one :class:`OptimizerWork` over the run's
   parameter groups. RNG, buffers (BatchNorm statistics) and gradients are restored afterwards.
2. **The candidates** (:func:`candidates`): torch (the op table's reference), PyTorch's other ways where the
   installed version has them (each SDPA backend for attention; for a classifier head both paths of torch's
   own, ``F.linear_cross_entropy``'s chunked one and the materialized logits, whichever the head's shape
   gave the ``torch`` candidate; torch's optimizer is already its fused one on CUDA), and the project's Triton
   kernels.
3. **Measure** (:func:`measure_op`). Each candidate runs every call once, forward and backward, on the
   recorded inputs (the first call of each kind: real activations, real targets and document ids); that
   first run is timed apart (compiling, autotuning). Its outputs and input gradients are compared with the
   torch function on upcast inputs (float64; float32 without TF32 on a GPU), relative error against the
   tolerance ``tritonforge kernels check`` uses for the dtype (or twice torch's own error, where torch
   cannot come closer). A candidate that raises or disagrees is rejected (with a warning when its result
   is wrong or it is one of the project's kernels). The rest are timed (CUDA events around back-to-back
   runs), :data:`START_REPEATS` repeats of a micro-batch's calls of the op, interleaved, doubled up to
   :data:`MAX_REPEATS` while the answer is unclear, within
   ``kernels.tune_op_seconds`` per op (compiling apart; at least :data:`MIN_REPEATS` repeats whatever the
   time) and ``kernels.tune_seconds`` in all (an op that would start after it keeps torch, uncached).
4. **Decide** (:func:`choose`): the fastest candidate by median milliseconds per micro-batch, if it beats
   torch by more than the noise (the median absolute deviations of both added); else torch.
5. **Keep** (:class:`TuneCache`). The decision and its figures go to one JSON file per (card, driver,
   torch, triton, kernel sources, op, calls, flags), written atomically; a later run with the same key reads
   it, and spends only the recording forward and backward. A damaged file is ignored with a warning. A checkpoint records the choice, and a
   resumed run keeps it (``kernels.retune = true`` measures again). Under torchrun rank 0 decides and
   broadcasts, so every rank runs the same backends. Triton's own autotuned choices (the attention tiles of
   ``kernels.deterministic = false`` runs) are kept the same way (:mod:`.kept`), rank 0's sent to every rank.

An op set explicitly (``--kernels.OP=torch|triton``) is never tuned; ``kernels.tune = "trust"`` takes the
Triton kernels untimed (:func:`engine.ops.select.resolve`'s ``auto``), ``"off"`` takes torch. On a CPU ``auto``
is torch and nothing is measured.
"""
from .cache import CACHE_VERSION, TuneCache, cache_dir, environment_key, kernel_sources_hash
from .candidates import LINEAR_CROSS_ENTROPY_PATHS, SDPA_CANDIDATES, Candidate, candidates, torch_candidates
from .measure import (CLEAR_GAP, MAX_REPEATS, MIN_REPEATS, MUON_CUDA_TOLERANCE, OPTIMIZER_TOLERANCE, START_REPEATS,
                      TOLERANCE, Budget, CallWork, CudaClock, Measured,
                      OptimizerWork, choose, measure_op)
from .kept import KeptConfigs
from .record import Call, describe, record_calls
from .run import (NO_CUDA, TASK_STATE, Decision, Settings, agree, apply, decide, optimizer_work, probe_step, record,
                  record_works, recorded_choice, starting_choices, table, tunable, tune_ops, tune_run)
