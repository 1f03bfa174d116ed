"""Stage 2, full fine-tuning of the released 7B model (official-spec §7): LLaVA-UHD-v2 SFT data,
`vicuna_v1`, slicing on (max 7 slices), LLM + ViT + projector trainable except pos_embed, JBU
frozen except the final 4x fix-up, lr 2e-5 cosine with 3% warm-up, global batch 128, max length
4096. --config.init.checkpoint=<stage 1's final/> --config.init.vdim=<stage 0 output>."""

from hiwin_jax.train.loop import stage_config


def get_config():
  cfg = stage_config("vicuna7b", "sft")
  cfg.name = "stage2_sft"
  return cfg
