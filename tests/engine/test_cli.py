"""The command line as a shell uses it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_output_into_a_closed_pipe_ends_quietly():
    """``tritonforge --help | head`` : a reader that goes away early is not an error worth a traceback."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], stdout=write, stderr=subprocess.PIPE,
                          cwd=ROOT, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_a_time_budget_counts_from_the_commands_start(monkeypatch):
    """``tritonforge train`` hands the trainer the time it started (before torch was imported), so the
    command's wall time, imports and data loading included, is the budget; a call of ``train_main`` from a
    program of one's own counts from the trainer's creation."""
    import time
    from tritonforge.engine import cli
    from tritonforge.engine.train import trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda recipe, stream=None, started=None: seen.append(started))
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "gpt_cpu.toml")
    before = time.perf_counter()
    assert cli.main(["train", recipe, "--train.steps=1"]) == 0
    assert cli.train_main([recipe, "--train.steps=1"]) == 0
    assert before <= seen[0] <= time.perf_counter() and seen[1] is None


def test_a_trainer_counts_its_budget_from_the_start_it_is_given(tmp_path):
    from tritonforge.engine.config import load_recipe
    from tritonforge.engine.train.trainer import Trainer
    import time

    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "recipes" / "gpt_cpu.toml", [f"--run.dir={tmp_path / 'run'}", "--train.steps=2"])
    started = time.perf_counter() - 100.0
    trainer = Trainer(recipe, started=started)
    try:
        assert trainer._t_created == started
    finally:
        trainer.close(0)
