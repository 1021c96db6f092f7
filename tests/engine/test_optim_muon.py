"""optim.name = "muon" through the registry: the GPT's parameter split and both backends' first steps.

The float64 checks of the optimizer itself are in tests/kernels/test_muon.py.
"""
import torch

from tritonforge import kernels
from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.optim.muon import TorchMuon
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.tasks import Task
from tritonforge.engine.optim.build import build_optimizer

FP32_RTOL = 1e-5  # interpreted kernels vs the torch backend, both iterating in fp32 on CPU


def gpt_task(untied=False):
    torch.manual_seed(0)
    task = Task()
    task.model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab_size=24,
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
