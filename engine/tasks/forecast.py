"""Forecasting (``train.task = "forecast"``): ``train.seq_len`` steps of a multivariate series predict the
next ``train.horizon`` steps, with a GPT, an LSTM or a GRU reading continuous inputs.

The series is split in time: the first ``1 - data.val_fraction`` of the steps train, forecasts of the
rest validate (their context may reach back into the training steps; their targets never do). Each
channel is normalised by the mean and deviation of the training steps only. Every position of a window
forecasts the horizon after it, so one training window gives ``seq_len`` forecasts; evaluation scores the
forecast from the whole context at every origin of the validation split, in normalised units: MSE
(``val_loss``) and MAE, beside the naive forecast (the context's last value, repeated) and the
seasonal-naive one (the value one season, ``data.season`` steps, earlier).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..config import RNN_ARCHS, Recipe, RecipeError
from ..data.series import load_series
from ..models import recompute
from ..models.gpt import GPT, GPTConfig
from ..models.rnn import RNN, RNNConfig
from ..precision import autocast
from ..ops.select import Ops
from .base import Task

#: Validation forecasts per evaluation forward pass.
EVAL_CHUNK = 256


def build_forecaster(recipe: Recipe, channels: int, ops: Ops) -> nn.Module:
    """The model with a linear input of ``channels`` and a linear head of ``horizon · channels`` outputs."""
    m, out = recipe.model, recipe.train.horizon * channels
    if m.arch in RNN_ARCHS:
        return RNN(RNNConfig(cell=m.arch, n_layer=m.n_layer, d_model=m.d_model, hidden=m.hidden, vocab_size=out,
                             dropout=m.dropout, tie_embeddings=m.tie_embeddings, input_dim=channels), ops)
    model = GPT(GPTConfig.from_section(m, vocab_size=out, tie_embeddings=False), ops, input_dim=channels)
    model.ops_used = tuple(op for op in model.ops_used if op != "cross_entropy")  # the head feeds a squared error
    return model


class ForecastTask(Task):
    unit = "win"

    def __init__(self, recipe: Recipe, ops: Ops, device: torch.device, rank: int, world: int, log=print):
        self.recipe, self.device, self.rank, self.world = recipe, device, rank, world
        d, t = recipe.data, recipe.train
        values, self.names = load_series(d)
        steps, channels = values.shape
        self.context, self.horizon, self.season = t.seq_len, t.horizon, d.season
        self.split = int(steps * (1.0 - d.val_fraction))
        if self.split < self.context + self.horizon:
            raise RecipeError(
                f"train.horizon ({self.horizon}) + train.seq_len ({self.context}) is longer than the series' "
                f"training split ({self.split} of {steps} steps with data.val_fraction = {d.val_fraction})")
        if steps - self.split < self.horizon:
            raise RecipeError(
                f"train.horizon ({self.horizon}) is longer than the series' validation split ({steps - self.split} "
                f"of {steps} steps); raise data.val_fraction or shorten the horizon")
        mean, std = values[:self.split].mean(axis=0), values[:self.split].std(axis=0)
        self.mean, self.std = mean, np.where(std > 0, std, 1.0)
        self.series = torch.from_numpy((values - self.mean) / self.std).float().to(device)
        self.model = build_forecaster(recipe, channels, ops).to(device)
        recompute.apply(self.model, t.activation_checkpointing, log)
        self.recurrent = isinstance(self.model, RNN)
        # Validation origins: windows starting here forecast steps at or after the split, and only those.
        self.val_starts = np.arange(self.split - self.context, steps - self.context - self.horizon + 1)
        self.items_per_micro_batch = t.batch_size
        self.baselines = self._baselines()
        log(f"data: {steps:,} steps x {channels} channels ({', '.join(self.names)}), {self.split:,} train / "
            f"{steps - self.split:,} validation steps, {len(self.val_starts):,} validation forecasts; "
            f"model: {sum(p.numel() for p in self.model.parameters()):,} parameters")

    def _windows(self, starts: np.ndarray) -> torch.Tensor:
        """(len(starts), context + horizon, channels) windows of the normalised series."""
        idx = torch.as_tensor(starts, device=self.device)[:, None] + torch.arange(
            self.context + self.horizon, device=self.device)
        return self.series[idx]

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, context, C) and the horizon after every position: targets (B, context, horizon, C)."""
        t = self.recipe.train
        rng = np.random.default_rng([self.recipe.run.seed, step])
        total = t.grad_accum * self.world * t.batch_size
        starts = rng.integers(0, self.split - self.context - self.horizon + 1, size=total)
        first = (micro * self.world + self.rank) * t.batch_size
        w = self._windows(starts[first:first + t.batch_size])
        targets = w[:, 1:].unfold(1, self.horizon, 1)[:, :self.context].transpose(2, 3)
        return w[:, :self.context], targets

    def _predict(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        out = model(inputs)
        out = out[0] if self.recurrent else out
        return out.float().view(*inputs.shape[:2], self.horizon, inputs.shape[-1])

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self._predict(model, inputs), targets)

    def _baselines(self) -> dict[str, float]:
        """MSE and MAE of the naive and seasonal-naive forecasts over the validation origins."""
        w = self._windows(self.val_starts).double()
        context, target = w[:, :self.context], w[:, self.context:]
        naive = context[:, -1:].expand_as(target)
        # Step k of the horizon repeats the step a whole number of seasons earlier that lies in the context.
        k = torch.arange(self.horizon, device=self.device)
        back = self.season * ((k // self.season) + 1)
        seasonal = w[:, self.context + k - back]
        out = {}
        for name, guess in (("naive", naive), ("seasonal", seasonal)):
            out[f"{name}_mse"] = (guess - target).pow(2).mean().item()
            out[f"{name}_mae"] = (guess - target).abs().mean().item()
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # squared error, absolute error, count
        mine = self.val_starts[self.rank::self.world]
        for i in range(0, len(mine), EVAL_CHUNK):
            w = self._windows(mine[i:i + EVAL_CHUNK])
            with autocast(self.recipe.train.precision, self.device):
                pred = self._predict(model, w[:, :self.context])[:, -1]
            err = (pred - w[:, self.context:]).double()
            sums += torch.stack([err.pow(2).sum(), err.abs().sum(), torch.tensor(err.numel(), device=self.device)])
        model.train(was_training)
        sq, ab, n = distributed.mean(sums).tolist()  # the means' ratios are the global ratios
        return {"val_loss": sq / n, "val_mae": ab / n, **self.baselines}

    def flops_per_item(self) -> float:
        """Training FLOPs per window: 6 per weight per position (attention's share left out)."""
        return 6.0 * sum(p.numel() for p in self.model.parameters()) * self.context
