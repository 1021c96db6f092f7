"""The time-budget clock: fixing a time-budgeted run's step count once its warmup steps are timed, then
keeping the run inside the budget (see :class:`BudgetClock`)."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

from ..config import BUDGET_MIN_WARMUP, Recipe
from ..device import sync
from ..precision import autocast
from ..tasks import Task

#: Share added to the measured step time when a time budget fixes the step count (machines vary while they run).
BUDGET_MARGIN = 0.06
#: Seconds reserved for what follows the final evaluation and sample: the last checkpoint and the process's
#: exit (on a 2-core CPU the main job's checkpoint took 0.16 s, and the command exited 1.0 s after its last
#: line; importing torch alone adds 0.5 s of interpreter teardown).
END_SECONDS = 1.5
#: A re-timed budget raises its step count only by more than this share (pace measurements are noisy).
BUDGET_RAISE = 0.02
#: The pace a re-timing acts on: the steps of this many logging windows (one slow spell moves it less).
PACE_WINDOWS = 4
#: Evaluation-sized forwards timed when the count is fixed (their median: the first may pay for allocations);
#: near the end each re-timing times one more, and the median of the last this many is the estimate.
FORWARD_REPEATS = 3
#: A re-timing times an evaluation forward when what is left of the budget is under this many times the
#: final evaluation's reserve: the reserve is then what decides the count, so it is measured, not carried.
FORWARD_RETIME = 2.0


class BudgetClock:
    """Fixes a time-budgeted run's step count once its warmup steps are timed, then keeps the run inside it.

    The steps before the count is fixed are warmup steps, whose learning rate does not depend on the count,
    so fixing it changes nothing that already ran. The count fits the budget (counted from ``started``, a
    ``time.perf_counter()`` reading taken when the run began) with the periodic and final evaluations, the
    end-of-run sample, the end (:data:`END_SECONDS`), and a margin of :data:`BUDGET_MARGIN` on the measured
    step time. Machines also change
    speed while they run (a neighbour's job, a throttled clock), and an evaluation's cost is known only once
    one has run: at every logging step the clock re-times the steps of the last :data:`PACE_WINDOWS` logging
    windows and sets the count to what fits at that pace: lower whenever the rest no longer fits, higher
    when at least :data:`BUDGET_RAISE` more steps fit (so noise does not move it), never past
    ``train.steps``. Each change goes to ``on_change(steps)`` (which makes the run follow it: the rest of the
    learning rate is scheduled over the new count), then is printed and recorded through ``log``. All
    ``world`` processes take the smallest count any of them computes. The final evaluation is reserved at the
    median of :data:`FORWARD_REPEATS` evaluation forwards timed at the fix (then at the last periodic
    evaluation's time per batch), and re-timed in the run's last stretch (:data:`FORWARD_RETIME`): a forward's
    time does not follow the training steps' pace (the warmup's steps run slower, the forward does not).
    In that last stretch the clock also re-times every :attr:`MIN_WINDOW` steps on a CPU, logging steps or
    not, at the slower of the recent windows' pace and the latest window's: a slowdown there leaves no time
    to be averaged in; and there the count is only ever lowered. The evaluations' reserve carries the same
    margin as the steps. Timing reads the clock only where the trainer already waits for the device (logging and
    evaluation steps), except at the two ends of the warmup window.

    The trainer calls :meth:`after_step`, :meth:`after_log` and :meth:`after_eval` with the number of
    steps taken so far, and adds the seconds it spends outside training steps to :attr:`paused`.
    """

    #: Steps a re-timing needs since the previous one (shorter windows are too noisy to act on).
    MIN_WINDOW = 10

    def __init__(self, recipe: Recipe, started: float, task: Task, forward_model: nn.Module, device: torch.device,
                 world: int, on_change: Callable[[int], None], log):
        self.settings = recipe.train  # the budget, evaluations, sample and precision (the step count aside)
        self.started, self.task, self.forward_model = started, task, forward_model
        self.device, self.world, self.on_change, self.log = device, world, on_change, log
        warmup = recipe.optim.warmup_steps
        self.window_end = max(BUDGET_MIN_WARMUP, min(warmup, 50)) if recipe.optim.schedule == "constant" \
            else min(warmup, 50)
        self.window_start: float | None = None
        self.paused = 0.0
        self.fixed = False
        self.forward = 0.0  # seconds of one evaluation batch: timed at the fix, then from evaluations and re-timings
        self.forwards: list[float] = []  # the latest forward timings, whose median is ``forward``
        #: Under :data:`FORWARD_RETIME` times the final evaluation's reserve left, as all processes agreed.
        self.last_stretch = False
        self.windows: list[tuple[int, int, float]] = []  # (first step, steps, seconds) of the recent logging windows
        #: ``train.steps``: the count never goes past it.
        self.ceiling = recipe.train.steps
        #: The run's step count: the ceiling until the count is fixed.
        self.steps = recipe.train.steps

    def seconds_left(self) -> float:
        return self.settings.budget_seconds() - (time.perf_counter() - self.started)

    def after_step(self, step: int) -> None:
        """Called after each step; fixes the count at the end of the warmup window, and on a CPU re-times
        every :attr:`MIN_WINDOW` steps in the run's last stretch, logging step or not (there the clock needs
        no wait for a device; on CUDA a quiet step never reads the device, so only logging steps re-time)."""
        if self.fixed:
            if self.last_stretch and self.device.type == "cpu" and step - self.start_step >= self.MIN_WINDOW:
                self.after_log(step)
            return
        if step == 1 or self.window_start is None:  # the first step pays one-time costs: not timed
            sync(self.device)
            self.window_start, self.start_step, self.paused = time.perf_counter(), step, 0.0
            return
        if step < max(self.window_end, self.start_step + 2):
            return
        sync(self.device)
        now = time.perf_counter()
        per_step = (now - self.window_start - self.paused) / (step - self.start_step)
        self.forwards = self._forward_seconds(FORWARD_REPEATS)
        self.forward = _median(self.forwards)
        steps = self._agree(self.steps_that_fit(step, per_step, self.forward))
        self._set(step, steps, per_step, f"{steps} steps fit ({1e3 * per_step:.0f} ms/step measured over steps "
                                         f"{self.start_step + 1}-{step}")
        self.fixed = True
        self.window_start, self.start_step, self.paused = time.perf_counter(), step, 0.0

    def after_eval(self, seconds: float) -> None:
        """A periodic evaluation took ``seconds``: the cost of the ones still to come."""
        self.forward = seconds / max(1, self.task.eval_batches(final=False))
        self.forwards = [self.forward]

    def after_log(self, step: int) -> None:
        """Called at logging steps (the device is idle): move the count to what fits at the pace just measured."""
        if not self.fixed or step >= self.steps or step - self.start_step < self.MIN_WINDOW:
            return
        now = time.perf_counter()
        self.windows = [*self.windows, (self.start_step + 1, step - self.start_step,
                                        now - self.window_start - self.paused)][-PACE_WINDOWS:]
        per_step = sum(w[2] for w in self.windows) / sum(w[1] for w in self.windows)
        window = f"{self.windows[0][0]}-{step}"
        self.window_start, self.start_step, self.paused = now, step, 0.0
        reserve = self.forward * self.task.eval_batches(final=True)
        self.last_stretch = self._any(self.seconds_left() < FORWARD_RETIME * reserve)
        if self.last_stretch:
            first, count, seconds = self.windows[-1]
            if seconds / count > per_step:  # a slowdown this late cannot wait to be averaged in
                per_step, window = seconds / count, f"{first}-{step}"
            self.forwards = [*self.forwards, *self._forward_seconds(1)][-FORWARD_REPEATS:]
            self.forward = _median(self.forwards)
            self.window_start = time.perf_counter()  # the timing is not a training step's
        steps, current = self._agree(self.steps_that_fit(step, per_step, self.forward)), self.steps
        # Never raised in the last stretch: there a low reading of the noisy forward would spend the reserve.
        if steps < current or (steps > current * (1 + BUDGET_RAISE) and not self.last_stretch):
            self._set(step, steps, per_step, f"{steps} steps fit (steps {window} ran at {1e3 * per_step:.0f} ms/step")

    def _set(self, step: int, steps: int, per_step: float, how: str) -> None:
        self.steps = steps
        self.on_change(steps)
        left = self.seconds_left()
        self.log.print(f"time budget {self.settings.time_budget}: {how}, {left:.0f} s left); the learning rate is "
                       f"scheduled over them")
        self.log.record({"kind": "budget", "step": step, "steps": steps, "step_ms": 1e3 * per_step,
                         "eval_forward_ms": 1e3 * self.forward, "seconds_left": left})

    def _agree(self, steps: int) -> int:
        """The smallest count over all processes (their clocks differ; their loops must end together)."""
        if self.world == 1:
            return steps
        box = torch.tensor([steps], device=self.device, dtype=torch.int64)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MIN)
        return int(box.item())

    def _any(self, flag: bool) -> bool:
        """Whether any process's ``flag`` is set: a forward of a sharded model is a collective, so either every
        process times one or none does."""
        if self.world == 1:
            return flag
        box = torch.tensor([int(flag)], device=self.device, dtype=torch.int64)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
        return bool(box.item())

    def _forward_seconds(self, repeats: int) -> list[float]:
        """Timings of ``repeats`` evaluation-sized forwards (no gradients, eval mode) of a training batch."""
        model = self.forward_model
        inputs, targets = self.task.batch(0, 0)
        was_training = model.training
        model.eval()
        seconds = []
        with torch.no_grad(), autocast(self.settings.precision, self.device):
            for _ in range(repeats):
                begin = time.perf_counter()
                self.task.loss(model, inputs, targets)
                sync(self.device)
                seconds.append(time.perf_counter() - begin)
        model.train(was_training)
        return seconds

    def steps_that_fit(self, step: int, per_step: float, forward: float) -> int:
        """The step count that fits what is left of the budget after ``step`` steps, at ``per_step`` seconds a
        step and ``forward`` seconds an evaluation batch (never fewer than the steps already taken)."""
        s = self.settings
        left = self.seconds_left()
        per_step *= 1 + BUDGET_MARGIN
        forward *= 1 + BUDGET_MARGIN  # the evaluation's batches vary as the steps do
        fixed = forward * (self.task.eval_batches(final=True) + s.sample_tokens / s.batch_size) + END_SECONDS
        steps = step
        for _ in range(3):  # the periodic evaluations depend on the count
            evals = max(0, steps // s.eval_every - step // s.eval_every) if s.eval_every else 0
            cost = fixed + evals * forward * self.task.eval_batches(final=False)
            steps = step + max(0, int((left - cost) / per_step))
        return min(steps, self.ceiling)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
