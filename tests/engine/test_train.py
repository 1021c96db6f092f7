"""Short end-to-end training runs on CPU: the loss falls; fp16 overflow steps are skipped."""
import json
import sys
from pathlib import Path

import pytest
import torch

from tritonforge import engine
from tritonforge import kernels

from tritonforge.engine.config import load_recipe
from tritonforge.engine.precision import LossScaler
from tritonforge.engine.optim.muon import TorchMuon
from tritonforge.engine.optim.schedule import lr_at
from tritonforge.engine.train.step import masked_step
from tritonforge.engine.train.trainer import Trainer
from support import Sink

TINY = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--model.context=32", "--train.seq_len=32",
        "--train.batch_size=8", "--train.eval_batches=2", "--train.sample_tokens=8", "--run.name=t"]


def tiny_recipe(tmp_path, *extra):
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        docs = (f"the quick brown fox number {i} jumps over the lazy dog. " * 8 for i in range(300))
        corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return load_recipe(None, TINY + [f"--data.source={corpus}", f"--data.cache_dir={tmp_path / 'cache'}",
                                     f"--run.dir={tmp_path / 'run'}", "--data.val_fraction=0.1", *extra])


def quiet(*_a, **_k):
    pass


def test_loss_falls(tmp_path):
    r = tiny_recipe(tmp_path, "--train.steps=40", "--train.eval_every=0", "--optim.lr=3e-3", "--optim.warmup_steps=5",
                    "--train.log_every=5")
    sink = Sink()
    trainer = Trainer(r, stream=sink)
    first = trainer.task.evaluate(trainer.model)["val_loss"]
    summary = trainer.fit()
    trainer.close()
    assert summary["val_loss"] < first - 1.0, (first, summary)
    text = sink.text
    assert "kernels: attention=torch" in text and "sample:" in text and "\x1b" not in text and "\r" not in text


def test_grad_accum_matches_one_big_batch(tmp_path):
    """Accumulating 2 micro-batches of 4 gives the update of one batch of 8 with the same windows."""
    a = Trainer(tiny_recipe(tmp_path, "--train.steps=1", "--train.batch_size=8", "--train.grad_clip=0"), stream=Sink())
    b = Trainer(tiny_recipe(tmp_path, "--train.steps=1", "--train.batch_size=4", "--train.grad_accum=2",
                            "--train.grad_clip=0", f"--run.dir={tmp_path / 'run2'}"), stream=Sink())
    b.task.model.load_state_dict(a.task.model.state_dict())
    a.train_step(0)
    b.train_step(0)
    for pa, pb in zip(a.task.model.parameters(), b.task.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    a.close()
    b.close()


def test_loss_scaler_backs_off_and_grows():
    s = LossScaler(torch.device("cpu"), enabled=True, init_scale=1024.0, growth_interval=2)
    s.update(torch.tensor(1.0))
    assert s.scale.item() == 512.0
    s.update(torch.tensor(0.0))
    s.update(torch.tensor(0.0))
    assert s.scale.item() == 1024.0
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1024.0, float("inf")])
    assert s.unscale_([p]).item() == 1.0


def test_fp16_overflow_step_is_skipped(tmp_path):
    r = tiny_recipe(tmp_path, "--train.precision=fp16", "--train.steps=4", "--train.eval_every=0", "--train.grad_clip=1.0")
    trainer = Trainer(r, stream=Sink())
    real_loss = trainer.task.loss

    def loss_with_overflow_at_step_1(model, x, y):
        loss = real_loss(model, x, y)
        return loss * 1e34 if trainer.step == 1 else loss  # ×65536 loss scale → inf gradients

    trainer.task.loss = loss_with_overflow_at_step_1
    trainer.train_step(0)
    trainer.step = 1
    before = [p.detach().clone() for p in trainer.task.model.parameters()]
    scale = trainer.scaler.scale.item()
    out = trainer.train_step(1)
    assert out.scaler_skip and not out.bad
    assert trainer.scaler.scale.item() == scale / 2
    for p, q in zip(trainer.task.model.parameters(), before):
        assert torch.equal(p, q)
    trainer.step = 2
    out = trainer.train_step(2)
    assert not out.scaler_skip
    assert any(not torch.equal(p, q) for p, q in zip(trainer.task.model.parameters(), before))
    trainer.close()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_loss_with_finite_gradients_skips_the_update(tmp_path, backend):
    """A non-finite loss whose gradients are finite (an out-of-range target on CUDA does this: its loss is NaN
    and its gradient is not) is a bad step: the log says the update was skipped, and no optimizer applies it,
    the fused Triton one included; the next step updates again."""
    r = tiny_recipe(tmp_path, "--train.steps=4", "--train.eval_every=0", "--train.grad_clip=1.0",
                    f"--kernels.optimizer={backend}")
    trainer = Trainer(r, stream=Sink())
    real_loss = trainer.task.loss

    def nan_loss_at_step_1(model, x, y):
        loss = real_loss(model, x, y)
        return loss + float("nan") if trainer.step == 1 else loss  # the gradient of a constant is zero

    trainer.task.loss = nan_loss_at_step_1
    trainer.train_step(0)
    trainer.step = 1
    before = [p.detach().clone() for p in trainer.task.model.parameters()]
    state_before = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                    for s in trainer.optimizer.state.values()]
    out = trainer.train_step(1)
    assert out.bad and not out.scaler_skip
    for p, q in zip(trainer.task.model.parameters(), before):
        assert torch.equal(p, q)
    for state, old in zip(trainer.optimizer.state.values(), state_before):
        for key, value in old.items():
            assert torch.equal(state[key], value), key
    trainer.step = 2
    assert not trainer.train_step(2).bad
    assert any(not torch.equal(p, q) for p, q in zip(trainer.task.model.parameters(), before))
    trainer.close()


def test_schedules(tmp_path):
    r = tiny_recipe(tmp_path, "--train.steps=100", "--optim.lr=1.0", "--optim.min_lr=0.1", "--optim.warmup_steps=10")
    assert lr_at(0, r) == 0.1 and lr_at(9, r) == 1.0
    assert abs(lr_at(99, r) - 0.1) < 1e-3 and lr_at(50, r) < lr_at(20, r)
    r.optim.schedule = "constant"
    assert lr_at(99, r) == 1.0
    r.optim.schedule = "onecycle"
    assert lr_at(10, r) == 1.0 and abs(lr_at(99, r) - 0.1) < 1e-9
    r.optim.schedule, r.optim.cooldown = "wsd", 0.4  # flat to step 60, then 40 steps down toward min_lr
    assert lr_at(10, r) == lr_at(60, r) == 1.0 and lr_at(61, r) < 1.0
    assert abs(lr_at(99, r) - (0.1 + 0.9 / 40)) < 1e-9


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def test_a_masked_step_applies_the_update_bit_for_bit_or_leaves_everything_as_it_was():
    """Muon (and AdamW in its other group) through the trainer's masked step: a good step is the plain step's
    bits, a bad one (NaN gradients) changes no parameter or state, a skipped first step leaves fresh state."""
    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
        return params, TorchMuon([{"params": params[:1]}, {"params": params[1:], "use_muon": False}], lr=0.1)

    skipped, opt_skipped = make()
    for p in skipped:
        p.grad = torch.full_like(p, float("nan"))
    masked_step(opt_skipped, torch.tensor(False))
    assert all(torch.equal(p, q) for p, q in zip(skipped, make()[0]))
    assert all(not t.any() for p in skipped for t in opt_skipped.state[p].values())

    plain, opt_plain = make()
    masked, opt_masked = make()
    for step in range(4):
        grads = [torch.randn(8, 4), torch.randn(4)]
        bad = step == 2
        for p, q, g in zip(plain, masked, grads):
            p.grad, q.grad = g.clone(), g * float("nan") if bad else g.clone()
        if not bad:
            opt_plain.step()
        masked_step(opt_masked, torch.tensor(not bad))
        assert all(torch.equal(p, q) for p, q in zip(plain, masked))
        assert all(torch.equal(opt_plain.state[p][k], opt_masked.state[q][k])
                   for p, q in zip(plain, masked) for k in opt_plain.state[p])


@pytest.mark.parametrize("extra", [[], ["--train.precision=fp16", "--kernels.optimizer=triton"]],
                         ids=["torch-optimizer", "fp16-triton-optimizer"])
def test_steps_that_do_not_log_never_read_the_device(tmp_path, monkeypatch, extra):
    """The engine reads device tensors on the host only on logging, evaluation and checkpoint steps: the GPU
    never waits for the CPU in between. Counted here are reads made from the engine's and kernels' own code."""
    r = tiny_recipe(tmp_path, "--train.steps=6", "--train.log_every=3", "--train.eval_every=0", "--train.grad_clip=1.0",
                    "--model.n_layer=1", "--train.sample_tokens=0", *extra)
    trainer = Trainer(r, stream=Sink())
    own = (str(Path(engine.__file__).parent), str(Path(kernels.__file__).parent))
    allowed = {"_drain", "_log", "evaluate", "save", "finish"}  # logging, evaluation, checkpoint steps; the sample
    reads = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frames, frame = [], sys._getframe(1)
            while frame is not None:
                frames.append(frame.f_code)
                frame = frame.f_back
            if frames[0].co_filename.startswith(own) and not any(f.co_name in allowed for f in frames):
                reads.append((name, trainer.step, frames[0].co_filename, frames[0].co_name))
            return real(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    trainer.fit()
    trainer.close()
    assert reads == []


@pytest.mark.gpu
@pytest.mark.parametrize("kernels_set", ["torch", "triton"])
def test_steps_run_under_cuda_sync_debug_error(tmp_path, kernels_set):
    """On a GPU, steps that neither log, evaluate nor checkpoint make no synchronizing call at all:
    ``torch.cuda.set_sync_debug_mode("error")`` turns any into an exception."""
    r = tiny_recipe(tmp_path, "--run.device=cuda", "--train.steps=6", "--train.log_every=6", "--train.eval_every=0",
                    "--train.precision=bf16", "--train.sample_tokens=0", *(
                        [f"--kernels.{op}={kernels_set}" for op in ("attention", "layer_norm", "cross_entropy",
                                                                   "optimizer")]))
    trainer = Trainer(r, stream=Sink())
    for step in range(2):  # first steps allocate, autotune and compile
        trainer.train_step(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            trainer.train_step(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.close()


def test_evaluation_is_fixed_with_a_standard_error_and_the_final_one_covers_the_whole_split(tmp_path):
    r = tiny_recipe(tmp_path, "--train.steps=1", "--data.val_fraction=0.03")
    trainer = Trainer(r, stream=Sink())
    task, model = trainer.task, trainer.model
    periodic = task.evaluate(model)
    assert set(periodic) == {"val_loss", "val_loss_se"} and 0 < periodic["val_loss_se"] < 0.1 * periodic["val_loss"]
    assert task.evaluate(model) == periodic  # the same windows every time
    final = task.evaluate(model, final=True)
    assert final["val_loss_sample"] == periodic["val_loss"]
    # the whole split in non-overlapping windows, here as one batch (all windows have T tokens)
    val, T = torch.from_numpy(task.data.val.astype("int64")), r.train.seq_len
    n = (len(val) - 1) // T
    assert n >= 10
    with torch.no_grad():
        whole = model(val[:n * T].view(n, T), val[1:n * T + 1].view(n, T)).item()
    assert abs(final["val_loss"] - whole) < 1e-5
    trainer.close()
    r.train.final_eval_tokens = len(val) - 1  # a split larger than the limit keeps the sample
    assert task.evaluate(model, final=True) == periodic
