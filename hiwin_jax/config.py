"""Every config schema (ml_collections), and loading a config file with command-line overrides.

A file in `configs/` defines `get_config() -> ConfigDict` from the schemas here: a model config
(`tiny`, `vicuna7b`, ...) is `base_config()` with the model's geometry; a stage config
(`vdim_stage0`, `stage1_pretrain`, `stage2_sft`, ...) is a complete recipe of one training run.
Every config has the same top-level shape:

  name, seed
  model        vision, llm, projector, precision, max_length          `model_config`
  mesh         data, fsdp, tensor, rules                              `mesh_config`
and a stage config (`hiwin train`) adds
  data         stage 0: `vdim_data_config`; stages 1/2: `data_config`
  train        stage, num_steps, log_every, optimizer and the stage's own fields:
               stage 0: `vdim_train_config`; stages 1/2: `train_config`
  checkpoint   `checkpoint_config`
  init         stage 0: `vdim_init_config`; stages 1/2: `init_config`
  export       `export_config`

`load_config("tiny", ["--config.model.llm.num_layers=2"])` (a name in configs/ or a path) runs
`get_config()`, applies the overrides, then `resolve_model` fills the projector's derived fields
once; nothing downstream derives them again.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Mapping, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


# --- the model --------------------------------------------------------------------------------

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
  """VDIM (JBU) + Hiwin projector, official-spec §3-§5. None = derived from the towers by
  `resolve_model`: embed_dim = LLM width, kv_dim = ViT width, num_heads = embed_dim // 128."""
  return ConfigDict(dict(
      embed_dim=None, kv_dim=None, num_heads=None, grid_size=12,
      feature_scale_mask=7,   # bits 1/2/4 = levels 1x/2x/4x (the 7B config.json says which)
      layout="r1",            # r1: the released 7B token layout; r2: 13B / Qwen2 (branch HEAD)
      jbu_scale=4,
      conv_impl="xla",        # the Pallas kernels are not partitioned over a sharded batch
      # True: reproduce the official CUDA grad_filters bug (official-spec §3.4: only taps 0, 1, 4,
      # 9, 16, 25, 36 of the adaptive-conv filters get gradient), for bit-faithful replays of
      # the official runs.
      jbu_official_grad_bug=False,
      # "folded": k/v in-projections moved onto the queries (same math, ~12x fewer FLOPs at
      # E=4096); "official": projected per sample, as nn.MultiheadAttention does
      attention="folded",
      # separator embeddings between slices: "\n" and "," of the LLM's vocabulary (LLaMA ids)
      newline_token=13, comma_token=29892,
  ))


def precision_config() -> ConfigDict:
  """Parameters in `param_dtype`, compute in `dtype`; `matmul_precision` for fp32 matmuls."""
  return ConfigDict(dict(dtype="float32", param_dtype="float32", matmul_precision="default"))


def model_config() -> ConfigDict:
  """The whole model (`LlavaUHD`): the released CLIP-L/14-336 + Vicuna-7B geometry."""
  return ConfigDict(dict(vision=vision_config(), llm=llm_config(),
                         projector=projector_config(), precision=precision_config(),
                         # tokenizer_model_max_length: the spliced sequence is cut here
                         max_length=4096))


def resolve_model(model: ConfigDict) -> ConfigDict:
  """Fills the projector's derived fields of `model` in place (those still None) and checks
  them; returns `model`. `load_config` calls it once; a model config read from a file (a
  checkpoint's sidecar, an official config.json) goes through it when it is read."""
  p = model.projector
  if p.embed_dim is None:
    p.embed_dim = model.llm.hidden_size
  if p.kv_dim is None:
    p.kv_dim = model.vision.hidden_size
  if p.num_heads is None:
    p.num_heads = p.embed_dim // 128
  if p.num_heads < 1 or p.embed_dim % p.num_heads:
    raise ValueError(f"model.projector: embed_dim {p.embed_dim} does not split into "
                     f"num_heads {p.num_heads} heads (set model.projector.num_heads)")
  return model


def model_from_dict(saved: Mapping) -> ConfigDict:
  """A model config saved as a dict (a checkpoint's `hiwin_config.json`) over today's schema,
  so fields added since it was written take their defaults; resolved."""
  model = model_config()
  model.update(saved)
  return resolve_model(model)


# --- the mesh ---------------------------------------------------------------------------------

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


def base_config() -> ConfigDict:
  """What every config starts from: a name, a seed, the model and the mesh."""
  cfg = ConfigDict()
  cfg.name = "base"
  cfg.seed = 0
  cfg.model = model_config()
  cfg.mesh = mesh_config()
  return cfg


# --- data -------------------------------------------------------------------------------------

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


def vdim_data_config() -> ConfigDict:
  """`cfg.data` of stage 0: the images the VDIM pre-trains on (official-spec §3.7)."""
  return ConfigDict(dict(
      source="",               # folder of images (recursive) or "skimage" (bundled photos)
      image_size=336,          # multiple of the patch size; the downsamplers map back to /14
      global_batch_size=16,    # sharded over the mesh's data axes
      workers=8,               # decoding threads
  ))


# --- training ---------------------------------------------------------------------------------

def adamw_config() -> ConfigDict:
  """AdamW after global-norm clipping with linear warm-up and cosine decay: HF Trainer's
  `adamw_torch` defaults as LLaVA's scripts use them (official-spec §7).

  `projector_lr` / `vision_lr`: peak learning rates of the projector (`projector/*` and the
  JBU, `jbu/*`) and of the ViT (`vision/*`), LLaVA's `mm_projector_lr` and
  `mm_vision_tower_lr`; 0 = `lr` (the official LLaVA-UHD v2 recipe: one rate). They follow
  `lr`'s schedule."""
  return ConfigDict(dict(
      name="adamw", lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, b1=0.9,
      b2=0.999, eps=1e-8, grad_clip=1.0, projector_lr=0.0, vision_lr=0.0))


def nadam_config() -> ConfigDict:
  """`torch.optim.NAdam` (its defaults) after Lightning's gradient-norm clip to `clip_norm` in
  the first `clip_steps` steps, constant learning rate: the VDIM pre-training's optimizer."""
  return ConfigDict(dict(
      name="nadam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, momentum_decay=4e-3,
      clip_norm=1e-4, clip_steps=10))


def train_config() -> ConfigDict:
  """`cfg.train` of stages 1 and 2. `trainable` / `frozen`: regular expressions fully matched
  against "/"-joined parameter paths (`projector/pos_embed`); frozen wins."""
  return ConfigDict(dict(
      stage="sft",         # "pretrain" (stage 1) or "sft" (stage 2)
      trainable=[],
      frozen=[],
      optimizer=adamw_config(),
      num_steps=-1,        # -1: data.epochs over the dataset
      jbu_dropout=True,    # the official JBU's Dropout2d is active in both stages (frozen or not)
      peak_tflops=0.0,     # per device, for MFU; 0 = from the device kind (unknown on CPU)
      log_every=10,
  ))


def vdim_loss_config() -> ConfigDict:
  """The multi-view reconstruction loss of the official VDIM pre-training (official-spec §3.7):
  jitters per step, their reflect padding (px) and zoom, the random projection's width, the
  sampled CRF term's weight and sample count."""
  return ConfigDict(dict(n_jitters=2, max_pad=30, max_zoom=2.0, projection_dim=30,
                         crf_weight=0.001, crf_samples=1000))


def vdim_train_config() -> ConfigDict:
  """`cfg.train` of stage 0."""
  return ConfigDict(dict(
      stage="vdim",
      optimizer=nadam_config(),
      num_steps=-1,        # -1: one epoch, ceil(#images / global_batch_size) steps
      log_every=10,
      vdim_loss=vdim_loss_config(),
  ))


def checkpoint_config() -> ConfigDict:
  """Run checkpoints every `every` steps (and at the end and on SIGTERM), the last `keep` kept;
  `resume`: continue from the latest one (False: refuse a folder that has checkpoints)."""
  return ConfigDict(dict(every=500, keep=3, async_save=True, resume=True))


def init_config() -> ConfigDict:
  """Where the weights of stages 1/2 come from before training (applied in this order, later
  wins): `checkpoint`: a hiwin parameter checkpoint (e.g. stage 1's `final/`, or a converted
  official model); `vdim`: stage 0's output folder or an official VDIM `.ckpt` (the JBU; the
  official recipe reloads it in both stages)."""
  return ConfigDict(dict(checkpoint="", vdim=""))


def vdim_init_config() -> ConfigDict:
  """Stage 0's frozen featurizer: `vision`, an HF CLIP folder (openai/clip-vit-large-patch14-336
  for the real run); "" = random initialisation (warned)."""
  return ConfigDict(dict(vision=""))


def export_config() -> ConfigDict:
  """What a finished run writes besides `final/` (the hiwin checkpoint): with `official`, the
  official PyTorch layout (stages 1/2: the LLaVA-UHD folder; stage 0: the VDIM `.ckpt`) in
  `dtype`."""
  return ConfigDict(dict(official=False, dtype="bfloat16"))


# --- loading ----------------------------------------------------------------------------------

def resolve_config_path(name: str) -> pathlib.Path:
  """`tiny`, `configs/tiny.py` or any path to a config file."""
  path = pathlib.Path(name)
  if path.suffix != ".py":
    path = CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    raise FileNotFoundError(f"config {name!r} not found (looked for {path}); known configs: "
                            f"{known_configs()}")
  return path


def known_configs() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def from_file(name: str) -> ConfigDict:
  """What the config file's `get_config()` returns: no overrides, nothing resolved. A recipe
  builds on another config with it (the model of `vicuna7b`, the stage of `stage1_pretrain`)."""
  path = resolve_config_path(name)
  spec = importlib.util.spec_from_file_location(f"hiwin_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
  """Applies `--config.a.b=value` (or `a.b=value`) overrides; unknown keys are an error.
  Derived fields are not updated: override before `load_config` resolves them."""
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
  """The finished config: `get_config()` of the file, the overrides, the derived fields."""
  cfg = apply_overrides(from_file(name), overrides)
  if "model" in cfg:
    resolve_model(cfg.model)
  return cfg
