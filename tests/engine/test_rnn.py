"""Recurrent language models: shapes, training, the carry_state sampler, and exact resume with a carried state."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonforge.engine import checkpoint
from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.data.text import StreamWindows
from tritonforge.engine.runlog import read_metrics
from tritonforge.engine.models.rnn import RNN, RNNConfig
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.train.trainer import Trainer
from support import Sink, tiny_corpus

OPS = resolve({}, "cpu")
SHAPES = [dict(cell="lstm"), dict(cell="gru"), dict(cell="lstm", hidden=24),
          dict(cell="gru", hidden=24, tie_embeddings=False)]
TINY = ["--model.arch=lstm", "--model.n_layer=2", "--model.d_model=16", "--model.hidden=24", "--model.dropout=0.1",
        "--train.seq_len=8", "--train.batch_size=3", "--train.grad_accum=2", "--train.eval_batches=1",
        "--train.eval_every=0", "--train.log_every=1", "--train.sample_tokens=4", "--optim.lr=1e-2",
        "--optim.warmup_steps=2", "--data.val_fraction=0.2", "--run.threads=1"]


@pytest.fixture
def data(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


def train_losses(run_dir) -> list[tuple]:
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [(m["kind"], m["step"], m.get("loss", m.get("val_loss"))) for m in records]


@pytest.mark.parametrize("opts", SHAPES, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o in SHAPES])
def test_forward_shapes_state_and_gradients(opts):
    torch.manual_seed(0)
    cfg = RNNConfig(**{**dict(n_layer=2, d_model=16, vocab_size=40, dropout=0.1), **opts})
    model = RNN(cfg, OPS)
    idx = torch.randint(0, 40, (3, 5))
    logits, state = model(idx)
    assert logits.shape == (3, 5, 40)
    assert [s.shape for s in state] == [(2, 3, cfg.state_dim)] * (2 if cfg.cell == "lstm" else 1)
    loss, _ = model(idx, torch.randint(0, 40, (3, 5)), state=state)
    if cfg.tied:
        assert abs(loss.item() - math.log(40)) < 0.1  # near uniform at init
        assert model.lm_head.weight is model.wte.weight
        assert (model.proj is not None) == (cfg.state_dim != cfg.d_model)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_state_carries_the_sequence():
    """Two halves run on the carried state give the whole sequence's logits."""
    torch.manual_seed(0)
    model = RNN(RNNConfig(cell="gru", n_layer=2, d_model=16, vocab_size=40), OPS).eval()
    idx = torch.randint(0, 40, (2, 9))
    whole, _ = model(idx)
    first, state = model(idx[:, :4])
    second, _ = model(idx[:, 4:], state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    assert model.generate(idx[:, :2], 5).shape == (2, 7)


def test_stream_windows_are_consecutive_per_row_and_restart_each_pass():
    tokens = np.arange(6 * 40, dtype=np.uint16)  # 6 rows of 40 tokens each (2 micro x 1 rank x 3)
    w = StreamWindows(tokens, seq_len=8, batch_size=3, grad_accum=2, seed=5)
    assert w.stream_len == 40 and w.windows_per_pass == 4
    for micro in range(2):
        x0, y0 = w.batch(0, micro)
        assert torch.equal(y0[:, :-1], x0[:, 1:])
        for step in range(1, 4):
            x1, _ = w.batch(step, micro)
            assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # each row goes on where its last window ended
            x0 = x1
        rows = (x0[:, 0] // 40).tolist()
        assert rows == [3 * micro, 3 * micro + 1, 3 * micro + 2]  # its own stream, never another row's
    assert [w.starts_pass(s) for s in range(9)] == [True, False, False, False] * 2 + [True]
    offsets = {int(w.batch(s, 0)[0][0, 0]) for s in (0, 4, 8, 12, 16)}
    assert len(offsets) > 1 and all(o < 8 for o in offsets)  # each pass starts at its own offset in [0, seq_len)
    two_ranks = StreamWindows(tokens, 8, 3, 1, 5, world=2)  # same rows at another split of the global batch
    assert torch.equal(two_ranks.batch(2, 0, rank=1)[0], w.batch(2, 1)[0])


def test_training_lowers_the_loss(data, tmp_path):
    r = load_recipe(None, TINY + data + [f"--run.dir={tmp_path}", "--train.steps=25", "--model.arch=gru",
                                         "--train.carry_state=true"])
    trainer = Trainer(r, stream=Sink())
    try:
        trainer.fit()
    finally:
        trainer.close()
    train = [loss for kind, _, loss in train_losses(tmp_path) if kind == "train"]
    assert np.mean(train[-5:]) < train[0] - 1.0


class Crash(Exception):
    """Stands for a kill: the run stops at once, saving nothing."""


def test_kill_and_resume_with_a_carried_state_is_bit_identical(data, tmp_path):
    common = TINY + data + ["--train.steps=7", "--checkpoint.every=3", "--train.carry_state=true",
                            "--train.sample_tokens=0"]

    def run(run_dir, *extra, patch=None):
        trainer = Trainer(load_recipe(None, common + [f"--run.dir={run_dir}", *extra]), stream=Sink())
        try:
            if patch is not None:
                patch(trainer)
            trainer.fit()
        finally:
            trainer.close()

    def crash_after_step_5(trainer):
        def on_step_end(step):
            if step == 5:
                raise Crash
        trainer.task.on_step_end = on_step_end

    run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", patch=crash_after_step_5)
    saved = checkpoint.load(tmp_path / "b" / "checkpoints" / "ckpt-00000003.pt")["task"]["carried"]
    assert [tuple(p.shape) for p in saved] == [(2, 6, 24)] * 2 and all(p.abs().sum() > 0 for p in saved)
    run(tmp_path / "b", "--checkpoint.resume=latest")
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [s for k, s, _ in b if k == "train"] == [1, 2, 3, 4, 5, 6, 7] and a == b
    final_a, final_b = (checkpoint.consolidate(d / "checkpoints" / "ckpt-00000007.pt")["model"]
                        for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.parametrize("args, message", [
    (["--parallel.strategy=fsdp"], "parallel.strategy = 'fsdp' does not shard model.arch = 'lstm'"),
    (["--model.arch=gpt", "--train.carry_state=true"], "train.carry_state needs a recurrent language model"),
    (["--model.hidden=-1"], "model.hidden must be >= 0, got -1"),
    (["--model.dropout=1.0"], "model.dropout must be in [0, 1), got 1.0"),
    (["--train.activation_checkpointing=every_2"],
     "train.activation_checkpointing = 'every_2': model.arch = 'lstm' has no residual blocks to checkpoint"),
])
def test_bad_recurrent_recipes_name_the_field(args, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, TINY + args)
    assert message in str(e.value)


def test_streams_too_short_for_carry_state_are_refused():
    with pytest.raises(RecipeError, match=r"train.carry_state: 100 training tokens cut into 12 streams"):
        StreamWindows(np.zeros(100, dtype=np.uint16), seq_len=8, batch_size=3, grad_accum=2, seed=0, world=2)


@pytest.mark.slow
def test_a_carried_state_saved_by_two_processes_resumes_in_one(data, tmp_path):
    """DDP under torchrun: the ranks gather their rows' state into the checkpoint; one process resumes it."""
    root = Path(__file__).resolve().parents[2]
    args = TINY + data + ["--train.carry_state=true", "--train.sample_tokens=0", "--train.grad_accum=1",
                          "--model.dropout=0",  # dropout masks depend on the world size
                          "--run.device=cpu", "--train.time_budget="]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def train(*extra, nproc=1):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        recipe = str(root / "recipes" / "lstm_cpu.toml")
        proc = subprocess.run([*launch, "-m", "engine.train", recipe, *args, *extra], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    train("--train.batch_size=4", "--train.steps=6", f"--run.dir={tmp_path / 'one'}")
    train("--train.batch_size=2", "--train.steps=3", f"--run.dir={tmp_path / 'two'}", nproc=2)
    train("--train.batch_size=4", "--train.steps=6", f"--run.dir={tmp_path / 'two'}", "--checkpoint.resume=latest")
    one, two = ([loss for kind, _, loss in train_losses(tmp_path / d) if kind == "train"] for d in ("one", "two"))
    assert len(two) == 6 and two == pytest.approx(one, rel=1e-5, abs=1e-6)
