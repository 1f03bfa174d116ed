"""Stage 2, full fine-tuning of the released 7B model (official-spec §7): LLaVA-UHD-v2 SFT data,
`vicuna_v1`, slicing on (max 7 slices), LLM + ViT + projector trainable except pos_embed, JBU
frozen except the final 4x fix-up, lr 2e-5 cosine with 3% warm-up, global batch 128, max length
4096.

Set the data and weights: --config.data.json=... --config.data.image_folder=...
--config.data.tokenizer=/ckpt/vicuna-7b-v1.5 --config.init.checkpoint=<stage 1's final/>
--config.init.vdim=<stage 0 run folder or VDIM .ckpt>.
"""

from hiwin_jax import config


def get_config():
  cfg = config.ConfigDict()
  cfg.name = "stage2_sft"
  cfg.seed = 0

  cfg.model = config.from_file("vicuna7b").model  # bf16 compute, rematerialised towers
  cfg.model.precision.param_dtype = "float32"     # fp32 master weights
  cfg.model.max_length = 4096                     # = data.max_length

  cfg.mesh = config.mesh_config()                 # FSDP over every device

  cfg.data = config.data_config()
  cfg.data.update(template="vicuna_v1", slicing=True, max_slice_nums=7, max_length=4096,
                  global_batch_size=128, epochs=1)

  cfg.train = config.train_config()
  # The official JBU is `mm_projector.upsampler`; ours is the `jbu` group, so "the projector
  # except the upsampler" is `projector/.*`.
  cfg.train.update(stage="sft",
                   trainable=[r"llm/.*", r"vision/.*", r"projector/.*", r"jbu/fixup_proj/.*"],
                   frozen=[r"projector/pos_embed"], jbu_dropout=True)
  cfg.train.optimizer.update(lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0)

  cfg.checkpoint = config.checkpoint_config()
  cfg.init = config.init_config()
  cfg.export = config.export_config()
  return cfg
