"""Stage 0: VDIM (JBU 4x stack) pre-training as the official run (official-spec §3.7).

Frozen CLIP-ViT-L/14-336 featurizer (layer -2, no ChannelNorm), 336 px images, global batch 16
(the official run: 8 GPUs x 2), fp32, torch NAdam 1e-3, gradient-norm clip 1e-4 for the first
10 steps, 2 jitters per step, one epoch.

Set the images and the featurizer: --config.data.source=<folder of images, e.g. COCO train2017>
--config.init.vision=<HF openai/clip-vit-large-patch14-336 folder>.
"""

from hiwin_jax import config


def get_config():
  cfg = config.ConfigDict()
  cfg.name = "vdim_stage0"
  cfg.seed = 0

  # The model whose JBU this trains. Stage 0 builds only its ViT (the frozen featurizer, from
  # init.vision) and the JBU (projector.jbu_scale, conv_impl, jbu_official_grad_bug); the
  # official pre-training ran in fp32.
  cfg.model = config.model_config()

  cfg.mesh = config.mesh_config()
  cfg.mesh.update(data=-1, fsdp=1)  # pure data parallelism: the VDIM has ~1 M parameters

  cfg.data = config.vdim_data_config()
  cfg.data.update(source="", image_size=336, global_batch_size=16, workers=8)

  cfg.train = config.vdim_train_config()
  cfg.train.num_steps = -1  # one epoch (the official max_epochs = 1)
  cfg.train.optimizer.update(lr=1e-3, clip_norm=1e-4, clip_steps=10)
  cfg.train.vdim_loss.update(n_jitters=2, max_pad=30, max_zoom=2.0, projection_dim=30,
                             crf_weight=0.001, crf_samples=1000)

  cfg.checkpoint = config.checkpoint_config()
  cfg.checkpoint.update(every=500, keep=3)
  cfg.init = config.vdim_init_config()
  cfg.export = config.export_config()
  cfg.export.dtype = "float32"  # the official VDIM checkpoint is fp32
  return cfg
