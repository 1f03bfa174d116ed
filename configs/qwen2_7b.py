"""CLIP-ViT-L/14-336 + Qwen2-7B (the R2 Qwen2 checkpoint): GQA 28/4, q/k/v bias, theta 1e6."""

from hiwin_jax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "qwen2_7b"
  cfg.model.precision.dtype = "bfloat16"
  cfg.model.vision.remat = "full"
  llm = cfg.model.llm
  llm.update(arch="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
             num_kv_heads=4, head_dim=128, mlp_dim=18944, rms_norm_eps=1e-6, rope_theta=1e6,
             max_position_embeddings=32768, qkv_bias=True, tie_embeddings=False,
             bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
             remat="minimal_with_context")
  # R2 (branch HEAD) checkpoints: per-slice separators, levels {1x, 4x} (spec §0.1, §4.1).
  # The separators stay LLaMA's ids 29892 (",") and 13 ("\n") on purpose: the official slicer
  # returns them whatever the LLM, the model embeds them with Qwen2's own table (there they are
  # other tokens) and the R2 layout code branches on exactly these two ids.
  cfg.model.projector.update(layout="r2", feature_scale_mask=5, comma_token=29892,
                             newline_token=13)
  return cfg
