"""Transfer learning: train.init_from (runs and Hugging Face folders), train.freeze, `tritonforge export`."""
import json

import pytest
import torch

from tritonforge.engine import cli, hf, transfer
from tritonforge.engine.ops import select as op_select, table as op_table
from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.train.trainer import Trainer
from support import Sink

TINY = ["--model.n_layer=2", "--model.d_model=32", "--model.n_head=4", "--model.context=32", "--train.seq_len=32",
        "--train.batch_size=4", "--train.eval_batches=2", "--train.sample_tokens=0", "--train.eval_every=0",
        "--train.log_every=1", "--optim.warmup_steps=0", "--optim.lr=3e-3", "--data.val_fraction=0.1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("transfer-corpus")
    path = base / "corpus.jsonl"
    docs = (f"the quick brown fox number {i} jumps over the lazy dog. " * 4 for i in range(120))
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return [f"--data.source={path}", f"--data.cache_dir={base / 'cache'}"]


def gpt_recipe(corpus, run_dir, *extra):
    return load_recipe(None, TINY + corpus + [f"--run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """A finished 3-step run, its summary and its trainer (for the weights and batches it saw)."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    trainer = Trainer(gpt_recipe(corpus, run_dir, "--train.steps=3"), stream=Sink())
    summary = trainer.fit()
    trainer.close()
    return run_dir, summary, trainer


def test_init_from_starts_at_step_0_where_the_source_ended(corpus, source, tmp_path):
    run_dir, summary, src = source
    sink = Sink()
    tuned = Trainer(gpt_recipe(corpus, tmp_path / "ft", f"--train.init_from={run_dir}", "--train.steps=2"), stream=sink)
    assert tuned.step == 0 and not tuned.optimizer.state
    assert "init_from: 29 of 29 tensors loaded" in sink.text
    # The same data and the same weights give the same losses, bit for bit: the source's last evaluation,
    # and the loss of the first fine-tuning step on its batch (no dropout).
    assert tuned.evaluate(final=True)["val_loss"] == summary["val_loss"]  # the whole split, as the run ended
    with torch.no_grad():
        expected = src.task.loss(src.task.model, *src.task.batch(0, 0)).item()
    assert tuned.train_step(0).loss.item() == expected
    tuned.close()


def test_a_new_vocabulary_is_reinitialised_and_listed(corpus, source, tmp_path):
    run_dir, _, src = source
    sink = Sink()
    tuned = Trainer(gpt_recipe(corpus, tmp_path / "ft", f"--train.init_from={run_dir}/checkpoints",
                               "--model.vocab_size=320"), stream=sink)
    assert "re-initialised (shape differs): wte.weight (256, 32) -> (320, 32), lm_head.weight (256, 32) -> (320, 32)" \
        in sink.text
    fresh = tuned.task.model.wte.weight.detach()
    assert fresh.std().item() == pytest.approx(0.02, rel=0.2)  # the fresh init, not the source's rows
    torch.testing.assert_close(tuned.task.model.blocks[1].mlp.fc.weight, src.task.model.blocks[1].mlp.fc.weight,
                               atol=0, rtol=0)
    tuned.close()


def test_freeze_keeps_parameters_bit_identical(corpus, source, tmp_path):
    run_dir, _, _ = source
    sink = Sink()
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    tuned = Trainer(gpt_recipe(corpus, tmp_path / "ft", f"--train.init_from={ckpt}", "--train.steps=3",
                               "--train.freeze=blocks.0.*,lm_head.weight"), stream=sink)
    model = tuned.task.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("blocks.0.") or n == "wte.weight"}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in frozen}
    trained = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    total = sum(p.numel() for p in model.parameters())
    assert f"freeze: 13 tensors fixed; training {trained:,} of {total:,} parameters" in sink.text
    assert sum(p.numel() for p in tuned.step_fn.params) == trained
    tuned.fit()
    tuned.close()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, others[name]), name


def test_strict_refuses_a_different_model_and_lenient_loads_what_is_shared(corpus, source, tmp_path):
    run_dir, _, src = source
    with pytest.raises(RecipeError, match=r"train.init_from: .* different parameters \(not in .*blocks.2.attn"):
        Trainer(gpt_recipe(corpus, tmp_path / "a", f"--train.init_from={run_dir}", "--model.n_layer=3"), stream=Sink())
    assert not (tmp_path / "a").exists()  # refused before the run wrote anything
    sink = Sink()
    tuned = Trainer(gpt_recipe(corpus, tmp_path / "b", f"--train.init_from={run_dir}", "--model.n_layer=3",
                               "--train.init_strict=false"), stream=sink)
    assert "left as initialised (not in the source): blocks.2." in sink.text
    torch.testing.assert_close(tuned.task.model.blocks[1].ln2.weight, src.task.model.blocks[1].ln2.weight, atol=0, rtol=0)
    tuned.close()


def test_bad_inputs_stop_early_naming_the_field(corpus, source, tmp_path):
    run_dir, _, _ = source
    (tmp_path / "empty").mkdir()
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    cases = [
        (f"--train.init_from={tmp_path / 'missing'}", "train.init_from: no such run directory"),
        (f"--train.init_from={tmp_path / 'empty'}", "train.init_from: .*no complete checkpoint.*no config.json"),
        (f"--train.init_from={tmp_path / 'mistral'}", "train.init_from: .*model_type 'mistral' .*not supported"),
        ("--train.freeze=blocks.9.*", "train.freeze: pattern 'blocks.9.\\*' matches no parameter"),
        ("--train.freeze=*", "train.freeze: .* freezes every parameter"),
    ]
    for override, match in cases:
        with pytest.raises(RecipeError, match=match):
            Trainer(gpt_recipe(corpus, tmp_path / "run", override), stream=Sink())
        assert not (tmp_path / "run").exists()


def test_init_from_a_hugging_face_folder_and_export_back(corpus, tmp_path, capsys):
    cfg = GPTConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=32, context=64, vocab_size=256, pos="rope",
                    rope_base=500.0, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5, d_ff=96)
    torch.manual_seed(0)
    original = GPT(cfg, op_select.resolve({op: "torch" for op in op_table.op_names()}))
    hf.save_folder(tmp_path / "hf", original.state_dict(), cfg)
    sink = Sink()
    # The recipe's model (2 layers, learned positions, ...) gives way to the folder's config.json.
    tuned = Trainer(gpt_recipe(corpus, tmp_path / "ft", f"--train.init_from={tmp_path / 'hf'}", "--train.steps=1"),
                    stream=sink)
    assert "n_layer=1" in sink.text and "pos=rope" in sink.text and tuned.task.cfg == cfg
    for name, value in original.state_dict().items():
        assert torch.equal(tuned.task.model.state_dict()[name], value), name
    tuned.fit()
    tuned.close()
    assert cli.main(["export", str(tmp_path / "ft"), str(tmp_path / "out")]) == 0
    back = hf.to_engine(hf.load_weights(tmp_path / "out"), hf.read_config(tmp_path / "out"))
    for name, value in tuned.task.model.state_dict().items():
        assert torch.equal(back[name], value), name
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "ft"), str(tmp_path / "out")]) == 2
    assert "OUT_DIR: " in capsys.readouterr().err


def test_cnn_fine_tuned_on_other_classes_gets_a_new_head(tmp_path):
    common = ["--model.arch=resnet", "--model.width=4", "--model.depths=1,1,1,1", "--model.image_size=16",
              "--data.num_images=200", "--data.val_fraction=0.1", f"--data.cache_dir={tmp_path / 'cache'}",
              "--train.batch_size=8", "--train.eval_batches=1", "--train.eval_every=0", "--train.ema_decay=0.9",
              "--optim.name=sgd", "--optim.lr=0.05", "--optim.warmup_steps=0", "--train.grad_clip=0"]
    src = Trainer(load_recipe(None, common + ["--data.source=shapes", "--model.num_classes=10", "--train.steps=2",
                                              f"--run.dir={tmp_path / 'src'}"]), stream=Sink())
    src.fit()
    src.close()
    sink = Sink()
    tuned = Trainer(load_recipe(None, common + ["--data.source=shapes-b", "--model.num_classes=8", "--train.steps=1",
                                                f"--run.dir={tmp_path / 'ft'}", f"--train.init_from={tmp_path / 'src'}"]),
                    stream=sink)
    assert "re-initialised (shape differs): fc.weight (10, 32) -> (8, 32), fc.bias (10,) -> (8,)" in sink.text
    assert tuned.task.data.classes[:2] == ["hexagon", "star"]
    loaded = {k: v for k, v in src.task.model.state_dict().items() if not k.startswith("fc.")}
    for name, value in loaded.items():  # BatchNorm statistics included; the weight average starts from them
        assert torch.equal(tuned.task.model.state_dict()[name], value), name
        assert torch.equal(tuned.task.ema.state_dict()[name], value), name
    tuned.close()


def test_find_checkpoint_takes_a_run_a_folder_or_a_file(source):
    run_dir, _, _ = source
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    for where in (run_dir, run_dir / "checkpoints", ckpt):
        assert transfer.find_checkpoint(where, "x") == ckpt


def test_a_frozen_run_resumes_frozen(corpus, tmp_path):
    """Resuming freezes again (requires_grad is not in a checkpoint) so the optimizer state fits."""
    common = ["--train.freeze=blocks.0.*"]
    first = Trainer(gpt_recipe(corpus, tmp_path / "r", *common, "--train.steps=1"), stream=Sink())
    first.fit()
    first.close()
    frozen = first.task.model.blocks[0].attn.qkv.weight.detach().clone()
    sink = Sink()
    resumed = Trainer(gpt_recipe(corpus, tmp_path / "r", *common, "--train.steps=2", "--checkpoint.resume=latest"),
                      stream=sink)
    assert "freeze: 12 tensors fixed" in sink.text and "init_from" not in sink.text
    resumed.fit()
    resumed.close()
    assert torch.equal(resumed.task.model.blocks[0].attn.qkv.weight, frozen)
    assert not torch.equal(resumed.task.model.blocks[1].attn.qkv.weight, first.task.model.blocks[1].attn.qkv.weight)
