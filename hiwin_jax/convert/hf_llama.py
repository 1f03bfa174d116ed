"""HF `LlamaForCausalLM` / `Qwen2ForCausalLM` <-> `hiwin_jax.models.llama.LlamaModel`.

The conversion is the key table `llama_table`: Linear weights are transposed, everything else is
copied, per-layer tensors are stacked on the leading `layers` axis. `hiwin_jax.convert.formats`
(format "hf-llm") moves whole HF folders (config.json + sharded safetensors) in and out without torch.
"""

from __future__ import annotations

from typing import Any

from hiwin_jax.convert.core import IDENTITY, TRANSPOSE, KeyTable, Rule

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def llama_table(cfg_llm) -> KeyTable:
  """The torch key -> our path table for the architecture and options in `cfg_llm`."""
  rules = [Rule("model.embed_tokens.weight", "embed_tokens.embedding", IDENTITY)]
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rules.append(Rule(f"model.layers.{{i}}.self_attn.{name}.weight",
                      f"layers.self_attn.{name}.kernel", TRANSPOSE))
    if cfg_llm.qkv_bias and name != "o_proj":
      rules.append(Rule(f"model.layers.{{i}}.self_attn.{name}.bias",
                        f"layers.self_attn.{name}.bias", IDENTITY))
  for name in ("gate_proj", "up_proj", "down_proj"):
    rules.append(Rule(f"model.layers.{{i}}.mlp.{name}.weight", f"layers.mlp.{name}.kernel",
                      TRANSPOSE))
  for name in ("input_layernorm", "post_attention_layernorm"):
    rules.append(Rule(f"model.layers.{{i}}.{name}.weight", f"layers.{name}.scale", IDENTITY))
  rules.append(Rule("model.norm.weight", "norm.scale", IDENTITY))
  ignore = ["rotary_emb.inv_freq"]
  if cfg_llm.tie_embeddings:
    # A torch state_dict of a tied model lists the shared tensor under both names.
    ignore.append("lm_head.weight")
  else:
    rules.append(Rule("lm_head.weight", "lm_head.kernel", TRANSPOSE))
  return KeyTable(f"HF {ARCHITECTURES[cfg_llm.arch]}", tuple(rules), tuple(ignore))


# --- config.json <-> llm config -----------------------------------------------------------------

def _rope_theta(config: dict) -> float:
  """rope_theta of a transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) file."""
  rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ValueError(f"RoPE scaling {kind!r} is not supported (only plain RoPE): {rope}")
  theta = rope.get("rope_theta", config.get("rope_theta"))
  return float(10000.0 if theta is None else theta)


def _token_id(value):
  return value[0] if isinstance(value, (list, tuple)) else value


def hf_config_to_llm(config_json: dict) -> dict[str, Any]:
  """The llm config fields (`hiwin_jax.config.llm_config`) described by an HF config.json."""
  c = config_json
  arch = c.get("model_type")
  if arch not in ARCHITECTURES:
    raise ValueError(f"model_type {arch!r} is not supported; expected one of "
                     f"{sorted(ARCHITECTURES)}")
  if c.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
  if c.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  if arch == "llama" and c.get("attention_bias"):
    raise ValueError("llama attention_bias=True (which also biases o_proj) is not supported")
  if c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or ()):
    raise ValueError("sliding-window attention is not supported")
  heads = c["num_attention_heads"]
  return dict(
      arch=arch,
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=c.get("num_key_value_heads") or heads,
      head_dim=c.get("head_dim") or c["hidden_size"] // heads,
      mlp_dim=c["intermediate_size"],
      rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      rope_theta=_rope_theta(c),
      max_position_embeddings=c.get("max_position_embeddings", 2048),
      qkv_bias=arch == "qwen2",  # HF Qwen2 always biases q/k/v
      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      bos_token_id=_token_id(c.get("bos_token_id")),
      eos_token_id=_token_id(c.get("eos_token_id")),
      pad_token_id=_token_id(c.get("pad_token_id")),
  )


def llm_to_hf_config(cfg_llm, dtype: str = "float32") -> dict[str, Any]:
  """A config.json that `AutoModelForCausalLM.from_pretrained` loads as Llama/Qwen2ForCausalLM."""
  c = cfg_llm
  if c.arch == "llama" and c.qkv_bias:
    raise ValueError("HF Llama cannot express q/k/v biases without an o_proj bias")
  if c.arch == "qwen2" and not c.qkv_bias:
    raise ValueError("HF Qwen2 always has q/k/v biases; set qkv_bias=True")
  out = dict(
      architectures=[ARCHITECTURES[c.arch]], model_type=c.arch,
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_dim,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_act="silu",
      max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
      # Both spellings: transformers 5 reads rope_parameters, transformers 4 rope_theta.
      rope_theta=float(c.rope_theta),
      rope_parameters=dict(rope_type="default", rope_theta=float(c.rope_theta)),
      tie_word_embeddings=bool(c.tie_embeddings), attention_dropout=0.0,
      initializer_range=0.02, use_cache=True,
      bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
      dtype=dtype,
  )
  if c.arch == "llama":
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers,
               layer_types=["full_attention"] * c.num_layers)
  return out
