"""The official LLaVA-UHD v2 checkpoints <-> `LlavaUHD` parameters (official-spec §8).

One `KeyTable` covers the full checkpoint (sharded safetensors + config.json): the LLM
(`model.*`, `lm_head.weight`), the fine-tuned ViT (`model.vision_tower.vision_tower.vision_model.*`),
the Hiwin projector (`model.mm_projector.*`) and the JBU (`model.mm_projector.upsampler.upsampler.*`).
`mm_projector.bin` holds the projector and JBU keys only (a torch pickle of tensors, read with
`weights_only=True`).

Keys the forward never reads are still stored and round-trip: `query`, `kv_proj`, the 8x (and,
with mask 5, 2x) level projector and embedding. Two groups have no parameter of ours:
- the dead CLIP copy `model.mm_projector.upsampler.model.0.vision_tower.vision_model.*` (FeatUp's
  featurizer, never called) and its ChannelNorm `...upsampler.model.1.norm.*`: ignored on import;
  on export filled with our ViT's weights and a unit LayerNorm, as the spec allows, so the official
  code loads the file with `strict=True`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import numpy as np

from hiwin_jax import config, outputs, weights
from hiwin_jax.convert import core, hf_clip, hf_llama, vdim
from hiwin_jax.convert.core import IDENTITY, TRANSPOSE, KeyTable, Rule
from hiwin_jax.convert.formats import dtype_name, np_dtype
from hiwin_jax.convert.safetensors_io import (CheckpointError, SafetensorsReader,
                                              read_checkpoint_json, write_safetensors,
                                              write_sharded)

PROJ = "model.mm_projector."
PROJECTOR_FILE = "mm_projector.bin"  # the name stage 1 gives it
VISION = "model.vision_tower.vision_tower.vision_model."
JBU = PROJ + "upsampler.upsampler."
DEAD_CLIP = PROJ + "upsampler.model.0.vision_tower.vision_model."
CHANNEL_NORM = PROJ + "upsampler.model.1.norm."
PROJECTOR_TYPES = {"adapt_spatial_resampler": "r1", "adapt_spatial_resampler_v2": "r2"}
MODEL_TYPES = {"llava_llama": "llama", "llava_qwen": "qwen2", "llava_qwen2": "qwen2"}


def projector_table(prefix: str = PROJ, ours: str = "projector.") -> KeyTable:
  """`AdaptSpatialResampler`'s own keys (spec §8.2) <-> `HiwinProjector` paths."""
  rules = [Rule(prefix + k, ours + k, IDENTITY)
           for k in ("pos_embed", "query", "query_1", "query_2", "query_3", "query_4", "proj")]
  rules.append(Rule(prefix + "kv_proj.weight", ours + "kv_proj.kernel", TRANSPOSE))
  for s in (1, 2, 4, 8):
    rules += [
        Rule(f"{prefix}feature_{s}x_embedding", f"{ours}feature_{s}x_embedding", IDENTITY),
        Rule(f"{prefix}features_{s}x_projector.weight", f"{ours}features_{s}x_projector.kernel",
             TRANSPOSE),
        Rule(f"{prefix}features_{s}x_projector.bias", f"{ours}features_{s}x_projector.bias",
             IDENTITY)]
  rules += [Rule(prefix + "attn.in_proj_weight", ours + "attn_in_proj.kernel", TRANSPOSE),
            Rule(prefix + "attn.in_proj_bias", ours + "attn_in_proj.bias", IDENTITY),
            Rule(prefix + "attn.out_proj.weight", ours + "attn_out_proj.kernel", TRANSPOSE),
            Rule(prefix + "attn.out_proj.bias", ours + "attn_out_proj.bias", IDENTITY),
            Rule(prefix + "cat_proj.weight", ours + "cat_proj.kernel", TRANSPOSE),
            Rule(prefix + "cat_proj.bias", ours + "cat_proj.bias", IDENTITY)]
  for ln in ("ln_q", "ln_kv", "ln_proj", "ln_post"):
    rules += [Rule(f"{prefix}{ln}.weight", f"{ours}{ln}.scale", IDENTITY),
              Rule(f"{prefix}{ln}.bias", f"{ours}{ln}.bias", IDENTITY)]
  return KeyTable("AdaptSpatialResampler", tuple(rules))


def llava_table(cfg_model, projector_only: bool = False) -> KeyTable:
  """The full checkpoint's table (or `mm_projector.bin`'s with `projector_only`)."""
  tables = [projector_table(), vdim.jbu_table(cfg_model.projector.jbu_scale, JBU, "jbu.")]
  if not projector_only:
    tables = [core.prefixed(hf_llama.llama_table(cfg_model.llm), ours="llm."),
              hf_clip.clip_table(cfg_model.vision, prefix=VISION, ours_prefix="vision.")] + tables
  rules = tuple(r for t in tables for r in t.rules)
  ignore = ("rotary_emb.inv_freq", "position_ids", DEAD_CLIP, CHANNEL_NORM)
  return KeyTable("LLaVA-UHD v2" + (" mm_projector" if projector_only else ""), rules, ignore)


def dead_weight(params: dict[str, np.ndarray], cfg_model) -> Iterator[tuple[str, np.ndarray]]:
  """The never-used FeatUp featurizer copy and ChannelNorm: the copy filled from our ViT when
  `params` holds it, else (a projector on its own) with zeros; a unit ChannelNorm. The official
  code never calls either, its strict `load_state_dict` only needs the keys and shapes."""
  dtype = params["projector.proj"].dtype
  vision = {k: v for k, v in params.items() if k.startswith("vision.")}
  if not vision:
    vision = {k: np.broadcast_to(np.zeros((), dtype), shape)
              for k, (shape, _) in _targets(cfg_model).items() if k.startswith("vision.")}
  yield from core.to_torch(hf_clip.clip_table(cfg_model.vision, prefix=DEAD_CLIP,
                                              ours_prefix="vision."), vision)
  width = cfg_model.vision.hidden_size
  yield CHANNEL_NORM + "weight", np.ones(width, dtype)
  yield CHANNEL_NORM + "bias", np.zeros(width, dtype)


# --- config.json ---------------------------------------------------------------------------------

def config_from_json(config_json: dict[str, Any], cfg_model=None):
  """`cfg.model` for an official config.json (spec §8.4): LLM fields, feature_scale_mask, select
  layer, projector type (-> token layout) and max length. The file does not describe the ViT
  (`mm_vision_tower` is a path): its geometry comes from `cfg_model` (default CLIP-L/14-336).

  The projector's widths follow the checkpoint (embed_dim = LLM width, kv_dim = ViT width, as
  the official code builds them); its head count is `cfg_model`'s when the LLM width is
  `cfg_model`'s, else the official embed_dim // 128."""
  cfg = config.model_config() if cfg_model is None else config.ConfigDict(cfg_model.to_dict())
  width, heads = cfg.projector.embed_dim or cfg.llm.hidden_size, cfg.projector.num_heads
  c = dict(config_json)
  model_type = c.get("model_type")
  if model_type not in MODEL_TYPES:
    raise CheckpointError(f"model_type {model_type!r} is not a LLaVA-UHD v2 checkpoint "
                          f"(expected one of {sorted(MODEL_TYPES)})")
  kind = c.get("mm_projector_type", "adapt_spatial_resampler")
  if kind not in PROJECTOR_TYPES:
    raise CheckpointError(f"mm_projector_type {kind!r} is not supported "
                          f"(expected one of {sorted(PROJECTOR_TYPES)})")
  cfg.llm.update(hf_llama.hf_config_to_llm(dict(c, model_type=MODEL_TYPES[model_type])))
  cfg.vision.select_layer = int(c.get("mm_vision_select_layer", cfg.vision.select_layer))
  cfg.projector.update(layout=PROJECTOR_TYPES[kind],
                       feature_scale_mask=int(c.get("feature_scale_mask", 7)))
  if c.get("mm_hidden_size", cfg.vision.hidden_size) != cfg.vision.hidden_size:
    raise CheckpointError(f"mm_hidden_size {c['mm_hidden_size']} != ViT width "
                          f"{cfg.vision.hidden_size}")
  cfg.max_length = int(c.get("tokenizer_model_max_length", cfg.max_length))
  cfg.projector.update(embed_dim=None, kv_dim=None,
                       num_heads=heads if width == cfg.llm.hidden_size else None)
  return config.resolve_model(cfg)


def config_to_json(cfg_model, dtype: str) -> dict[str, Any]:
  """An R1/R2 config.json: the LLM's HF fields plus the multimodal fields of spec §8.4."""
  llm = cfg_model.llm
  out = hf_llama.llm_to_hf_config(llm, dtype)
  layout = cfg_model.projector.layout
  out.update(
      model_type="llava_llama" if llm.arch == "llama" else "llava_qwen",
      architectures=["LlavaLlamaForCausalLM" if llm.arch == "llama" else "LlavaQwenForCausalLM"],
      mm_vision_tower="openai/clip-vit-large-patch14-336",
      mm_hidden_size=cfg_model.vision.hidden_size,
      mm_projector_type=next(k for k, v in PROJECTOR_TYPES.items() if v == layout),
      mm_vision_select_layer=cfg_model.vision.select_layer, mm_vision_select_feature="patch",
      mm_patch_merge_type="flat", feature_scale_mask=cfg_model.projector.feature_scale_mask,
      image_aspect_ratio="pad", tokenizer_padding_side="right",
      tokenizer_model_max_length=cfg_model.max_length, tune_mm_mlp_adapter=False,
      freeze_mm_mlp_adapter=False, mm_use_im_start_end=False, mm_use_im_patch_token=False,
      use_mm_proj=True, torch_dtype=dtype)
  if layout == "r1":
    out["feature_mode"] = "featup_muti_res"
  else:
    out["model_mode"] = "uhd_v2"
  return out


# --- folders and files ---------------------------------------------------------------------------

def _targets(cfg_model, dtype=None) -> dict[str, tuple[tuple, np.dtype]]:
  from flax import nnx
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  targets = weights.param_targets(nnx.eval_shape(
      lambda: LlavaUHD(cfg_model, Precision(), rngs=nnx.Rngs(0))))
  if dtype is not None:
    targets = {k: (shape, np_dtype(dtype)) for k, (shape, _) in targets.items()}
  return targets


def import_official(folder: str | pathlib.Path, dtype: str | None = None, cfg_model=None):
  """(cfg.model, dotted path -> numpy array) of a full official checkpoint folder."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: no such folder")
  config_json = read_checkpoint_json(folder / "config.json", "LLaVA-UHD checkpoint config")
  try:
    cfg = config_from_json(config_json, cfg_model)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{folder / 'config.json'}: cannot use this checkpoint config: "
                          f"{e}") from None
  reader = SafetensorsReader(folder)
  params = core.to_ours(llava_table(cfg), reader, _targets(cfg, dtype), where=str(folder))
  return cfg, params


def import_projector(path: str | pathlib.Path, cfg_model, dtype: str | None = None):
  """The projector + JBU parameters (paths `projector.*`, `jbu.*`) of an `mm_projector.bin`
  (torch pickle) or of its `.safetensors` twin; nothing else of the model is needed."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    reader = SafetensorsReader(path)
    tensors = {k: reader.get(k) for k in reader.keys() if k.startswith(PROJ)}
  else:
    tensors = vdim.read_torch_tensors(path, PROJ)
  targets = {k: v for k, v in _targets(cfg_model, dtype).items()
             if k.startswith(("projector.", "jbu."))}
  return core.to_ours(llava_table(cfg_model, projector_only=True), core.DictSource(tensors),
                      targets, where=str(path))


def projector_tensors(params: dict[str, np.ndarray], cfg_model,
                      dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Every `model.mm_projector.*` key of the released `mm_projector.bin` from the `projector.*`
  and `jbu.*` parameters alone (a stage-1 run that trained only the projector); other entries of
  `params` are only read for the dead featurizer copy (`dead_weight`)."""
  cast = np_dtype(dtype)
  yield from core.to_torch(llava_table(cfg_model, projector_only=True), params, cast)
  for key, value in dead_weight(params, cfg_model):
    yield key, value if cast is None else value.astype(cast)


def official_tensors(params: dict[str, np.ndarray], cfg_model,
                     dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Every key of the full official checkpoint (spec §8.2-§8.3), dead weight included."""
  cast = np_dtype(dtype)
  tables = [core.prefixed(hf_llama.llama_table(cfg_model.llm), ours="llm."),
            hf_clip.clip_table(cfg_model.vision, prefix=VISION, ours_prefix="vision.")]
  for table in tables:
    yield from core.to_torch(table, params, cast)
  yield from projector_tensors(params, cfg_model, dtype)


def export_official(params: dict[str, np.ndarray], cfg_model, folder: str | pathlib.Path,
                    dtype: str | None = "bfloat16", max_shard_bytes: int = 5 * 2 ** 30, *,
                    overwrite: bool = False) -> pathlib.Path:
  """The official full-checkpoint layout (bf16 by default, as released), tensor by tensor. The
  folder appears complete or not at all; a non-empty one is refused unless `overwrite` (then
  replaced whole, if it holds only model files)."""
  name = dtype or dtype_name(params["llm.norm.scale"].dtype)
  with outputs.atomic_folder(folder, outputs.MODEL_FOLDER, overwrite=overwrite,
                             flag="--output") as tmp:
    write_sharded(tmp, official_tensors(params, cfg_model, dtype), max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config_to_json(cfg_model, name), indent=2))
  return pathlib.Path(folder)


def export_projector(params: dict[str, np.ndarray], cfg_model, path: str | pathlib.Path,
                     dtype: str | None = "bfloat16", safetensors: bool = False) -> pathlib.Path:
  """`mm_projector.bin`: every `model.mm_projector.*` key (JBU and dead copy included), a
  torch.save'd dict of tensors as stage 1 writes it, from the projector's parameters alone
  (`projector_tensors`); with `safetensors`, the same tensors also in `<path>.safetensors`."""
  path = pathlib.Path(path)
  tensors = dict(projector_tensors(params, cfg_model, dtype))
  vdim.save_torch_tensors(path, tensors)
  if safetensors:
    write_safetensors(path.with_suffix(".safetensors"), tensors.items())
  return path


def export_projector_folder(params: dict[str, np.ndarray], cfg_model,
                            folder: str | pathlib.Path, dtype: str | None = "bfloat16", *,
                            overwrite: bool = False) -> pathlib.Path:
  """`hiwin convert export --format llava-projector`: `folder` with `mm_projector.bin` and its
  `.safetensors` twin (`export_projector`), written completely or not at all."""
  with outputs.atomic_folder(folder, outputs.PROJECTOR_FOLDER, overwrite=overwrite,
                             flag="--output") as tmp:
    export_projector(params, cfg_model, tmp / PROJECTOR_FILE, dtype, safetensors=True)
  return pathlib.Path(folder)
