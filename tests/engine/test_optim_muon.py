"""optim.name = "muon" through the registry: the GPT's parameter split and both backends' first steps.

The float64 checks of the optimizer itself are in tests/kernels/test_muon.py.
"""
import copy

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from tritonforge import kernels
from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.optim.build import build_optimizer
from tritonforge.engine.optim.muon import TorchMuon, torch_optimizer_states
from tritonforge.engine.tasks import Task
from tritonforge.engine.optim.build import build_optimizer

FP32_RTOL = 1e-5  # interpreted kernels vs the torch backend, both iterating in fp32 on CPU


def gpt_task(untied=False, d_model=16):
    torch.manual_seed(0)
    task = Task()
    task.model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=d_model, context=8, vocab_size=24,
                               tie_embeddings=not untied), resolve({}, "cpu"))
    return task


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    task = gpt_task(untied=True)
    groups = task.param_groups(0.1, muon=True)
    names = {id(p): n for n, p in task.model.named_parameters()}
    muon = sorted(names[id(p)] for p in groups[0]["params"])
    assert [g["use_muon"] for g in groups] == [True, False, False]
    assert muon and all(n.startswith("blocks.") and n.endswith(".weight") for n in muon)
    adamw_decayed = {names[id(p)] for p in groups[1]["params"]}
    assert {"wte.weight", "lm_head.weight"} <= adamw_decayed and not adamw_decayed & set(muon)
    assert all(p.dim() == 1 for p in groups[2]["params"]) and groups[2]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(task.model.parameters()))
    assert all("use_muon" not in g for g in task.param_groups(0.1))


def test_torch_and_triton_backends_take_the_same_first_step():
    tasks = [gpt_task(), gpt_task()]
    x = torch.randint(0, 24, (2, 8))
    opts = []
    for task, backend in zip(tasks, ("torch", "triton")):
        opt, clips = build_optimizer(resolve({"optimizer": backend}, "cpu"),
            "muon", task.param_groups(0.1, muon=True), lr=0.01, betas=(0.9, 0.95), eps=1e-8,
            weight_decay=0.1, nesterov=True, muon_momentum=0.9, max_grad_norm=1.0)
        assert isinstance(opt, (TorchMuon if backend == "torch" else kernels.Muon))
        assert clips is (backend == "triton")
        assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[1]["betas"] == (0.9, 0.95)
        opts.append(opt)
    for task, opt, clips in zip(tasks, opts, (False, True)):
        logits = task.model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        (100 * logits.float().square().mean()).backward()  # a gradient norm above the clip
        if not clips:
            assert torch.nn.utils.clip_grad_norm_(task.model.parameters(), 1.0) > 1.0
        opt.step()
    for p, q in zip(tasks[1].model.parameters(), tasks[0].model.parameters()):
        torch.testing.assert_close(p, q, rtol=FP32_RTOL, atol=FP32_RTOL * q.abs().max().item())


# torch.optim.Muon iterates in bf16 (8 significant bits) on every device, the engine in fp32 on CPU; five
# quintic iterations leave the singular values anywhere in about [0.7, 1.2], so the rounding moves a Muon
# matrix's step by 4-9% here (Frobenius norm of the difference over the step's): allowed up to 15%. The
# momentum buffers, AdamW's parameters and state are fp32 on both sides (FP32_RTOL).
BF16_STEP_RTOL = 0.15


def stepped(backend, untied=True, d_model=16, steps=2):
    """A GPT and the engine's Muon (``backend``) after ``steps`` steps, so both kinds of state are there."""
    task = gpt_task(untied=untied, d_model=d_model)
    opt, _ = build_optimizer(
        resolve({"optimizer": backend}, "cpu"), "muon", task.param_groups(0.1, muon=True), lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
        nesterov=True, muon_momentum=0.9)
    for step in range(steps):
        backward(task.model, seed=step)
        opt.step()
    return task.model, opt


def backward(model, seed):
    """Gradients of a squared-logits loss on the batch ``seed`` draws."""
    torch.manual_seed(seed)
    model.zero_grad()
    logits = model(torch.randint(0, 24, (2, 8)))
    (logits[0] if isinstance(logits, tuple) else logits).float().square().mean().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_state_loads_into_torch_muon_and_adamw_and_takes_the_same_next_step(backend):
    model, opt = stepped(backend)
    _, state = get_state_dict(model, opt)  # keyed by parameter names, as checkpoints hold it
    muon_sd, adamw_sd = torch_optimizer_states(state, model)
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    muon = torch.optim.Muon([{"params": [params[n] for n in g["param_names"]]} for g in muon_sd["param_groups"]])
    adamw = torch.optim.AdamW([{"params": [params[n] for n in g["param_names"]]}
                               for g in adamw_sd["param_groups"]])
    muon.load_state_dict(copy.deepcopy(muon_sd))  # torch keeps loaded tensors that need no cast: copies
    adamw.load_state_dict(copy.deepcopy(adamw_sd))
    assert muon.param_groups[0]["momentum"] == 0.9 and muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["eps"] == 1e-8
    names = {n for g in muon_sd["param_groups"] + adamw_sd["param_groups"] for n in g["param_names"]}
    assert names == set(params)
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    backward(model, seed=10)
    backward(twin, seed=10)
    opt.step()
    muon.step()
    adamw.step()
    ours = dict(model.named_parameters())
    muon_names = {n for g in muon_sd["param_groups"] for n in g["param_names"]}
    for n, p in params.items():
        theirs, mine = p.detach() - before[n], ours[n].detach() - before[n]
        if n in muon_names:
            assert (theirs - mine).norm() <= BF16_STEP_RTOL * mine.norm(), n
            torch.testing.assert_close(muon.state[p]["momentum_buffer"], opt.state[ours[n]]["momentum_buffer"],
                                       rtol=FP32_RTOL, atol=1e-7)
        else:
            torch.testing.assert_close(p, ours[n], rtol=FP32_RTOL, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(adamw.state[p][key], opt.state[ours[n]][key], rtol=FP32_RTOL, atol=1e-9)
            assert float(adamw.state[p]["step"]) == 3


def test_bad_state_is_refused_naming_the_parameter():
    model, opt = stepped("torch", steps=1)
    _, state = get_state_dict(model, opt)
    with pytest.raises(ValueError, match=r"blocks\.0\.\S+ has shape .* the model's parameter"):
        torch_optimizer_states(state, gpt_task(untied=True, d_model=32).model)  # another model
    with pytest.raises(ValueError, match=r"lm_head\.weight is not a parameter of the model"):
        torch_optimizer_states(state, gpt_task().model)  # tied embeddings: no lm_head.weight there
    with pytest.raises(ValueError, match=r"keyed by position"):
        torch_optimizer_states(opt.state_dict(), model)
    muon_name = next(g for g in state["param_groups"] if g["use_muon"])["params"][0]
    broken = copy.deepcopy(state)
    del broken["state"][muon_name]
    with pytest.raises(ValueError, match=rf"{muon_name} \(Muon\) has no state"):
        torch_optimizer_states(broken, model)
    broken = copy.deepcopy(state)
    del broken["state"]["wte.weight"]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"wte\.weight \(AdamW\) lacks exp_avg_sq"):
        torch_optimizer_states(broken, model)
    broken = copy.deepcopy(state)
    broken["param_groups"] = [g for g in broken["param_groups"] if g["use_muon"]]
    with pytest.raises(ValueError, match=r"no param group holds wte\.weight"):
        torch_optimizer_states(broken, model)
