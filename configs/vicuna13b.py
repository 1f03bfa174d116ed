"""CLIP-ViT-L/14-336 + Vicuna-13B v1.5 (the R2 13B checkpoint)."""

from hiwin_jax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "vicuna13b"
  cfg.model.precision.dtype = "bfloat16"
  cfg.model.vision.remat = "full"
  llm = cfg.model.llm
  llm.update(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
             mlp_dim=13824, remat="minimal_with_context")
  # R2 (branch HEAD) checkpoints: per-slice separators, levels {1x, 4x} (spec §0.1, §4.1).
  cfg.model.projector.update(layout="r2", feature_scale_mask=5)
  return cfg
