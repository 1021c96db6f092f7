"""The CPU guard against oneDNN issue 6035: a channels_last strided 1x1 convolution with fewer input channels
than oneDNN's block corrupts the heap in its weight gradient (one thread) or gets that gradient wrong (more).

Whatever trains or runs a backward through such a convolution does so in a subprocess: a regression of the
guard aborts that process, and fails its test, instead of killing the test session.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tritonforge.engine.ops import select as op_select, table as op_table
from tritonforge.engine.config import load_recipe
from tritonforge.engine.tasks import build_task
from tritonforge.engine.tasks.vision import SubsampledConv2d, build_model, onednn_unsafe

ROOT = Path(__file__).resolve().parents[2]

#: A width-4 ResNet on 16x16 shapes: its stage-2 and stage-3 shortcuts are stride-2 1x1 convolutions from 4
#: and from 8 channels.
WIDTH_4 = ["--model.width=4", "--model.depths=1,1,1,1", "--model.image_size=16", "--data.num_images=200",
           "--data.val_fraction=0.1", "--train.batch_size=16", "--train.eval_every=0", "--train.eval_batches=1"]

GRADIENTS = """
import copy, sys
import torch
from engine.ops import select as op_select, table as op_table
from engine.config import load_recipe
from engine.tasks.vision import build_model, guard_onednn_convs

cfg = load_recipe(None, ["--data.source=shapes", *sys.argv[1:]]).model
torch.manual_seed(0)
reference = build_model(cfg, op_select.resolve({op: "torch" for op in op_table.op_names()}, "cpu"))
guarded = copy.deepcopy(reference).to(memory_format=torch.channels_last)
guard_onednn_convs(guarded)
x = torch.randn(8, 3, 16, 16)
for threads in (2, 1):
    torch.set_num_threads(threads)
    for model, inputs in ((reference, x), (guarded, x.contiguous(memory_format=torch.channels_last))):
        model.zero_grad()
        for _ in range(3):
            model(inputs).square().mean().backward()
    for (name, p), q in zip(reference.named_parameters(), guarded.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{threads} threads: {name}")
"""


def torch_ops():
    return op_select.resolve({op: "torch" for op in op_table.op_names()}, "cpu")


def python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_width_4_resnet_trains_with_one_thread(tmp_path):
    """`tritonforge train recipes/cnn_cpu.toml --model.width=4` (one intra-op thread) aborted in malloc."""
    proc = python("-m", "engine.train", str(ROOT / "recipes" / "cnn_cpu.toml"), *WIDTH_4, "--train.steps=3",
                  "--run.threads=1", f"--data.cache_dir={tmp_path / 'cache'}", f"--run.dir={tmp_path / 'run'}")
    assert "2 strided 1x1 convolution(s) with fewer than 16 input channels run at stride 1" in proc.stdout
    assert "done: 3 steps" in proc.stdout


def test_guarded_gradients_match_nchw():
    """Without the guard, two threads get the shortcuts' weight gradients wrong and one thread crashes."""
    python("-c", GRADIENTS, "--model.arch=resnet", "--model.width=4", "--model.depths=1,1,1,1")


@pytest.mark.parametrize("conv, unsafe", [
    (nn.Conv2d(4, 8, 1, stride=2), True),
    (nn.Conv2d(8, 16, 1, stride=2), True),  # safe with AVX2's block of 8, not with AVX-512's 16
    (nn.Conv2d(16, 32, 1, stride=2), False),
    (nn.Conv2d(4, 8, 1), False),  # stride 1: no gathered workspace
    (nn.Conv2d(4, 8, 1, stride=2, padding=1), False),  # another oneDNN kernel
    (nn.Conv2d(3, 16, 3, stride=2), False),
    (nn.Conv2d(4, 8, 2, stride=2), False),  # ConvNeXt's downsampling
    (nn.Linear(4, 8), False),
])
def test_which_convolutions_are_unsafe(conv, unsafe):
    assert onednn_unsafe(conv) == unsafe


def test_subsampled_convolution_is_the_strided_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 1, stride=2)
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():  # the forward is safe: only the weight gradient writes out of bounds
        expected = conv(x)
        conv.__class__ = SubsampledConv2d
        torch.testing.assert_close(conv(x), expected)


def test_task_subsamples_only_the_unsafe_convolutions(tmp_path, monkeypatch):
    """The task's CPU model runs its two small shortcuts at stride 1 on subsampled inputs; every other
    convolution is left as it was."""
    r = load_recipe(None, ["--model.arch=resnet", "--data.source=shapes", "--run.device=cpu", *WIDTH_4,
                           f"--data.cache_dir={tmp_path / 'cache'}"])
    lines = []
    task = build_task(r, torch_ops(), torch.device("cpu"), log=lines.append)
    assert sum("oneDNN issue 6035" in line for line in lines) == 1
    calls = {}
    conv2d = torch.nn.functional.conv2d

    def spy(x, weight, bias=None, stride=1, *args, **kwargs):
        calls[id(weight)] = stride
        return conv2d(x, weight, bias, stride, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    with torch.no_grad():
        task.model(task.batch(0, 0)[0])
    subsampled = {"stages.1.0.shortcut.0", "stages.2.0.shortcut.0"}
    for name, conv in task.model.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert (type(conv) is SubsampledConv2d) == (name in subsampled), name
            assert calls[id(conv.weight)] == (1 if name in subsampled else conv.stride), name


def test_default_width_is_left_alone():
    """recipes/cnn_cpu.toml's width 16 has no unsafe convolution: its runs are unchanged, bit for bit."""
    cfg = load_recipe(str(ROOT / "recipes" / "cnn_cpu.toml"), []).model
    with torch.device("meta"):
        model = build_model(cfg, torch_ops())
    assert not any(onednn_unsafe(m) for m in model.modules())
