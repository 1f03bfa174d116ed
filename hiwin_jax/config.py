"""Config schemas (ml_collections) and loading with command-line overrides.

A config file in `configs/` defines `get_config() -> ConfigDict`, built from the schema functions
here and a handful of overrides. `load_config("configs/tiny.py", ["--config.model.llm.num_layers=2"])`
or `load_config("tiny", ...)` returns the finished ConfigDict.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def vision_config() -> ConfigDict:
  """CLIP ViT-L/14-336 as the official model uses it (official-spec §2)."""
  return ConfigDict(dict(
      image_size=336, patch_size=14, num_channels=3, hidden_size=1024, num_layers=24,
      num_heads=16, mlp_dim=4096, layer_norm_eps=1e-5, select_layer=-2,
      remat="none",
  ))


def llm_config() -> ConfigDict:
  """Vicuna-7B v1.5 (LLaMA-2 7B geometry), official-spec §6.1."""
  return ConfigDict(dict(
      arch="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
      num_kv_heads=32, head_dim=128, mlp_dim=11008, rms_norm_eps=1e-5, rope_theta=10000.0,
      max_position_embeddings=4096, qkv_bias=False, tie_embeddings=False,
      bos_token_id=1, eos_token_id=2, pad_token_id=0,
      attention="xla",  # "xla" everywhere; "cudnn" = jax.nn.dot_product_attention on GPU
      remat="none",
  ))


def projector_config() -> ConfigDict:
  """VDIM (JBU) + Hiwin projector, official-spec §3-§5. None = derived from the towers:
  embed_dim = LLM width, kv_dim = ViT width, num_heads = embed_dim // 128."""
  return ConfigDict(dict(
      embed_dim=None, kv_dim=None, num_heads=None, grid_size=12,
      feature_scale_mask=7,   # bits 1/2/4 = levels 1x/2x/4x (the 7B config.json says which)
      layout="r1",            # r1: the released 7B token layout; r2: 13B / Qwen2 (branch HEAD)
      jbu_scale=4, conv_impl="xla",
      # "folded": k/v in-projections moved onto the queries (same math, ~12x fewer FLOPs at
      # E=4096); "official": projected per sample, as nn.MultiheadAttention does
      attention="folded",
      # separator embeddings between slices: "\n" and "," of the LLM's vocabulary (LLaMA ids)
      newline_token=13, comma_token=29892,
  ))


def resolved_projector(model: ConfigDict) -> ConfigDict:
  """The projector config with the derived fields filled in from the towers."""
  p = ConfigDict(model.projector.to_dict())
  if p.embed_dim is None:
    p.embed_dim = model.llm.hidden_size
  if p.kv_dim is None:
    p.kv_dim = model.vision.hidden_size
  if p.num_heads is None:
    p.num_heads = p.embed_dim // 128
  if p.embed_dim % p.num_heads:
    raise ValueError(f"projector embed_dim {p.embed_dim} is not divisible by {p.num_heads} heads")
  return p


def precision_config() -> ConfigDict:
  """Parameters in `param_dtype`, compute in `dtype`; `matmul_precision` for fp32 matmuls."""
  return ConfigDict(dict(dtype="float32", param_dtype="float32", matmul_precision="default"))


def default_logical_rules() -> list[tuple[str, tuple[str, ...] | str | None]]:
  """Logical axis -> mesh axes. FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`."""
  return [
      ("batch", ("data", "fsdp")),
      ("layers", None),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("norm", None),
      ("vision_embed", "fsdp"),
      ("vision_mlp", "tensor"),
      ("vision_heads", "tensor"),
      ("vision_patch", None),
      ("vision_pos", None),
  ]


def mesh_config() -> ConfigDict:
  """Mesh axis sizes; one of them may be -1 (all remaining devices)."""
  return ConfigDict(dict(data=1, fsdp=-1, tensor=1, rules=default_logical_rules()))


def data_config() -> ConfigDict:
  """Fields of `cfg.data` for the LLaVA training stages (stage 1: template plain, slicing False,
  max_length 3072; stage 2: vicuna_v1, slicing True, 4096); read by
  `hiwin_jax.data.loader.make_train_iterator`."""
  return ConfigDict({
      "format": "json",            # "json" (LLaVA json + image folder) | "array_record"
      "json": "",                  # LLaVA-format json: [{id, image, conversations}]
      "image_folder": "",          # the json's "image" paths are relative to this folder
      "array_record_dir": "",      # written by `hiwin data build`
      "tokenizer": "",             # folder with tokenizer.model (+ tokenizer_config.json)
      "template": "vicuna_v1",     # plain | vicuna_v1 | qwen_1_5
      "slicing": True,             # False: overview only (official stage 1 `--single True`)
      "max_slice_nums": 7,         # the official training value (spec §1.1; evaluation uses 9)
      "max_length": 4096,          # longer spliced samples are excluded (reason too_long)
      "seq_multiple": 128,         # sequence length bucket granularity
      "global_batch_size": 128,    # samples per optimizer step over all processes
      "grad_accum": 1,             # micro-batches per step (leading axis of every array)
      "seed": 0,
      "shuffle": True,
      "remainder": "pad",          # "pad" (filler samples, labels -100) | "drop"
      "workers": 0,                # grain worker processes; 0 = in the training process
      "prefetch": 2,               # steps prefetched (per worker)
      "cache_dir": "",             # metadata cache; "" = no cache
      "epochs": 1,
  })


def base_config() -> ConfigDict:
  cfg = ConfigDict()
  cfg.name = "base"
  cfg.seed = 0
  cfg.model = ConfigDict(dict(vision=vision_config(), llm=llm_config(),
                              projector=projector_config(), precision=precision_config(),
                              # tokenizer_model_max_length: the spliced sequence is cut here
                              max_length=4096))
  cfg.mesh = mesh_config()
  return cfg


def _load_module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"hiwin_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def resolve_config_path(name: str) -> pathlib.Path:
  """`tiny`, `configs/tiny.py` or any path to a config file."""
  path = pathlib.Path(name)
  if path.suffix != ".py":
    path = CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise FileNotFoundError(f"config {name!r} not found (looked for {path}); known configs: {known}")
  return path


def _parse_value(text: str, current):
  """Parses `text` as a Python literal, keeping the type of the value it replaces."""
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    if current is None:
      return text
    raise ValueError(f"cannot parse override value {text!r} as {type(current).__name__}") from e
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies `--config.a.b=value` (or `a.b=value`) overrides; unknown keys are an error."""
  for item in overrides:
    key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not of the form --config.key=value")
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
      if part not in node:
        raise KeyError(f"override {item!r}: no config key {'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"override {item!r}: no config key {key!r}; keys here: {sorted(node.keys())}")
    node[leaf] = _parse_value(text, node[leaf])
  return cfg


def load_config(name: str, overrides: Sequence[str] = ()) -> ConfigDict:
  cfg = _load_module(resolve_config_path(name)).get_config()
  return apply_overrides(cfg, overrides)
