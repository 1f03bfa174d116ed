"""Stage 0 on a CPU: the tiny CLIP of configs/tiny.py (random weights), scikit-image's bundled
photos at 84 px (6x6 patches: the downsamplers map 84 px back to 6x6), batch 2, 30 steps."""

from hiwin_jax import config as C


def get_config():
  cfg = C.load_config("vdim_stage0")
  cfg.name = "vdim_stage0_tiny"
  cfg.steps = 30
  cfg.log_every = 5
  cfg.vision = C.load_config("tiny").model.vision
  cfg.vision.image_size = 84  # position table 6x6: no interpolation at the training size
  cfg.loss.max_pad = 8        # the official 30 px at 336 px, scaled to 84 px
  cfg.data.update(source="skimage", image_size=84, batch_size=2, workers=2)
  cfg.checkpoint.update(every=10, keep=2)
  cfg.mesh.update(data=-1, fsdp=1)
  return cfg
