"""Official LLaVA-UHD v2 checkpoint layout (spec §8.2-§8.3) <-> our parameters.

The official key list is written here from the spec's tables, independently of the converter.
"""

import json

import ml_dtypes
import numpy as np
import pytest

from hiwin_jax import config as C
from hiwin_jax.convert import llava_uhd as L
from hiwin_jax.convert.safetensors_io import CheckpointError, write_sharded


def official_shapes(e, c, layers, vocab, mlp, vision_layers, vision_mlp, grid=24, patch=14,
                    tied=False):
  """Key -> shape of the full R1 checkpoint for LLM width e, ViT width c (spec §8.2-§8.3)."""
  shapes = {"model.embed_tokens.weight": (vocab, e), "model.norm.weight": (e,)}
  if not tied:
    shapes["lm_head.weight"] = (vocab, e)
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({p + f"self_attn.{n}_proj.weight": (e, e) for n in "qkvo"})
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


def tiny_model_cfg():
  cfg = C.load_config("tiny").model
  return cfg


def tiny_shapes(cfg):
  return official_shapes(cfg.llm.hidden_size, cfg.vision.hidden_size, cfg.llm.num_layers,
                         cfg.llm.vocab_size, cfg.llm.mlp_dim, cfg.vision.num_layers,
                         cfg.vision.mlp_dim)


def tiny_config_json(cfg, mask=7):
  return {"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
          "hidden_size": cfg.llm.hidden_size, "intermediate_size": cfg.llm.mlp_dim,
          "num_hidden_layers": cfg.llm.num_layers, "num_attention_heads": cfg.llm.num_heads,
          "num_key_value_heads": cfg.llm.num_heads, "vocab_size": cfg.llm.vocab_size,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
          "mm_hidden_size": cfg.vision.hidden_size, "mm_projector_type": "adapt_spatial_resampler",
          "mm_vision_select_layer": -2, "feature_scale_mask": mask, "feature_mode":
          "featup_muti_res", "tokenizer_model_max_length": 4096, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
  cfg = tiny_model_cfg()
  cfg.llm.num_kv_heads = cfg.llm.num_heads  # Vicuna has no GQA; the table covers MHA
  rng = np.random.default_rng(0)
  tensors = {k: rng.standard_normal(s).astype(ml_dtypes.bfloat16)
             for k, s in sorted(tiny_shapes(cfg).items())}
  folder = tmp_path_factory.mktemp("official")
  write_sharded(folder, tensors.items(), max_shard_bytes=400_000)
  (folder / "config.json").write_text(json.dumps(tiny_config_json(cfg)))
  return folder, tensors, cfg


def test_official_checkpoint_round_trips_bit_exact(official_folder, tmp_path):
  folder, tensors, cfg_in = official_folder
  cfg, params = L.import_official(folder, dtype="bfloat16", cfg_model=cfg_in)
  assert cfg.projector.layout == "r1" and cfg.projector.feature_scale_mask == 7
  assert cfg.vision.select_layer == -2
  back = dict(L.official_tensors(params, cfg))
  assert set(back) == set(tensors)
  dead = (L.DEAD_CLIP, L.CHANNEL_NORM)
  for key, value in tensors.items():
    assert back[key].shape == value.shape, key
    if not key.startswith(dead):
      np.testing.assert_array_equal(back[key].view(np.uint16), value.view(np.uint16),
                                    err_msg=key)
  # The dead featurizer copy is filled from our ViT (the spec allows any values).
  np.testing.assert_array_equal(back[L.DEAD_CLIP + "embeddings.class_embedding"],
                                params["vision.class_embedding"])
  out = L.export_official(params, cfg, tmp_path / "export")
  cfg2, params2 = L.import_official(out, dtype="bfloat16", cfg_model=cfg_in)
  assert cfg2.to_dict() == cfg.to_dict()
  for key in params:
    np.testing.assert_array_equal(params2[key], params[key], err_msg=key)


def test_mm_projector_bin_round_trips(official_folder, tmp_path):
  pytest.importorskip("torch")
  folder, _, cfg_in = official_folder
  cfg, params = L.import_official(folder, dtype="bfloat16", cfg_model=cfg_in)
  path = L.export_projector(params, cfg, tmp_path / "mm_projector.bin")
  proj = L.import_projector(path, cfg, dtype="bfloat16")
  assert set(proj) == {k for k in params if k.startswith(("projector.", "jbu."))}
  for key, value in proj.items():
    np.testing.assert_array_equal(value, params[key], err_msg=key)


def test_missing_or_misshaped_official_keys_are_named(official_folder, tmp_path):
  folder, tensors, cfg = official_folder
  bad = dict(tensors)
  bad["model.mm_projector.cat_proj.weight"] = np.zeros((3, 3), ml_dtypes.bfloat16)
  del bad["model.mm_projector.query_3"]
  out = tmp_path / "bad"
  write_sharded(out, sorted(bad.items()))
  (out / "config.json").write_text(json.dumps(tiny_config_json(cfg)))
  with pytest.raises(CheckpointError, match="query_3"):
    L.import_official(out, cfg_model=cfg)
  del bad["model.mm_projector.cat_proj.weight"]
  bad["model.mm_projector.query_3"] = tensors["model.mm_projector.query_3"]
  bad["model.mm_projector.cat_proj.weight"] = np.zeros((3, 3), ml_dtypes.bfloat16)
  write_sharded(out, sorted(bad.items()))
  with pytest.raises(CheckpointError, match=r"cat_proj.weight.*\(3, 3\)"):
    L.import_official(out, cfg_model=cfg)


def test_7b_export_has_exactly_the_official_keys_and_parameter_counts():
  """Spec §8.2: 176,653,490 projector parameters outside upsampler.model.*, 1,062,066 JBU."""
  cfg = C.load_config("vicuna7b").model
  targets = L._targets(cfg)
  # Zero-stride arrays: the 7B parameter tree without allocating it.
  params = {k: np.broadcast_to(np.zeros((), np.float32), shape) for k, (shape, _) in
            targets.items()}
  got = {k: v.shape for k, v in L.official_tensors(params, cfg)}
  want = official_shapes(4096, 1024, 32, 32000, 11008, 24, 4096)
  assert got == want
  proj = sum(int(np.prod(s)) for k, s in got.items()
             if k.startswith(L.PROJ) and not k.startswith(L.PROJ + "upsampler.model."))
  jbu = sum(int(np.prod(s)) for k, s in got.items() if k.startswith(L.JBU))
  assert (proj, jbu) == (176_653_490, 1_062_066)


def test_config_json_round_trip_and_r2():
  cfg = C.load_config("vicuna7b").model
  base = C.base_config().model
  back = L.config_from_json(L.config_to_json(cfg, "bfloat16"), base)
  for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size",
                "rope_theta", "rms_norm_eps", "tie_embeddings"):
    assert back.llm[field] == cfg.llm[field], field
  assert back.projector.to_dict() == cfg.projector.to_dict()
  assert back.max_length == cfg.max_length
  r2 = C.load_config("qwen2_7b").model
  js = L.config_to_json(r2, "bfloat16")
  assert js["mm_projector_type"] == "adapt_spatial_resampler_v2" and js["feature_scale_mask"] == 5
  back = L.config_from_json(js, C.base_config().model)
  assert (back.projector.layout, back.llm.arch, back.llm.num_kv_heads) == ("r2", "qwen2", 4)
  with pytest.raises(CheckpointError, match="model_type"):
    L.config_from_json({"model_type": "bert"})
