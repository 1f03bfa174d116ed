"""Stage 1, projector pre-training of the released 7B model (official-spec §7): LLaVA-Pretrain
558K captions, `plain` template, overview only, projector trainable (pos_embed included), JBU
reloaded from stage 0, lr 1e-3 cosine with 3% warm-up, global batch 256, max length 3072.

Set the data and weights: --config.data.json=... --config.data.image_folder=...
--config.data.tokenizer=/ckpt/vicuna-7b-v1.5 --config.init.checkpoint=<converted CLIP + Vicuna>
--config.init.vdim=<stage 0 run folder or VDIM .ckpt>.
"""

from hiwin_jax import config


def get_config():
  cfg = config.ConfigDict()
  cfg.name = "stage1_pretrain"
  cfg.seed = 0

  cfg.model = config.from_file("vicuna7b").model  # bf16 compute, rematerialised towers
  cfg.model.precision.param_dtype = "float32"     # fp32 master weights
  cfg.model.max_length = 3072                     # = data.max_length

  cfg.mesh = config.mesh_config()                 # FSDP over every device

  cfg.data = config.data_config()
  cfg.data.update(template="plain", slicing=False, max_length=3072, global_batch_size=256,
                  epochs=1)

  cfg.train = config.train_config()
  cfg.train.update(stage="pretrain", trainable=[r"projector/.*"], frozen=[], jbu_dropout=True)
  cfg.train.optimizer.update(lr=1e-3, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0)

  cfg.checkpoint = config.checkpoint_config()
  cfg.init = config.init_config()
  cfg.export = config.export_config()
  return cfg
