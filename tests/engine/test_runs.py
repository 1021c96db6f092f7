"""Runs you can trust: exact resume, signals, NaN policy, the run directory, console, wandb and plots.

Every run here is a one-layer GPT of about 20k parameters on a small local corpus, a few steps long.
"""
import json
import platform
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritonforge.engine import checkpoint, plot
from tritonforge.engine.checkpoint import CheckpointError
from tritonforge.engine.cli import main as cli_main
from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.runlog import RunLogger, read_metrics
from tritonforge.engine.optim.schedule import lr_at
from tritonforge.engine.train.trainer import Trainer, TrainingError
from support import Sink, tiny_corpus

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context=16", "--model.dropout=0.1",
        "--train.seq_len=16", "--train.batch_size=4", "--train.eval_batches=2", "--train.eval_every=0",
        "--train.log_every=1", "--train.sample_tokens=0", "--optim.lr=1e-2", "--optim.warmup_steps=2",
        "--data.val_fraction=0.2", "--run.name=tiny", "--run.threads=1",
        "--train.time_budget=", "--optim.name=adamw"]  # the main job's recipe, as a fixed-step AdamW run


@pytest.fixture
def data(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


def recipe(data, run_dir, *extra):
    return load_recipe(None, TINY + data + [f"--run.dir={run_dir}", *extra])


class Crash(Exception):
    """Stands for a kill: the run stops at once, saving nothing."""


def run(r, sink=None, patch=None) -> Trainer:
    """Train ``r`` to the end (or to an exception, which propagates); ``patch(trainer)`` runs first."""
    trainer = Trainer(r, stream=sink or Sink())
    try:
        if patch is not None:
            patch(trainer)
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def losses(run_dir) -> list[tuple]:
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [(m["kind"], m["step"], m.get("loss", m.get("val_loss"))) for m in records]


def model_state(path) -> dict:
    return checkpoint.consolidate(path)["model"]


# ---------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------

def test_kill_and_resume_gives_the_same_loss_at_every_step(data, tmp_path):
    common = ("--train.steps=8", "--checkpoint.every=3", "--train.eval_every=4")
    run(recipe(data, tmp_path / "a", *common))

    def crash_after_step_5(trainer):
        def on_step_end(step):
            if step == 5:
                with open(trainer.run_dir / "metrics.jsonl", "a") as f:
                    f.write('{"kind": "train", "st')  # a line cut short by the kill
                raise Crash
        trainer.task.on_step_end = on_step_end

    with pytest.raises(Crash):
        run(recipe(data, tmp_path / "b", *common), patch=crash_after_step_5)
    assert checkpoint.latest(tmp_path / "b" / "checkpoints").name == "ckpt-00000003.pt"
    sink = Sink()
    run(recipe(data, tmp_path / "b", *common, "--checkpoint.resume=latest"), sink)
    assert "resumed from" in sink.text and "at step 3" in sink.text

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for k, s, _ in a if k == "train"] == list(range(1, 9))
    assert a == b  # every step's loss and every evaluation, bit for bit
    final_a, final_b = (model_state(tmp_path / d / "checkpoints" / "ckpt-00000008.pt") for d in "ab")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_from_a_checkpoint_path_and_with_a_bare_resume(data, tmp_path, monkeypatch):
    """``--resume PATH`` continues in that checkpoint's run; a bare ``--resume`` finds the newest run by name."""
    monkeypatch.chdir(tmp_path)
    args = TINY + data + ["--train.steps=3"]
    assert cli_main(["train", str(ROOT / "recipes" / "gpt_cpu.toml"), *args]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("tiny-")
    first = run_dir / "checkpoints" / "ckpt-00000003.pt"
    assert cli_main(["train", str(ROOT / "recipes" / "gpt_cpu.toml"), *args[:-1], "--train.steps=4",
                     "--resume", str(first)]) == 0
    assert cli_main(["train", str(ROOT / "recipes" / "gpt_cpu.toml"), *args[:-1], "--train.steps=5", "--resume"]) == 0
    assert list((tmp_path / "runs").iterdir()) == [run_dir]
    assert [s for k, s, _ in losses(run_dir) if k == "train"] == [1, 2, 3, 4, 5]


def test_checkpoint_holds_the_whole_training_state(data, tmp_path):
    trainer = run(recipe(data, tmp_path / "r", "--train.steps=7", "--checkpoint.every=2", "--checkpoint.keep=2"))
    manifests = checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [checkpoint.step_of(m) for m in manifests] == [6, 7]  # keep the last K
    state = checkpoint.load(manifests[-1].with_suffix(".pt"))
    assert {"step", "scaler", "rng", "bad_steps", "recipe"} <= set(state)
    assert state["step"] == 7 and set(state["rng"]) >= {"torch", "numpy", "python"}
    assert "scale" in state["scaler"] and state["recipe"] == trainer.resolved.to_dict()
    sharded = checkpoint.consolidate(manifests[-1].with_suffix(".pt"))  # model and optimizer, by parameter name
    assert all(torch.equal(v, sharded["model"][k]) for k, v in trainer.task.model.state_dict().items())
    assert sharded["optimizer"]["state"]["wte.weight"]["exp_avg"].shape == trainer.task.model.wte.weight.shape


def test_resume_refuses_a_checkpoint_of_another_model(data, tmp_path):
    run(recipe(data, tmp_path / "r", "--train.steps=2"))
    with pytest.raises(CheckpointError, match=r"holds a different model \(model.d_model: 32 -> 64\)"):
        Trainer(recipe(data, tmp_path / "r", "--checkpoint.resume=latest", "--model.d_model=64"), stream=Sink())


def test_a_fresh_run_refuses_a_directory_holding_another_run(data, tmp_path):
    run(recipe(data, tmp_path / "r", "--train.steps=2"))
    with pytest.raises(RecipeError, match="already holds the checkpoints of a run; resume it"):
        Trainer(recipe(data, tmp_path / "r", "--train.steps=2"), stream=Sink())


def test_resuming_from_a_truncated_checkpoint_fails_clearly(data, tmp_path, capsys):
    run(recipe(data, tmp_path / "r", "--train.steps=2"))
    ckpt = tmp_path / "r" / "checkpoints" / "ckpt-00000002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code = cli_main(["train", str(ROOT / "recipes" / "gpt_cpu.toml"), *TINY, *data, f"--run.dir={tmp_path / 'r'}",
                     "--train.steps=4", "--resume"])
    err = capsys.readouterr().err
    assert code == 1 and "ckpt-00000002.pt is truncated or corrupt: 1000 bytes" in err and "Traceback" not in err


def test_sigterm_saves_a_checkpoint_and_exits_with_128_plus_signum(data, tmp_path):
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "engine.train", str(ROOT / "recipes" / "gpt_cpu.toml"), *TINY, *data,
           f"--run.dir={run_dir}", "--train.steps=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM; checkpoint saved to" in err
    saved = checkpoint.latest(run_dir / "checkpoints")
    state = checkpoint.load(saved)
    logged = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")]
    assert state["step"] == logged[-1] >= 1  # saved right after the last step it ran


# ---------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------

def poison(steps, value=float("nan")):
    """Make the loss non-finite at the given (1-based) steps."""
    def patch(trainer):
        real = trainer.task.loss

        def loss(model, x, y):
            out = real(model, x, y)
            return out * value if trainer.step + 1 in steps else out
        trainer.task.loss = loss
    return patch


def assert_checkpoints_finite(folder):
    for manifest in checkpoint.list_checkpoints(folder):
        assert all(torch.isfinite(t).all() for t in model_state(manifest.with_suffix(".pt")).values())


def test_nan_steps_are_skipped_up_to_the_limit(data, tmp_path):
    sink = Sink()
    trainer = run(recipe(data, tmp_path / "r", "--train.steps=6", "--train.on_nan=skip", "--train.max_bad_steps=2",
                         "--checkpoint.every=2"), sink, patch=poison({3, 4}))
    assert trainer.step == 6
    assert "warning: step 3: the loss is nan; update skipped (1/2 in a row); last good checkpoint: " in sink.text
    assert "warning: step 4: the loss is nan; update skipped (2/2 in a row)" in sink.text
    assert_checkpoints_finite(tmp_path / "r" / "checkpoints")


def test_too_many_nan_steps_in_a_row_stop_the_run(data, tmp_path):
    with pytest.raises(TrainingError) as e:
        run(recipe(data, tmp_path / "r", "--train.steps=8", "--train.max_bad_steps=2", "--checkpoint.every=2"),
            patch=poison({3, 4, 5}))
    good = tmp_path / "r" / "checkpoints" / "ckpt-00000004.pt"
    assert str(e.value) == (f"step 5: the loss is nan; stopping (3 bad steps in a row, more than train.max_bad_steps "
                            f"= 2); the update was not applied; last good checkpoint: {good}")
    assert [checkpoint.step_of(m) for m in checkpoint.list_checkpoints(good.parent)] == [2, 4]
    assert_checkpoints_finite(good.parent)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_on_nan_stop_stops_at_the_first_bad_step(data, tmp_path, value):
    with pytest.raises(TrainingError) as e:
        run(recipe(data, tmp_path / "r", "--train.steps=8", "--train.on_nan=stop", "--checkpoint.every=2"),
            patch=poison({3}, value))
    assert str(e.value).startswith(f"step 3: the loss is {value}; stopping (train.on_nan = 'stop')")
    assert str(e.value).endswith(f"last good checkpoint: {tmp_path / 'r' / 'checkpoints' / 'ckpt-00000002.pt'}")


def test_a_checkpoint_of_non_finite_weights_is_never_written(data, tmp_path):
    trainer = Trainer(recipe(data, tmp_path / "r", "--train.steps=2"), stream=Sink())
    with torch.no_grad():
        next(trainer.task.model.parameters())[0] = float("nan")
    with pytest.raises(TrainingError, match="parameters are not finite; no checkpoint written"):
        trainer.save()
    trainer.close()
    assert checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints") == []


def test_out_of_memory_names_the_batch_and_context(data, tmp_path):
    def oom(trainer):
        def loss(model, x, y):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        trainer.task.loss = loss

    with pytest.raises(TrainingError) as e:
        run(recipe(data, tmp_path / "r", "--train.steps=2"), patch=oom)
    assert str(e.value).startswith("CUDA out of memory at step 1 with train.batch_size=4 and train.seq_len=16 "
                                   "(model.context=16): lower train.batch_size")


# ---------------------------------------------------------------------------------------------------
# The run directory and the console
# ---------------------------------------------------------------------------------------------------

def test_run_directory_and_console(data, tmp_path):
    sink = Sink()
    r = recipe(data, tmp_path / "r", "--train.steps=4", "--train.eval_every=2", "--train.log_every=2")
    run(r, sink)
    run_dir = tmp_path / "r"
    assert load_recipe(run_dir / "recipe.toml").to_dict() == r.to_dict()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["kernels"]["attention"] == "torch"
    assert env["cpu_memory_kept"] is (platform.libc_ver()[0] == "glibc")  # run.cpu_memory = "keep", the default
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [(m["kind"], m["step"]) for m in records] == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    assert {"loss", "lr", "throughput", "items", "step_ms"} <= set(records[0]) and "val_loss" in records[1]

    lines = sink.text.splitlines()
    assert not any(ord(c) < 32 for c in sink.text.replace("\n", ""))  # no \r or escape codes in a file
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == 2 and progress[1].startswith("step 4/4 | loss ")
    assert all(f in progress[0] for f in (" | lr ", " tok/s | ", "ETA "))
    assert sum(line.startswith("eval @ step ") and "val_loss" in line for line in lines) == 2


def test_progress_line_on_a_terminal_and_on_cuda():
    record = {"kind": "train", "step": 5, "loss": 2.5, "lr": 1e-3, "throughput": 123456.0, "tflops": 312.5, "mfu": 0.42}
    tty = Sink(tty=True)
    log = RunLogger(stream=tty)
    log.progress(record, 10, "tok", 65.0)
    log.print("eval")
    assert tty.text == ("\r\x1b[2Kstep 5/10 | loss 2.5000 | lr 1.00e-03 | 123.5k tok/s | 312.5 TFLOP/s | MFU 42.0% | "
                        "ETA 1:05\r\x1b[2Keval\n")


def test_progress_line_before_a_time_budget_fixes_the_step_count():
    record = {"kind": "train", "step": 25, "loss": 2.5, "lr": 1e-3, "throughput": 2500.0}
    sink = Sink()
    RunLogger(stream=sink).progress(record, None, "tok", None, budget_left_s=31.2)
    assert sink.text == "step 25 | loss 2.5000 | lr 1.00e-03 | 2.5k tok/s | budget left 0:31 (step count not fixed yet)\n"


# ---------------------------------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------------------------------

def wandb_records(run_file: Path) -> list:
    """The records of an offline wandb run file: a LevelDB-style log of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = run_file.read_bytes(), 7, b"", []
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_file: Path, timeout: float = 60.0) -> dict[int, dict]:
    """The logged rows by step, once wandb's writer process has finished the file (it may lag finish())."""
    deadline = time.monotonic() + timeout
    records = wandb_records(run_file)
    while records[-1:] == [] or records[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, f"{run_file} was not finished within {timeout} s"
        time.sleep(0.1)
        records = wandb_records(run_file)
    rows = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            rows[row.pop("_step")] = row
    return rows


@pytest.mark.slow  # wandb's writer process finishes the run file a few seconds after the run
def test_wandb_offline_logs_the_metrics_jsonl_names(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in (("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"), ("WANDB_CONFIG_DIR", tmp_path / "cfg"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run(recipe(data, tmp_path / "r", "--train.steps=3", "--train.eval_every=2", "--logging.wandb=offline"))
    (run_file,) = (tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    jsonl = read_metrics(tmp_path / "r" / "metrics.jsonl")
    names = {k for m in jsonl for k in m} - {"kind", "step"}
    assert names == {k for row in rows.values() for k in row} - {"_runtime", "_timestamp"}
    for m in jsonl:
        assert all(rows[m["step"]][k] == v for k, v in m.items() if k not in ("kind", "step")), m


def test_wandb_asked_for_but_not_installed(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(RecipeError, match=r"logging.wandb = 'offline' needs the wandb package: pip install wandb"):
        Trainer(recipe(data, tmp_path / "r", "--logging.wandb=offline"), stream=Sink())
    assert not (tmp_path / "r").exists()  # stopped before any work


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    data = tiny_corpus(tmp_path_factory)
    base = tmp_path_factory.mktemp("two-runs")
    for name in ("a", "b"):
        run(recipe(data, base / name, "--train.steps=4", "--train.eval_every=2", f"--run.name={name}",
                   f"--optim.lr={'1e-2' if name == 'a' else '3e-3'}"))
    return base / "a", base / "b"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_two_runs(two_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.png"
    assert cli_main(["plot", *map(str, two_runs), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    width, height = png_size(out)
    assert width > 1.5 * height and out.stat().st_size > 20_000  # two panels with curves on them
    import matplotlib.image

    pixels = matplotlib.image.imread(out)[..., :3].reshape(-1, 3)
    assert len({tuple(p) for p in pixels[::7].tolist()}) > 50
    assert cli_main(["plot", str(two_runs[0]), "-o", str(tmp_path / "one.png"), "--x", "tokens"]) == 0
    assert png_size(tmp_path / "one.png")[0] < width


def test_plot_labels_runs_by_name_and_kernel_backends(two_runs):
    curves = [plot.load_run(d) for d in two_runs]
    assert [c.label for c in curves] == ["a (torch)", "b (torch)"] and curves[0].unit == "tok"
    assert [p[0] for p in curves[0].train] == [1, 2, 3, 4] and [p[0] for p in curves[0].val] == [2, 4]
    assert curves[0].train[1][1] == 2 * 4 * 16  # tokens after two steps of 4 windows of 16
    assert plot.backends_label({"attention": "triton", "layer_norm": "torch", "rms_norm": "triton"}) == \
        "triton: attention, rms_norm"


def test_plot_without_matplotlib_says_how_to_get_it(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli_main(["plot", str(two_runs[0]), "-o", str(tmp_path / "x.png")]) == 1
    assert "pip install 'tritonforge[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 1
    assert f"{tmp_path} is not a run directory: it has no metrics.jsonl" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Time budget
# ---------------------------------------------------------------------------------------------------

def test_a_time_budget_fixes_the_step_count_records_it_and_resumes_with_it(data, tmp_path, monkeypatch):
    """The count is fixed after the warmup steps are timed, recorded, and kept by a resumed run, which then
    computes exactly what the run would have without the interruption."""
    from tritonforge.engine.train import budget

    monkeypatch.setattr(budget.BudgetClock, "steps_that_fit", lambda self, step, per_step, forward: 7)  # the machine's speed
    common = ("--train.time_budget=30s", "--train.steps=1000", "--optim.warmup_steps=5", "--checkpoint.every=6")
    sink = Sink()
    given = recipe(data, tmp_path / "a", *common)
    run(given, sink)
    assert given.train.steps == 1000  # the run follows the count; the recipe it was given stays as it was
    assert [s for k, s, _ in losses(tmp_path / "a") if k == "train"] == list(range(1, 8))
    progress = [line for line in sink.text.splitlines() if line.startswith("step ")]
    # Before the count is fixed (after step 5) a line shows no total and no ETA, but the budget left.
    assert progress[0].startswith("step 1 | loss ") and "ETA" not in progress[0] and "budget left " in progress[0]
    assert progress[4].startswith("step 5/7 | loss ") and "ETA " in progress[4]
    assert load_recipe(tmp_path / "a" / "recipe.toml").train.steps == 7
    assert checkpoint.load(checkpoint.latest(tmp_path / "a" / "checkpoints"))["budget_steps"] == 7

    def crash_after_step_7(trainer):  # after the checkpoint of step 6, before the last one
        def on_step_end(step):
            if step == 7:
                raise Crash
        trainer.task.on_step_end = on_step_end

    with pytest.raises(Crash):
        run(recipe(data, tmp_path / "b", *common), patch=crash_after_step_7)
    monkeypatch.setattr(budget.BudgetClock, "steps_that_fit", lambda self, step, per_step, forward: 99)  # never asked again
    sink = Sink()
    run(recipe(data, tmp_path / "b", *common, "--checkpoint.resume=latest"), sink)
    assert "recipe changes" not in sink.text
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_time_budget_fixes_a_count_that_fits(data, tmp_path):
    """The count the budget fixes fits what was left of it at the measured step time (whatever the machine's
    speed: no wall-clock assertion, which a loaded machine would break)."""
    sink = Sink()
    trainer = run(recipe(data, tmp_path / "r", "--train.time_budget=6s", "--train.steps=100000",
                         "--optim.warmup_steps=5"), sink)
    budget, *refits = [m for m in read_metrics(tmp_path / "r" / "metrics.jsonl") if m["kind"] == "budget"]
    assert "time budget 6s:" in sink.text and trainer.step == (refits or [budget])[-1]["steps"] < 100000
    for b in (budget, *refits):  # each count fits what was left at the pace just measured
        assert (b["steps"] - b["step"]) * b["step_ms"] / 1e3 <= max(b["seconds_left"], 0.0)


def test_a_run_re_times_itself_lowering_its_count_when_slower_and_raising_it_when_faster(data, tmp_path, monkeypatch):
    """Re-timed at its logging steps, a run whose rest no longer fits lowers its count, one with room for
    more than 2% more raises it (less moves nothing), each change is recorded, and the rest of the
    learning rate is scheduled over the new count."""
    from tritonforge.engine.train import budget

    answers = {0: 20, 1: 20, 2: 15, 3: 15, 4: 18}  # the counts the machine's pace gives at the fix and each re-timing
    calls = []

    def steps_that_fit(self, step, per_step, forward):
        calls.append(step)
        return answers.get(len(calls) - 1, self.steps)

    monkeypatch.setattr(budget.BudgetClock, "steps_that_fit", steps_that_fit)
    monkeypatch.setattr(budget.BudgetClock, "MIN_WINDOW", 1)
    sink = Sink()
    trainer = run(recipe(data, tmp_path / "r", "--train.time_budget=30s", "--train.steps=1000",
                         "--optim.warmup_steps=5", "--train.log_every=2"), sink)
    assert calls[:5] == [5, 6, 8, 10, 12]  # fixed after the warmup, then re-timed at each logging step
    assert trainer.step == 18 and load_recipe(tmp_path / "r" / "recipe.toml").train.steps == 18
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [(b["step"], b["steps"]) for b in records if b["kind"] == "budget"] == [(5, 20), (8, 15), (12, 18)]
    assert "steps 6-8 ran at" in sink.text  # the pace of the last logging windows (here 6 and 7-8) and "15 steps fit" in sink.text
    final = load_recipe(tmp_path / "r" / "recipe.toml")
    for m in records:
        if m["kind"] == "train" and m["step"] > 12:  # after the last change, the schedule of 18 steps
            assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, final))


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _TimedTask:
    """A task whose evaluation-sized forward takes ``forward_seconds`` of the fake clock."""

    def __init__(self, clock):
        self.clock, self.forward_seconds, self.forwards = clock, 0.25, 0

    def batch(self, step, micro):
        return None, None

    def loss(self, model, inputs, targets):
        self.clock.now += self.forward_seconds
        self.forwards += 1

    def eval_batches(self, final):
        return 100 if final else 10


class _Log:
    def __init__(self):
        self.lines, self.records = [], []

    def print(self, line):
        self.lines.append(line)

    def record(self, record):
        self.records.append(record)


def test_a_budget_re_times_over_recent_windows_and_measures_the_final_evaluation_near_the_end(monkeypatch):
    """A re-timing acts on the pace of the last few logging windows, not the last one alone; the final
    evaluation is reserved at the median of three forwards timed at the fix and, in the run's last stretch,
    at the median of the latest timings (one per re-timing), whatever the training steps' pace."""
    from tritonforge.engine.train import budget

    clock = _Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    r = load_recipe(None, ["--train.time_budget=200s", "--train.steps=100000", "--optim.warmup_steps=5",
                           "--train.eval_every=0", "--train.sample_tokens=0"])
    task, log = _TimedTask(clock), _Log()
    timer = budget.BudgetClock(r, 0.0, task, torch.nn.Linear(1, 1), torch.device("cpu"), 1, lambda n: None, log)

    def steps(first, last, seconds):
        for step in range(first, last + 1):
            clock.now += seconds
            timer.after_step(step)

    steps(1, 5, 1.0)  # warmup at 1 s a step: fixed after step 5, the forward timed three times
    assert task.forwards == budget.FORWARD_REPEATS
    fix = log.records[-1]
    assert fix["step_ms"] == pytest.approx(1000) and fix["eval_forward_ms"] == pytest.approx(250)
    steps(6, 15, 0.5)  # twice as fast: the forward is not assumed to follow
    timer.after_log(15)
    assert log.records[-1]["step_ms"] == pytest.approx(500) and log.records[-1]["eval_forward_ms"] == pytest.approx(250)
    left = log.records[-1]["seconds_left"]
    margin = 1 + budget.BUDGET_MARGIN  # on the steps and on the evaluation alike
    assert log.records[-1]["steps"] == 15 + int((left - 100 * 0.25 * margin - budget.END_SECONDS) / (0.5 * margin))
    assert task.forwards == budget.FORWARD_REPEATS  # far from the end: nothing timed
    steps(16, 25, 1.0)  # one slow window: the pace is that of steps 6-25, not of 16-25 alone
    timer.after_log(25)
    assert log.records[-1]["step_ms"] == pytest.approx(750) and "steps 6-25 ran at 750 ms/step" in log.lines[-1]
    for i in range(budget.PACE_WINDOWS):  # older windows drop out
        steps(26 + 10 * i, 35 + 10 * i, 1.0)
        timer.after_log(35 + 10 * i)
    assert log.records[-1]["step_ms"] == pytest.approx(1000)
    # The last stretch (under twice the 25 s reserve left): each re-timing times one forward, now 0.1 s.
    task.forward_seconds = 0.1
    timer.started = clock.now - (200 - 2 * 100 * 0.25 + 1)  # 49 s left
    forwards, step = task.forwards, 65
    estimates = []
    for _ in range(2):
        steps(step + 1, step + 10, 0.5)  # faster: the count leaves room for both re-timings
        step += 10
        timer.after_log(step)
        estimates.append(timer.forward)
    assert task.forwards == forwards + 2
    assert estimates == [pytest.approx(0.25), pytest.approx(0.1)]  # medians of (.25, .25, .1), (.25, .1, .1)


def _in_the_last_stretch(monkeypatch):
    """A budget clock (200 s, a 25 s final-evaluation reserve) run at 1 s a step into its last stretch, which
    begins at the re-timing after step 55: (clock, task, log, steps(first, last, seconds))."""
    from tritonforge.engine.train import budget

    clock = _Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    r = load_recipe(None, ["--train.time_budget=200s", "--train.steps=100000", "--optim.warmup_steps=5",
                           "--train.eval_every=0", "--train.sample_tokens=0"])
    task, log = _TimedTask(clock), _Log()
    timer = budget.BudgetClock(r, 0.0, task, torch.nn.Linear(1, 1), torch.device("cpu"), 1, lambda n: None, log)

    def steps(first, last, seconds):
        for step in range(first, last + 1):
            clock.now += seconds
            timer.after_step(step)

    steps(1, 5, 1.0)
    for end in range(15, 55, 10):  # four windows at 1 s a step, each re-timed at its logging step
        steps(end - 9, end, 1.0)
        timer.after_log(end)
    assert not timer.last_stretch
    timer.started = clock.now - (200 - 59)  # 59 s left, 49 s at the next re-timing: under twice the 25 s reserve
    steps(46, 55, 1.0)
    timer.after_log(55)
    assert timer.last_stretch and timer.forward == pytest.approx(0.25)
    return timer, task, log, steps


def test_a_slowdown_in_the_last_stretch_lowers_the_count_between_logging_steps(monkeypatch):
    """In the run's last stretch the clock re-times every MIN_WINDOW steps without waiting for a logging
    step, at the latest window's pace when that is the slower: a late slowdown cuts the steps it no longer
    has time for (a 35% slower end of a 1m45s run had overrun its budget by 4 s)."""
    from tritonforge.engine.train import budget

    timer, task, log, steps = _in_the_last_stretch(monkeypatch)
    count, records = timer.steps, len(log.records)
    steps(56, 65, 1.5)  # slower: re-timed after step 65, no logging step called
    assert len(log.records) == records + 1 and log.records[-1]["step"] == 65
    assert log.records[-1]["step_ms"] == pytest.approx(1500) and "steps 56-65 ran at 1500 ms/step" in log.lines[-1]
    left, margin = log.records[-1]["seconds_left"], 1 + budget.BUDGET_MARGIN
    assert timer.steps == 65 + int((left - 100 * 0.25 * margin - budget.END_SECONDS) / (1.5 * margin)) < count
    steps(66, 68, 1.5)  # fewer than MIN_WINDOW steps since: nothing re-timed
    assert len(log.records) == records + 1


def test_the_last_stretch_never_raises_the_count(monkeypatch):
    """A low reading of the evaluation forward near the end would fit more steps: the count stays (a 3m45s
    run raised it on one and overran its budget by 5 s)."""
    timer, task, log, steps = _in_the_last_stretch(monkeypatch)
    count, records = timer.steps, len(log.records)
    task.forward_seconds, timer.forwards = 0.01, [0.01, 0.01]
    steps(56, 65, 1.0)  # re-timed after step 65: the forward's median is now 0.01 s, a reserve of 1 s
    assert task.forwards and timer.forward == pytest.approx(0.01)
    assert timer.steps_that_fit(65, 1.0, timer.forward) > count * 1.1  # what a raise would have set
    assert timer.steps == count and len(log.records) == records


def test_a_time_budget_needs_warmup_steps_to_time():
    with pytest.raises(RecipeError, match="optim.warmup_steps must be >= 5"):
        load_recipe(None, ["--train.time_budget=4m", "--optim.warmup_steps=2"])
    with pytest.raises(RecipeError, match="train.time_budget: '4 minutes' is not a duration"):
        load_recipe(None, ["--train.time_budget=4 minutes"])
