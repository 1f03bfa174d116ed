"""Stage 0 on a CPU: the official stage-0 recipe (configs/vdim_stage0.py) with the tiny CLIP of
configs/tiny.py (random weights), scikit-image's bundled photos at 84 px (6x6 patches: the
downsamplers map 84 px back to 6x6), batch 2, 30 steps."""

from hiwin_jax import config


def get_config():
  cfg = config.from_file("vdim_stage0")
  cfg.name = "vdim_stage0_tiny"
  cfg.model = config.from_file("tiny").model
  cfg.model.vision.image_size = 84  # position table 6x6: no interpolation at the training size
  cfg.data.update(source="skimage", image_size=84, global_batch_size=2, workers=2)
  cfg.train.update(num_steps=30, log_every=5)
  cfg.train.vdim_loss.max_pad = 8   # the official 30 px at 336 px, scaled to 84 px
  cfg.checkpoint.update(every=10, keep=2)
  return cfg
