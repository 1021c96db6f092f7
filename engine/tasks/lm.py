"""Language modelling: a GPT trained on token windows to predict the next token."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from engine import distributed
from engine.config import Recipe, RecipeError
from engine.data.text import TokenWindows, get_tokenizer, load_tokens
from engine.models import checkpointing
from engine.models.gpt import GPT, GPTConfig
from engine.precision import autocast
from engine.registry import Ops
from engine.tasks import Task, register


def gpt_config(recipe: Recipe, tokenizer_vocab: int) -> GPTConfig:
    m = recipe.model
    vocab = m.vocab_size or (tokenizer_vocab + 63) // 64 * 64
    if vocab < tokenizer_vocab:
        raise RecipeError(f"model.vocab_size ({vocab}) is smaller than the {recipe.data.tokenizer} tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    return dataclasses.replace(m, vocab_size=vocab)


class LanguageModelingTask(Task):
    unit = "tok"

    def __init__(self, recipe: Recipe, ops: Ops, device: torch.device, rank: int, world: int, log=print):
        self.recipe, self.device, self.rank, self.world = recipe, device, rank, world
        t = recipe.train
        gpt_config(recipe, get_tokenizer(recipe.data.tokenizer).vocab_size)  # refuse a bad vocab before tokenizing
        data = distributed.main_first(lambda: load_tokens(recipe.data, log=log), rank, world)
        self.data, self.log = data, log
        self.tokenizer = data.tokenizer
        self.cfg = gpt_config(recipe, data.tokenizer.vocab_size)
        self.model = GPT(self.cfg, ops).to(device)
        checkpointing.apply(self.model, t.activation_checkpointing)
        self.train_windows = TokenWindows(data.train, t.seq_len, t.batch_size, t.grad_accum, recipe.run.seed, world)
        if len(data.val) < t.seq_len + 1:
            raise RecipeError(f"data.val_fraction ({recipe.data.val_fraction}) leaves {len(data.val)} validation "
                              f"tokens, fewer than train.seq_len + 1 ({t.seq_len + 1})")
        self.val_windows = TokenWindows(data.val, t.seq_len, t.batch_size, 1, recipe.run.seed, world)
        self.items_per_micro_batch = t.batch_size * t.seq_len
        log(f"data: {len(data.train):,} train / {len(data.val):,} val tokens ({data.tokenizer.name} tokenizer); "
            f"model: {self.model.num_params():,} parameters")

    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def batch(self, step: int, micro: int):
        return self._to_device(*self.train_windows.batch(step, micro, self.rank))

    def loss(self, model: nn.Module, inputs, targets):
        return model(inputs, targets)

    @torch.no_grad()
    def _window_losses(self, model: nn.Module, starts) -> tuple[float, float, int]:
        """(mean, standard error of the mean, count) of the per-window mean losses of the validation
        windows at ``starts``, over all processes."""
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # count, sum, sum of squares
        for x, y, count in self.val_windows.eval_batches(starts, self.rank):
            x, y = self._to_device(x, y)
            with autocast(self.recipe.train.precision, self.device):
                losses = model(x, y, per_sequence=True)[:count].double()
            sums += torch.stack([losses.new_tensor(count), losses.sum(), losses.square().sum()])
        n, total, squares = (distributed.mean(sums) * self.world).tolist()
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        return mean, (var / n) ** 0.5, int(n)

    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """The mean loss of ``train.eval_batches`` batches of windows spread evenly over the validation split
        (the same windows every time) with its standard error; at the end of a run, the loss of the whole
        split when it holds at most ``train.final_eval_tokens`` tokens, logged beside the sample's."""
        t = self.recipe.train
        was_training = model.training
        model.eval()
        mean, se, _ = self._window_losses(model, self.val_windows.spread_starts(t.eval_batches * t.batch_size))
        metrics = {"val_loss": mean, "val_loss_se": se}
        if final and 0 < len(self.data.val) <= t.final_eval_tokens:
            whole, whole_se, n = self._window_losses(model, self.val_windows.tiling_starts())
            self.log(f"final evaluation: the whole validation split, {n:,} windows of {t.seq_len} tokens")
            metrics = {"val_loss": whole, "val_loss_se": whole_se, "val_loss_sample": mean,
                       "val_loss_sample_se": se}
        model.train(was_training)
        return metrics

    def eval_batches(self, final: bool) -> int:
        """Batches of one evaluation on this process: the sample, plus the whole split at the end."""
        t = self.recipe.train
        batches = t.eval_batches
        if final and 0 < len(self.data.val) <= t.final_eval_tokens:
            windows = len(self.val_windows.tiling_starts())
            batches += -(-windows // (t.batch_size * self.world))
        return batches

    def flops_per_item(self) -> float:
        return self.model.flops_per_token(self.recipe.train.seq_len)

    @torch.no_grad()
    def finish(self, model: nn.Module) -> str | None:
        n = self.recipe.train.sample_tokens
        if n <= 0:
            return None
        prompt = self.recipe.train.sample_prompt or "\n"
        idx = torch.as_tensor(self.tokenizer.encode(prompt).astype("int64"), device=self.device)[None]
        g = torch.Generator(device=self.device).manual_seed(self.recipe.run.seed)
        was_training = model.training
        model.eval()
        with autocast(self.recipe.train.precision, self.device):
            out = self.model.generate(idx, n, generator=g)
        model.train(was_training)
        return self.tokenizer.decode(out[0].tolist())


@register("gpt")
def build(recipe, ops, device, rank, world, log) -> Task:
    return LanguageModelingTask(recipe, ops, device, rank, world, log)
