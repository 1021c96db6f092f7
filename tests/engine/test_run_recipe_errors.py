"""A mistake in a recipe stops the run before any work, with a message naming the field."""
from pathlib import Path

import pytest

from tritonforge.engine.cli import main as cli_main
from support import tiny_corpus

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context=16", "--train.seq_len=16",
        "--train.batch_size=4", "--train.steps=2", "--train.sample_tokens=0", "--data.val_fraction=0.2",
        "--train.time_budget=", "--optim.name=adamw"]


@pytest.fixture
def data(tmp_path_factory):
    """Overrides pointing at the small corpus test_runs.py uses too (tokenized once per session)."""
    return tiny_corpus(tmp_path_factory)


def train(capsys, recipe, *args) -> tuple[int, str]:
    code = cli_main(["train", str(recipe), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=-0.1", "error: optim.lr must be > 0, got -0.1"),
    ("--train.batch_size=0", "error: train.batch_size must be > 0, got 0"),
    ("--train.seq_len=64", "error: train.seq_len (64) is longer than the model supports (model.context = 16)"),
    ("--data.source={tmp}/no-such-corpus.txt", "error: data.source: path does not exist: {tmp}/no-such-corpus.txt"),
    ("--model.vocab_size=128", "error: model.vocab_size (128) is smaller than the byte tokenizer's vocabulary (256)"),
    ("--train.stepz=5", "error: unknown key train.stepz; valid keys of [train]: steps, "),
    ("--train.steps=ten", "error: train.steps: expected an integer, got ten"),
    ("--logging.wandb=sometimes", "error: logging.wandb: 'sometimes' is not one of off, offline, online"),
    ("--checkpoint.resume={tmp}/gone", "error: checkpoint.resume: no such checkpoint or run directory: {tmp}/gone"),
])
def test_bad_value_stops_before_any_work(data, tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    code, err = train(capsys, ROOT / "recipes" / "gpt_cpu.toml", *TINY, *data, f"--run.dir={run_dir}",
                      override.format(tmp=tmp_path))
    assert code == 2
    assert err.splitlines()[-1].startswith(message.format(tmp=tmp_path)), err
    assert "Traceback" not in err
    assert not run_dir.exists()


def test_wrong_type_in_a_recipe_file(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nsteps = "ten"\n')
    assert train(capsys, recipe) == (2, "error: train.steps: expected an integer, got 'ten'\n")
    recipe.write_text("[trian]\nsteps = 10\n")
    code, err = train(capsys, recipe)
    assert code == 2 and err.startswith("error: unknown recipe section [trian]; valid sections: ")


def test_missing_recipe_file(tmp_path, capsys):
    assert train(capsys, tmp_path / "nope.toml") == (2, f"error: recipe file not found: {tmp_path / 'nope.toml'}\n")
