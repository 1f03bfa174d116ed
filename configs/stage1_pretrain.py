"""Stage 1, projector pre-training of the released 7B model (official-spec §7): LLaVA-Pretrain
558K captions, `plain` template, overview only, projector trainable (pos_embed included), JBU
reloaded from stage 0, lr 1e-3 cosine with 3% warm-up, global batch 256, max length 3072.

Set the data and weights: --config.data.json=... --config.data.image_folder=...
--config.data.tokenizer=/ckpt/vicuna-7b-v1.5 --config.init.checkpoint=<converted CLIP + Vicuna>
--config.init.vdim=<stage 0 run folder or VDIM .ckpt>."""

from hiwin_jax.train.loop import stage_config


def get_config():
  cfg = stage_config("vicuna7b", "pretrain")
  cfg.name = "stage1_pretrain"
  return cfg
