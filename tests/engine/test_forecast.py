"""Forecasting: the built-in series, windows and targets, the baselines, beating them, and bad inputs."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.data.series import SERIES_LENGTH, generated_series
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.tasks.forecast import ForecastTask
from tritonforge.engine.train.trainer import Trainer
from support import Sink

OPS = resolve({}, "cpu")
BASE = ["--train.task=forecast", "--data.source=series", "--data.val_fraction=0.2", "--train.seq_len=24",
        "--train.horizon=6", "--train.batch_size=16", "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2",
        "--model.hidden=32", "--model.context=24", "--train.eval_every=0", "--train.log_every=1",
        "--train.sample_tokens=0", "--optim.lr=1e-2", "--optim.warmup_steps=5", "--optim.weight_decay=0",
        "--run.threads=1"]


def task(*args) -> ForecastTask:
    return ForecastTask(load_recipe(None, BASE + list(args)), OPS, torch.device("cpu"), 0, 1, log=lambda *_: None)


def write_csv(path: Path, columns: dict[str, list]) -> Path:
    names = list(columns)
    rows = [",".join(names)] + [",".join(str(columns[n][i]) for n in names) for i in range(len(columns[names[0]]))]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_built_in_series_is_deterministic_and_has_seasons_and_trends():
    a, names = generated_series()
    b, _ = generated_series()
    assert a.shape == (SERIES_LENGTH, 4) and len(names) == 4 and np.array_equal(a, b)
    day = a[24:] - a[:-24]
    assert (day.std(axis=0) < a.std(axis=0)).all()  # a daily season explains much of every channel
    assert (a[-500:].mean(axis=0) > a[:500].mean(axis=0))[[0, 2]].all()  # two channels trend upwards


def test_windows_targets_and_normalisation_use_the_training_split_only():
    t = task("--model.arch=gru")
    x, y = t.batch(step=3, micro=0)
    assert x.shape == (16, 24, 4) and y.shape == (16, 24, 6, 4)
    # Position p's targets are the horizon right after it: position p+1's first target is x[p+2].
    torch.testing.assert_close(y[:, :-1, 0], x[:, 1:])
    torch.testing.assert_close(y[:, :-2, 1], x[:, 2:])
    train = t.series[:t.split]
    torch.testing.assert_close(train.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    assert t.series[t.split:].mean(0).abs().max() > 0.1  # the validation steps were not used to fit it
    assert t.val_starts[0] + t.context == t.split and t.val_starts[-1] + t.context + t.horizon == SERIES_LENGTH
    starts = np.random.default_rng([1337, 3]).integers(0, t.split - 30 + 1, size=16)
    assert (starts + 30 <= t.split).all()  # training targets never reach the validation steps


def test_the_baselines_on_a_purely_seasonal_series(tmp_path):
    """A series that repeats every 8 steps: seasonal-naive is exact, naive is not; other columns are skipped."""
    steps = np.arange(400)
    wave = np.sin(2 * np.pi * steps / 8).tolist()
    f = write_csv(tmp_path / "s.csv", {"time": [f"t{i}" for i in steps], "wave": wave})
    t = task(f"--data.source={f}", "--data.season=8", "--model.arch=lstm")
    assert t.names == ["wave"]
    assert t.baselines["seasonal_mse"] < 1e-20 and t.baselines["seasonal_mae"] < 1e-10
    assert t.baselines["naive_mse"] > 0.5


@pytest.mark.parametrize("arch, steps", [("gru", 80), ("gpt", 150)])
def test_a_short_run_beats_the_naive_and_seasonal_naive_forecasts(tmp_path, arch, steps):
    r = load_recipe(None, BASE + [f"--model.arch={arch}", f"--train.steps={steps}", f"--run.dir={tmp_path}"])
    trainer = Trainer(r, stream=Sink())
    try:
        out = trainer.fit()
    finally:
        trainer.close()
    assert out["val_loss"] < out["seasonal_mse"] < out["naive_mse"]
    assert out["val_mae"] < min(out["seasonal_mae"], out["naive_mae"])


def test_the_gpt_forecaster_checkpoints_its_blocks_with_the_same_loss_and_gradients():
    """train.activation_checkpointing reaches the forecasting GPT; dropout on, the same step bit for bit."""
    def step(policy):
        torch.manual_seed(0)
        t = task("--model.arch=gpt", "--model.n_layer=2", "--model.dropout=0.2",
                 f"--train.activation_checkpointing={policy}")
        torch.manual_seed(1)
        loss = t.loss(t.model.train(), *t.batch(step=0, micro=0))
        loss.backward()
        return t.model, loss.detach(), {n: p.grad for n, p in t.model.named_parameters()}

    plain, loss_a, grads_a = step("none")
    model, loss_b, grads_b = step("blocks")
    assert [type(b).__name__ for b in plain.blocks] == ["Block"] * 2
    assert [type(b).__name__ for b in model.blocks] == ["CheckpointedBlock"] * 2
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("args, message", [
    (["--train.seq_len=0"], "train.seq_len must be > 0, got 0"),
    (["--train.horizon=0"], "train.horizon must be > 0, got 0"),
    (["--data.season=48"], "data.season (48) is longer than the context (train.seq_len = 24)"),
    (["--model.arch=resnet"], "train.task = 'forecast' trains model.arch = 'gpt', 'lstm' or 'gru', not 'resnet'"),
    (["--data.source=stdlib"], "data.source: a forecast reads 'series' (built in) or a .csv/.parquet file"),
    (["--data.source=/no/such.csv"], "data.source: no such file: /no/such.csv"),
    (["--train.task=regress"], "train.task: 'regress' is not one of auto, forecast"),
    (["--model.arch=lstm", "--train.activation_checkpointing=blocks"],
     "train.activation_checkpointing = 'blocks': model.arch = 'lstm' has no residual blocks to checkpoint"),
])
def test_bad_forecast_recipes_name_the_field(args, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, BASE + args)
    assert message in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--train.horizon=30"], "train.horizon (30) is longer than the series' validation split (20 of 100 steps)"),
    (["--train.horizon=10", "--train.seq_len=72", "--model.context=72"],
     "train.horizon (10) + train.seq_len (72) is longer than the series' training split (80 of 100 steps"),
    (["--data.columns=b,nope"], "data.columns: no column 'nope' in"),
    (["--data.columns=a,name"], "data.columns: column 'name' of"),
])
def test_bad_forecast_data_names_the_field(tmp_path, args, message):
    f = write_csv(tmp_path / "d.csv", {"a": list(range(100)), "b": [i % 5 for i in range(100)],
                                       "name": ["x"] * 100})
    with pytest.raises(RecipeError) as e:
        task(f"--data.source={f}", "--model.arch=lstm", *args)
    assert message in str(e.value)
