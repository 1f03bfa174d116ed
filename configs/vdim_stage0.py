"""Stage 0: VDIM (JBU 4x stack) pre-training as the official run (official-spec §3.7).

`hiwin_jax.train.vdim.run_vdim(cfg, out_dir)`. Frozen CLIP-ViT-L/14-336 featurizer (layer -2, no
ChannelNorm), 336 px images, global batch 16 (the official run: 8 GPUs x 2), torch NAdam 1e-3,
gradient-norm clip 1e-4 for the first 10 steps, 2 jitters per step, one epoch.
Set `data.source` (a folder of images, e.g. COCO train2017) and `vision_weights` (an HF
`openai/clip-vit-large-patch14-336` folder) on the command line.
"""

import ml_collections

from hiwin_jax import config as C


def get_config():
  cfg = ml_collections.ConfigDict()
  cfg.name = "vdim_stage0"
  cfg.stage = "vdim"
  cfg.seed = 0
  cfg.steps = -1            # -1: one epoch, ceil(#images / batch_size) steps (max_epochs = 1)
  cfg.log_every = 10
  cfg.vision = C.vision_config()
  cfg.vision_weights = ""   # HF CLIP folder for ckpt_convert "hf-clip"; "" = random init (warned)
  cfg.precision = C.precision_config()  # the official pre-training ran in fp32
  cfg.jbu = ml_collections.ConfigDict(dict(
      scale=4,
      conv_impl="xla",      # the Pallas kernels are not partitioned over a sharded batch
      # True: reproduce the official CUDA grad_filters bug (only taps 0, 1, 4, 9, 16, 25, 36 of
      # the adaptive-conv filters get gradient), for bit-faithful replays of the official run.
      official_grad_bug=False,
  ))
  cfg.loss = ml_collections.ConfigDict(dict(
      n_jitters=2, max_pad=30, max_zoom=2.0, projection_dim=30, crf_weight=0.001,
      crf_samples=1000,
  ))
  cfg.data = ml_collections.ConfigDict(dict(
      source="",            # folder of images (recursive) or "skimage"
      image_size=336,       # multiple of 14; the downsamplers map back to image_size / 14
      batch_size=16,        # global; sharded over the mesh's data axes
      workers=8,            # decoding threads
  ))
  cfg.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, momentum_decay=4e-3,  # torch.optim.NAdam defaults
      clip_norm=1e-4, clip_steps=10,
  ))
  cfg.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, resume=True))
  cfg.mesh = C.mesh_config()
  cfg.mesh.update(data=-1, fsdp=1)  # pure data parallelism: the VDIM has ~1 M parameters
  return cfg
