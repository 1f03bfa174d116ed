"""A tiny model with the real architecture, for tests and the offline demo (fp32, CPU-sized)."""

from hiwin_jax import config


def get_config():
  cfg = config.base_config()
  cfg.name = "tiny"
  cfg.model.vision.update(hidden_size=64, num_layers=3, num_heads=4, mlp_dim=128)
  cfg.model.llm.update(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, mlp_dim=128, max_position_embeddings=2048)
  cfg.model.projector.update(num_heads=4, comma_token=11)  # "," must exist in the tiny vocab
  return cfg
