"""Activation checkpointing: the same losses and gradients with and without it, dropout and drop-path on,
with the torch ops and the Triton kernels (through the interpreter on CPU), eager and under torch.compile.
DDP and FSDP2 are in test_distributed.py."""
import copy

import pytest
import torch

from tritonforge.engine.ops import select as op_select, table as op_table
from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.models import recompute
from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.models.rnn import RNN, RNNConfig
from tritonforge.engine.tasks.vision import build_model

OPS = op_select.resolve({}, "cpu")
#: Every op on its Triton kernel (tests/conftest.py turns the interpreter on, so they run on CPU tensors).
TRITON = op_select.resolve({op: "triton" for op in op_table.op_names()}, "cpu")


def _grads(model, loss_fn):
    torch.manual_seed(1)  # dropout and drop-path draw their masks from the global generator
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_with_and_without(model, loss_fn, policy):
    plain = copy.deepcopy(model)
    assert recompute.apply(model, policy) > 0
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
    recompute.apply(model, "blocks")
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


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_gpt_on_the_triton_kernels(llama):
    """The Triton ops (torch.library custom ops) recompute in the backward: the same loss and gradients, bit for
    bit — attention, layer norm or RMSNorm, the fused head and loss, and with ``llama`` RoPE and SwiGLU."""
    extra = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False) if llama else {}
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, context=16, vocab_size=64, dropout=0.2, **extra),
                TRITON).train()
    used = {op: TRITON.backends[op] for op in model.ops_used}
    assert set(used.values()) == {"triton"}, used
    x = torch.randint(0, 64, (2, 16))
    _same_with_and_without(model, lambda m: m(x, x), "blocks")


@pytest.mark.parametrize("ops", [OPS, TRITON], ids=["torch", "triton"])
def test_gpt_under_torch_compile(ops):
    """torch.compile traces the checkpointed blocks in one graph (``fullgraph``; each block a
    ``tag_activation_checkpoint`` region that AOTAutograd's partitioner recomputes) and gives eager's loss and
    gradients. ``aot_eager`` runs the traced aten ops as eager does, so the tolerance is zero; inductor would
    fuse and reorder floating-point work (about 1e-7 apart here) and takes a minute to compile on a CPU.
    Dropout is off: a compiled graph draws its own masks."""
    from torch._higher_order_ops.wrap import tag_activation_checkpoint

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, context=16, vocab_size=64), ops).train()
    assert recompute.apply(model, "blocks") == 2
    regions = []

    def backend(gm, example_inputs):
        regions.extend(n for n in gm.graph.nodes if n.target is tag_activation_checkpoint)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    x = torch.randint(0, 64, (2, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss_a, grads_a = _grads(model, lambda m: m(x, x))
    loss_b, grads_b = _grads(model, lambda m: compiled(x, x))
    torch._dynamo.reset()
    assert len(regions) == 2  # one checkpointed region per block: the checkpoint was traced, not dropped
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def test_a_model_without_residual_blocks_is_refused():
    rnn = RNN(RNNConfig(cell="lstm", n_layer=1, d_model=16, hidden=16, vocab_size=32), OPS)
    with pytest.raises(RecipeError, match="train.activation_checkpointing = 'blocks': RNN has no residual blocks"):
        recompute.apply(rnn, "blocks")
    assert recompute.apply(rnn, "none") == 0


def test_the_count_of_checkpointed_blocks():
    model = GPT(GPTConfig(n_layer=3, n_head=2, d_model=32, context=16, vocab_size=64), OPS)
    assert recompute.apply(model, "every_2") == 2
    assert recompute.checkpointed_blocks(model) == 2
