"""Language modelling: a GPT, LSTM or GRU trained on token windows to predict the next token.

With ``train.carry_state`` (recurrent models only) each batch row reads consecutive windows
(:class:`~engine.data.text.StreamWindows`) and the recurrent state at the end of one step's window is the
start of the next step's, detached: truncated backpropagation through time. The carried state is part of
the checkpoint, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from engine import distributed
from engine.config import RNN_ARCHS, Recipe, RecipeError
from engine.data.text import StreamWindows, TokenWindows, get_tokenizer, load_tokens
from engine.models.gpt import GPT, GPTConfig
from engine.models.rnn import RNN, RNNConfig
from engine.precision import autocast
from engine.registry import Ops
from engine.tasks import Task, register


def _model_values(recipe: Recipe, tokenizer_vocab: int, cls: type) -> dict:
    """The [model] fields ``cls`` has, with the vocabulary resolved against the tokenizer's."""
    m = recipe.model
    vocab = m.vocab_size or (tokenizer_vocab + 63) // 64 * 64
    if vocab < tokenizer_vocab:
        raise RecipeError(f"model.vocab_size ({vocab}) is smaller than the {recipe.data.tokenizer} tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dataclasses.asdict(m).items() if k in fields}
    values["vocab_size"] = vocab
    return values


def gpt_config(recipe: Recipe, tokenizer_vocab: int) -> GPTConfig:
    return GPTConfig(**_model_values(recipe, tokenizer_vocab, GPTConfig))


def rnn_config(recipe: Recipe, tokenizer_vocab: int) -> RNNConfig:
    return RNNConfig(cell=recipe.model.arch, **_model_values(recipe, tokenizer_vocab, RNNConfig))


def build_model(recipe: Recipe, tokenizer_vocab: int, ops: Ops) -> GPT | RNN:
    if recipe.model.arch in RNN_ARCHS:
        return RNN(rnn_config(recipe, tokenizer_vocab), ops)
    return GPT(gpt_config(recipe, tokenizer_vocab), ops)


class LanguageModelingTask(Task):
    unit = "tok"

    def __init__(self, recipe: Recipe, ops: Ops, device: torch.device, rank: int, world: int, log=print):
        self.recipe, self.device, self.rank, self.world = recipe, device, rank, world
        t = recipe.train
        gpt_config(recipe, get_tokenizer(recipe.data.tokenizer).vocab_size)  # refuse a bad vocab before tokenizing
        data = distributed.main_first(lambda: load_tokens(recipe.data, log=log), rank, world)
        self.tokenizer = data.tokenizer
        self.model = build_model(recipe, data.tokenizer.vocab_size, ops).to(device)
        self.recurrent = isinstance(self.model, RNN)
        windows = StreamWindows if t.carry_state else TokenWindows
        self.train_windows = windows(data.train, t.seq_len, t.batch_size, t.grad_accum, recipe.run.seed, world)
        # train.carry_state: the state each micro-batch's rows carry into the next step (None: start from zero),
        # and the micro-batch that batch() handed out last, whose loss() comes next.
        self.carried: list[tuple[torch.Tensor, ...] | None] = [None] * t.grad_accum
        self._micro = 0
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
        if self.recipe.train.carry_state:
            self._micro = micro
            if self.train_windows.starts_pass(step):
                self.carried[micro] = None
        return self._to_device(*self.train_windows.batch(step, micro, self.rank))

    def loss(self, model: nn.Module, inputs, targets):
        if not self.recurrent:
            return model(inputs, targets)
        if not self.recipe.train.carry_state:
            return model(inputs, targets)[0]
        loss, state = model(inputs, targets, state=self.carried[self._micro])
        self.carried[self._micro] = tuple(s.detach().float() for s in state)
        return loss

    def state_dict(self) -> dict:
        """The carried recurrent state of every row of the global batch (train.carry_state), for exact resume.

        Each process holds its rows' state; all take part in gathering them into one tensor per state part,
        (n_layer, rows, hidden), rows in the global batch's order.
        """
        if not self.recipe.train.carry_state or any(s is None for s in self.carried):
            return {}
        parts = []
        for local in zip(*self.carried):  # one state part (h, or c): grad_accum tensors (L, B, H)
            local = torch.stack(local, dim=1)  # (L, accum, B, H)
            if self.world > 1:
                gathered = [torch.empty_like(local) for _ in range(self.world)]
                torch.distributed.all_gather(gathered, local)
                local = torch.stack(gathered, dim=2)  # (L, accum, world, B, H)
            parts.append(local.reshape(local.shape[0], -1, local.shape[-1]).cpu())
        return {"carried": parts}

    def load_state_dict(self, state: dict) -> None:
        if "carried" not in state:
            return
        t = self.recipe.train
        rows = t.grad_accum * self.world * t.batch_size
        if state["carried"][0].shape[1] != rows:
            raise RecipeError(f"train.carry_state: the checkpoint carries the state of {state['carried'][0].shape[1]} "
                              f"rows; this run has {rows} (train.batch_size x train.grad_accum x processes); "
                              f"resume with the same global batch")
        for micro in range(t.grad_accum):
            self.carried[micro] = tuple(
                p.view(p.shape[0], t.grad_accum, self.world, t.batch_size, -1)[:, micro, self.rank].to(self.device)
                for p in state["carried"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        n = 0
        for x, y in self.val_windows.eval_batches(self.recipe.train.eval_batches, self.rank):
            x, y = self._to_device(x, y)
            with autocast(self.recipe.train.precision, self.device):
                loss = model(x, y)
            total += (loss[0] if self.recurrent else loss).double()
            n += 1
        model.train(was_training)
        return {"val_loss": distributed.mean(total / n).item()}

    def flops_per_item(self) -> float:
        if self.recurrent:
            return self.model.flops_per_token()
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
@register("lstm")
@register("gru")
def build(recipe, ops, device, rank, world, log) -> Task:
    return LanguageModelingTask(recipe, ops, device, rank, world, log)
