"""Hugging Face GPT-2 and Llama model folders, read into the engine's GPT and written back out.

A folder is ``config.json`` plus ``model.safetensors`` (or ``pytorch_model.bin``, or shards listed in
``model.safetensors.index.json``). Nothing is downloaded: users bring the folder.

- GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorm, tanh-GELU (or exact GELU) MLP, biases. Its Conv1D weights
  are stored (in, out), so they are transposed; its fused ``c_attn`` is our ``qkv`` as it is.
- Llama (``LlamaForCausalLM``): rotary positions, RMSNorm, SwiGLU, grouped-query attention. ``q/k/v_proj``
  are concatenated into our ``qkv`` and ``gate/up_proj`` into our ``mlp.fc`` (gate first, as
  :class:`~engine.models.gpt.MLP` chunks it). Both use the rotate-half form of RoPE, so q and k need no
  permutation.

What the engine cannot represent (RoPE scaling, a head dim other than d_model / n_head, other activations,
attention biases without MLP biases, a sliding window on export, ...) is refused with a message naming the
option. ``transformers`` is never needed to read or write a folder; ``safetensors`` is imported lazily.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .models.gpt import GPTConfig


class HFError(ValueError):
    """A Hugging Face folder or config that the engine cannot read or write."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"{path} is not readable JSON: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------

def _refuse(what: str, why: str) -> HFError:
    return HFError(f"{what}: {why}; the engine's GPT cannot represent it")


def model_fields(hf: dict) -> dict:
    """The ``[model]`` recipe fields of the engine's GPT equal to the HF ``config.json`` ``hf``."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _gpt2_fields(hf)
    if kind == "llama":
        return _llama_fields(hf)
    arch = ", ".join(hf.get("architectures") or []) or "none given"
    raise HFError(f"config.json: model_type {kind!r} (architectures: {arch}) is not supported; "
                  f"the engine reads GPT-2 ('gpt2') and Llama ('llama') models")


#: GPT-2's ``activation_function`` values the GPT's MLP computes, and the ``model.mlp`` of each.
_GELU_KINDS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


def _gpt2_fields(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU_KINDS:
        raise _refuse(f"activation_function = {act!r}", "the GPT's MLP uses the tanh GELU (gelu_new) or the "
                      "exact one (gelu)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise _refuse("scale_attn_weights / scale_attn_by_inverse_layer_idx", "attention is scaled by 1/sqrt(head_dim) only")
    if hf.get("add_cross_attention", False):
        raise _refuse("add_cross_attention = true", "a decoder-only model has no cross-attention")
    d, heads = hf["n_embd"], hf["n_head"]
    if d % heads:
        raise _refuse(f"n_embd = {d}, n_head = {heads}", "n_embd must be divisible by n_head")
    return dict(arch="gpt", n_layer=hf["n_layer"], n_head=heads, n_kv_head=0, d_model=d, context=hf["n_positions"],
                vocab_size=hf["vocab_size"], pos="learned", norm="layernorm", mlp=_GELU_KINDS[act], d_ff=hf.get("n_inner") or 0,
                bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), window=0,
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))


def _llama_fields(hf: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(f"hidden_act = {hf['hidden_act']!r}", "the SwiGLU MLP gates with SiLU")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 4 / 5 spell it so
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _refuse(f"RoPE scaling {rope_type!r}", "rotary positions are unscaled")
    theta = float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    if d % heads or (hf.get("head_dim") or d // heads) != d // heads:
        raise _refuse(f"head_dim = {hf.get('head_dim')} with hidden_size = {d}, num_attention_heads = {heads}",
                      "the head dim is hidden_size / num_attention_heads")
    if heads % kv:
        raise _refuse(f"num_key_value_heads = {kv}", f"num_attention_heads ({heads}) must be a multiple of it")
    if (d // heads) % 2:
        raise _refuse(f"head dim {d // heads}", "rotary positions need an even head dim")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise _refuse(f"attention_bias = {attn_bias}, mlp_bias = {mlp_bias}", "model.bias applies to both or neither")
    return dict(arch="gpt", n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=0 if kv == heads else kv,
                d_model=d, context=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], pos="rope",
                rope_base=theta, norm="rmsnorm", mlp="swiglu", d_ff=hf["intermediate_size"], bias=attn_bias,
                tie_embeddings=hf.get("tie_word_embeddings", False), window=0,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def layout_of(cfg: GPTConfig) -> str:
    """"gpt2" or "llama": the HF layout that represents ``cfg`` exactly, or an HFError naming what does not fit."""
    if cfg.window:
        raise HFError(f"model.window = {cfg.window}: neither GPT-2 nor Llama has a sliding attention window")
    if cfg.qk_norm:
        raise HFError("model.qk_norm = true: neither GPT-2 nor Llama normalizes queries and keys")
    if cfg.logit_softcap:
        raise HFError(f"model.logit_softcap = {cfg.logit_softcap}: neither GPT-2 nor Llama caps its logits")
    if cfg.value_embeds:
        raise HFError(f"model.value_embeds = {cfg.value_embeds}: neither GPT-2 nor Llama mixes token embeddings "
                      f"into the attention values")
    if cfg.unet_skips:
        raise HFError("model.unet_skips = true: neither GPT-2 nor Llama has skip connections between blocks")
    if cfg.smear:
        raise HFError("model.smear = true: neither GPT-2 nor Llama mixes the previous token's embedding into the input")
    gpt2 = {"pos": "learned", "norm": "layernorm", "mlp": "gelu"}
    llama = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
    ours = {k: getattr(cfg, k) for k in gpt2}
    if {**ours, "mlp": "gelu" if ours["mlp"] == "gelu_exact" else ours["mlp"]} == gpt2:
        if cfg.kv_heads != cfg.n_head:
            raise HFError(f"model.n_kv_head = {cfg.n_kv_head}: GPT-2 has no grouped-query attention")
        return "gpt2"
    if ours == llama:
        return "llama"
    shown = ", ".join(f"model.{k} = {v!r}" for k, v in ours.items())
    raise HFError(f"{shown}: GPT-2 needs learned/layernorm/gelu and Llama rope/rmsnorm/swiglu; this mix has no "
                  f"Hugging Face layout")


def hf_config(cfg: GPTConfig) -> dict:
    """The ``config.json`` of the HF model equal to ``cfg``."""
    eps = cfg.norm_eps or (1e-5 if cfg.norm == "layernorm" else 1e-6)
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32",
                  bos_token_id=None, eos_token_id=None)
    if layout_of(cfg) == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_embd=cfg.d_model, n_positions=cfg.context, n_inner=cfg.ff_dim,
                    activation_function="gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
                    layer_norm_epsilon=eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
                    scale_attn_weights=True, **common)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model,
                head_dim=cfg.head_dim, intermediate_size=cfg.ff_dim, max_position_embeddings=cfg.context,
                hidden_act="silu", rms_norm_eps=eps, rope_theta=cfg.rope_base, attention_bias=cfg.bias,
                mlp_bias=cfg.bias, attention_dropout=0.0, **common)


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------

def _names(cfg: GPTConfig, layout: str) -> list[tuple[str, list[str], bool]]:
    """(our name, their names, transposed) for every tensor. Several names are concatenated along dim 0."""
    rows: list[tuple[str, list[str], bool]] = []
    if layout == "gpt2":
        rows += [("wte.weight", ["transformer.wte.weight"], False), ("wpe.weight", ["transformer.wpe.weight"], False)]
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b, conv in (("ln1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                               ("ln2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)):
                rows.append((ours + a + ".weight", [theirs + b + ".weight"], conv))  # Conv1D stores (in, out)
                rows.append((ours + a + ".bias", [theirs + b + ".bias"], False))
        rows += [("ln_f.weight", ["transformer.ln_f.weight"], False), ("ln_f.bias", ["transformer.ln_f.bias"], False)]
    else:
        rows.append(("wte.weight", ["model.embed_tokens.weight"], False))
        params = ("weight", "bias") if cfg.bias else ("weight",)
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            rows.append((ours + "ln1.weight", [theirs + "input_layernorm.weight"], False))
            rows.append((ours + "ln2.weight", [theirs + "post_attention_layernorm.weight"], False))
            for p in params:
                rows.append((f"{ours}attn.qkv.{p}", [f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv"], False))
                rows.append((f"{ours}attn.proj.{p}", [f"{theirs}self_attn.o_proj.{p}"], False))
                rows.append((f"{ours}mlp.fc.{p}", [f"{theirs}mlp.gate_proj.{p}", f"{theirs}mlp.up_proj.{p}"], False))
                rows.append((f"{ours}mlp.proj.{p}", [f"{theirs}mlp.down_proj.{p}"], False))
        rows.append(("ln_f.weight", ["model.norm.weight"], False))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ["lm_head.weight"], False))
    return rows


#: Buffers some HF checkpoints hold that the engine recomputes (GPT-2's causal mask, Llama's RoPE table).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The folder's tensors under their HF names (never runs code: safetensors or ``weights_only``)."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise HFError(f"{folder} holds config.json but no weights (expected one of: {', '.join(WEIGHT_FILES)})")
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device="cpu"))
    return state


def to_engine(hf_state: dict[str, torch.Tensor], hf: dict) -> dict[str, torch.Tensor]:
    """HF tensors (as :func:`load_weights` gives them) renamed and laid out as the engine's GPT state dict."""
    cfg = GPTConfig(**{k: v for k, v in model_fields(hf).items() if k != "arch"})
    layout = layout_of(cfg)
    state = {k: v for k, v in hf_state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if layout == "gpt2" and "transformer.wte.weight" not in state:  # saved from GPT2Model: no "transformer." prefix
        state = {(k if k == "lm_head.weight" else "transformer." + k): v for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same matrix as the embedding
    rows = _names(cfg, layout)
    missing = [n for _, names, _ in rows for n in names if n not in state]
    if missing:
        raise HFError(f"the weights lack {len(missing)} tensors the config implies: {_few(missing)}")
    used = {n for _, names, _ in rows for n in names}
    extra = sorted(set(state) - used)
    if extra:
        raise HFError(f"the weights hold {len(extra)} tensors the engine's GPT has no place for: {_few(extra)}")
    out = {}
    for ours, names, transposed in rows:
        parts = [state[n].t() if transposed else state[n] for n in names]
        out[ours] = torch.cat(parts, dim=0).float().contiguous() if len(parts) > 1 else parts[0].float().contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def from_engine(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The engine's GPT state dict as HF tensors (contiguous, none sharing memory, as safetensors wants)."""
    layout = layout_of(cfg)
    H, Hkv, D, F = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
    splits = {"attn.qkv": [H * D, Hkv * D, Hkv * D], "mlp.fc": [F, F]}
    out = {}
    for ours, names, transposed in _names(cfg, layout):
        if ours in state:
            tensor = state[ours]
        elif layout == "gpt2" and ours.endswith(".bias"):  # a GPT without biases: GPT-2's are zeros
            tensor = torch.zeros(state[ours[:-len("bias")] + "weight"].shape[0])
        else:
            raise HFError(f"the checkpoint has no tensor {ours!r}")
        sizes = next((s for key, s in splits.items() if key in ours), None) if len(names) > 1 else None
        parts = tensor.split(sizes, dim=0) if sizes else (tensor,)
        for name, part in zip(names, parts):
            out[name] = (part.t() if transposed else part).float().contiguous().clone()
    return out


def save_folder(out_dir: str | Path, state: dict[str, torch.Tensor], cfg: GPTConfig) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of the HF model equal to the engine's GPT."""
    from safetensors.torch import save_file

    config, tensors = hf_config(cfg), from_engine(state, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
