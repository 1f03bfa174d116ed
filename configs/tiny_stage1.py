"""Stage 1 on the tiny model (tests, `hiwin demo`): the official stage-1 recipe at CPU size.
Data paths (--config.data.json / image_folder / tokenizer) are set by the caller."""

from hiwin_jax.train.loop import stage_config


def get_config():
  cfg = stage_config("tiny", "pretrain")
  cfg.name = "tiny_stage1"
  cfg.model.precision.dtype = "float32"
  cfg.data.update(global_batch_size=8, max_length=1024, seq_multiple=64, workers=0)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  cfg.train.log_every = 10
  cfg.checkpoint.update(every=50, keep=2)
  return cfg
