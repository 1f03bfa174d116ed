"""The released LLaVA-UHD v2 model: CLIP-ViT-L/14-336 + Vicuna-7B v1.5 (official-spec §2, §6.1)."""

from hiwin_jax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "vicuna7b"
  cfg.model.precision.dtype = "bfloat16"
  cfg.model.vision.remat = "full"
  cfg.model.llm.remat = "minimal_with_context"
  return cfg
