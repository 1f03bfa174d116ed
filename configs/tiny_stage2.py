"""Stage 2 on the tiny model (tests, `hiwin demo`): the official stage-2 recipe
(configs/stage2_sft.py) at CPU size, with a higher learning rate than 7B's 2e-5 (the tiny model
starts far from trained). --config.init.checkpoint=<tiny stage 1's final/> and the data paths
are set by the caller."""

from hiwin_jax import config


def get_config():
  cfg = config.from_file("stage2_sft")
  cfg.name = "tiny_stage2"
  cfg.model = config.from_file("tiny").model  # fp32 compute and parameters
  cfg.model.max_length = 1024
  cfg.train.optimizer.lr = 1e-3
  cfg.data.update(global_batch_size=8, max_length=1024, seq_multiple=64, workers=0)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  cfg.checkpoint.update(every=50, keep=2)
  return cfg
