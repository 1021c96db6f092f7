"""The GPT's value embeddings, U-net skips and smear, and Muon's ``optim.ns_steps``: each changes what it
should, is off by default (GPT-2's forward and keys), trains, and lands in AdamW's groups under Muon."""
import pytest
import torch

from tritonforge import kernels
from tritonforge.engine import hf
from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.optim.build import build_optimizer
from tritonforge.engine.optim.muon import TorchMuon
from tritonforge.engine.tasks import Task

OPS = resolve({}, "cpu")
BASE = dict(n_layer=4, n_head=4, d_model=32, context=16, vocab_size=64)
#: Each option, the parameters it adds, and how to set its gates so that it adds nothing.
OPTIONS = {
    "value_embeds": (dict(value_embeds=1), {"value_embeds.0.weight", "blocks.0.attn.value_mix",
                                            "blocks.3.attn.value_mix"}),
    "value_embeds_gqa": (dict(value_embeds=2, n_kv_head=2), {"value_embeds.0.weight", "value_embeds.1.weight",
                         *(f"blocks.{i}.attn.value_mix" for i in range(4))}),
    "unet_skips": (dict(unet_skips=True), {"skip_weights"}),
    "smear": (dict(smear=True), {"smear.weight", "smear.scale"}),
}


def neutral(model):
    """Set every new gate so that the option adds exactly nothing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("value_mix"):
                p.copy_(torch.tensor([1.0, 0.0]))
            elif name in ("skip_weights", "smear.scale"):
                p.zero_()


def pair(opts):
    """The model without the option and with it, the shared weights equal."""
    torch.manual_seed(0)
    shape = {k: v for k, v in opts.items() if k not in ("value_embeds", "unet_skips", "smear")}
    default = GPT(GPTConfig(**{**BASE, **shape}), OPS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **opts}), OPS)
    model.load_state_dict(default.state_dict(), strict=False)
    return default, model


@pytest.mark.parametrize("name", OPTIONS)
def test_option_adds_its_parameters_and_changes_the_forward(name):
    opts, added = OPTIONS[name]
    default, model = pair(opts)
    assert set(model.state_dict()) - set(default.state_dict()) == added
    assert set(default.state_dict()) <= set(model.state_dict())
    idx = torch.randint(0, 64, (2, 12))
    assert not torch.allclose(model(idx), default(idx), atol=1e-6)


@pytest.mark.parametrize("name", OPTIONS)
def test_option_with_neutral_gates_is_the_default_model_bit_for_bit(name):
    default, model = pair(OPTIONS[name][0])
    neutral(model)
    idx = torch.randint(0, 64, (2, 12))
    assert torch.equal(model(idx), default(idx))


def test_default_model_has_none_of_the_new_parameters():
    keys = set(GPT(GPTConfig(**BASE), OPS).state_dict())
    assert not any(k.startswith(("value_embeds", "skip_weights", "smear")) or "value_mix" in k for k in keys)
    cfg = GPTConfig()
    assert (cfg.value_embeds, cfg.unet_skips, cfg.smear) == (0, False, False)


@pytest.mark.parametrize("name", OPTIONS)
def test_gradients_reach_the_new_parameters(name):
    opts, added = OPTIONS[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **opts}), OPS)
    idx = torch.randint(0, 64, (2, 12))
    model(idx, idx.roll(1, dims=1)).backward()
    params = dict(model.named_parameters())
    for key in added:
        assert params[key].grad is not None and params[key].grad.abs().sum() > 0, key


def test_value_embeds_serve_the_first_and_last_blocks():
    model = GPT(GPTConfig(**{**BASE, "n_layer": 6, "value_embeds": 2}), OPS)
    assert [model.value_embed_of(i) for i in range(6)] == [0, 1, None, None, 0, 1]
    assert model.value_embeds[0].weight.shape == (64, 32)
    assert model.num_params() == GPT(GPTConfig(**{**BASE, "n_layer": 6}), OPS).num_params() + 4 * 2  # the value_mix of blocks 0, 1, 4, 5


def test_value_embeds_need_token_ids():
    with pytest.raises(ValueError, match="model.value_embeds"):
        GPT(GPTConfig(**{**BASE, "value_embeds": 1}), OPS, input_dim=3)


def test_unet_skip_adds_the_mirrored_blocks_output():
    """With one pair of blocks, block 1's input is block 0's output times (1 + the skip weight)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "n_layer": 2, "unet_skips": True}), OPS)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0] + args[1]))
    out0 = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: out0.append(out[0] + out[1]))
    with torch.no_grad():
        model.skip_weights.fill_(0.25)
    model(torch.randint(0, 64, (2, 12)))
    torch.testing.assert_close(seen[0], 1.25 * out0[0])


def test_smear_mixes_only_the_previous_token_and_not_across_documents():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "smear": True}), OPS)
    with torch.no_grad():
        model.smear.weight.normal_()
    x = model.wte(torch.randint(0, 64, (1, 6)))
    out = model.smear(x)
    assert torch.equal(out[:, 0], x[:, 0])
    gate = model.smear.scale * torch.sigmoid(x[0, 3, :12] @ model.smear.weight)
    torch.testing.assert_close(out[0, 3], x[0, 3] + gate * x[0, 2])
    packed = model.smear(x, segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    assert torch.equal(packed[:, 3], x[:, 3]) and torch.equal(packed[:, 4], out[:, 4])


@pytest.mark.parametrize("opts", [dict(value_embeds=1, smear=True, unet_skips=True),
                                  dict(smear=True, pos="rope", n_kv_head=2)], ids=["all", "smear-rope-gqa"])
def test_generate_with_the_kv_cache_gives_the_tokens_of_recomputing(opts):
    """The smear reads the last held token's embedding from the cache: the same tokens as recomputing."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **opts}), OPS).eval()
    with torch.no_grad():
        if "smear" in opts:
            model.smear.weight.normal_()
    prompt = torch.randint(0, 64, (2, 3))
    cached = model.generate(prompt, 10, temperature=0.0, top_k=1)
    idx = prompt
    for _ in range(10):
        idx = torch.cat((idx, model(idx)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, idx)


def test_new_parameters_go_to_adamw_under_muon():
    torch.manual_seed(0)
    task = Task()
    task.model = GPT(GPTConfig(**{**BASE, "value_embeds": 1, "unet_skips": True, "smear": True}), OPS)
    groups = task.param_groups(0.1, muon=True)
    names = {id(p): n for n, p in task.model.named_parameters()}
    muon = {names[id(p)] for p in groups[0]["params"]}
    adamw = {names[id(p)] for g in groups[1:] for p in g["params"]}
    assert groups[0]["use_muon"] and not any(g["use_muon"] for g in groups[1:])
    assert {"value_embeds.0.weight", "skip_weights", "smear.weight", "smear.scale", "blocks.0.attn.value_mix"} <= adamw
    assert not any("value" in n or "skip" in n or "smear" in n for n in muon)


def test_each_option_trains():
    """All three on, 15 AdamW steps on one batch: the loss falls by a third."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "value_embeds": 2, "unet_skips": True, "smear": True}), OPS)
    idx = torch.randint(0, 64, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(idx, idx.roll(1, dims=1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.67 * losses[0], losses


@pytest.mark.parametrize("opts, match", [(dict(value_embeds=1), "model.value_embeds = 1"),
                                         (dict(unet_skips=True), "model.unet_skips = true"),
                                         (dict(smear=True), "model.smear = true")])
def test_hf_export_refuses_the_options(tmp_path, opts, match):
    with pytest.raises(hf.HFError, match=match):
        hf.save_folder(tmp_path, {}, GPTConfig(**opts))


@pytest.mark.parametrize("args, message", [
    (["--model.value_embeds=3"], "model.value_embeds must be an integer from 0 to n_layer / 2 (2)"),
    (["--model.value_embeds=-1"], "model.value_embeds must be an integer from 0 to n_layer / 2"),
    (["--model.unet_skips=maybe"], "model.unet_skips: expected true/false"),
    (["--model.smear=2"], "model.smear: expected true/false"),
    (["--optim.ns_steps=0"], "optim.ns_steps must be an integer in [1, 100), got 0"),
    (["--optim.ns_steps=4.5"], "optim.ns_steps: expected an integer"),
    (["--optim.embed_lr_scale=0"], "optim.embed_lr_scale"),
    (["--optim.embed_lr_scale=-1"], "optim.embed_lr_scale"),
])
def test_bad_values_name_the_field(args, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, args)
    assert message in str(e.value)


def test_recipe_fields_reach_the_model_and_optimizer():
    recipe = load_recipe(None, ["--model.value_embeds=2", "--model.unet_skips=true", "--model.smear=true",
                                "--optim.ns_steps=4"])
    cfg = GPTConfig.from_section(recipe.model, vocab_size=64)
    assert (cfg.value_embeds, cfg.unet_skips, cfg.smear) == (2, True, True)
    assert recipe.optim.ns_steps == 4 and load_recipe(None, []).optim.ns_steps == 5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ns_steps_reaches_muon_and_changes_its_step(backend):
    """Muon's groups carry ``ns_steps`` on both backends, and 4 iterations step differently from 5."""
    after = []
    for steps in (5, 4):
        torch.manual_seed(0)
        task = Task()
        task.model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab_size=24), OPS)
        opt, _ = build_optimizer(resolve({"optimizer": backend}, "cpu"), "muon", task.param_groups(0.1, muon=True),
                                 lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, muon_momentum=0.9, ns_steps=steps)
        assert isinstance(opt, TorchMuon if backend == "torch" else kernels.Muon)
        assert opt.param_groups[0]["use_muon"] and opt.param_groups[0]["ns_steps"] == steps
        task.model(torch.randint(0, 24, (2, 8))).square().mean().backward()
        opt.step()
        after.append(task.model.blocks[0].attn.qkv.weight.detach().clone())
    assert not torch.allclose(after[0], after[1])


@pytest.mark.parametrize("name", OPTIONS)
def test_a_seed_draws_the_same_shared_weights_with_or_without_the_option(name):
    """The options draw nothing (gates) or draw on a fork of the generator (value embeddings), so runs of one
    seed differ only by the option: the comparisons in docs/recipes.md are paired."""
    opts = OPTIONS[name][0]
    shape = {k: v for k, v in opts.items() if k not in ("value_embeds", "unet_skips", "smear")}
    torch.manual_seed(0)
    default = GPT(GPTConfig(**{**BASE, **shape}), OPS).state_dict()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **opts}), OPS).state_dict()
    after = torch.rand(3)
    torch.manual_seed(0)
    GPT(GPTConfig(**{**BASE, **shape}), OPS)
    assert all(torch.equal(default[k], model[k]) for k in default) and torch.equal(torch.rand(3), after)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_embed_lr_scale_puts_the_tables_in_a_group_of_their_own(pos):
    """Token (and tied head), position and value tables form one decayed AdamW group carrying ``lr_scale``;
    at 1 (the default) the groups are as before."""
    torch.manual_seed(0)
    task = Task()
    task.model = GPT(GPTConfig(**{**BASE, "value_embeds": 1, "pos": pos}), OPS)
    names = {id(p): n for n, p in task.model.named_parameters()}
    tables = {"wte.weight", "value_embeds.0.weight"} | ({"wpe.weight"} if pos == "learned" else set())
    for muon in (False, True):
        plain = task.param_groups(0.1, muon=muon)
        assert not any("lr_scale" in g for g in plain)
        groups = task.param_groups(0.1, muon=muon, embed_lr_scale=0.5)
        scaled = [g for g in groups if "lr_scale" in g]
        assert len(scaled) == 1 and scaled[0]["lr_scale"] == 0.5 and scaled[0]["weight_decay"] == 0.1
        assert {names[id(p)] for p in scaled[0]["params"]} == tables
        assert sorted(names[id(p)] for g in groups for p in g["params"]) == sorted(names.values())
        if muon:
            assert scaled[0]["use_muon"] is False and groups[0]["use_muon"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_embed_lr_scale_scales_the_tables_step(backend, tmp_path, tmp_path_factory):
    """The trainer sets each group's lr to the schedule's times its ``lr_scale``: under AdamW at a constant
    rate, a table's first update is ``lr_scale`` times what it is without the scale, on both backends."""
    from support import tiny_corpus
    from tritonforge.engine.train.trainer import Trainer

    data = tiny_corpus(tmp_path_factory)
    moved = {}
    for scale in (1.0, 0.25):
        recipe = load_recipe(None, data + [
            "--model.n_layer=1", "--model.d_model=16", "--model.n_head=2", "--model.context=8",
            "--train.seq_len=8", "--train.batch_size=2", "--train.steps=1", "--train.time_budget=",
            "--train.eval_batches=1", "--train.sample_tokens=0", "--optim.name=adamw", "--optim.lr=1e-2",
            "--optim.warmup_steps=0", "--optim.schedule=constant", "--optim.weight_decay=0",
            f"--kernels.optimizer={backend}", f"--optim.embed_lr_scale={scale}", "--run.device=cpu",
            f"--run.dir={tmp_path / str(scale)}", "--data.val_fraction=0.2"])
        trainer = Trainer(recipe)
        before = trainer.task.model.wpe.weight.detach().clone()
        trainer.step_fn(0, 1e-2)
        lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
        assert lrs == ([1e-2] if scale == 1.0 else [pytest.approx(2.5e-3), 1e-2])
        moved[scale] = (trainer.task.model.wpe.weight.detach() - before).abs().max().item()
    # Adam's first step moves each entry by lr (times sign): a quarter of the rate, a quarter of the move
    assert moved[0.25] == pytest.approx(0.25 * moved[1.0], rel=1e-3)
