"""Muon's Newton-Schulz iterations shared over ranks (engine.optim.sharing): owners, layouts, and the shared
step's exactness at three ranks. Whole training runs under torchrun are in test_distributed.py."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from tritonforge.engine.optim.sharing import MuonSharing, MuonShardingError, assign_owners, newton_schulz_flops, shard_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_shard_sizes_follow_torch_chunk():
    for size in (1, 5, 7, 16):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(size).chunk(world)  # fewer than world when the last ranks get nothing
            assert shard_sizes(size, world) == [len(c) for c in chunks] + [0] * (world - len(chunks))


def test_owners_balance_iteration_flops_in_parameter_order():
    """Largest first to the least-loaded rank: the 64x64 alone on one rank, the four 32x32 on the other
    (1/8 of its cost each); equal costs fall to the lowest rank, so every process derives the same owners."""
    shapes = [(32, 32), (64, 64), (32, 32), (32, 32), (32, 32)]
    assert assign_owners([newton_schulz_flops(s, 5) for s in shapes], world=2) == [1, 0, 1, 1, 1]
    assert assign_owners([1.0, 1.0, 1.0], world=2) == [0, 1, 0]


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_unsupported_layouts_name_the_parameter(world_of_one):
    mesh = init_device_mesh("cpu", (1, 1))
    both = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0), Shard(1)])
    tensor_parallel = distribute_tensor(torch.randn(4, 6), mesh, [Replicate(), Shard(1)])
    names = {id(both): "blocks.0.attn.qkv.weight", id(tensor_parallel): "blocks.0.mlp.fc.weight"}
    sharing = MuonSharing(names=names)
    with pytest.raises(MuonShardingError, match=r"blocks\.0\.attn\.qkv\.weight: sharded along both dimensions"):
        sharing.check([both])
    with pytest.raises(MuonShardingError, match=r"blocks\.0\.mlp\.fc\.weight: on a 2-D device mesh .*tensor "
                                                r"parallelism is not supported"):
        sharing.check([tensor_parallel])


EXACT = """
import torch, torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
from tritonforge.engine.distributed import cleanup
from tritonforge.engine.optim.sharing import MuonSharing
from tritonforge.engine.optim.muon import NS_COEFFICIENTS, newton_schulz_stack_
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
shapes = [(7, 5), (5, 9), (16, 16), (3, 20), (1, 4), (16, 16)]  # uneven and empty shards, one shared shape
whole = [torch.randn(s) for s in shapes]
settings = [(NS_COEFFICIENTS, 5, 1e-7)] * len(shapes)
expected = []
for u in whole:
    x = u.clone()[None]
    newton_schulz_stack_(x, *settings[0])
    expected.append(x[0])
sharded = [distribute_tensor(u.clone(), mesh, [Shard(i % 2)]) for i, u in enumerate(whole)]
updates = [p.to_local().clone() for p in sharded]
MuonSharing()(sharded, updates, settings, newton_schulz_stack_)
for p, u, x in zip(sharded, updates, expected):
    assert torch.equal(u, distribute_tensor(x, mesh, p.placements).to_local()), p.shape
updates = [u.clone() for u in whole]
MuonSharing(dist.group.WORLD)(whole, updates, settings, newton_schulz_stack_)
assert all(torch.equal(u, x) for u, x in zip(updates, expected))
sys.stdout.write(f"exact {dist.get_rank()}\\n")  # one write: the ranks share the pipe
sys.stdout.flush()
# the engine's own teardown: a barrier (no rank leaves while another is still in a collective) and the
# mesh and DTensors freed before the group
del mesh, sharded
cleanup()
"""


@pytest.mark.slow
def test_shared_iterations_are_exact_at_three_ranks(tmp_path):
    """Three ranks, shards along either dimension, rows that do not divide (one rank holds none): every
    rank's part of X is bit for bit the slice of one process's X; replicated (DDP) matrices likewise."""
    script = tmp_path / "exact.py"
    script.write_text("import sys, types\nsys.modules['tritonforge'] = types.ModuleType('tritonforge')\n"
                      f"sys.modules['tritonforge'].__path__ = [{str(ROOT)!r}]\n" + EXACT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=3", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(proc.stdout.split("\n"))[-3:] == ["exact 0", "exact 1", "exact 2"]
