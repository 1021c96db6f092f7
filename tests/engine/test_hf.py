"""Hugging Face GPT-2 and Llama folders: imported models give transformers' logits, exported ones load back.

The round trips need ``transformers`` (the ``test`` extra) and are skipped without it; the refusals do not.
"""
import json

import pytest
import torch

from tritonforge.engine import hf
from tritonforge.engine.ops import select as op_select, table as op_table
from tritonforge.engine.models.gpt import GPT, GPTConfig

#: fp32 logits of the same tiny model computed by two implementations (different op order).
FP32_ATOL = 1e-5
TORCH_OPS = op_select.resolve({op: "torch" for op in op_table.op_names()})


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms and biases included, so a wrong transpose or split cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else 0.3 * noise)


def _tokens(vocab: int, T: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))


def _engine_model(folder) -> GPT:
    config = hf.read_config(folder)
    fields = {k: v for k, v in hf.model_fields(config).items() if k != "arch"}
    model = GPT(GPTConfig(**fields), TORCH_OPS).eval()
    model.load_state_dict(hf.to_engine(hf.load_weights(folder), config))
    return model


GPT2_CONFIGS = {
    "tied": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=16, layer_norm_epsilon=1e-5),
    "untied-inner": dict(n_embd=32, n_layer=1, n_head=2, vocab_size=40, n_positions=16, n_inner=48,
                         tie_word_embeddings=False, layer_norm_epsilon=3e-5),
    "exact-gelu": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=16, activation_function="gelu"),
}
LLAMA_CONFIGS = {
    "gqa-untied": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=57, max_position_embeddings=32, rope_theta=500.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mha-tied-bias": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=50, max_position_embeddings=32,
                          tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("name", list(GPT2_CONFIGS))
def test_gpt2_import_matches_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(**GPT2_CONFIGS[name], bos_token_id=0, eos_token_id=0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    _randomize(theirs, 1)
    theirs.save_pretrained(tmp_path)
    ours = _engine_model(tmp_path)
    idx = _tokens(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_llama_import_matches_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**LLAMA_CONFIGS[name], bos_token_id=0, eos_token_id=0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    _randomize(theirs, 2)
    theirs.save_pretrained(tmp_path)
    ours = _engine_model(tmp_path)
    idx = _tokens(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=FP32_ATOL, rtol=0)


EXPORTS = {
    "gpt2-tied": GPTConfig(n_layer=2, n_head=4, d_model=32, context=16, vocab_size=64),
    "gpt2-untied-nobias": GPTConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=40, bias=False,
                                    tie_embeddings=False, norm_eps=2e-5),
    "gpt2-exact-gelu": GPTConfig(n_layer=1, n_head=2, d_model=32, context=16, vocab_size=40, mlp="gelu_exact"),
    "llama-gqa": GPTConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, context=32, vocab_size=48, pos="rope",
                           rope_base=300.0, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "llama-tied-bias": GPTConfig(n_layer=1, n_head=2, d_model=32, context=32, vocab_size=48, pos="rope",
                                 norm="rmsnorm", mlp="swiglu", d_ff=40, bias=True),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    cfg = EXPORTS[name]
    ours = GPT(cfg, TORCH_OPS).eval()
    _randomize(ours, 3)
    hf.save_folder(tmp_path, ours.state_dict(), cfg)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    idx = _tokens(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=FP32_ATOL, rtol=0)
    # and back: the folder imports to the same tensors
    back = hf.to_engine(hf.load_weights(tmp_path), hf.read_config(tmp_path))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back[key], value, atol=0, rtol=0)


def test_pytorch_model_bin_is_read(tmp_path):
    cfg = EXPORTS["gpt2-tied"]
    ours = GPT(cfg, TORCH_OPS)
    hf.save_folder(tmp_path, ours.state_dict(), cfg)
    tensors = hf.load_weights(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # as GPT2Model saves them
    torch.save(bare, tmp_path / "pytorch_model.bin")
    back = hf.to_engine(hf.load_weights(tmp_path), hf.read_config(tmp_path))
    torch.testing.assert_close(back["blocks.0.attn.qkv.weight"], ours.blocks[0].attn.qkv.weight.detach())
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(hf.HFError, match="no weights"):
        hf.load_weights(tmp_path)


LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             vocab_size=50)


@pytest.mark.parametrize("config, match", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "model_type 'mistral'.*not supported"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
    ({**LLAMA, "head_dim": 16}, "head_dim = 16"),
    ({**LLAMA, "attention_bias": True, "mlp_bias": False}, "attention_bias = True, mlp_bias = False"),
    ({**LLAMA, "hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    (dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=1, n_positions=8, vocab_size=9,
          activation_function="relu"), "activation_function = 'relu'"),
])
def test_unrepresentable_configs_are_refused(config, match):
    with pytest.raises(hf.HFError, match=match):
        hf.model_fields(config)


@pytest.mark.parametrize("cfg, match", [
    (GPTConfig(window=8), "model.window = 8"),
    (GPTConfig(pos="rope"), "model.pos = 'rope', model.norm = 'layernorm'.*no Hugging Face layout"),
    (GPTConfig(n_head=4, n_kv_head=2), "GPT-2 has no grouped-query attention"),
    (GPTConfig(qk_norm=True), "model.qk_norm = true"),
    (GPTConfig(logit_softcap=30.0), "model.logit_softcap = 30.0"),
])
def test_export_refuses_what_hf_cannot_represent(tmp_path, cfg, match):
    with pytest.raises(hf.HFError, match=match):
        hf.save_folder(tmp_path, {}, cfg)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = EXPORTS["gpt2-tied"]
    tensors = hf.from_engine(GPT(cfg, TORCH_OPS).state_dict(), cfg)
    config = hf.hf_config(cfg)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(hf.HFError, match="lack 1 tensors.*h.1.mlp.c_fc.bias"):
        hf.to_engine(tensors, config)
    tensors["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(128)
    tensors["transformer.h.2.ln_1.weight"] = torch.zeros(32)
    with pytest.raises(hf.HFError, match="no place for: transformer.h.2.ln_1.weight"):
        hf.to_engine(tensors, json.loads(json.dumps(config)))
