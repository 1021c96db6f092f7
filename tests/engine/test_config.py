"""Recipes: parsing, presets, overrides and their errors."""
from pathlib import Path

import pytest

from tritonforge.engine.config import RecipeError, dump_toml, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    load_recipe(path)


def test_preset_then_recipe_then_overrides(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[model]\npreset = "gpt2-124m"\nn_layer = 2\n[optim]\nbetas = [0.9, 0.99]\n')
    r = load_recipe(f, ["--model.d_model=384", "--train.compile=true", "--optim.lr", "0.01"])
    assert (r.model.n_layer, r.model.d_model, r.model.vocab_size) == (2, 384, 50304)  # preset, file, CLI
    assert r.train.compile is True and r.optim.lr == 0.01 and r.optim.betas == (0.9, 0.99)
    r = load_recipe(f, ["--optim.betas=0.8,0.9"])
    assert r.optim.betas == (0.8, 0.9)
    r = load_recipe(f, ["--kernels.deterministic=false", "--kernels.mlp=torch"])
    assert r.kernels.deterministic is False
    assert r.kernels.backends() == {"attention": "auto", "layer_norm": "auto", "rms_norm": "auto", "mlp": "torch",
                                    "dwconv": "auto", "cross_entropy": "auto", "rope": "auto", "swiglu": "auto",
                                    "nt_xent": "auto", "optimizer": "auto"}


def test_toml_ints_are_accepted_for_floats(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("[optim]\nlr = 1\nmin_lr = 0\n")
    assert load_recipe(f).optim.lr == 1.0


@pytest.mark.parametrize("args, message", [
    (["--train.bogus=1"], "unknown key train.bogus; valid keys of [train]: steps, batch_size"),
    (["--nosuch.key=1"], "unknown recipe section [nosuch]"),
    (["--train.steps=ten"], "train.steps: expected an integer, got ten"),
    (["--train.compile=maybe"], "train.compile: expected true/false, got maybe"),
    (["--kernels.deterministic=1.5"], "kernels.deterministic: expected true/false, got 1.5"),
    (["--kernels.mlp=fast"], "kernels.mlp: unknown backend 'fast'"),
    (["--train.precision=fp8"], "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    (["--optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    (["--train.batch_size=0"], "train.batch_size must be > 0, got 0"),
    (["--train.seq_len=512", "--model.context=256"], "train.seq_len (512) is longer than the model supports"),
    (["--model.n_head=5"], "model.d_model (192) must be divisible by model.n_head (5)"),
    (["--model.n_kv_head=3"], "model.n_head (4) must be divisible by model.n_kv_head (3)"),
    (["--model.preset=gpt9"], "model.preset: unknown preset 'gpt9'"),
    (["--kernels.attention=cuda"], "kernels.attention: unknown backend 'cuda'; valid backends: auto, torch, triton"),
    (["--optim.betas=0.9"], "optim.betas: expected a list of a number, a number, got 0.9"),
    (["--optim.muon_momentum=1"], "optim.muon_momentum must be in [0, 1), got 1.0"),
    (["train.steps=3"], "unexpected argument 'train.steps=3'"),
    (["--train.steps"], "override --train.steps needs a value"),
])
def test_bad_overrides_name_the_field(args, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, args)
    assert message in str(e.value)


def test_bad_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nsteps = \n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(f)
    f.write_text("[train]\nsteps = 1.5\n")
    with pytest.raises(RecipeError, match=r"train.steps: expected an integer, got 1.5"):
        load_recipe(f)
    f.write_text("steps = 3\n")
    with pytest.raises(RecipeError, match="must be a \\[section\\] table"):
        load_recipe(f)


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(ROOT / "recipes" / "gpt_cpu.toml", ["--run.name=a \"quoted\" name", "--optim.lr=0.002"])
    f = tmp_path / "resolved.toml"
    f.write_text(dump_toml(r))
    assert load_recipe(f) == r


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c.d-e", "x"]) == [("a", "b", "1"), ("c", "d_e", "x")]


def test_strings_with_control_characters_round_trip(tmp_path):
    text = "def f():\n\t\"x\" \\ \x01 \x7f é 😀"
    r = load_recipe(None, ["--train.sample_prompt=" + text])
    f = tmp_path / "resolved.toml"
    f.write_text(dump_toml(r))
    assert load_recipe(f).train.sample_prompt == text
