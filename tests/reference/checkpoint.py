"""The official LLaVA-UHD v2 checkpoint layout (official-spec §8.2-8.4), written from the spec's
tables independently of the converter: every key with its shape, and config.json."""

from __future__ import annotations


def official_shapes(e, c, layers, vocab, mlp, vision_layers, vision_mlp, grid=24, patch=14,
                    tied=False, kv=None, qkv_bias=False):
  """Key -> shape of the full checkpoint for LLM width e, ViT width c (spec §8.2-§8.3).

  kv: the k/v projections' width (num_key_value_heads * head_dim; default e, no GQA); qkv_bias:
  Qwen2's q/k/v biases. `LlavaQwenForCausalLM` keeps HF Qwen2's names under `model.` and
  `lm_head`, as `LlavaLlamaForCausalLM` keeps Llama's; the R1 and R2 projectors share their keys.
  """
  kv = e if kv is None else kv
  shapes = {"model.embed_tokens.weight": (vocab, e), "model.norm.weight": (e,)}
  if not tied:
    shapes["lm_head.weight"] = (vocab, e)
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (e, e), p + "self_attn.k_proj.weight": (kv, e),
                   p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.o_proj.weight": (e, e)})
    if qkv_bias:
      shapes.update({p + "self_attn.q_proj.bias": (e,), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.bias": (kv,)})
    shapes.update({p + "mlp.gate_proj.weight": (mlp, e), p + "mlp.up_proj.weight": (mlp, e),
                   p + "mlp.down_proj.weight": (e, mlp), p + "input_layernorm.weight": (e,),
                   p + "post_attention_layernorm.weight": (e,)})

  def clip(prefix):
    out = {prefix + "embeddings.class_embedding": (c,),
           prefix + "embeddings.patch_embedding.weight": (c, 3, patch, patch),
           prefix + "embeddings.position_embedding.weight": (grid * grid + 1, c),
           prefix + "pre_layrnorm.weight": (c,), prefix + "pre_layrnorm.bias": (c,),
           prefix + "post_layernorm.weight": (c,), prefix + "post_layernorm.bias": (c,)}
    for i in range(vision_layers):
      p = f"{prefix}encoder.layers.{i}."
      for n in "qkv":
        out[p + f"self_attn.{n}_proj.weight"], out[p + f"self_attn.{n}_proj.bias"] = (c, c), (c,)
      out[p + "self_attn.out_proj.weight"], out[p + "self_attn.out_proj.bias"] = (c, c), (c,)
      for n in ("layer_norm1", "layer_norm2"):
        out[p + n + ".weight"], out[p + n + ".bias"] = (c,), (c,)
      out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (vision_mlp, c), (vision_mlp,)
      out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (c, vision_mlp), (c,)
    return out

  shapes.update(clip("model.vision_tower.vision_tower.vision_model."))
  m = "model.mm_projector."
  shapes.update({m + "pos_embed": (144, e), m + "query": (144, e), m + "kv_proj.weight": (e, c),
                 m + "proj": (e, e), m + "attn.in_proj_weight": (3 * e, e),
                 m + "attn.in_proj_bias": (3 * e,), m + "attn.out_proj.weight": (e, e),
                 m + "attn.out_proj.bias": (e,), m + "cat_proj.weight": (e, 4 * e),
                 m + "cat_proj.bias": (e,)})
  for k in (1, 2, 3, 4):
    shapes[f"{m}query_{k}"] = (144, e)
  for s in (1, 2, 4, 8):
    shapes[f"{m}feature_{s}x_embedding"] = (1, 1, e)
    shapes[f"{m}features_{s}x_projector.weight"] = (e, c)
    shapes[f"{m}features_{s}x_projector.bias"] = (e,)
  for ln in ("ln_q", "ln_kv", "ln_proj", "ln_post"):
    shapes[f"{m}{ln}.weight"], shapes[f"{m}{ln}.bias"] = (e,), (e,)
  u = m + "upsampler.upsampler."
  for up in ("up1", "up2"):
    shapes.update({f"{u}{up}.range_temp": (), f"{u}{up}.sigma_spatial": (),
                   f"{u}{up}.range_proj.0.weight": (32, 3, 1, 1), f"{u}{up}.range_proj.0.bias": (32,),
                   f"{u}{up}.range_proj.3.weight": (32, 32, 1, 1), f"{u}{up}.range_proj.3.bias": (32,),
                   f"{u}{up}.fixup_proj.0.weight": (49, 52, 1, 1), f"{u}{up}.fixup_proj.0.bias": (49,),
                   f"{u}{up}.fixup_proj.3.weight": (49, 49, 1, 1), f"{u}{up}.fixup_proj.3.bias": (49,)})
  shapes[u + "fixup_proj.1.weight"], shapes[u + "fixup_proj.1.bias"] = (c, c, 1, 1), (c,)
  shapes.update(clip(m + "upsampler.model.0.vision_tower.vision_model."))
  shapes[m + "upsampler.model.1.norm.weight"] = shapes[m + "upsampler.model.1.norm.bias"] = (c,)
  return shapes


def model_shapes(cfg):
  """`official_shapes` at the geometry of our model config `cfg` (untied)."""
  llm = cfg.llm
  return official_shapes(llm.hidden_size, cfg.vision.hidden_size, llm.num_layers,
                         llm.vocab_size, llm.mlp_dim, cfg.vision.num_layers, cfg.vision.mlp_dim,
                         kv=llm.num_kv_heads * llm.head_dim, qkv_bias=bool(llm.qkv_bias))


def config_json(cfg, mask=7):
  """The R1 config.json fields (spec §8.4) of a checkpoint of our model config `cfg`."""
  return {"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
          "hidden_size": cfg.llm.hidden_size, "intermediate_size": cfg.llm.mlp_dim,
          "num_hidden_layers": cfg.llm.num_layers, "num_attention_heads": cfg.llm.num_heads,
          "num_key_value_heads": cfg.llm.num_heads, "vocab_size": cfg.llm.vocab_size,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
          "mm_hidden_size": cfg.vision.hidden_size, "mm_projector_type": "adapt_spatial_resampler",
          "mm_vision_select_layer": -2, "feature_scale_mask": mask, "feature_mode":
          "featup_muti_res", "tokenizer_model_max_length": 4096, "torch_dtype": "bfloat16"}


def config_json_r2(cfg, qwen2: bool):
  """The config.json of an R2 (branch HEAD) checkpoint of our model config `cfg`: the 13B
  (`llava_llama`) or Qwen2-7B-Instruct (`llava_qwen`: GQA, theta 1e6, eps 1e-6, Qwen2's special
  ids) release, `adapt_spatial_resampler_v2` with levels {1x, 4x}, `model_mode` uhd_v2."""
  out = config_json(cfg, mask=5)
  del out["feature_mode"]
  out.update(mm_projector_type="adapt_spatial_resampler_v2", model_mode="uhd_v2",
             num_key_value_heads=cfg.llm.num_kv_heads, tie_word_embeddings=False)
  if qwen2:
    out.update(model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"],
               rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
               bos_token_id=151643, eos_token_id=151645, tokenizer_model_max_length=32768)
  return out


def assert_export_holds(folder, tensors) -> None:
  """An exported official folder holds exactly the keys of `tensors` ({key: bf16 array}), each
  bit for bit, except the never-called featurizer copy (refilled on export)."""
  import numpy as np

  from hiwin_jax.convert.safetensors_io import SafetensorsReader
  back = SafetensorsReader(folder)
  assert set(back.keys()) == set(tensors)
  for key, value in tensors.items():
    if ".upsampler.model." not in key:
      np.testing.assert_array_equal(back.get(key).view(np.uint16), value.view(np.uint16),
                                    err_msg=key)
