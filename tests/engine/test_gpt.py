"""The GPT model: shapes for every option, init, FLOPs, generation, backend independence."""
import math

import pytest
import torch

from tritonforge.engine.models.gpt import GPT, GPTConfig, rotary_tables
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.ops.reference import torch_rope

OPS = resolve({}, "cpu")
OPTIONS = [
    dict(),
    dict(pos="rope", bias=False),
    dict(norm="rmsnorm", mlp="swiglu"),
    dict(n_kv_head=2),
    dict(n_kv_head=1, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    dict(window=3),
    dict(tie_embeddings=False, dropout=0.1),
    dict(d_ff=40),
]


def tiny(**kw):
    base = dict(n_layer=2, n_head=4, d_model=32, context=16, vocab_size=64)
    base.update(kw)
    return GPT(GPTConfig(**base), OPS)


@pytest.mark.parametrize("opts", OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "default" for o in OPTIONS])
def test_forward_shapes_and_loss(opts):
    torch.manual_seed(0)
    model = tiny(**opts)
    idx = torch.randint(0, 64, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, 64)
    loss = model(idx, torch.randint(0, 64, (3, 11)))
    assert loss.shape == () and math.isfinite(loss.item())
    assert abs(loss.item() - math.log(64)) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gqa_shrinks_the_qkv_projection():
    full, gqa = tiny(), tiny(n_kv_head=1)
    assert full.blocks[0].attn.qkv.weight.shape == (3 * 32, 32)
    assert gqa.blocks[0].attn.qkv.weight.shape == ((4 + 2) * 8, 32)


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, d_model=128, context=16, vocab_size=64), OPS)
    std = model.blocks[0].mlp.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=12, n_head=12, d_model=768, context=1024, vocab_size=50304), OPS)
    assert model.num_params() == 123_653_376 + (50304 - 50257) * 768  # nanoGPT: 123.65M at V=50257
    assert model.flops_per_token(1024) == 6 * model.num_params() + 6 * 12 * 1024 * 768


def test_causality():
    torch.manual_seed(0)
    model = tiny(pos="rope").eval()
    idx = torch.randint(0, 64, (1, 10))
    a = model(idx)
    idx2 = idx.clone()
    idx2[0, 7] = (idx2[0, 7] + 1) % 64
    b = model(idx2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rotary_is_a_rotation():
    cos, sin = rotary_tables(8, 16, 10000.0)
    x = torch.randn(1, 2, 16, 8)
    y, _ = torch_rope(x, x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than the model's context 16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_generate_appends_tokens():
    torch.manual_seed(0)
    model = tiny().eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 23) and out.max() < 64


def generate_without_cache(model, idx, max_new_tokens, temperature=0.8, top_k=40, generator=None):
    """Generation as the whole prefix recomputed for every token: what the KV cache must reproduce."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.cfg.context:])[:, -1, :].float() / max(temperature, 1e-5)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        idx = torch.cat((idx, torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)), dim=1)
    return idx


GENERATE_OPTIONS = [dict(), dict(pos="rope", n_kv_head=2, qk_norm=True),
                    dict(window=3, norm="rmsnorm", mlp="swiglu"), dict(n_kv_head=1, pos="rope", window=5)]


@pytest.mark.parametrize("opts", GENERATE_OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "default"
                                                        for o in GENERATE_OPTIONS])
@pytest.mark.parametrize("sampling", [dict(temperature=0.8, top_k=40), dict(temperature=1.0, top_k=None),
                                      dict(temperature=0.0, top_k=1)], ids=["top-k", "full", "greedy"])
def test_generate_with_the_kv_cache_gives_the_tokens_of_recomputing(opts, sampling):
    """Same seed, same tokens as recomputing the prefix, past the context too (16 positions: 3 + 20)."""
    torch.manual_seed(0)
    model = tiny(**opts).eval()
    prompt = torch.randint(0, 64, (2, 3))
    cached = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1), **sampling)
    recomputed = generate_without_cache(model, prompt, 20, generator=torch.Generator().manual_seed(1), **sampling)
    assert torch.equal(cached, recomputed)


def test_generate_feeds_each_new_token_once(monkeypatch):
    """Within the context, every step after the prompt runs the model on the one new token."""
    torch.manual_seed(0)
    model = tiny(pos="rope").eval()
    lengths = []
    forward = GPT.forward

    def recording(self, idx, *args, **kwargs):
        lengths.append(idx.shape[1])
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", recording)
    model.generate(torch.zeros(1, 5, dtype=torch.long), 8, generator=torch.Generator().manual_seed(0))
    assert lengths == [5] + [1] * 7


def test_state_dict_keys_do_not_depend_on_the_backend():
    a = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab_size=32), resolve({}, "cpu"))
    b = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab_size=32),
            resolve({"attention": "torch", "layer_norm": "torch"}, "cpu"))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert "blocks.0.ln1.weight" in a.state_dict() and "blocks.0.ln1.bias" in a.state_dict()


@pytest.mark.parametrize("tie, softcap", [(True, 0.0), (False, 0.0), (False, 0.05)])
def test_triton_head_and_loss_match_torch(tie, softcap):
    """The head and loss through the triton ``cross_entropy`` backend (the fused linear cross-entropy, in the
    interpreter) give the torch backend's loss and every parameter's gradient (fp32: summation order only),
    with or without a soft cap (0.05: near the logits' own size at init, so it bends them)."""
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab_size=300, tie_embeddings=tie,
                    logit_softcap=softcap)
    torch.manual_seed(0)
    ref = GPT(cfg, resolve({"cross_entropy": "torch"}, "cpu"))
    fused = GPT(cfg, resolve({"cross_entropy": "triton"}, "cpu"))
    fused.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 300, (2, 8))
    targets = torch.randint(0, 300, (2, 8))
    losses = []
    for model in (ref, fused):
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max().item()
        assert (q.grad - p.grad).abs().max().item() <= 1e-5 * max(scale, 1e-3), name
    with torch.no_grad():  # evaluation goes through the same op, without computing gradients
        assert fused(idx, targets).item() == pytest.approx(losses[0], rel=1e-5)


def _rotate_inline(x, cos, sin):
    """The GPT's rotation as it was written inline before it became the registry's ``rope`` op."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _llama_tiny_cfg(n_layer=2):
    return GPTConfig(n_layer=n_layer, n_head=4, n_kv_head=2, d_model=32, context=16, vocab_size=64, pos="rope",
                     norm="rmsnorm", mlp="swiglu", bias=False)


def test_torch_rope_and_swiglu_are_bitwise_the_inline_math():
    inline = OPS.replace(
        rope=lambda q, k, cos, sin: (_rotate_inline(q, cos[:q.shape[2]], sin[:q.shape[2]]),
                                     _rotate_inline(k, cos[:q.shape[2]], sin[:q.shape[2]])),
        swiglu=lambda h: torch.nn.functional.silu(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1])
    torch.manual_seed(0)
    ref = GPT(_llama_tiny_cfg(), inline)
    model = GPT(_llama_tiny_cfg(), OPS)
    model.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            losses = [m(idx, targets) for m in (ref, model)]
        for m, loss in zip((ref, model), losses):
            m.zero_grad()
            loss.backward()
        assert torch.equal(losses[0], losses[1])
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(p.grad, q.grad), name


def test_triton_rope_and_swiglu_match_torch():
    """The llama-style block with the rope and swiglu kernels (interpreter) against the torch backend: the
    same loss and gradients up to fp32 rounding (the kernels round once, torch after every op)."""
    torch.manual_seed(0)
    ref = GPT(_llama_tiny_cfg(n_layer=1), resolve({"rope": "torch", "swiglu": "torch"}, "cpu"))
    fused = GPT(_llama_tiny_cfg(n_layer=1), resolve({"rope": "triton", "swiglu": "triton"}, "cpu"))
    fused.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, 64, (1, 12)), torch.randint(0, 64, (1, 12))
    losses = []
    for model in (ref, fused):
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max().item()
        assert (q.grad - p.grad).abs().max().item() <= 1e-5 * max(scale, 1e-3), name


# ----------------------------------------------------------------------------------------------
# the speedrun options: QK-norm, ReLU², zero-initialised projections, logit soft-capping
# ----------------------------------------------------------------------------------------------
def test_default_model_has_none_of_the_speedrun_options():
    """The defaults are GPT-2's: no QK-norm parameters, GELU, scaled-normal projections, raw logits."""
    torch.manual_seed(0)
    model = tiny()
    assert not any("q_norm" in k or "k_norm" in k for k in model.state_dict())
    assert model.blocks[0].attn.proj.weight.abs().min() > 0
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    logits = model(idx)
    assert logits.abs().max() > 0
    assert model(idx, targets).item() == torch.nn.functional.cross_entropy(logits.reshape(-1, 64),
                                                                           targets.reshape(-1)).item()


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    model = tiny(qk_norm=True, n_layer=1)
    idx = torch.randint(0, 64, (2, 9))
    before = model(idx)
    with torch.no_grad():  # scale the q and k rows of the fused projection (and their biases) by 10
        model.blocks[0].attn.qkv.weight[:64] *= 10
        model.blocks[0].attn.qkv.bias[:64] *= 10
    torch.testing.assert_close(model(idx), before, rtol=1e-4, atol=1e-5)
    assert model.blocks[0].attn.q_norm.weight.shape == (8,)


def test_relu2_mlp():
    torch.manual_seed(0)
    mlp = tiny(mlp="relu2").blocks[0].mlp
    x = torch.randn(3, 32)
    torch.testing.assert_close(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))
    assert mlp.fc.weight.shape == (128, 32)  # 4·d, as GELU


@pytest.mark.parametrize("kind, approximate", [("gelu", "tanh"), ("gelu_exact", "none")])
def test_gelu_mlps(kind, approximate):
    torch.manual_seed(0)
    mlp = tiny(mlp=kind).blocks[0].mlp
    x = torch.randn(3, 32)
    h = mlp.fc(x)
    torch.testing.assert_close(mlp(x), mlp.proj(torch.nn.functional.gelu(h, approximate=approximate)), rtol=0, atol=0)
    # the two differ: each kind computes its own GELU
    other = "none" if approximate == "tanh" else "tanh"
    assert not torch.equal(mlp(x), mlp.proj(torch.nn.functional.gelu(h, approximate=other)))


def test_zero_init_proj_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    model = tiny(zero_init_proj=True)
    idx = torch.randint(0, 64, (2, 9))
    x = model.wte(idx) + model.wpe(torch.arange(9))
    h = torch.nn.functional.layer_norm(x, (32,), model.ln_f.weight, model.ln_f.bias, 1e-5)
    torch.testing.assert_close(model(idx), model.lm_head(h))


def test_logit_softcap_bounds_logits_and_is_in_the_loss():
    torch.manual_seed(0)
    model = tiny(logit_softcap=0.5, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # raw logits far past the cap
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    logits = model(idx)
    assert logits.abs().max() <= 0.5
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))
    torch.testing.assert_close(model(idx, targets), expected)


def test_per_sequence_losses_average_to_the_batch_loss():
    torch.manual_seed(0)
    model = tiny(logit_softcap=2.0)
    idx, targets = torch.randint(0, 64, (3, 9)), torch.randint(0, 64, (3, 9))
    per = model(idx, targets, per_sequence=True)
    assert per.shape == (3,) and len(set(per.tolist())) == 3
    torch.testing.assert_close(per.mean(), model(idx, targets))
    torch.testing.assert_close(per[1], model(idx[1:2], targets[1:2]))


# Each option's own behaviour is tested above; training is checked with all of them on at once (and alone
# in docs/recipes.md's measurements).
SPEEDRUN_OPTIONS = [dict(qk_norm=True, mlp="relu2", zero_init_proj=True, logit_softcap=3.0, tie_embeddings=False)]


@pytest.mark.parametrize("opts", SPEEDRUN_OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items())
                                                        for o in SPEEDRUN_OPTIONS])
def test_each_speedrun_option_trains(opts):
    """15 AdamW steps on one fixed batch: every parameter gets a gradient and the loss falls by a third."""
    torch.manual_seed(0)
    model = tiny(**opts)
    idx = torch.randint(0, 64, (4, 12))
    targets = idx.roll(1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.67 * losses[0], losses
