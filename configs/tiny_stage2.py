"""Stage 2 on the tiny model (tests, `hiwin demo`): the official stage-2 recipe at CPU size
(a higher learning rate than 7B's 2e-5: the tiny model starts far from trained).
--config.init.checkpoint=<tiny stage 1's final/> and the data paths are set by the caller."""

from hiwin_jax.train.loop import stage_config


def get_config():
  cfg = stage_config("tiny", "sft")
  cfg.name = "tiny_stage2"
  cfg.model.precision.dtype = "float32"
  cfg.train.optimizer.lr = 1e-3
  cfg.data.update(global_batch_size=8, max_length=1024, seq_multiple=64, workers=0)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  cfg.train.log_every = 10
  cfg.checkpoint.update(every=50, keep=2)
  return cfg
