"""Language modelling: a GPT, LSTM or GRU trained on token windows to predict the next token.

With ``train.carry_state`` (recurrent models only) each batch row reads consecutive windows
(:class:`~engine.data.text.StreamWindows`) and the recurrent state at the end of one step's window is the
start of the next step's, detached: truncated backpropagation through time. The carried state is part of
the checkpoint, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed
from ..config import RNN_ARCHS, Recipe, RecipeError
from ..data.text import Packed, StreamWindows, TokenWindows, get_tokenizer, load_tokens
from ..models import recompute
from ..models.gpt import GPT, GPTConfig
from ..models.rnn import RNN, RNNConfig
from ..precision import autocast
from ..ops.select import Ops
from .base import Task, register


def _vocab(recipe: Recipe, tokenizer_vocab: int) -> int:
    """``model.vocab_size``, or the tokenizer's vocabulary rounded up to a multiple of 64."""
    m = recipe.model
    vocab = m.vocab_size or (tokenizer_vocab + 63) // 64 * 64
    if vocab < tokenizer_vocab:
        raise RecipeError(f"model.vocab_size ({vocab}) is smaller than the {recipe.data.tokenizer} tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    return vocab


def gpt_config(recipe: Recipe, tokenizer_vocab: int) -> GPTConfig:
    return GPTConfig.from_section(recipe.model, vocab_size=_vocab(recipe, tokenizer_vocab))


def rnn_config(recipe: Recipe, tokenizer_vocab: int) -> RNNConfig:
    m = recipe.model
    return RNNConfig(cell=m.arch, n_layer=m.n_layer, d_model=m.d_model, hidden=m.hidden,
                     vocab_size=_vocab(recipe, tokenizer_vocab), dropout=m.dropout, tie_embeddings=m.tie_embeddings)


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
        self.data, self.log = data, log
        self.tokenizer = data.tokenizer
        self.model = build_model(recipe, data.tokenizer.vocab_size, ops).to(device)
        self.cfg = self.model.cfg
        recompute.apply(self.model, t.activation_checkpointing, log)
        self.recurrent = isinstance(self.model, RNN)
        windows = StreamWindows if t.carry_state else TokenWindows
        d = recipe.data

        def packing(segments):  # data.packing: the split's document boundaries (refused with carry_state)
            return {} if d.packing == "none" else dict(segments=segments, reset_positions=d.reset_positions,
                                                       separator_loss=d.separator_loss)

        self.train_windows = windows(data.train, t.seq_len, t.batch_size, t.grad_accum, recipe.run.seed, world,
                                     **packing(data.train_segments))
        # train.carry_state: the state each micro-batch's rows carry into the next step (None: start from zero),
        # and the training forwards run so far, which say the step and micro-batch of the next one (the
        # trainer asks for micro-batches 0 .. grad_accum - 1 of each step in order; batch() stays a pure
        # function of (step, micro), so it may be fetched ahead).
        self.carried: list[tuple[torch.Tensor, ...] | None] = [None] * t.grad_accum
        self.forwards = 0
        if len(data.val) < t.seq_len + 1:
            raise RecipeError(f"data.val_fraction ({recipe.data.val_fraction}) leaves {len(data.val)} validation "
                              f"tokens, fewer than train.seq_len + 1 ({t.seq_len + 1})")
        self.val_windows = TokenWindows(data.val, t.seq_len, t.batch_size, 1, recipe.run.seed, world,
                                        **packing(data.val_segments))
        self.items_per_micro_batch = t.batch_size * t.seq_len
        log(f"data: {len(data.train):,} train / {len(data.val):,} val tokens ({data.tokenizer.name} tokenizer); "
            f"model: {self.model.num_params():,} parameters")

    def _to_device(self, x: torch.Tensor | Packed, y: torch.Tensor):
        if self.device.type != "cuda":
            return x, y
        move = lambda t: None if t is None else t.pin_memory().to(self.device, non_blocking=True)  # noqa: E731
        return (Packed(*map(move, x)) if isinstance(x, Packed) else move(x)), move(y)

    def batch(self, step: int, micro: int):
        return self._to_device(*self.train_windows.batch(step, micro, self.rank))

    @staticmethod
    def _forward(model: nn.Module, inputs, targets, **kwargs):
        """``model(inputs, targets, ...)``, packed windows' document ids and positions passed along."""
        if isinstance(inputs, Packed):
            return model(inputs.idx, targets, segment_ids=inputs.segment_ids, position_ids=inputs.position_ids,
                         **kwargs)
        return model(inputs, targets, **kwargs)

    def loss(self, model: nn.Module, inputs, targets):
        if not self.recurrent:
            return self._forward(model, inputs, targets)
        if not self.recipe.train.carry_state:
            return model(inputs, targets)[0]
        if not (model.training and torch.is_grad_enabled()):  # a timing probe: the carried state stays
            return model(inputs, targets, state=self.carried[0])[0]
        step, micro = divmod(self.forwards, self.recipe.train.grad_accum)
        if self.train_windows.starts_pass(step):
            self.carried[micro] = None
        loss, state = model(inputs, targets, state=self.carried[micro])
        self.carried[micro] = tuple(s.detach().float() for s in state)
        self.forwards += 1
        return loss

    def state_dict(self) -> dict:
        """The carried recurrent state of every row of the global batch (train.carry_state), for exact resume.

        Each process holds its rows' state; all take part in gathering them into one tensor per state part,
        (n_layer, rows, hidden), rows in the global batch's order.
        """
        if not self.recipe.train.carry_state:
            return {}
        zero = self.model.zero_state(self.recipe.train.batch_size, self.device)
        carried = [zero if s is None else s for s in self.carried]  # a None state is the zero state
        parts = []
        for local in zip(*carried):  # one state part (h, or c): grad_accum tensors (L, B, H)
            local = torch.stack(local, dim=1)  # (L, accum, B, H)
            if self.world > 1:
                gathered = [torch.empty_like(local) for _ in range(self.world)]
                torch.distributed.all_gather(gathered, local)
                local = torch.stack(gathered, dim=2)  # (L, accum, world, B, H)
            parts.append(local.reshape(local.shape[0], -1, local.shape[-1]).cpu())
        return {"carried": parts, "forwards": self.forwards}

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
        self.forwards = state["forwards"]

    @torch.no_grad()
    def _window_losses(self, model: nn.Module, starts) -> tuple[float, float, int]:
        """(mean, standard error of the mean, count) of the per-window mean losses of the validation
        windows at ``starts``, over all processes."""
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # count, sum, sum of squares
        for x, y, count in self.val_windows.eval_batches(starts, self.rank):
            x, y = self._to_device(x, y)
            with autocast(self.recipe.train.precision, self.device):
                losses = self._forward(model, x, y, per_sequence=True)
                losses = (losses[0] if self.recurrent else losses)[:count].double()
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
