"""HF `CLIPVisionModel` (openai/clip-vit-large-patch14-336) <-> `ClipVisionTower`.

HF checkpoints name the vision tensors `vision_model.<...>` (the hub's CLIPModel files and
transformers 4.x `CLIPVisionModel`) or `<...>` (transformers 5 `CLIPVisionModel.save_pretrained`).
`hiwin_jax.convert.formats` (format "hf-clip") imports both and exports the `vision_model.` layout,
which both transformers 4 and 5 load.
The LLaVA checkpoint nests the same keys under `model.vision_tower.vision_tower.vision_model.`:
`clip_table(cfg, prefix=...)` serves it, `ours_prefix` places the tower inside a bigger model.
"""

from __future__ import annotations

from typing import Any

from hiwin_jax.convert.core import CONV_HWIO, IDENTITY, TRANSPOSE, KeyTable, Rule
from hiwin_jax.convert.safetensors_io import CheckpointError

HF_PREFIX = "vision_model."

# CLIPVisionConfig field -> vision_config field, with transformers' defaults: save_pretrained
# writes only the fields that differ from them, so a config.json may omit any of these.
_FIELDS = (
    ("image_size", "image_size", 224),
    ("patch_size", "patch_size", 32),
    ("num_channels", "num_channels", 3),
    ("hidden_size", "hidden_size", 768),
    ("num_hidden_layers", "num_layers", 12),
    ("num_attention_heads", "num_heads", 12),
    ("intermediate_size", "mlp_dim", 3072),
    ("layer_norm_eps", "layer_norm_eps", 1e-5),
)


def clip_table(cfg_vision=None, prefix: str = HF_PREFIX, ours_prefix: str = "") -> KeyTable:
  """Torch key `prefix + <HF name>` <-> our path `ours_prefix + <param path>`.

  The layout does not depend on the geometry (layer counts come from the parameter shapes);
  `cfg_vision` is accepted so every model's table is built the same way.
  """
  del cfg_vision
  layer = "encoder.layers.{i}."
  rules = [
      ("embeddings.class_embedding", "class_embedding", IDENTITY),
      ("embeddings.patch_embedding.weight", "patch_embedding", CONV_HWIO),
      ("embeddings.position_embedding.weight", "position_embedding", IDENTITY),
      ("pre_layrnorm.weight", "pre_layrnorm.scale", IDENTITY),
      ("pre_layrnorm.bias", "pre_layrnorm.bias", IDENTITY),
  ]
  for norm in ("layer_norm1", "layer_norm2"):
    rules += [(f"{layer}{norm}.weight", f"layers.{norm}.scale", IDENTITY),
              (f"{layer}{norm}.bias", f"layers.{norm}.bias", IDENTITY)]
  for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
                     ("mlp", ("fc1", "fc2"))):
    for name in names:
      rules += [(f"{layer}{sub}.{name}.weight", f"layers.{sub}.{name}.kernel", TRANSPOSE),
                (f"{layer}{sub}.{name}.bias", f"layers.{sub}.{name}.bias", IDENTITY)]
  rules += [("post_layernorm.weight", "post_layernorm.scale", IDENTITY),
            ("post_layernorm.bias", "post_layernorm.bias", IDENTITY)]
  return KeyTable(
      name="HF CLIPVisionModel",
      rules=tuple(Rule(prefix + t, ours_prefix + o, tf) for t, o, tf in rules),
      ignore=("position_ids",))  # a buffer that older transformers versions saved


def hf_config_to_vision(config_json) -> dict[str, Any]:
  """vision_config fields of a CLIPVisionConfig, or of a CLIPConfig's `vision_config` (a parsed
  config.json). Only architecture fields are returned (select_layer and remat are ours)."""
  hf = dict(config_json)
  if "vision_config" in hf:
    hf = hf["vision_config"] or {}
  act = hf.get("hidden_act", "quick_gelu")
  if act != "quick_gelu":
    raise CheckpointError(f"CLIP hidden_act {act!r} is not supported (ClipVisionTower uses "
                          f"quick_gelu, as openai/clip-vit-large-patch14-336 does)")
  return {ours: type(default)(hf.get(theirs, default)) for theirs, ours, default in _FIELDS}


def vision_to_hf_config(cfg_vision, dtype: str = "float32") -> dict[str, Any]:
  """A CLIPVisionConfig config.json that `CLIPVisionModel.from_pretrained` loads."""
  hf = {theirs: cfg_vision[ours] for theirs, ours, _ in _FIELDS}
  hf.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model",
            hidden_act="quick_gelu", attention_dropout=0.0, initializer_range=0.02,
            initializer_factor=1.0, dtype=dtype)
  return hf
