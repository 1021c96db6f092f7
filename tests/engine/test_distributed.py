"""torchrun on CPU with gloo: DDP and FSDP2 match a single process, with AdamW and with Muon (both backends);
checkpoints move between world sizes; activation checkpointing leaves both strategies' losses unchanged.

Every run here is a real ``torchrun --nproc_per_node=2 -m engine.train`` (or a single ``python -m
engine.train``) on a tiny GPT, compared through the per-step losses in ``metrics.jsonl``.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonforge.engine import checkpoint
from tritonforge.engine.optim.muon import torch_optimizer_states

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "gpt_cpu.toml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    f = folder / "corpus.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"sample {i}: the quick brown fox jumps over the lazy dog. " * 6})
                           for i in range(300)))
    return folder


def common(corpus: Path, steps: int) -> list[str]:
    return ["--model.n_layer=2", "--model.d_model=32", "--model.n_head=2", "--model.context=32",
            "--train.seq_len=32", "--train.eval_batches=2", "--train.sample_tokens=0", "--train.log_every=1",
            "--train.eval_every=0", f"--train.steps={steps}", "--train.time_budget=", "--optim.name=adamw",
            "--run.threads=1", "--run.device=cpu",
            f"--data.source={corpus / 'corpus.jsonl'}", f"--data.cache_dir={corpus / 'cache'}",
            "--data.val_fraction=0.1", "--optim.lr=1e-2", "--optim.warmup_steps=2"]


def run(args: list[str], nproc: int = 1, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1 and launcher is None:
        cmd = [sys.executable, "-m", "engine.train", RECIPE, *args]
    else:
        cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *(launcher or []),
               "-m", "engine.train", RECIPE, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, tmp_path, strategy):
    """Global batch 8 as 1×8, and as 2 processes × 2 micro-batches × 2 (accumulation skips the sync)."""
    single = tmp_path / "single"
    run(common(corpus, 5) + ["--train.batch_size=8", f"--run.dir={single}"])
    multi = tmp_path / "multi"
    run(common(corpus, 5) + ["--train.batch_size=2", "--train.grad_accum=2", f"--parallel.strategy={strategy}",
                             f"--run.dir={multi}"], nproc=2)
    assert_same_losses(losses(single), losses(multi), range(1, 6))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_at_another_world_size(corpus, tmp_path, strategy):
    """Save at world size 2, resume at 1 — and the reverse — and the losses continue unchanged."""
    args = common(corpus, 6) + ["--train.batch_size=2", "--checkpoint.every=3", "--checkpoint.keep=5"]
    single_args = common(corpus, 6) + ["--train.batch_size=4", "--checkpoint.every=3", "--checkpoint.keep=5"]
    two = tmp_path / "two"
    run(args + [f"--parallel.strategy={strategy}", f"--run.dir={two}"], nproc=2)
    one = tmp_path / "one"
    run(single_args + [f"--run.dir={one}"])
    assert_same_losses(losses(two), losses(one), range(1, 7))

    # 2 -> 1: keep only the step-3 checkpoint of the two-process run, resume it in one process.
    two_to_one = tmp_path / "two_to_one"
    _copy_until(two, two_to_one, step=3)
    run(single_args + [f"--run.dir={two_to_one}", "--checkpoint.resume=latest"])
    assert_same_losses(losses(two_to_one), losses(one), range(4, 7))

    # 1 -> 2.
    one_to_two = tmp_path / "one_to_two"
    _copy_until(one, one_to_two, step=3)
    run(args + [f"--parallel.strategy={strategy}", f"--run.dir={one_to_two}", "--checkpoint.resume=latest"], nproc=2)
    assert_same_losses(losses(one_to_two), losses(two), range(4, 7))


def test_muon_under_ddp_matches_one_process_and_resumes_in_one(corpus, tmp_path):
    """optim.name = "muon": two DDP processes, sharing the iterations, take one process's steps, and their
    checkpoint resumes there."""
    muon = ["--optim.name=muon", "--checkpoint.every=3", "--checkpoint.keep=5"]
    single = tmp_path / "single"
    run(common(corpus, 5) + muon + ["--train.batch_size=8", f"--run.dir={single}"])
    multi = tmp_path / "multi"
    proc = run(common(corpus, 5) + muon + ["--train.batch_size=2", "--train.grad_accum=2",
                                           "--parallel.strategy=ddp", f"--run.dir={multi}"], nproc=2)
    assert "Newton-Schulz shared over 2 ranks (DDP replicas" in proc.stdout
    assert_same_losses(losses(single), losses(multi), range(1, 6))
    resumed = tmp_path / "resumed"
    _copy_until(multi, resumed, step=3)
    run(common(corpus, 5) + muon + ["--train.batch_size=8", f"--run.dir={resumed}", "--checkpoint.resume=latest"])
    assert_same_losses(losses(resumed), losses(single), range(4, 6))


MUON_STEPS = 20
# Muon for the tiny GPT's block matrices (one block); the Triton backend runs through the interpreter.
MUON = ["--optim.name=muon", "--model.n_layer=1", "--train.final_eval_tokens=0"]


def test_muon_under_fsdp_matches_one_process_and_resumes_at_any_world_size(corpus, tmp_path):
    """Global batch 8 as 1x8, and as 2 FSDP2 processes x 2 micro-batches x 2, for 20 steps; the FSDP2 run's
    step-3 checkpoint resumes in 2 processes (bit for bit) and in 1, a one-process checkpoint resumes under
    FSDP2, and the checkpoint consolidates to torch.optim.Muon's state."""
    args = common(corpus, MUON_STEPS) + MUON + ["--kernels.optimizer=torch", "--checkpoint.every=3",
                                                "--checkpoint.keep=10"]
    two_args = args + ["--train.batch_size=2", "--train.grad_accum=2", "--parallel.strategy=fsdp"]
    one_args = args + ["--train.batch_size=8"]
    proc = run(two_args + [f"--run.dir={tmp_path / 'two'}"], nproc=2)
    assert "Newton-Schulz shared over 2 ranks (FSDP2 shards" in proc.stdout
    run(one_args + [f"--run.dir={tmp_path / 'one'}"])
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert_same_losses(two, one, range(1, MUON_STEPS + 1))
    for src, dst, resume_args, nproc in [("two", "two_again", two_args, 2), ("two", "two_to_one", one_args, 1),
                                         ("one", "one_to_two", two_args, 2)]:
        _copy_until(tmp_path / src, tmp_path / dst, step=3)
        run(resume_args + [f"--run.dir={tmp_path / dst}", "--checkpoint.resume=latest"], nproc=nproc)
    later = range(4, MUON_STEPS + 1)
    assert {s: two[s] for s in later} == losses(tmp_path / "two_again")
    assert_same_losses(losses(tmp_path / "two_to_one"), one, later)
    assert_same_losses(losses(tmp_path / "one_to_two"), two, later)
    assert_consolidates_to_torch_muon(tmp_path / "two" / "checkpoints")


@pytest.fixture(scope="module")
def triton_muon_one_process(corpus, tmp_path_factory):
    """One process's losses with the Triton Muon (through the interpreter): the reference of both FSDP2 runs."""
    run_dir = tmp_path_factory.mktemp("triton_one")
    run(common(corpus, MUON_STEPS) + MUON + ["--kernels.optimizer=triton", "--train.batch_size=8",
                                             f"--run.dir={run_dir}"])
    return losses(run_dir)


def test_muon_under_fsdp_matches_one_process_with_triton_kernels(corpus, tmp_path, triton_muon_one_process):
    """The same with the Triton optimizer (through the interpreter): its stacks hold each rank's rows."""
    args = common(corpus, MUON_STEPS) + MUON + ["--kernels.optimizer=triton"]
    run(args + ["--train.batch_size=2", "--train.grad_accum=2", "--parallel.strategy=fsdp",
                f"--run.dir={tmp_path / 'fsdp'}"], nproc=2)
    assert_same_losses(triton_muon_one_process, losses(tmp_path / "fsdp"), range(1, MUON_STEPS + 1))


def test_muon_under_fsdp_at_four_processes_matches_one_with_triton_kernels(corpus, tmp_path,
                                                                           triton_muon_one_process):
    """4 FSDP2 processes x 2 micro-batches x 1 with the Triton optimizer: each rank's stacks hold a quarter of
    every matrix's rows (8 of the 32-row ones), and the shared iterations gather them whole on their owner."""
    args = common(corpus, MUON_STEPS) + MUON + ["--kernels.optimizer=triton"]
    proc = run(args + ["--train.batch_size=1", "--train.grad_accum=2", "--parallel.strategy=fsdp",
                       f"--run.dir={tmp_path / 'fsdp'}"], nproc=4)
    assert "Newton-Schulz shared over 4 ranks (FSDP2 shards" in proc.stdout
    assert_same_losses(triton_muon_one_process, losses(tmp_path / "fsdp"), range(1, MUON_STEPS + 1))


def test_muon_under_fsdp_at_four_processes_matches_one(corpus, tmp_path):
    """Global batch 8 as 4 FSDP2 processes x 2 micro-batches x 1: the 32-row matrices split 8 rows a rank."""
    args = common(corpus, MUON_STEPS) + MUON + ["--kernels.optimizer=torch"]
    run(args + ["--train.batch_size=8", f"--run.dir={tmp_path / 'one'}"])
    run(args + ["--train.batch_size=1", "--train.grad_accum=2", "--parallel.strategy=fsdp",
                f"--run.dir={tmp_path / 'fsdp'}"], nproc=4)
    assert_same_losses(losses(tmp_path / "one"), losses(tmp_path / "fsdp"), range(1, MUON_STEPS + 1))


def assert_consolidates_to_torch_muon(folder):
    """The whole momentum buffers of the Muon matrices load into a torch.optim.Muon over them."""
    optim = checkpoint.consolidate(folder)["optimizer"]
    muon_group = next(g for g in optim["param_groups"] if g["use_muon"])
    names = muon_group["params"]
    assert names and all(set(optim["state"][n]) == {"momentum_buffer"} for n in names)
    matrices = [torch.zeros_like(optim["state"][n]["momentum_buffer"]) for n in names]
    assert all(m.shape[0] == 32 or m.shape[1] == 32 for m in matrices)  # whole, not a shard's rows
    reference = torch.optim.Muon(matrices)
    group = {k: v for k, v in muon_group.items() if k in reference.param_groups[0]}
    reference.load_state_dict({"state": {i: optim["state"][n] for i, n in enumerate(names)},
                               "param_groups": [{**group, "params": list(range(len(names)))}]})
    for p, n in zip(matrices, names):
        assert torch.equal(reference.state[p]["momentum_buffer"], optim["state"][n]["momentum_buffer"])
    assert_converts_to_torch_optimizers(checkpoint.consolidate(folder))


def assert_converts_to_torch_optimizers(consolidated):
    """torch_optimizer_states splits the consolidated FSDP2 state into torch.optim.Muon's and AdamW's."""
    model, optim = consolidated["model"], consolidated["optimizer"]
    muon_sd, adamw_sd = torch_optimizer_states(optim, model)
    params = {n: torch.zeros_like(t) for n, t in model.items()}
    for cls, sd in ((torch.optim.Muon, muon_sd), (torch.optim.AdamW, adamw_sd)):
        opt = cls([{"params": [params[n] for n in g["param_names"]]} for g in sd["param_groups"]])
        opt.load_state_dict(sd)
        for g in opt.param_groups:
            for p, n in zip(g["params"], g["param_names"]):
                assert all(torch.equal(opt.state[p][k], optim["state"][n][k]) for k in opt.state[p]), n
    converted = [n for sd in (muon_sd, adamw_sd) for g in sd["param_groups"] for n in g["param_names"]]
    assert sorted(converted) == sorted(n for g in optim["param_groups"] for n in g["params"])


# torchrun sets PYTHONUNBUFFERED, so each piece of a print() is its own write and two ranks printing at once
# interleave their pieces; a line written with one write() of under 4 KB reaches the pipe whole.
COUNTING = """
import os, sys
import torch
from tritonforge.engine import distributed
from tritonforge.engine.models import recompute, gpt
forwards = [0]
block_forward = gpt.Block.forward
def forward(self, *args):
    forwards[0] += torch.is_grad_enabled()  # training forwards, and a checkpoint's recomputation in the backward
    return block_forward(self, *args)
gpt.Block.forward = forward
real_wrap = distributed.wrap
def wrap(model, recipe, device, *rest, **options):
    model = real_wrap(model, recipe, device, *rest, **options)
    blocks = getattr(model, "module", model).blocks
    names = ",".join(type(b).__name__ for b in blocks)
    sys.stdout.write(f"wrapped blocks: {names} {recompute.checkpointed_blocks(model)}\\n")
    return model
distributed.wrap = wrap
from tritonforge.engine.cli import train_main
code = train_main(sys.argv[1:])
sys.stdout.write(f"rank {os.environ['RANK']}: {forwards[0]} block forwards with grad\\n")
sys.exit(code)
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activation_checkpointing_under_two_processes(corpus, tmp_path, strategy):
    """Two processes with train.activation_checkpointing = "blocks" take the same steps as without it, bit for
    bit (dropout on: the recomputation replays its masks), and the blocks really recompute: after wrapping
    (FSDP2 subclasses each block again) both blocks are still checkpointed, and every training forward of a
    block runs twice."""
    script = tmp_path / "count_forwards.py"
    script.write_text(COUNTING)
    steps, accum, layers = 3, 2, 2
    args = common(corpus, steps) + ["--model.dropout=0.1", "--train.batch_size=2", f"--train.grad_accum={accum}",
                                    f"--parallel.strategy={strategy}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = {}
    for policy in ("none", "blocks"):
        proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), RECIPE, *args,
                               f"--train.activation_checkpointing={policy}", f"--run.dir={tmp_path / policy}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[policy] = proc
    wrapped = "FSDPCheckpointedBlock,FSDPCheckpointedBlock 2" if strategy == "fsdp" else \
        "CheckpointedBlock,CheckpointedBlock 2"
    assert f"wrapped blocks: {wrapped}" in out["blocks"].stdout
    assert "2 of 2 residual blocks recompute" in out["blocks"].stdout
    for rank in (0, 1):
        assert f"rank {rank}: {steps * accum * layers} block forwards with grad" in out["none"].stdout
        assert f"rank {rank}: {2 * steps * accum * layers} block forwards with grad" in out["blocks"].stdout
    plain, checkpointed = losses(tmp_path / "none"), losses(tmp_path / "blocks")
    assert plain.keys() == checkpointed.keys() == set(range(1, steps + 1))
    assert plain == checkpointed  # the recomputation replays the forward exactly: bit for bit


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src`` as it was right after the checkpoint of ``step`` (later checkpoints dropped)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        digits = "".join(c for c in ckpt.name if c.isdigit())
        if digits and int(digits) > step:
            shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    (dst / "metrics.jsonl").unlink()


CRASHER = """
import os, sys
from tritonforge.engine.train import trainer
real = trainer.Trainer.train_step
def train_step(self, step):
    if step == 4 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
        os._exit(3)  # a worker dies mid-run on the first attempt
    return real(self, step)
trainer.Trainer.train_step = train_step
from tritonforge.engine.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


def test_a_dead_worker_restarts_from_the_last_checkpoint(corpus, tmp_path):
    script = tmp_path / "crash_once.py"
    script.write_text(CRASHER)
    out = tmp_path / "restarted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = common(corpus, 6) + ["--train.batch_size=2", "--checkpoint.every=2", f"--run.dir={out}"]
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", str(script),
                           RECIPE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    reference = tmp_path / "reference"
    run(common(corpus, 6) + ["--train.batch_size=4", f"--run.dir={reference}"])
    restarted = losses(out)
    assert_same_losses(restarted, losses(reference), range(1, 7))
