"""Stage 1 on the tiny model (tests, `hiwin demo`): the official stage-1 recipe
(configs/stage1_pretrain.py) at CPU size. Data paths (--config.data.json / image_folder /
tokenizer) are set by the caller."""

from hiwin_jax import config


def get_config():
  cfg = config.from_file("stage1_pretrain")
  cfg.name = "tiny_stage1"
  cfg.model = config.from_file("tiny").model  # fp32 compute and parameters
  cfg.model.max_length = 1024
  cfg.data.update(global_batch_size=8, max_length=1024, seq_multiple=64, workers=0)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  cfg.checkpoint.update(every=50, keep=2)
  return cfg
