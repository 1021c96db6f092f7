"""``parallel.sync_bn``: BatchNorm statistics over the global batch under DDP.

torch's SyncBatchNorm synchronizes CUDA tensors only, so on CPUs a run of several processes that asks for it
stops before any work, naming the field; in a world of one there is nothing to synchronize. The conversion
keeps every parameter and buffer under its name, so the checkpoints of a synchronized run load in a run
without it (resume, ``train.init_from``). That two GPU processes with synchronized BatchNorm compute what one
process computes on the whole batch needs two GPUs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonforge.engine import distributed
from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.train.trainer import Trainer
from support import Sink

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.arch=resnet", "--model.width=8", "--model.depths=1,1,1,1", "--model.num_classes=8",
        "--data.source=shapes-b", "--data.num_images=400", "--data.val_fraction=0.1", "--train.task=simclr",
        "--train.batch_size=8", "--train.eval_batches=2", "--train.eval_every=0", "--train.log_every=1",
        "--train.sample_tokens=0", "--train.grad_clip=0", "--optim.warmup_steps=1", "--run.threads=1",
        "--run.device=cpu", "--ssl.knn_bank=32", "--ssl.probe_epochs=0", "--parallel.sync_bn=true"]


def tiny(tmp_path, name, *extra):
    return load_recipe(None, TINY + [f"--data.cache_dir={tmp_path / 'cache'}", f"--run.dir={tmp_path / name}", *extra])


def fit(trainer: Trainer) -> dict:
    try:
        return trainer.fit()
    finally:
        trainer.close()


def losses(run_dir: Path) -> list[float]:
    import json

    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_several_cpu_processes_stop_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "init", lambda device_type: distributed.DistInfo(rank=0, world=2))
    with pytest.raises(RecipeError, match=r"parallel\.sync_bn: torch's SyncBatchNorm synchronizes CUDA tensors "
                                          r"only, and this run has 2 processes on cpu"):
        Trainer(tiny(tmp_path, "run"), stream=Sink())
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # before the data
    recipe = tiny(tmp_path, "run")
    distributed.check_sync_bn(recipe, torch.device("cuda", 1), 2)  # where it runs
    distributed.check_sync_bn(recipe, torch.device("cpu"), 1)  # nothing to synchronize


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(RecipeError, match=r"parallel\.sync_bn synchronizes BatchNorm layers; model\.arch = 'gpt'"):
        load_recipe(None, ["--model.arch=gpt", "--parallel.sync_bn=true"])


def test_synchronized_layers_keep_their_names_and_checkpoints_load_without_them(tmp_path):
    """A run whose BatchNorm layers are SyncBatchNorm (as under DDP with parallel.sync_bn) in a world of one:
    the same names, the same losses as BatchNorm, and its checkpoint resumes and starts a classifier in plain
    runs."""
    plain = Trainer(tiny(tmp_path, "plain", "--train.steps=2"), stream=Sink())
    fit(plain)
    synced = Trainer(tiny(tmp_path, "synced", "--train.steps=2"), stream=Sink())
    model, lines = synced.task.model, []
    names = {k: v.shape for k, v in model.state_dict().items()}
    batchnorms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert distributed.sync_batchnorm(model, log=lines.append) is model
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == batchnorms >= 6
    assert isinstance(model.projector[1], torch.nn.SyncBatchNorm)  # the head's BatchNorm1d too
    assert lines == [f"parallel.sync_bn: {batchnorms} BatchNorm layer(s) synchronized over 1 processes"]
    assert {k: v.shape for k, v in model.state_dict().items()} == names
    fit(synced)
    assert losses(tmp_path / "synced") == losses(tmp_path / "plain")  # out of a process group: BatchNorm

    resumed = Trainer(tiny(tmp_path, "synced", "--train.steps=3", "--checkpoint.resume=latest"), stream=Sink())
    assert resumed.step == 2 and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in resumed.task.model.modules())
    fit(resumed)
    classify = load_recipe(None, [a for a in TINY if not a.startswith(("--train.task", "--ssl."))] + [
        f"--data.cache_dir={tmp_path / 'cache'}", f"--run.dir={tmp_path / 'ft'}", "--train.steps=1",
        f"--train.init_from={tmp_path / 'synced'}"])
    fit(Trainer(classify, stream=Sink()))  # train.init_strict: every backbone name matched


@pytest.mark.slow
def test_torchrun_on_cpu_stops_before_any_work(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engine.train",
           str(ROOT / "recipes" / "cnn_cpu.toml"), "--parallel.sync_bn=true", f"--run.dir={tmp_path / 'run'}",
           f"--data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "error: parallel.sync_bn: torch's SyncBatchNorm" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


SYNC_WORKER = """
import os, sys, types
pkg = types.ModuleType("tritonforge"); pkg.__path__ = [sys.argv[1]]; sys.modules["tritonforge"] = pkg
import copy
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tritonforge.engine import distributed
from tritonforge.engine.config import load_recipe
from tritonforge.engine.ops import select as op_select
from tritonforge.engine.tasks.ssl import PretrainingModel, strip_head
from tritonforge.engine.tasks.vision import build_model

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(device)
dist.init_process_group("nccl")
r = load_recipe(None, ["--model.arch=resnet", "--model.width=8", "--model.depths=1,1,1,1", "--data.source=shapes",
                       "--train.task=simclr"])
torch.manual_seed(0)
backbone = build_model(r.model, op_select.resolve({}, device))
whole = PretrainingModel(backbone, strip_head(backbone), "simclr", r.ssl).to(device, memory_format=torch.channels_last)
part = distributed.sync_batchnorm(copy.deepcopy(whole))
ddp = DistributedDataParallel(part, device_ids=[device.index])
x = torch.randn(16, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)  # the same everywhere
w = torch.randn(16, r.ssl.proj_dim, device=device)
rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
out_whole = whole(x)
(out_whole * w).sum().div(world).backward()  # DDP averages the processes' gradients
out_part = ddp(x[rows])
(out_part * w[rows]).sum().backward()
torch.testing.assert_close(out_part, out_whole[rows], rtol=1e-5, atol=1e-5)
for (name, a), b in zip(part.named_parameters(), whole.parameters()):
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
for (name, a), b in zip(part.named_buffers(), whole.buffers()):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
distributed.cleanup()  # the engine's teardown: a barrier first
print("match")
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_two_gpu_processes_match_one_on_the_whole_batch(tmp_path):
    """Under DDP with synchronized BatchNorm, each of 2 processes holding half the batch gets the outputs, the
    gradients (averaged by DDP) and the running statistics of one process holding the whole batch."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    script = tmp_path / "worker.py"
    script.write_text(SYNC_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(ROOT)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.count("match") == 2, done.stdout[-3000:] + done.stderr[-3000:]
