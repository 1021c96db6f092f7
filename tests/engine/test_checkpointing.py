"""Activation checkpointing: the same losses and gradients with and without it, dropout and drop-path on."""
import copy

import pytest
import torch

from engine import registry
from engine.config import RecipeError, load_recipe
from engine.models import checkpointing
from engine.models.gpt import GPT, GPTConfig
from engine.tasks.vision import build_model

OPS = registry.resolve({}, "cpu")


def _grads(model, loss_fn):
    torch.manual_seed(1)  # dropout and drop-path draw their masks from the global generator
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_with_and_without(model, loss_fn, policy):
    plain = copy.deepcopy(model)
    assert checkpointing.apply(model, policy) > 0
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    loss_a, grads_a = _grads(plain, loss_fn)
    loss_b, grads_b = _grads(model, loss_fn)
    assert torch.equal(loss_a, loss_b)  # the recomputation replays the RNG: bit for bit
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("policy", ["blocks", "every_2"])
def test_gpt_with_dropout(policy):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, d_model=32, context=16, vocab_size=64, dropout=0.2), OPS).train()
    x = torch.randint(0, 64, (2, 16))
    _same_with_and_without(model, lambda m: m(x, x), policy)


@pytest.mark.parametrize("arch", ["convnext", "resnet"])
def test_cnns(arch):
    extra = ["--model.drop_path=0.5"] if arch == "convnext" else []
    m = load_recipe(None, [f"--model.arch={arch}", "--model.width=8", "--model.depths=1,1,2,1",
                           "--data.source=shapes", *extra]).model
    torch.manual_seed(0)
    model = build_model(m, OPS).train()
    x = torch.randn(2, 3, 32, 32)
    _same_with_and_without(model, lambda mod: mod(x).square().mean(), "blocks")


def test_a_copy_stays_checkpointed_with_its_own_weights():
    """A weight EMA is a deep copy: it must run its own weights, not the original's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, context=16, vocab_size=64), OPS)
    checkpointing.apply(model, "blocks")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert not torch.equal(model(x), twin(x))
    assert type(twin.blocks[0]).__name__ == "CheckpointedBlock"


def test_bad_policy_names_the_field():
    with pytest.raises(RecipeError, match="train.activation_checkpointing: 'every_0' is not one of"):
        load_recipe(None, ["--train.activation_checkpointing=every_0"])
